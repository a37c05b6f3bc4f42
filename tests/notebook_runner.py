"""notebooks/run.py loaded as a module, so the notebook tests run notebooks exactly as `make demo` does."""

from __future__ import annotations

import functools
import importlib.util
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@functools.cache
def runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("notebooks_run", NOTEBOOKS / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_copy(notebook: Path, folder: Path) -> Any:
    """Run a copy of ``notebook`` in ``folder`` as `make demo` does, on a kernel whose environment is a plain
    Jupyter's (no forced widgets, no Kaggle batch run); the executed notebook."""
    copy = folder / notebook.name
    shutil.copy(notebook, copy)
    shutil.copy(NOTEBOOKS / "simulated_gpu.py", folder)  # what the scenario notebooks import without a GPU
    with pytest.MonkeyPatch.context() as env:  # the kernel inherits this environment
        env.delenv("VRAM_MAGIC_WIDGETS", raising=False)
        env.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
        return runner().run_notebook(copy)
