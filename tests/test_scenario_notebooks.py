"""The three seed-scenario notebooks, run as a reader runs them: top to bottom on a real Jupyter kernel.

- ``s1_merge.ipynb``: ``merged = model.merge_and_unload()`` runs out of memory because ``reference``, a
  second copy of the base model, still holds memory; the report lists freeing it as fix 1, and
  ``%vram fix 1`` runs it.
- ``s2_qlora.ipynb``: a QLoRA ``Trainer`` cell at ``per_device_train_batch_size=4`` runs out of memory;
  ``%%oomsafe --auto`` halves the batch and doubles gradient accumulation.
- ``s3_load.ipynb``: ``from_pretrained(..., dtype=torch.bfloat16)`` does not fit; ``--auto`` loads it in
  8-bit.

Each runs once (in a temporary copy, with ``notebooks/run.py``), the first time a test asks for it. On a GPU
the out-of-memory errors are real, under per-process caps; without one each notebook simulates its GPU with
``notebooks/simulated_gpu.py``, imported in one labelled line, and says so.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nbformat
import pytest
import torch

from tests.notebook_runner import run_copy
from tests.stack import BITSANDBYTES_QUANTIZES_HERE, TRANSFORMERS_MAJOR

pytestmark = pytest.mark.notebook
# The notebooks are written for transformers 5 (from_pretrained(..., dtype=...)), and without a GPU s2 and s3
# quantize with bitsandbytes on the CPU.
runs_here = pytest.mark.skipif(
    TRANSFORMERS_MAJOR < 5 or not BITSANDBYTES_QUANTIZES_HERE,
    reason="the scenario notebooks write transformers 5's dtype= and, without a GPU, quantize with "
    "bitsandbytes on the CPU: transformers 4.45 wants torch_dtype= and quantizes on CUDA only",
)

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SCENARIOS = ("s1_merge", "s2_qlora", "s3_load")
# The cells whose error is the point (a %%oomsafe cell ending in OutOfMemoryHandled): tagged, and no others.
FAILING_CELLS = {"s1_merge": ["oom"], "s2_qlora": [], "s3_load": []}
SIMULATED = not torch.cuda.is_available()


class _Runs:
    """Each notebook executed at most once per test session, in its own temporary folder."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self._factory = factory
        self._done: dict[str, tuple[Any, Path]] = {}

    def __call__(self, name: str) -> tuple[Any, Path]:
        if name not in self._done:
            folder = self._factory.mktemp(name)
            self._done[name] = (run_copy(NOTEBOOKS / f"{name}.ipynb", folder), folder)
        return self._done[name]


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> _Runs:
    return _Runs(tmp_path_factory)


def _cell(notebook: Any, cell_id: str) -> Any:
    return next(cell for cell in notebook.cells if cell.get("id") == cell_id)


def _stdout(cell: Any) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def _report(cell: Any) -> str:
    """The text of the one report a failed %%oomsafe cell displayed (its text/plain)."""
    (report,) = [o for o in cell.outputs if o.output_type == "display_data"]
    return str(report.data["text/plain"])


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_committed_notebook_has_no_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    assert notebook.cells[0].cell_type == "markdown" and notebook.cells[0].source.startswith("# Scenario ")


@runs_here
@pytest.mark.parametrize("name", SCENARIOS)
def test_every_cell_ran_and_only_the_tagged_ones_failed(runs: _Runs, name: str) -> None:
    notebook, folder = runs(name)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    failed = [cell.id for cell in code if any(o.output_type == "error" for o in cell.outputs)]
    tagged = [cell.id for cell in code if "raises-exception" in cell.metadata.get("tags", [])]
    assert failed == tagged == FAILING_CELLS[name]
    for cell_id in failed:
        (error,) = [o for o in _cell(notebook, cell_id).outputs if o.output_type == "error"]
        assert error.ename == "OutOfMemoryHandled"
    assert (folder / f"{name}.executed.ipynb").is_file() and (folder / f"{name}.html").is_file()


@runs_here
@pytest.mark.parametrize("name", SCENARIOS)
def test_the_notebook_says_whether_its_oom_is_real(runs: _Runs, name: str) -> None:
    notebook, _ = runs(name)
    setup = _stdout(_cell(notebook, "setup"))
    oom = _stdout(_cell(notebook, "oom"))
    if SIMULATED:
        assert "No GPU: the out-of-memory error below is SIMULATED." in setup
        assert "SIMULATED: no GPU here; this is the error a GPU capped at " in oom
        assert "**Without a GPU**" in _cell(notebook, "oom-md").source
        assert "**simulated**" in _cell(notebook, "oom-md").source
    else:
        assert "SIMULATED" not in setup + oom


