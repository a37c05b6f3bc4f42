"""Everything under tests/gpu needs a CUDA GPU: it is marked ``gpu`` and skipped without one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent


def _why_no_cuda() -> str | None:
    try:
        import torch
    except ImportError:
        return "needs torch with a CUDA GPU (torch is not installed)"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    return None


@pytest.hookimpl(tryfirst=True)  # mark before `-m "not gpu"` deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if HERE in item.path.resolve().parents]
    reason = _why_no_cuda() if ours else None
    for item in ours:
        item.add_marker(pytest.mark.gpu)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def capped(ip: Any) -> Iterator[Any]:
    """The shell on a GPU capped at 4 GiB for this process (real OOMs past it); the cap lifted afterwards."""
    import torch

    torch.cuda.init()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(4 * 2**30 / total)
    try:
        yield ip
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
