"""The magics as a user meets them, through a real IPython shell."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from tests.conftest import CAPPED_LOAD_OOM
from vram_magic import OutOfMemoryHandled, Report, Snapshot

MiB = 2**20

# A cell function whose frame holds a 64 MiB tensor when a real-format CUDA OOM is raised from it,
# as transformers' caching_allocator_warmup does on a GPU that is too small.
FAILING_LOAD_TEMPLATE = """
import torch, weakref
PINNED = []
def load_model():
    weights = torch.ones(64 * 2**20 // 4)
    PINNED.append(weakref.ref(weights))
    raise torch.OutOfMemoryError({message!r})
"""
FAILING_LOAD = FAILING_LOAD_TEMPLATE.format(message=CAPPED_LOAD_OOM)
# torch 1.x wording: 2 GiB asked with 1.5 GiB free on an 11 GiB GPU, so freeing 0.5 GiB would do.
SHORTFALL_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 11.17 GiB total capacity; 8.00 GiB already "
    "allocated; 1.50 GiB free; 8.50 GiB reserved in total by PyTorch)"
)


def _run(ip: Any, cell: str) -> tuple[Any, Any]:
    with capture_output() as captured:
        result = ip.run_cell(cell)
    return result, captured


def _tracebacks(ip: Any, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    shown: list[list[str]] = []
    monkeypatch.setattr(ip, "_showtraceback", lambda etype, evalue, stb: shown.append(stb))
    return shown


def test_a_cell_that_does_not_oom_runs_as_without_the_magic(ip: Any) -> None:
    result, captured = _run(ip, "%%oomsafe\nvalue = 40\n%time doubled = value * 2\nvalue + 2\n")
    assert result.success
    assert result.result == 42
    assert ip.user_ns["doubled"] == 80  # the line magic inside the cell ran
    assert "Wall time" in captured.stdout


def test_a_trailing_semicolon_hides_the_value(ip: Any) -> None:
    result, _ = _run(ip, "%%oomsafe\n1 + 1;\n")
    assert result.success and result.result is None


def test_a_non_oom_error_is_shown_exactly_as_without_the_magic(
    ip: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown = _tracebacks(ip, monkeypatch)
    ip.run_cell("def divide():\n    return 1 / 0\n")
    plain = ip.run_cell("# %%oomsafe\ndivide()\n")  # the first line as the traceback shows it
    ours = ip.run_cell("%%oomsafe\ndivide()\n")
    assert isinstance(plain.error_in_exec, ZeroDivisionError)
    assert isinstance(ours.error_in_exec, ZeroDivisionError)  # the user's own exception, not a wrapper
    without_us, with_us = ("\n".join(stb) for stb in shown)
    assert "run_cell_magic" not in with_us and "oomsafe" not in with_us.replace("%%oomsafe", "")
    assert with_us == without_us


def test_an_exception_raised_again_in_a_later_cell_shows_that_raise(
    ip: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown = _tracebacks(ip, monkeypatch)
    ip.run_cell("STORED = ValueError('stored')\n")
    ip.run_cell("%%oomsafe\nraise STORED\n")
    ip.run_line_magic("tb", "")  # the same raise, shown again: still from the user's frame
    assert "\n".join(shown[-1]) == "\n".join(shown[-2]) and "run_cell_magic" not in "".join(shown[-1])
    ip.run_cell("a = 1\nb = 2\nraise STORED  # again\n")
    again = "\n".join(shown[-1])
    assert "raise STORED  # again" in again and "line 3" in again


@pytest.mark.parametrize("mode", ["Verbose", "Context"])
def test_functions_defined_in_the_cell_keep_their_traceback_details(
    ip: Any, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    cell = (
        "class Model:\n"
        "    def step(self, a, b):\n"
        "        c = a + 1\n"
        "        return c / b\n"
        "value = Model().step(\n"
        "    1,\n"
        "    0,\n"
        ")\n"
    )
    ip.run_line_magic("xmode", mode)
    try:
        shown = _tracebacks(ip, monkeypatch)
        ip.run_cell(f"# %%oomsafe\n{cell}")
        ip.run_cell(f"%%oomsafe\n{cell}")
    finally:
        ip.run_line_magic("xmode", "Context")
    without_us, with_us = ("\n".join(stb) for stb in shown)
    assert "Model.step" in with_us and "    0,\n" in with_us  # qualified name; the whole statement
    if mode == "Verbose":
        assert "c = 2" in with_us and "b = 0" in with_us  # the values of the failing line's variables
    assert with_us == without_us


@pytest.mark.parametrize(
    "body",
    ["x = 1\nx = (\n", "if True:\nx = 1\n", "return 5\n", "print('a' 'b' c)\n"],
    ids=["incomplete", "indentation", "return-outside-function", "invalid-syntax"],
)
def test_a_syntax_error_is_shown_exactly_as_without_the_magic(
    ip: Any, monkeypatch: pytest.MonkeyPatch, body: str
) -> None:
    shown = _tracebacks(ip, monkeypatch)
    plain = ip.run_cell(body)
    ours = ip.run_cell(f"%%oomsafe\n{body}")
    assert isinstance(plain.error_before_exec, SyntaxError)
    assert isinstance(ours.error_in_exec.__cause__, type(plain.error_before_exec))
    without_us, with_us = ("\n".join(stb) for stb in shown)
    assert "oomsafe" not in with_us and "Traceback" not in with_us
    # The same lines, one line further down: the %%oomsafe line is line 1 of the cell.
    line = re.compile(r"line (\d+)")
    assert line.sub(lambda m: f"line {int(m.group(1)) - 1}", with_us) == without_us


def test_top_level_await_is_a_one_line_usage_error(ip: Any) -> None:
    result, captured = _run(ip, "%%oomsafe\nimport asyncio\nawait asyncio.sleep(0)\n")
    assert isinstance(result.error_in_exec, UsageError)
    assert "cannot run top-level `await`: run this cell without %%oomsafe" in str(result.error_in_exec)
    assert "Traceback" not in captured.stdout + captured.stderr


@pytest.mark.parametrize(
    ("fallback", "error"),
    [("None.chunked()", AttributeError), ("json.loads('{not json')", ValueError)],
    ids=["in-the-cell", "in-a-library-the-fallback-calls"],
)
def test_a_bug_in_the_users_own_oom_fallback_is_shown_as_that_bug(
    ip: Any, monkeypatch: pytest.MonkeyPatch, fallback: str, error: type[Exception]
) -> None:
    shown = _tracebacks(ip, monkeypatch)
    ip.run_cell(
        f"import json, torch\ndef generate():\n    raise torch.OutOfMemoryError({CAPPED_LOAD_OOM!r})\n"
    )
    cell = f"try:\n    out = generate()\nexcept torch.OutOfMemoryError:\n    out = {fallback}\n"
    plain = ip.run_cell(cell)
    ours, captured = _run(ip, f"%%oomsafe\n{cell}")
    assert isinstance(plain.error_in_exec, error)
    assert isinstance(ours.error_in_exec, error)  # not OutOfMemoryHandled
    assert "OutOfMemoryHandled" not in captured.stdout
    assert shown[-1][-1] == shown[-2][-1]  # the same error line as without the magic


def test_a_library_that_turns_an_oom_into_another_error_is_still_rescued(
    ip: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "some_library.py").write_text(
        "import torch\n"
        "def load():\n"
        "    try:\n"
        f"        raise torch.OutOfMemoryError({CAPPED_LOAD_OOM!r})\n"
        "    except torch.OutOfMemoryError:\n"
        "        raise RuntimeError('The model is too big for this GPU.')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result, _ = _run(ip, "%%oomsafe\nimport some_library\nmodel = some_library.load()\n")
    assert isinstance(result.error_in_exec, OutOfMemoryHandled)
    report = _last_report(ip)
    assert report.oom is not None and report.oom.requested_bytes == round(1.59 * 2**30)


def test_debugging_a_failed_cell_skips_the_magics_frames(ip: Any) -> None:
    from IPython.core.debugger import Pdb

    ip.run_cell("def divide():\n    return 1 / 0\n")
    ip.run_cell("%%oomsafe\ndivide()\n")
    debugger = Pdb()
    debugger.setup(None, sys.last_traceback)  # as %debug does: the stack, and the frame it starts at
    stack = debugger.stack
    hidden = debugger.hidden_frames(stack)
    shown = [frame.f_code.co_name for (frame, _), hide in zip(stack, hidden, strict=True) if not hide]
    assert "divide" in shown
    # vram_magic's own frames are hidden; IPython's run_cell_magic stays, as for any cell magic (%%time)
    assert not {"oomsafe", "_run"} & set(shown), shown


@pytest.mark.parametrize(
    ("interactivity", "cell"),
    [
        ("all", "1 + 1\nx = 3\n2 + 2\n"),
        ("last", "y = 1\nfor i in range(2):\n    i * 10\n"),
        ("last_expr_or_assign", "yy = 5\n"),
        ("last_expr_or_assign", "yy = 5\nyy += 1\n"),
        ("none", "7 * 6\n"),
        ("all", "1;\n2;\n"),  # a trailing ";" hides every value
    ],
)
def test_the_shells_ast_node_interactivity_is_followed(
    ip: Any, monkeypatch: pytest.MonkeyPatch, interactivity: str, cell: str
) -> None:
    monkeypatch.setattr(ip, "ast_node_interactivity", interactivity)
    with capture_output() as without_us:  # stored as a notebook stores cells: ";" is read from the history
        plain = ip.run_cell(cell, store_history=True)
    with capture_output() as with_us:
        ours = ip.run_cell(f"%%oomsafe\n{cell}", store_history=True)
    assert plain.success and ours.success
    numbered = re.compile(r"Out\[\d+\]")
    assert numbered.sub("Out", with_us.stdout) == numbered.sub("Out", without_us.stdout)


def test_a_silent_run_shows_no_values(ip: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ip, "ast_node_interactivity", "all")
    with capture_output() as captured:
        result = ip.run_cell("%%oomsafe\n1 + 1\n2 + 2\n", silent=True)
    assert result.success and captured.stdout == ""


def test_a_syntax_error_raised_while_the_cell_runs_shows_no_frame_of_the_magic(
    ip: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown = _tracebacks(ip, monkeypatch)
    ours = ip.run_cell("%%oomsafe\nx = 1\neval('1 +')\n")
    assert isinstance(ours.error_in_exec.__cause__, SyntaxError)
    text = "\n".join(shown[-1])
    assert "oomsafe" not in text.replace("# %%oomsafe", "") and "run_cell_magic" not in text
    assert "eval('1 +')" in text and "SyntaxError" in text


def test_a_compile_error_comes_after_the_statements_before_it_ran(ip: Any) -> None:
    line = re.compile(r"line (\d+)")  # one line further down: the %%oomsafe line is line 1 of the cell
    for cell in ("print('before')\nbreak\n", "import os\nfrom __future__ import annotations\nz = 1\n"):
        plain, without_us = _run(ip, cell)
        ours, with_us = _run(ip, f"%%oomsafe\n{cell}")
        assert plain.success == ours.success, cell
        assert line.sub(lambda m: f"line {int(m.group(1)) - 1}", with_us.stdout) == without_us.stdout
    assert with_us.stdout == "" and ip.user_ns["z"] == 1


def test_a_cell_that_only_mentions_await_runs(ip: Any) -> None:
    result, _ = _run(ip, "%%oomsafe\nnote = 'await the results'\nasync def later():\n    await later()\n")
    assert result.success and ip.user_ns["note"] == "await the results"
    lazy = "async def agen():\n    yield 1\nstream = (i async for i in agen())\n"  # needs no event loop
    result, _ = _run(ip, f"%%oomsafe\n{lazy}")
    assert result.success and ip.user_ns["stream"] is not None


@pytest.mark.parametrize(
    "cell",
    [
        "import asyncio\nawait asyncio.sleep(0)\n",
        "import asyncio\nawait asyncio.sleep(0)\nbreak\n",  # a compile error elsewhere: still the usage line
        "async with lock:\n    pass\n",
        "items = [i async for i in stream]\n",
    ],
    ids=["await", "await-and-break", "async-with", "async-comprehension"],
)
def test_every_top_level_await_is_a_one_line_usage_error_and_nothing_runs(ip: Any, cell: str) -> None:
    ip.user_ns.pop("asyncio", None)
    result, _ = _run(ip, f"%%oomsafe\n{cell}")
    assert isinstance(result.error_in_exec, UsageError)
    assert "asyncio" not in ip.user_ns  # nothing ran


def test_keyboard_interrupt_passes_through(ip: Any) -> None:
    result, _ = _run(ip, "%%oomsafe\nraise KeyboardInterrupt\n")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)


def test_plain_ipython_keeps_the_failed_cells_memory_alive(ip: Any) -> None:
    """The baseline the magic exists for: without it, the failed cell's traceback keeps its memory."""
    ip.run_cell(FAILING_LOAD)
    _run(ip, "load_model()\n")
    assert ip.user_ns["PINNED"][0]() is not None


def test_oomsafe_frees_what_the_failed_cell_pinned(ip: Any) -> None:
    ip.run_cell(FAILING_LOAD)
    result, captured = _run(ip, "%%oomsafe\nkept = 'still here'\nmodel = load_model()\n")
    assert ip.user_ns["PINNED"][0]() is None, "the 64 MiB tensor in the failed frame must be freed"
    assert isinstance(result.error_in_exec, OutOfMemoryHandled)
    assert ip.user_ns["kept"] == "still here"
    report = _last_report(ip)
    assert report.cleanup.freed_tensor_bytes == 64 * MiB
    assert report.analysis.failed_line == 3
    assert report.analysis.failed_statement == "model = load_model()"
    assert report.oom is not None and report.oom.allowed_bytes == round(1.5 * 2**30)
    text = captured.stdout + "".join(str(o.data.get("text/plain", "")) for o in captured.outputs)
    assert "1.59 GiB" in text and "1.50 GiB" in text and "64.00 MiB" in text


def test_the_oom_ends_the_cell_with_one_short_line_holding_no_user_frame(
    ip: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown = _tracebacks(ip, monkeypatch)
    ip.run_cell(FAILING_LOAD)
    ip.run_cell("%%oomsafe\nload_model()\n")
    assert len(shown) == 1 and len(shown[0]) == 1
    assert shown[0][0].startswith("OutOfMemoryHandled: ")
    tb = sys.last_traceback
    while tb is not None:
        assert tb.tb_frame.f_code.co_name != "load_model"
        tb = tb.tb_next


def test_the_report_names_the_earlier_variable_that_holds_memory(ip: Any) -> None:
    ip.run_cell(FAILING_LOAD_TEMPLATE.format(message=SHORTFALL_OOM))
    ip.run_cell("old_model = torch.nn.Linear(4096, 4096)\n")  # 64 MiB from an earlier cell
    _run(ip, "%%oomsafe\nmodel = load_model()\n")
    report = _last_report(ip)
    assert report.holders[0].name == "old_model"
    assert any("old_model" in cause.text for cause in report.causes)
    assert report.fixes[0].code == "%vram free old_model"


def test_the_free_fix_counts_what_deleting_its_names_frees_shared_storage_once(ip: Any) -> None:
    ip.run_cell(FAILING_LOAD_TEMPLATE.format(message=SHORTFALL_OOM))
    # An earlier model (64 MiB) under two names, a wrapper and its base, and 64 MiB of logits: deleting the
    # three frees the model once, and the logits.
    ip.run_cell("base = torch.nn.Linear(4096, 4096)\nwrapped = {'base_model': base}\n")
    ip.run_cell("logits = torch.zeros(16 * 2**20)\n")
    _run(ip, "%%oomsafe\nmodel = load_model()\n")
    free = _last_report(ip).fixes[0]
    assert free.key == "free" and set(free.free_names) == {"base", "wrapped", "logits"}
    assert free.why.startswith("Together they hold about 128.02 MiB that this cell does not need.")
    assert "Not enough alone" in free.why and free.fits is False  # the cell was 512 MiB short


def test_a_name_sharing_all_its_memory_with_one_the_cell_uses_is_not_offered_to_free(ip: Any) -> None:
    ip.run_cell(FAILING_LOAD_TEMPLATE.format(message=SHORTFALL_OOM))
    ip.run_cell("model = torch.nn.Linear(4096, 4096)\nalias = model\n")
    _run(ip, "%%oomsafe\nshape = model.weight.shape\nmodel = load_model()\n")
    report = _last_report(ip)
    assert "free" not in [fix.key for fix in report.fixes]  # deleting `alias` would free nothing


def test_vram_free_releases_a_plain_cells_failure_and_named_variables(ip: Any) -> None:
    ip.run_cell(FAILING_LOAD)
    _run(ip, "load_model()\n")
    ip.run_cell("spare = torch.zeros(16 * 2**20 // 4)\nimport weakref\nspare_ref = weakref.ref(spare)\n")
    with capture_output() as captured:
        ip.run_line_magic("vram", "free spare --device cpu")
    assert ip.user_ns["PINNED"][0]() is None
    assert ip.user_ns["spare_ref"]() is None and "spare" not in ip.user_ns
    assert "80.00 MiB" in captured.stdout


def test_vram_free_drops_output_cache_entries_holding_memory(ip: Any) -> None:
    ip.run_cell("import torch, weakref\nbig = torch.ones(2**20)\nbig_ref = weakref.ref(big)\n")
    ip.run_cell("big", store_history=True)
    ip.run_cell("del big")
    assert ip.user_ns["big_ref"]() is not None  # the output cache still holds it
    with capture_output():
        ip.run_line_magic("vram", "free --device cpu")
    assert ip.user_ns["big_ref"]() is None


def test_vram_who_lists_names_biggest_first(ip: Any) -> None:
    ip.run_cell("import torch\nsmall = torch.zeros(1024)\nlarge = torch.zeros(2**20)\nalias = large\n")
    with capture_output() as captured:
        ip.run_line_magic("vram", "who --device cpu")
    lines = captured.stdout
    assert lines.index("large") < lines.index("small")
    assert "alias" in lines


def test_vram_returns_a_snapshot_usable_in_code(ip: Any) -> None:
    snapshot = ip.run_line_magic("vram", "")
    assert isinstance(snapshot, Snapshot)
    assert snapshot.cpu.total_bytes is not None and snapshot.cpu.total_bytes > 0
    if not torch.cuda.is_available():
        assert snapshot.gpus == ()
        assert "GPU" in str(snapshot)


@pytest.mark.parametrize(
    ("magic", "line", "hint"),
    [
        ("vram", "bogus", "%vram who"),
        ("vram", "free no_such_name", "%vram who"),
        ("vram", "who extra", "%vram who"),
        ("vram", "--nope", "%vram?"),
        ("vram", "free 'x", "No closing quotation"),
        ("vram", 'estimate "gpt2', "%vram?"),
        ("vram", "who --device gpu", "--device cpu"),
        ("vram", "who --quant 4bit", "--quant goes with `%vram estimate`"),
        ("vram", "cap t4 --diff", "--diff goes with `%vram fix`"),
        ("vram", "--context 100", "--context goes with `%vram estimate`"),
        ("vram", "estimate gpt2 --device cpu", "--device goes with `%vram who` or `%vram free`"),
        ("vram", "who --context 0", "--context goes with `%vram estimate`"),
        ("vram", "whoo --device cpu", "Unknown %vram command 'whoo'"),
        ("oomsafe_line", "'x", "%%oomsafe?"),
    ],
)
def test_bad_input_is_a_one_line_usage_error(ip: Any, magic: str, line: str, hint: str) -> None:
    with pytest.raises(UsageError) as raised:
        if magic == "oomsafe_line":
            ip.run_cell_magic("oomsafe", line, "x = 1\n")
        else:
            ip.run_line_magic(magic, line)
    message = str(raised.value)
    assert hint in message
    assert "Traceback" not in message


def test_bad_cell_magic_option_is_a_usage_error(ip: Any) -> None:
    with pytest.raises(UsageError, match="unrecognized arguments: --nope; type `%%oomsafe\\?`"):
        ip.run_cell_magic("oomsafe", "--nope", "x = 1\n")


def test_help_comes_from_the_docstring(ip: Any) -> None:
    doc = ip.find_line_magic("vram").__doc__
    assert "%vram who" in doc and "%vram estimate MODEL" in doc and "%vram cap T4|12GiB" in doc
    assert "  %vram [--device DEVICE]" in doc and "[command] [names ...]" in doc  # the usage line
    assert "--insert              with 'fix': put the fixed cell in a new cell below" in doc


def test_unload_leaves_no_magic_behind(session_shell: Any) -> None:
    session_shell.run_line_magic("load_ext", "vram_magic")
    session_shell.run_line_magic("load_ext", "vram_magic")
    session_shell.run_line_magic("unload_ext", "vram_magic")
    assert session_shell.find_line_magic("vram") is None
    assert session_shell.find_cell_magic("oomsafe") is None
    assert "VramMagics" not in session_shell.magics_manager.registry
    session_shell.run_line_magic("load_ext", "vram_magic")
    session_shell.run_line_magic("reload_ext", "vram_magic")
    assert session_shell.find_cell_magic("oomsafe") is not None
    session_shell.run_line_magic("unload_ext", "vram_magic")


def test_import_and_load_stay_light() -> None:
    script = textwrap.dedent(
        """
        import sys
        import vram_magic
        assert "torch" not in sys.modules and "IPython" not in sys.modules, "import"
        from IPython.testing.globalipapp import start_ipython
        ip = start_ipython()
        ip.run_line_magic("load_ext", "vram_magic")
        heavy = {"torch", "transformers", "peft", "bitsandbytes", "accelerate", "ipywidgets", "libcst"}
        assert not heavy & set(sys.modules), heavy & set(sys.modules)
        # Nothing asks about a GPU or a tensor yet: a snapshot, who and a plain cell import nothing heavy.
        ip.run_line_magic("vram", "")
        ip.run_line_magic("vram", "who")
        ip.run_cell("%%oomsafe\\nx = 1")
        assert not heavy & set(sys.modules), heavy & set(sys.modules)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)


def _last_report(ip: Any) -> Report:
    magics = ip.magics_manager.registry["VramMagics"]
    assert isinstance(magics.last_report, Report)
    return magics.last_report


def test_frames_of_a_chained_exception_are_freed_too(ip: Any) -> None:
    ip.run_cell(FAILING_LOAD)
    ip.run_cell(
        "def first_try():\n"
        "    scratch = torch.ones(16 * 2**20 // 4)\n"
        "    PINNED.append(weakref.ref(scratch))\n"
        "    raise RuntimeError('first attempt failed')\n"
        "def with_fallback():\n"
        "    try:\n"
        "        first_try()\n"
        "    except RuntimeError:\n"
        "        load_model()\n"
    )
    _run(ip, "%%oomsafe\nwith_fallback()\n")
    assert [ref() for ref in ip.user_ns["PINNED"]] == [None, None]
    assert _last_report(ip).cleanup.freed_tensor_bytes == 80 * MiB


def test_tracebacks_name_the_running_cell_as_ipython_does(ip: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    shown = _tracebacks(ip, monkeypatch)
    ip.run_cell("%%oomsafe\n1 / 0\n", store_history=True)  # a stored cell: the counter has moved on
    number = ip.execution_count - 1
    assert f"Cell In[{number}], line 2" in "\n".join(shown[0])


TRAINING_SETUP = f"""
import torch
def train_step(batch_size, gradient_accumulation_steps):
    activations = torch.ones(batch_size * 2**20 // 4)
    if batch_size > 4:
        raise torch.OutOfMemoryError({SHORTFALL_OOM!r})
    return batch_size * gradient_accumulation_steps
"""
TRAINING_CELL = (
    "batch_size = 16\ngradient_accumulation_steps = 1\ntrain_step(batch_size, gradient_accumulation_steps)\n"
)


def test_vram_fix_runs_the_rewritten_cell_and_reports_again_if_it_still_fails(ip: Any) -> None:
    ip.run_cell(TRAINING_SETUP)
    _run(ip, "%%oomsafe\n" + TRAINING_CELL)
    number = [fix.key for fix in _last_report(ip).fixes].index("half-batch") + 1
    with capture_output() as captured:
        diff_shown = ip.run_cell(f"%vram fix {number} --diff")
    assert (
        diff_shown.success and "-batch_size = 16" in captured.stdout and "+batch_size = 8" in captured.stdout
    )
    assert ip.user_ns["batch_size"] == 16  # --diff runs nothing
    result, _ = _run(ip, f"%vram fix {number}")  # batch 8: still too big, a new report
    assert isinstance(result.error_in_exec, OutOfMemoryHandled)
    assert ip.user_ns["batch_size"] == 8 and ip.user_ns["gradient_accumulation_steps"] == 2
    again = [fix.key for fix in _last_report(ip).fixes].index("half-batch") + 1
    result, captured = _run(ip, f"%vram fix {again}")
    assert result.success and result.result == 16  # batch 4 x accumulation 4: the same effective batch
    assert (
        f"Fix {again} worked: Halve the batch (8 → 4) and double gradient accumulation (2 → 4)"
        in captured.stdout
    )


def test_oomsafe_auto_walks_the_fixes_until_one_works(ip: Any) -> None:
    ip.run_cell(TRAINING_SETUP)
    result, captured = _run(ip, "%%oomsafe --auto\n" + TRAINING_CELL)
    assert result.success and result.result == 16
    out = captured.stdout
    # The title says the last step; the code that ran, printed below it, has all of them.
    assert (
        "--auto: fix 1 worked: Halve the batch (8 → 4) and double gradient accumulation (2 → 4): the same "
        "effective batch." in out
    )
    # A line as each attempt starts (an attempt can take minutes), then the result.
    progress, _, outcome = out.partition("The cell as written: ")
    assert progress.splitlines() == [
        "--auto: trying fix 1: Halve the batch (16 → 8) and double gradient accumulation (1 → 2): the same "
        "effective batch…",
        "--auto: trying fix 1: Halve the batch (8 → 4) and double gradient accumulation (2 → 4): the same "
        "effective batch…",
    ]
    assert outcome.startswith("CUDA out of memory in a training step: asked for 2.00 GiB")
    assert "Attempts by --auto (3 runs" in out
    assert "1. the cell as written: out of memory" in out and "3. Halve the batch" in out
    assert "    batch_size = 4\n    gradient_accumulation_steps = 4" in out


def test_oomsafe_auto_stops_at_max_attempts_and_shows_the_last_report(ip: Any) -> None:
    ip.run_cell(TRAINING_SETUP)
    result, _ = _run(ip, "%%oomsafe --auto --max-attempts 2\n" + TRAINING_CELL)
    assert isinstance(result.error_in_exec, OutOfMemoryHandled)
    report = _last_report(ip)
    assert [a.succeeded for a in report.attempts] == [False, False]
    assert ip.user_ns["batch_size"] == 8


def test_the_report_says_which_names_the_failed_run_rebound(ip: Any) -> None:
    ip.run_cell(FAILING_LOAD)
    ip.run_cell("tokenizer = 'old tokenizer'\n")
    _run(ip, "%%oomsafe\ntokenizer = 'new tokenizer'\nmodel = load_model()\n")
    assert _last_report(ip).rebound_names == ("tokenizer",)
    assert "model" not in ip.user_ns


def test_the_rerun_button_runs_the_fix_in_the_notebook_namespace(
    ip: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ipywidgets

    monkeypatch.setenv("VRAM_MAGIC_WIDGETS", "1")
    ip.run_cell(TRAINING_SETUP)
    with capture_output() as captured:
        ip.run_cell(
            "%%oomsafe\nbatch_size = 8\ngradient_accumulation_steps = 1\n"
            "train_step(batch_size, gradient_accumulation_steps)\n"
        )
    assert any("application/vnd.jupyter.widget-view+json" in o.data for o in captured.outputs)
    # every live widget: Widget.widgets, or in ipywidgets 8.0.0 (which has no such attribute) _active_widgets
    live = getattr(ipywidgets.Widget, "widgets", None) or ipywidgets.Widget._active_widgets
    buttons = [w for w in live.values() if getattr(w, "description", "") == "Re-run"]
    report = _last_report(ip)
    number = [fix.key for fix in report.fixes].index("half-batch") + 1
    button = [b for b in buttons if b.tooltip == report.fixes[number - 1].title][-1]
    with capture_output():
        button.click()
    assert ip.user_ns["batch_size"] == 4 and ip.user_ns["gradient_accumulation_steps"] == 2


def test_vram_fix_insert_offers_the_fixed_cell_as_a_new_cell(
    ip: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    offered: list[tuple[str, bool]] = []
    monkeypatch.setattr(ip, "set_next_input", lambda text, replace=False: offered.append((text, replace)))
    ip.run_cell(TRAINING_SETUP)
    _run(ip, "%%oomsafe\n" + TRAINING_CELL)
    number = [fix.key for fix in _last_report(ip).fixes].index("half-batch") + 1
    with capture_output() as captured:
        ip.run_line_magic("vram", f"fix {number} --insert")
    assert offered == [
        (
            "%%oomsafe\nbatch_size = 8\ngradient_accumulation_steps = 2\n"
            "train_step(batch_size, gradient_accumulation_steps)\n",
            False,
        )
    ]
    assert "your cell is unchanged" in captured.stdout
    assert ip.user_ns["batch_size"] == 16  # nothing ran


def test_vram_fix_mistakes_are_one_line_usage_errors(ip: Any) -> None:
    ip.magics_manager.registry["VramMagics"].session.last_report = None
    with pytest.raises(UsageError, match="No %%oomsafe cell has run out of memory yet"):
        ip.run_line_magic("vram", "fix 1")
    ip.run_cell(TRAINING_SETUP)
    _run(ip, "%%oomsafe\n" + TRAINING_CELL)
    count = len(_last_report(ip).fixes)
    for words in (
        "fix",
        f"fix {count + 1}",
        "fix one",
        "fix 1 2",
        "fix \u00b2",
    ):  # ² is a digit, not a number
        with pytest.raises(UsageError, match=f"Type `%vram fix N` with N from 1 to {count}"):
            ip.run_line_magic("vram", words)
    with pytest.raises(UsageError, match="`%vram fix 1 --diff` or `%vram fix 1 --insert`, not both"):
        ip.run_line_magic("vram", "fix 1 --diff --insert")
    advice = next(i for i, fix in enumerate(_last_report(ip).fixes, 1) if not fix.runnable)
    with pytest.raises(UsageError, match=f"Fix {advice} .* is advice to follow by hand"):
        ip.run_line_magic("vram", f"fix {advice}")


def test_auto_never_lifts_a_cap_or_tries_a_bf16_load_not_known_to_shrink() -> None:
    from vram_magic import Fix
    from vram_magic._session import worth_trying_unattended

    def fix(key: str, fits: bool | None) -> Fix:
        return Fix(key, "", rewritten_cell="x = 1\n", fits=fits)

    assert not worth_trying_unattended(fix("lift-cap", True))  # the cap may be a rehearsal
    assert not worth_trying_unattended(fix("bf16", None))  # transformers 5 may load bf16 already
    assert worth_trying_unattended(fix("bf16", True))
    assert worth_trying_unattended(fix("half-batch", None))
    assert not worth_trying_unattended(fix("8bit", False))
    assert not worth_trying_unattended(Fix("other-process", "!nvidia-smi"))


# --------------------------------------------------------------------------------------------------
# Report hygiene: what the report shows is what the user wrote, and `%vram fix N` belongs to its report


def test_the_failed_line_is_the_line_that_failed_not_its_loops_first_line(ip: Any) -> None:
    ip.run_cell(FAILING_LOAD)
    _run(ip, "%%oomsafe\nfor attempt in range(3):\n    size = attempt * 2\n    model = load_model()\n")
    report = _last_report(ip)
    assert report.analysis.failed_line == 4
    assert report.analysis.failed_statement == "    model = load_model()"


def test_a_magic_line_that_failed_is_shown_as_typed(ip: Any) -> None:
    with capture_output():
        if ip.run_cell("%time raise ValueError('does %time re-raise?')").success:
            pytest.skip(
                "IPython 8.12's %time prints the error itself and the cell succeeds (IPython 9 re-raises)"
            )
    ip.run_cell(FAILING_LOAD)
    _run(ip, "%%oomsafe\nx = 1\n%time model = load_model()\n")
    report = _last_report(ip)
    assert report.analysis.failed_statement == "%time model = load_model()"
    assert "run_line_magic" not in str(report).split("Details")[0]


def test_vram_fix_runs_nothing_once_a_fix_of_its_report_worked(ip: Any) -> None:
    ip.run_cell(TRAINING_SETUP.replace("batch_size > 4", "batch_size > 8"))
    _run(ip, "%%oomsafe\n" + TRAINING_CELL)
    number = [fix.key for fix in _last_report(ip).fixes].index("half-batch") + 1
    worked, _ = _run(ip, f"%vram fix {number}")
    assert worked.success and ip.user_ns["batch_size"] == 8
    with pytest.raises(UsageError, match=r"done with \(fix \d worked\): `%vram fix` runs nothing"):
        ip.run_line_magic("vram", f"fix {number}")
    assert ip.user_ns["batch_size"] == 8  # the old code did not run again
    ip.run_line_magic("vram", f"fix {number} --diff")  # showing it is still fine


def test_vram_fix_runs_nothing_once_the_cell_ran_again(ip: Any) -> None:
    ip.run_cell(TRAINING_SETUP)
    cell = "%%oomsafe\n" + TRAINING_CELL
    _run(ip, cell)
    number = [fix.key for fix in _last_report(ip).fixes].index("half-batch") + 1
    _run(ip, "x = 1\n")  # another cell: the report still stands
    ip.run_line_magic("vram", f"fix {number} --diff")
    ip.run_cell("train_step = lambda batch, steps: batch * steps\n")
    assert _run(ip, cell)[0].success  # the same cell, run again (it fits now)
    with pytest.raises(UsageError, match=r"done with \(its cell ran again\)"):
        ip.run_line_magic("vram", f"fix {number}")


def test_an_error_raised_from_an_oom_by_the_users_own_handler_is_that_error(
    ip: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ip.run_cell(FAILING_LOAD)
    cell = (
        "try:\n    model = load_model()\n"
        "except torch.OutOfMemoryError as e:\n    raise ValueError('pick a smaller model') from e\n"
    )
    result, captured = _run(ip, "%%oomsafe\n" + cell)
    assert isinstance(result.error_in_exec, ValueError)
    assert "OutOfMemoryHandled" not in captured.stdout and not captured.outputs


def test_a_cpu_request_larger_than_all_ram_offers_no_freeing(ip: Any) -> None:
    message = (
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 39582418599936 bytes. Error code 12 (Cannot allocate memory)"
    )
    ip.run_cell(f"import torch\ndef build():\n    raise RuntimeError({message!r})\n")
    ip.run_cell("big = torch.zeros(30 * 2**20)\n")  # 120 MiB the cell does not use
    _run(ip, "%%oomsafe\nx = build()\n")
    report = _last_report(ip)
    assert report.causes[0].key == "too-big"
    assert "more than this machine's RAM" in report.causes[0].text
    assert "free" not in [fix.key for fix in report.fixes]


def test_vram_free_refuses_a_module(ip: Any) -> None:
    ip.run_cell("import torch\n")
    with pytest.raises(UsageError, match="`torch` is a module, not data that holds memory"):
        ip.run_line_magic("vram", "free torch")
    assert "torch" in ip.user_ns


def test_a_quoted_model_id_is_taken_as_typed(ip: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with capture_output():  # the first count of a model prints a progress line; compare the estimates alone
        ip.run_line_magic("vram", "estimate gpt2 --gpu t4")
    with capture_output() as quoted:
        ip.run_line_magic("vram", 'estimate "gpt2" --gpu t4')
    with capture_output() as plain:
        ip.run_line_magic("vram", "estimate gpt2 --gpu t4")
    assert quoted.stdout == plain.stdout and "openai-community/gpt2" in quoted.stdout


def test_estimate_of_a_training_step_shows_its_parts_and_what_fits(
    ip: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with capture_output() as shown:
        ip.run_line_magic(
            "vram", "estimate meta-llama/Llama-3.1-8B --gpu t4 --train qlora --batch 4 --context 1024"
        )
    text = shown.stdout
    assert "A training step, 4-bit NF4, batch 4 of sequences of 1024 tokens:" in text
    for part in ("LoRA adapters (float32)", "optimizer states", "float32 casts", "logits and loss", "peak"):
        assert part in text
    assert "Largest batch that fits (4-bit NF4, sequences of 1024 tokens): " in text
    with capture_output() as only:
        ip.run_line_magic(
            "vram", "estimate meta-llama/Llama-3.1-8B --gpu t4 --train qlora --context 1024 --fit batch"
        )
    assert only.stdout.startswith("Largest batch that fits (4-bit NF4, sequences of 1024 tokens): ")
    with pytest.raises(UsageError, match="go with --train"):
        ip.run_line_magic("vram", "estimate gpt2 --batch 4")
    with pytest.raises(UsageError, match="--optimizer goes with `%vram estimate`"):
        ip.run_line_magic("vram", "who --optimizer sgd")
    with pytest.raises(UsageError, match="--lora-targets goes with"):
        ip.run_line_magic("vram", "who --lora-targets all-linear")
