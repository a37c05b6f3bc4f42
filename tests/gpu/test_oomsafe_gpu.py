"""%%oomsafe against a real CUDA OOM, made with a per-process cap (shared/gpu/README.md)."""

from __future__ import annotations

from typing import Any

import pytest
from IPython.utils.capture import capture_output

from vram_magic import OutOfMemoryHandled, Report

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu

GiB = 2**30

# The function's frame holds 1 GiB on the GPU when the 8 GiB request fails under a 4 GiB cap.
FAILING_CELL_SETUP = """
import torch
def grow():
    held = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    more = torch.empty(8 * 2**30, dtype=torch.uint8, device="cuda")
    return held, more
"""


def _allocated() -> int:
    torch.cuda.synchronize()
    return int(torch.cuda.memory_allocated())


def test_plain_ipython_keeps_the_failed_cells_vram(capped: Any) -> None:
    ip = capped
    ip.run_cell(FAILING_CELL_SETUP)
    before = _allocated()
    with capture_output():
        ip.run_cell("grow()\n")
    assert _allocated() - before == GiB  # the baseline: 1 GiB pinned by the traceback
    with capture_output():
        ip.run_line_magic("vram", "free")
    assert _allocated() == before


def test_oomsafe_reclaims_everything_the_failed_cell_pinned(capped: Any) -> None:
    ip = capped
    ip.run_cell(FAILING_CELL_SETUP)
    before = _allocated()
    with capture_output() as captured:
        result = ip.run_cell("%%oomsafe\nblocks = grow()\n")
    assert isinstance(result.error_in_exec, OutOfMemoryHandled)
    assert _allocated() == before  # 100% of the 1 GiB is back
    report: Report = ip.magics_manager.registry["VramMagics"].last_report
    assert report.cleanup.reclaimed_bytes == GiB
    assert report.oom is not None and report.oom.kind == "cuda"
    assert report.oom.requested_bytes == 8 * GiB
    assert report.oom.allowed_bytes == 4 * GiB
    assert report.snapshot.gpus[0].cap_bytes is not None
    assert abs(report.snapshot.gpus[0].cap_bytes - 4 * GiB) < 0.01 * GiB
    assert "cap" in [cause.key for cause in report.causes]
    assert "8.00 GiB" in captured.stdout + "".join(str(o.data.get("text/plain")) for o in captured.outputs)
