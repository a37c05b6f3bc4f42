"""The post-mortem: what the failed call's frames held, kept as words before the frames are freed.

The OOMs are raised where CUDA would raise them (inside the function that allocates), with a real message;
the tensors are real CPU tensors.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from IPython.utils.capture import capture_output

from tests.conftest import CAPPED_LOAD_OOM
from vram_magic.render._postmortem import NO_POST_MORTEM

CELL = """%%oomsafe
out = forward(hidden)
"""

SETUP = """
import torch

class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, 64)

    def forward(self, states):
        weight = self.proj.weight  # a Parameter: the model's, not the failed call's
        normed = states
        attn_weights = torch.ones(2, 4, 64, 64)
        past = [torch.ones(1024), torch.ones(2048)]
        raise torch.OutOfMemoryError(MESSAGE)

layer = Attention()

def forward(states):
    scaled = states * 2
    return layer(scaled)

hidden = torch.ones(8, 64)
"""


def _run_failing_cell(ip: Any) -> str:
    ip.user_ns["MESSAGE"] = CAPPED_LOAD_OOM
    ip.run_cell(SETUP)
    with capture_output() as shown:
        ip.run_cell(CELL, store_history=True)
    return str(shown.outputs[0].data["text/plain"])


def test_debug_names_each_frame_and_what_its_tensors_were(ip: Any) -> None:
    _run_failing_cell(ip)
    with capture_output() as debug:
        ip.run_line_magic("vram", "debug")
    text = debug.stdout
    lines = [line.strip() for line in text.splitlines()]
    # From the cell down to where the allocation failed, each with its line of code.
    assert lines[1].startswith("cell [") and lines[1].endswith("], line 2: out = forward(hidden)")
    called = [line.split("): ", 1)[0] + ")" for line in lines[2:] if line.startswith("forward (Cell In[")]
    assert len(called) == 2 and called[0].endswith(":19)") and called[1].endswith(":13)")  # the defs' lines
    assert lines[-2:] == [  # the deepest frame comes last
        "states        float32 [8, 64] on cpu, 2.00 KiB",
        "normed        the same tensor as `states`",
    ]
    # What torch's Module.__call__ passes on through *args/**kwargs, the frame it calls names.
    assert not any(line.startswith(("args ", "kwargs ")) for line in lines)
    assert "attn_weights  float32 [2, 4, 64, 64] on cpu, 128.00 KiB" in lines
    assert "past          list of 2 tensors, 12.00 KiB" in lines
    assert "scaled  float32 [8, 64] on cpu, 2.00 KiB" in lines
    assert "states  float32 [8, 64] on cpu, 2.00 KiB (the notebook's `hidden`)" in lines
    assert not any(line.startswith("weight ") for line in lines)  # the model's Parameter is left out
    assert not any(line.startswith("self ") for line in lines)  # a module is not a tensor


def test_the_report_names_the_failed_calls_own_tensors(ip: Any) -> None:
    text = _run_failing_cell(ip)
    assert "What the failed call held (freed now; `%vram debug` shows every frame)" in text
    assert "`attn_weights` in forward (" in text and "float32 [2, 4, 64, 64] on cpu, 128.00 KiB" in text
    held = text.split("What the failed call held", 1)[1].split("\n\n", 1)[0]
    assert "`states`" not in held  # it is the notebook's `hidden`, which is not freed


def test_the_post_mortem_keeps_no_tensor_and_the_memory_is_reclaimed(ip: Any) -> None:
    ip.user_ns["MESSAGE"] = CAPPED_LOAD_OOM
    ip.run_cell("import torch, weakref\nwatched = []")
    ip.run_cell(
        "def allocate():\n"
        "    big = torch.ones(64 * 2**20, dtype=torch.uint8)\n"
        "    watched.append(weakref.ref(big))\n"
        "    raise torch.OutOfMemoryError(MESSAGE)\n"
    )
    with capture_output():
        ip.run_cell("%%oomsafe\nallocate()", store_history=True)
    (ref,) = ip.user_ns["watched"]
    assert ref() is None  # freed as before: the post-mortem did not keep it
    magics = ip.magics_manager.registry["VramMagics"]
    post_mortem = magics.session.last_post_mortem
    (frame,) = [f for f in post_mortem.frames if f.function == "allocate"]
    assert [(local.name, local.shape, local.nbytes) for local in frame.locals] == [
        ("big", (64 * 2**20,), 2**26)
    ]
    assert _only_plain_values(post_mortem)


def _only_plain_values(value: object) -> bool:
    """Every field, all the way down, is a str, int, float, bool, None or a tuple of them."""
    if dataclasses.is_dataclass(value):
        return all(_only_plain_values(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, tuple):
        return all(_only_plain_values(item) for item in value)
    return value is None or isinstance(value, str | int | float | bool)


def test_debug_before_any_oom_says_when_there_will_be_one(ip: Any) -> None:
    ip.magics_manager.registry["VramMagics"].session.last_post_mortem = None
    with capture_output() as debug:
        ip.run_line_magic("vram", "debug")
    assert debug.stdout.strip() == NO_POST_MORTEM


LIBRARY = """
import torch

def deep(message):
    activations = torch.ones(256, 1024)
    raise torch.OutOfMemoryError(message)

def generate(message):
    try:
        deep(message)
    except torch.OutOfMemoryError as error:
        raise RuntimeError("generation failed") from error
"""


def test_frames_below_a_library_that_raised_from_the_oom_are_kept(
    ip: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    (tmp_path / "generating_library.py").write_text(LIBRARY)  # a name no other test imports
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "generating_library", raising=False)
    ip.user_ns["MESSAGE"] = CAPPED_LOAD_OOM
    ip.run_cell("import generating_library")
    with capture_output():
        result = ip.run_cell("%%oomsafe\ngenerating_library.generate(MESSAGE)", store_history=True)
    assert type(result.error_in_exec).__name__ == "OutOfMemoryHandled"  # rescued as the OOM it came from
    with capture_output() as debug:
        ip.run_line_magic("vram", "debug")
    lines = [line.strip() for line in debug.stdout.splitlines()]
    assert any(line.startswith("deep (generating_library.py:") for line in lines)
    assert "activations  float32 [256, 1024] on cpu, 1.00 MiB" in lines
