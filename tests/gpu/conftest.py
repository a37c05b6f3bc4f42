"""Everything under tests/gpu needs a CUDA GPU: it is marked ``gpu`` and skipped without one."""

from __future__ import annotations

from pathlib import Path

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
