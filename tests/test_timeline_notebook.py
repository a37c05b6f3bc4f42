"""notebooks/timeline.ipynb, run as a reader runs it: the timeline's plot, the report's growers and the failed
call's tensors, and %vram debug, top to bottom on a real Jupyter kernel (as `make demo` runs it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import pytest
import torch

from tests.notebook_runner import run_copy

pytestmark = pytest.mark.notebook

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "timeline.ipynb"
SIMULATED = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    folder = tmp_path_factory.mktemp("timeline")
    return run_copy(NOTEBOOK, folder), folder


def _cell(run: tuple[Any, Path], cell_id: str) -> Any:
    return next(cell for cell in run[0].cells if cell.get("id") == cell_id)


def _text(cell: Any) -> str:
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("display_data", "execute_result"):
            parts.append(str(output.data.get("text/plain", "")))
    return "\n".join(parts)


def test_the_committed_notebook_has_no_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.outputs for cell in notebook.cells if cell.cell_type == "code")


def test_only_the_oom_cell_failed_and_it_ended_in_one_line(run: tuple[Any, Path]) -> None:
    code = [cell for cell in run[0].cells if cell.cell_type == "code"]
    failed = [cell.id for cell in code if any(o.output_type == "error" for o in cell.outputs)]
    assert failed == ["oom"]
    (error,) = [o for o in _cell(run, "oom").outputs if o.output_type == "error"]
    assert error.ename == "OutOfMemoryHandled"


def test_the_log_is_a_plot_in_the_saved_html_and_a_table_in_text(run: tuple[Any, Path]) -> None:
    (shown,) = [o for o in _cell(run, "log").outputs if o.output_type == "display_data"]
    assert {"image/png", "text/html", "text/plain"} <= set(shown.data)
    text = shown.data["text/plain"]
    assert "loss.backward()" not in text  # a cell is named by its first line
    assert "batch = torch.randint(0, config.vocab_size, (8, 256), device=device)" in text
    html = (run[1] / "timeline.html").read_text()
    assert html.count("data:image/png;base64,") >= 1


def test_the_report_names_the_growers_and_the_failed_calls_tensors(run: tuple[Any, Path]) -> None:
    report = _text(_cell(run, "oom"))
    assert "Cells that grew memory most since it was lowest (%vram track)" in report
    flat = " ".join(report.split())
    assert "`batch = torch.randint(0, config.vocab_size, (8, 256), device=device)`" in flat
    held = report.split("What the failed call held", 1)[1].split("\n\n", 1)[0]
    assert "[64, 2048, 512]" in held  # the activations of the batch that did not fit
    if SIMULATED:
        assert "--record needs a CUDA GPU (none is visible); the cell runs without recording." in report
        assert "SIMULATED: no GPU here" in report
    else:
        assert "Live allocations when it failed, by the line that made them (--record)" in report


def test_debug_shows_the_frames_from_the_cell_down(run: tuple[Any, Path]) -> None:
    lines = [line.strip() for line in _text(_cell(run, "debug")).splitlines()]
    assert lines[1].endswith("line 4: logits = model(big_batch).logits")
    assert any(line.startswith("forward (modeling_llama.py:") for line in lines)
    where = "cpu" if SIMULATED else "cuda:0"
    assert f"input_ids  int64 [64, 2048] on {where}, 1.00 MiB (the notebook's `big_batch`)" in lines


def test_the_timeline_is_a_table_of_every_tracked_cell(run: tuple[Any, Path]) -> None:
    (table,) = [o for o in _cell(run, "data").outputs if o.output_type == "execute_result"]
    assert "<table" in table.data["text/html"]
    assert "delta_bytes" in table.data["text/plain"]
