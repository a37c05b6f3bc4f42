"""take_snapshot on a real GPU: its figures agree with PyTorch's and NVML's own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vram_magic._probe import take_snapshot

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu

GiB = 1 << 30
REPO = Path(__file__).resolve().parents[2]


def _nvml_free(index: int) -> int:
    """NVML's free bytes for torch device ``index``, found by UUID."""
    import pynvml

    pynvml.nvmlInit()
    want = str(torch.cuda.get_device_properties(index).uuid).lower().removeprefix("gpu-")
    for i in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        if str(pynvml.nvmlDeviceGetUUID(handle)).lower().removeprefix("gpu-") == want:
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
    pytest.fail(f"no NVML device has torch device {index}'s UUID {want}")


def test_snapshot_agrees_with_torch_and_nvml() -> None:
    dev = torch.cuda.current_device()
    block = torch.empty(GiB, dtype=torch.uint8, device=dev)
    try:
        snap = take_snapshot()
        free, total = torch.cuda.mem_get_info(dev)
        g = snap.gpus[dev]
        assert g.name
        assert g.total_bytes == total
        assert g.free_bytes == pytest.approx(free, rel=0.01)
        assert g.free_bytes == pytest.approx(_nvml_free(dev), rel=0.01)
        assert g.allocated_bytes == torch.cuda.memory_allocated(dev) >= GiB
        assert g.reserved_bytes == torch.cuda.memory_reserved(dev)
        assert g.process_bytes is not None, snap.problems
        assert g.process_bytes >= g.reserved_bytes
    finally:
        del block
        torch.cuda.empty_cache()


def test_cap_follows_memory_fraction() -> None:
    dev = torch.cuda.current_device()
    torch.zeros(1, device=dev)  # CUDA initialised here
    try:
        torch.cuda.set_per_process_memory_fraction(0.5, dev)
        g = take_snapshot().gpus[dev]
        assert g.total_bytes is not None and g.cap_bytes is not None
        assert g.cap_bytes == pytest.approx(g.total_bytes / 2, rel=0.001)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
    assert take_snapshot().gpus[dev].cap_bytes is None


def test_snapshot_before_cuda_init_starts_no_cuda() -> None:
    """With torch imported but CUDA untouched, the GPUs come from NVML and no context is made."""
    code = (
        "import os, torch, pynvml\n"
        "from vram_magic._probe import take_snapshot\n"
        "snap = take_snapshot()\n"
        "pynvml.nvmlInit()\n"
        "handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]\n"
        "pids = [p.pid for h in handles for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)]\n"
        "g = snap.gpus[0]\n"
        "print(torch.cuda.is_initialized(), os.getpid() in pids, g.allocated_bytes, g.process_bytes,\n"
        "      g.total_bytes is not None and g.free_bytes is not None)\n"
    )
    env = os.environ | {"PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "False", "0", "0", "True"]