@runs_here
def test_s1_the_report_names_the_second_copy_and_frees_it(runs: _Runs) -> None:
    notebook, _ = runs("s1_merge")
    report = _report(_cell(notebook, "oom"))
    assert "CUDA out of memory in a LoRA merge: asked for " in report
    assert re.search(r"^  reference +LlamaForCausalLM ", report, re.MULTILINE)
    assert "`reference` (LlamaForCausalLM) from an earlier cell still holds" in report
    fixes = report[report.index("\nFixes") :]
    assert "  1. Free `reference`, then run the cell again\n" in fixes
    assert "%vram free reference" in fixes
    assert "  2. Merge on the CPU, then move the merged model back to the GPU if it fits\n" in fixes
    assert '+model = model.to("cpu")' in fixes
    if SIMULATED:  # the merge's largest float32 update (32 MiB) with 16 MiB left under the cap
        assert report.startswith(
            "CUDA out of memory in a LoRA merge: asked for 32.00 MiB with 16.00 MiB free"
        )
    fixed = _stdout(_cell(notebook, "fix"))
    assert re.match(r"Freed [\d.]+ MiB \(released: .*variable reference\)\.", fixed)
    assert "Fix 1 worked: Free `reference`, then run the cell again" in fixed
    works = _stdout(_cell(notebook, "works"))
    assert "merged: LlamaForCausalLM with 0 LoRA layers left" in works
    assert "merged.generate() works: 8 new tokens" in works


@runs_here
def test_s2_auto_halves_the_batch_and_keeps_the_effective_batch(runs: _Runs) -> None:
    notebook, _ = runs("s2_qlora")
    out = _stdout(_cell(notebook, "oom"))
    worked = "Halve the batch (4 → 2) and double gradient accumulation (1 → 2): the same effective batch"
    assert f"--auto: fix 1 worked: {worked}." in out
    assert "Attempts by --auto (2 runs, " in out
    assert "  1. the cell as written: out of memory (" in out
    assert f"  2. {worked}: worked (" in out
    assert "        per_device_train_batch_size=2,\n        gradient_accumulation_steps=2,\n" in out
    works = _stdout(_cell(notebook, "works"))
    assert "batch 2 x gradient accumulation 2 = 4 sequences per optimizer step" in works
    assert "2 optimizer steps, training loss " in works
    loss = re.search(r"loss on a training sequence: ([\d.]+)", works)
    assert loss is not None and 0 < float(loss.group(1)) < 20


@runs_here
def test_s3_auto_loads_the_model_in_8bit(runs: _Runs) -> None:
    notebook, _ = runs("s3_load")
    out = _stdout(_cell(notebook, "oom"))
    if SIMULATED:  # no GPU and no cap planned for: no preflight, so the load runs out and --auto rescues it
        assert "--auto: fix 1 worked: Load the model in 8-bit." in out
        assert "Attempts by --auto (2 runs, " in out
        assert "  1. the cell as written: out of memory (" in out
        assert "quantization_config=BitsAndBytesConfig(load_in_8bit=True)" in out
    else:  # on a GPU, preflight sees the load cannot fit and --auto runs the 8-bit plan first: no OOM at all
        assert "Running fix 1 instead: Load the model in 8-bit." in out
        assert "Fix 1 worked: Load the model in 8-bit" in out
    cap = re.search(
        r"may now use (\d+) MiB of the GPU; the model needs (\d+) MiB", _stdout(_cell(notebook, "cap"))
    )
    assert cap is not None
    works = _stdout(_cell(notebook, "works"))
    size = re.search(r"^(\d+) MiB in memory; layers like q_proj: Linear8bitLt$", works, re.MULTILINE)
    assert size is not None and int(size.group(1)) < int(cap.group(1)) < int(cap.group(2))
    assert "generate() works: 8 new tokens" in works
    # bitsandbytes' cast warning, once (after the 8-bit fix), not once per matmul of generate()
    assert "".join(o.get("text", "") for o in _cell(notebook, "works").outputs).count("MatMul8bitLt") == 1
