"""%%oomsafe --record: the live allocations at the failure, grouped by the line of the cell that made them.

No snapshot recorded on a GPU is at hand here, so the snapshots below are built by hand in the format
``torch.cuda.memory._snapshot()`` documents (segments of blocks, each with size, state and frames, innermost
frame first). The real recording runs in tests/gpu/test_timeline_gpu.py.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest
from IPython.utils.capture import capture_output

from tests.conftest import CAPPED_LOAD_OOM
from vram_magic import _history
from vram_magic._history import group_by_line

GiB = 2**30
CELL_FILE = "/tmp/ipykernel_4242/1234567.py"  # how ipykernel names a cell's code
SITE = os.path.dirname(os.__file__) + "/site-packages"  # a library path, as torch and transformers live
CELL = """for step, batch in enumerate(loader):
    logits = model(**batch)
    loss = loss_fn(logits, batch["labels"])
"""


def _block(size: int, frames: list[tuple[str, int, str]], state: str = "active_allocated") -> dict[str, Any]:
    return {
        "address": 0,
        "size": size,
        "requested_size": size,
        "state": state,
        "frames": [{"filename": f, "line": line, "name": name} for f, line, name in frames],
    }


def _snapshot(blocks: list[dict[str, Any]], device: int = 0) -> dict[str, Any]:
    return {
        "segments": [
            {
                "device": device,
                "address": 0,
                "total_size": sum(b["size"] for b in blocks),
                "stream": 0,
                "segment_type": "large",
                "allocated_size": 0,
                "active_size": 0,
                "blocks": blocks,
            }
        ],
        "device_traces": [[]],
    }


LINEAR = (f"{SITE}/torch/nn/modules/linear.py", 125, "forward")
MODEL = (f"{SITE}/transformers/models/llama/modeling_llama.py", 300, "forward")
CROSS_ENTROPY = (f"{SITE}/torch/nn/functional.py", 3000, "cross_entropy")


def test_allocations_are_grouped_by_the_cells_line_biggest_first() -> None:
    snapshot = _snapshot(
        [
            _block(2 * GiB, [LINEAR, MODEL, (CELL_FILE, 3, "<module>")]),
            _block(2 * GiB, [LINEAR, MODEL, (CELL_FILE, 3, "<module>")]),
            _block(2 * GiB, [MODEL, (CELL_FILE, 3, "<module>")]),
            _block(
                1 * GiB,
                [(f"{SITE}/torch/nn/functional.py", 3000, "cross_entropy"), (CELL_FILE, 4, "<module>")],
            ),
            _block(
                8 * GiB, [LINEAR, MODEL, (CELL_FILE, 3, "<module>")], state="inactive"
            ),  # cached, not live
            _block(3 * GiB, []),  # allocated before recording started
        ]
    )
    groups = group_by_line(snapshot, CELL_FILE, CELL)
    assert [(g.where, g.code, g.nbytes, g.count) for g in groups] == [
        ("line 3", "logits = model(**batch)", 6 * GiB, 3),
        ("no stack recorded (made before recording started)", "", 3 * GiB, 1),
        ("line 4", 'loss = loss_fn(logits, batch["labels"])', 1 * GiB, 1),
    ]


def test_outside_the_cell_the_users_own_function_is_named_not_the_library() -> None:
    train_py = "/home/me/project/train.py"
    snapshot = _snapshot(
        [
            _block(4 * GiB, [LINEAR, MODEL, (train_py, 42, "train_step"), (train_py, 80, "main")]),
            _block(1 * GiB, [LINEAR, MODEL]),
        ]
    )
    groups = group_by_line(snapshot, CELL_FILE, CELL)
    assert [(g.where, g.nbytes) for g in groups] == [
        ("train_step (train.py:42)", 4 * GiB),
        ("forward (library code)", 1 * GiB),
    ]


def test_only_the_failing_gpu_is_counted() -> None:
    snapshot = _snapshot([_block(GiB, [(CELL_FILE, 2, "<module>")])], device=1)
    assert group_by_line(snapshot, CELL_FILE, CELL, device=0) == ()
    assert group_by_line(snapshot, CELL_FILE, CELL, device=1)[0].where == "line 2"


def test_record_without_a_gpu_says_so_in_one_line_and_runs_the_cell(ip: Any) -> None:
    with capture_output() as shown:
        ip.run_cell("%%oomsafe --record\nanswer = 6 * 7")
    assert ip.user_ns["answer"] == 42
    assert shown.stdout.strip().splitlines() == [
        "--record needs a CUDA GPU (none is visible); the cell runs without recording."
    ]


class FakeRecorder:
    """Stands for PyTorch's recorder on a GPU machine (start and stop); the snapshot is the test's."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def start(self, max_entries: int = _history.MAX_ENTRIES) -> None:
        self.calls.append("start")

    def stop(self) -> None:
        self.calls.append("stop")


