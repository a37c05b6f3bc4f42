"""notebooks/run.py loaded as a module, so the notebook tests run notebooks exactly as `make demo` does."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@functools.cache
def runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("notebooks_run", NOTEBOOKS / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
