"""The timeline's GPU figures and a real %%oomsafe --record, on a real GPU under a per-process cap."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
from IPython.utils.capture import capture_output

import vram_magic

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu

GiB = 2**30


def test_each_cell_has_its_own_gpu_peak_end_and_change(tracked: Any) -> None:
    ip = tracked
    torch.zeros(1, device="cuda")  # CUDA initialised: the GPU is counted from the next cell
    ip.run_cell("import torch", store_history=True)
    ip.run_cell("kept = torch.empty(2**30, dtype=torch.uint8, device='cuda')", store_history=True)
    ip.run_cell(
        "scratch = torch.empty(3 * 2**30, dtype=torch.uint8, device='cuda')\ndel scratch", store_history=True
    )
    ip.run_cell("x = 1", store_history=True)
    gpu = [record for record in vram_magic.timeline() if record.device == "cuda:0"]
    _, kept, scratch, quiet = gpu
    assert kept.delta_bytes == GiB and kept.peak_bytes >= kept.end_bytes
    assert scratch.delta_bytes == 0 and scratch.peak_bytes - scratch.start_bytes == 3 * GiB
    assert quiet.peak_bytes == quiet.end_bytes == scratch.end_bytes  # the peak was reset for the new cell
    assert kept.device_used_bytes is not None and kept.device_used_bytes >= kept.end_bytes
    del ip.user_ns["kept"]
    torch.cuda.empty_cache()


def test_record_names_the_lines_that_made_the_memory_and_saves_the_snapshot(
    capped: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ip = capped
    monkeypatch.chdir(tmp_path)
    ip.run_cell("import torch")
    with capture_output() as shown:
        ip.run_cell(
            "%%oomsafe --record\n"
            "a = torch.empty(2**30, dtype=torch.uint8, device='cuda')\n"
            "b = [torch.empty(2**29, dtype=torch.uint8, device='cuda') for _ in range(2)]\n"
            "c = torch.empty(8 * 2**30, dtype=torch.uint8, device='cuda')\n",
            store_history=True,
        )
    report = ip.magics_manager.registry["VramMagics"].last_report
    assert report.recording is not None and report.recording.problem is None
    groups = {group.where: group for group in report.recording.groups}
    assert groups["line 2"].nbytes == GiB and groups["line 2"].count == 1
    assert groups["line 3"].nbytes == GiB and groups["line 3"].count == 2
    snapshot = pickle.loads(Path(report.recording.pickle_path).read_bytes())
    assert snapshot["segments"]
    assert report.recording.html_path is not None and Path(report.recording.html_path).stat().st_size > 0
    text = " ".join("".join(str(o.data.get("text/plain", "")) for o in shown.outputs).split())
    assert "line 2 `a = torch.empty(2**30, dtype=torch.uint8, device='cuda')`: 1.00 GiB" in text
    assert ip.magics_manager.registry["VramMagics"].session._recording is False
    for name in ("a", "b"):
        ip.user_ns.pop(name, None)