def test_on_an_oom_the_report_says_which_lines_made_what_and_the_snapshot_is_saved(
    ip: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    magics = ip.magics_manager.registry["VramMagics"]
    compile_cache = ip.compile.cache

    def cache(code: str, number: int = 0, raw_code: str | None = None) -> str:  # remember the cell's file
        name = compile_cache(code, number, raw_code)
        seen.append(name)
        return name

    seen: list[str] = []
    monkeypatch.setattr(ip.compile, "cache", cache)
    ip.user_ns["MESSAGE"] = CAPPED_LOAD_OOM
    ip.run_cell("import torch")
    recorder = FakeRecorder()
    for name in ("start", "stop"):
        monkeypatch.setattr(_history, name, getattr(recorder, name))
    monkeypatch.chdir(tmp_path)

    def snapshot_of_the_cell() -> dict[str, Any]:  # built once the cell's file name is known
        recorder.calls.append("take")
        return _snapshot([_block(3 * GiB, [MODEL, (seen[-1], 3, "<module>")])])

    monkeypatch.setattr(_history, "take", snapshot_of_the_cell)
    with capture_output() as shown:
        ip.run_cell(
            "%%oomsafe --record\nx = 1\nlogits = torch.ones(4) # stands for model(**batch)\n"
            "raise torch.OutOfMemoryError(MESSAGE)",
            store_history=True,
        )
    text = shown.outputs[0].data["text/plain"]
    assert "Live allocations when it failed, by the line that made them (--record)" in text
    # Lines count the %%oomsafe line as line 1, as "Failed at line N" does.
    flat = " ".join(text.split())  # as read, whatever the wrapping
    assert "line 3 `logits = torch.ones(4) # stands for model(**batch)`: 3.00 GiB in 1 allocation" in flat
    number = ip.execution_count - 1
    saved = tmp_path / f"vram-oom-cell{number}.pickle"
    assert f"Allocation history saved: {saved} (open it at https://pytorch.org/memory_viz)" in flat
    assert pickle.loads(saved.read_bytes())["segments"][0]["blocks"][0]["size"] == 3 * GiB
    assert recorder.calls == ["start", "take", "stop"]
    assert magics.session._recording is False


def test_a_snapshot_it_cannot_read_leaves_the_rescue_whole(
    ip: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = FakeRecorder()
    for name in ("start", "stop"):
        monkeypatch.setattr(_history, name, getattr(recorder, name))
    monkeypatch.setattr(_history, "take", lambda: {"segments": [{"blocks": 42}]})  # not torch's format
    monkeypatch.chdir(tmp_path)
    ip.user_ns["MESSAGE"] = CAPPED_LOAD_OOM
    ip.run_cell("import torch")
    with capture_output() as shown:
        result = ip.run_cell("%%oomsafe --record\nraise torch.OutOfMemoryError(MESSAGE)")
    assert type(result.error_in_exec).__name__ == "OutOfMemoryHandled"  # the report, as without --record
    text = " ".join(shown.outputs[0].data["text/plain"].split())
    assert "The allocation history is not saved: its allocations could not be read" in text
    assert recorder.calls == ["start", "stop"]
