"""notebooks/quickstart.ipynb, run as a reader runs it: top to bottom on a real Jupyter kernel.

The notebook runs once (in a temporary copy, with ``notebooks/run.py``) and each test reads what it showed.
On a GPU its out-of-memory error is real; without one the notebook simulates it and says so.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nbformat
import pytest
import torch

from tests.notebook_runner import run_copy

pytestmark = pytest.mark.notebook

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
QUICKSTART = NOTEBOOKS / "quickstart.ipynb"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
SIMULATED = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The executed quickstart and the folder it ran in. A cell error not tagged as expected fails here."""
    folder = tmp_path_factory.mktemp("quickstart")
    return run_copy(QUICKSTART, folder), folder


def _cell(run: tuple[Any, Path], cell_id: str) -> Any:
    notebook, _ = run
    return next(cell for cell in notebook.cells if cell.get("id") == cell_id)


def _stdout(cell: Any) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def _rich(cell: Any) -> list[Any]:
    return [o for o in cell.outputs if o.output_type in ("display_data", "execute_result")]


def _report(run: tuple[Any, Path]) -> Any:
    (report,) = _rich(_cell(run, "oom"))
    return report


def test_the_committed_notebook_has_no_outputs() -> None:
    notebook = nbformat.read(QUICKSTART, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_every_cell_ran_and_only_the_oom_cell_failed(run: tuple[Any, Path]) -> None:
    notebook, folder = run
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    failed = [cell.id for cell in code if any(o.output_type == "error" for o in cell.outputs)]
    assert failed == ["oom"]
    assert "raises-exception" in _cell(run, "oom").metadata.tags
    assert (folder / "quickstart.executed.ipynb").is_file()


def test_the_oom_cell_ends_with_one_line(run: tuple[Any, Path]) -> None:
    (error,) = [o for o in _cell(run, "oom").outputs if o.output_type == "error"]
    assert error.ename == "OutOfMemoryHandled"
    assert error.traceback == [f"OutOfMemoryHandled: {error.evalue}"]
    assert error.evalue.startswith("CUDA out of memory in a model load: asked for ")
    assert error.evalue.endswith("See the report above.")


def test_the_report_explains_the_oom_in_text(run: tuple[Any, Path]) -> None:
    text = _report(run).data["text/plain"]
    assert text.startswith("CUDA out of memory in a model load: asked for ")  # from_pretrained on the line
    assert "allowed (cap)" in text
    assert re.search(r"^  model +LlamaForCausalLM ", text, re.MULTILINE)  # the earlier model, by name
    assert re.search(r"^Fixes\b", text, re.MULTILINE)
    assert "%vram free model" in text
    assert "BitsAndBytesConfig" in text  # a model-load fix
    if SIMULATED:
        # The simulated load pinned a whole CPU copy of the model in its frame; the report freed exactly it.
        assert "SIMULATED" in _stdout(_cell(run, "oom"))
        asked = re.search(r"Tried to allocate ([\d.]+ MiB)", text)
        assert asked is not None
        assert f"freed {asked.group(1)}." in text.splitlines()[0]
        assert f"Freed {asked.group(1)} held by the failed cell" in text


def test_widget_outputs_carry_our_text(run: tuple[Any, Path]) -> None:
    notebook, _ = run
    state = notebook.metadata.widgets[WIDGET_STATE]["state"]
    outputs = {"vram-start": _rich(_cell(run, "vram-start")), "oom": [_report(run)]}
    outputs["vram-end"] = _rich(_cell(run, "vram-end"))
    for cell_id, shown in outputs.items():
        assert len(shown) == 1, cell_id
        data = shown[0].data
        assert data[WIDGET_VIEW]["model_id"] in state, cell_id  # a real view, its state saved
        assert data["text/plain"].strip(), cell_id
    assert "CPU RAM" in outputs["vram-end"][0].data["text/plain"]


def test_the_kernel_lives_on_after_the_oom(run: tuple[Any, Path]) -> None:
    assert "model still works: logits of shape (1, 8, 32000)" in _stdout(_cell(run, "alive"))
    freed = _stdout(_cell(run, "free"))
    assert freed.startswith("Freed ") and "variable model" in freed


def test_the_html_shows_the_report_without_javascript(run: tuple[Any, Path]) -> None:
    _, folder = run
    html = (folder / "quickstart.html").read_text(encoding="utf-8")
    first_line = _report(run).data["text/plain"].splitlines()[0]
    assert first_line in html
    assert WIDGET_VIEW in html  # and the widget itself, for readers with JavaScript
