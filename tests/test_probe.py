"""take_snapshot on this machine (no GPU, no NVML library) and NVML arithmetic through a fake pynvml.

The fake stands in only for NVML, which does not exist here; it has pynvml's function names and
return shapes (objects with ``.total``/``.free``/``.used``, ``.pid``/``.usedGpuMemory``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import psutil
import pytest

from vram_magic import _probe
from vram_magic._probe import _gpu_snapshot, _match_by_uuid, _NvmlDevice, _TorchFigures, take_snapshot
from vram_magic._types import ProcessMemory, Snapshot

GiB = 1 << 30
ME = os.getpid()
REPO = Path(__file__).resolve().parents[1]


# --- a minimal pynvml ------------------------------------------------------------------------------


class NVMLError(Exception):
    """Like pynvml.NVMLError: carries an error code, str() is NVML's text for it."""

    TEXT: ClassVar[dict[int, str]] = {3: "Not Supported", 12: "NVML Shared Library Not Found"}

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return self.TEXT.get(self.value, f"NVML Error with code {self.value}")


def fake_pynvml(gpus: list[dict[str, Any]], init_error: int | None = None) -> types.ModuleType:
    """gpus: dicts with name, uuid, total, free, compute=[(pid, used)], graphics=[...], process_error."""
    m = types.ModuleType("pynvml")
    m.NVMLError = NVMLError  # type: ignore[attr-defined]
    m.init_calls = 0  # type: ignore[attr-defined]

    def nvmlInit() -> None:
        m.init_calls += 1  # type: ignore[attr-defined]
        if init_error is not None:
            raise NVMLError(init_error)

    def procs(key: str) -> Any:
        def get(h: dict[str, Any]) -> list[types.SimpleNamespace]:
            if h.get("process_error"):
                raise NVMLError(h["process_error"])
            return [types.SimpleNamespace(pid=p, usedGpuMemory=u) for p, u in h.get(key, [])]

        return get

    def memory(h: dict[str, Any]) -> types.SimpleNamespace:
        return types.SimpleNamespace(total=h["total"], free=h["free"], used=h["total"] - h["free"])

    m.nvmlInit = nvmlInit  # type: ignore[attr-defined]
    m.nvmlDeviceGetCount = lambda: len(gpus)  # type: ignore[attr-defined]
    m.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]  # type: ignore[attr-defined]
    m.nvmlDeviceGetName = lambda h: h["name"]  # type: ignore[attr-defined]
    m.nvmlDeviceGetUUID = lambda h: h["uuid"]  # type: ignore[attr-defined]
    m.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
    m.nvmlDeviceGetComputeRunningProcesses = procs("compute")  # type: ignore[attr-defined]
    m.nvmlDeviceGetGraphicsRunningProcesses = procs("graphics")  # type: ignore[attr-defined]
    return m


def gpu(n: int, **kw: Any) -> dict[str, Any]:
    base = {"name": f"NVIDIA Fake {n}", "uuid": f"GPU-{n}{n}{n}{n}aaaa-0000", "total": 80 * GiB}
    return base | {"free": 70 * GiB} | kw


@pytest.fixture
def use_nvml(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install a fake pynvml; the probe's cached NVML state starts empty."""
    if _probe.cuda_initialized():
        pytest.skip("CUDA is initialised in this process; these cover the NVML-only path")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(_probe, "_nvml_state", None)

    def install(gpus: list[dict[str, Any]], init_error: int | None = None) -> types.ModuleType:
        fake = fake_pynvml(gpus, init_error)
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        return fake

    return install


def nvml_unavailable() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return True
    return False


# --- the real machine ------------------------------------------------------------------------------


@pytest.mark.skipif(not nvml_unavailable(), reason="NVML works on this machine")
def test_real_snapshot_has_no_gpus_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    monkeypatch.setattr(_probe, "_nvml_state", None)
    snap = take_snapshot()
    assert snap.gpus == ()
    assert "NVML is unavailable (NVML Shared Library Not Found)" in snap.problems
    assert "torch sees no CUDA GPU (this torch build is CPU-only)" in snap.problems
    for text in snap.problems:
        assert "\n" not in text and len(text) < 120


def test_cpu_figures_are_psutils() -> None:
    before = psutil.Process().memory_info().rss
    cpu = take_snapshot().cpu
    after = psutil.Process().memory_info().rss
    vm = psutil.virtual_memory()
    assert cpu.total_bytes == vm.total
    assert cpu.available_bytes == pytest.approx(vm.available, abs=256 << 20)
    assert cpu.process_rss_bytes is not None
    assert min(before, after) - (64 << 20) <= cpu.process_rss_bytes <= max(before, after) + (64 << 20)


def test_snapshot_without_torch_does_not_import_it() -> None:
    code = (
        "import sys\n"
        "from vram_magic._probe import cuda_initialized, take_snapshot\n"
        "snap = take_snapshot()\n"
        "assert not cuda_initialized()\n"
        "print('torch' in sys.modules)\n"
        "print(snap.cpu.total_bytes)\n"
        "print(*snap.problems, sep='\\n')\n"
    )
    env = os.environ | {"PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "False"
    assert int(out[1]) == psutil.virtual_memory().total
    if nvml_unavailable():
        assert any(p.startswith("NVML is unavailable (") for p in out[2:])
        assert "torch is not imported yet, so it was not asked about GPUs" in out[2:]


def test_without_nvidia_ml_py_says_what_to_install(use_nvml: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    problems = take_snapshot().problems
    assert any("nvidia-ml-py is not installed; pip install nvidia-ml-py" in p for p in problems)


# --- NVML arithmetic -------------------------------------------------------------------------------


def test_own_process_and_others_from_nvml(use_nvml: Any) -> None:
    use_nvml([gpu(0, compute=[(ME, 3 * GiB), (4242, 5 * GiB), (4343, 2 * GiB)])])
    (g,) = take_snapshot().gpus
    assert (g.index, g.name, g.total_bytes, g.free_bytes) == (0, "NVIDIA Fake 0", 80 * GiB, 70 * GiB)
    assert g.process_bytes == 3 * GiB
    assert g.other_processes == (ProcessMemory(4242, 5 * GiB), ProcessMemory(4343, 2 * GiB))
    assert (g.others_bytes, g.others_are_remainder) == (7 * GiB, False)
    assert (g.allocated_bytes, g.reserved_bytes, g.cap_bytes) == (0, 0, None)


def test_process_in_compute_and_graphics_lists_counts_once(use_nvml: Any) -> None:
    use_nvml([gpu(0, compute=[(4242, 5 * GiB)], graphics=[(4242, 5 * GiB), (77, GiB)])])
    (g,) = take_snapshot().gpus
    assert g.process_bytes == 0
    assert (g.others_bytes, g.other_processes) == (
        6 * GiB,
        (ProcessMemory(4242, 5 * GiB), ProcessMemory(77, GiB)),
    )


def test_nvml_does_not_list_us_and_we_hold_nothing(use_nvml: Any) -> None:
    use_nvml([gpu(0, compute=[(4242, 5 * GiB)])])
    (g,) = take_snapshot().gpus
    assert (g.process_bytes, g.others_bytes, g.others_are_remainder) == (0, 5 * GiB, False)


def test_nvml_misses_us_while_torch_holds_memory() -> None:
    """A container's PID namespace: NVML lists a host pid we cannot recognise as ours."""
    nv = _NvmlDevice(0, "H100", "GPU-a", 80 * GiB, 60 * GiB, (ProcessMemory(123456, 12 * GiB),))
    tf = _TorchFigures(allocated_bytes=9 * GiB, reserved_bytes=10 * GiB, has_context=True)
    problems: list[str] = []
    g = _gpu_snapshot(0, nv, tf, problems)
    assert g.process_bytes is None
    assert (g.other_processes, g.others_bytes, g.others_are_remainder) == ((), 10 * GiB, True)
    assert problems == [
        "NVML does not list this process on GPU 0 (a container's PID namespace?): "
        "other processes are counted as the remainder"
    ]


def test_a_cap_is_a_share_of_pytorchs_total_not_nvmls() -> None:
    """Measured on an H100: NVML says 79.65 GiB, PyTorch (CUDA) 79.18 GiB, and set_per_process_memory_fraction
    takes its share of PyTorch's. A T4 cap (14.75 GiB) must read back as 14.75 GiB, not 14.84."""
    torch_total, nvml_total = 85_017_985_024, 85_520_809_984
    t4 = round(14.75 * GiB)
    nv = _NvmlDevice(0, "H100", "GPU-a", nvml_total, nvml_total - 500 * 2**20, ())
    tf = _TorchFigures(total_bytes=torch_total, fraction=t4 / torch_total)  # no CUDA context yet
    g = _gpu_snapshot(0, nv, tf, [])
    assert g.total_bytes == nvml_total  # no context: total and free come from NVML, as a pair
    assert g.cap_bytes is not None and abs(g.cap_bytes - t4) <= 1


def test_other_process_memory_unknown_gives_labelled_remainder(use_nvml: Any) -> None:
    use_nvml([gpu(0, compute=[(ME, 2 * GiB), (4242, None), (4343, 3 * GiB)])])
    snap = take_snapshot()
    (g,) = snap.gpus
    assert g.process_bytes == 2 * GiB
    assert g.other_processes == (ProcessMemory(4242, None), ProcessMemory(4343, 3 * GiB))
    assert (g.others_bytes, g.others_are_remainder) == (8 * GiB, True)  # 80 - 70 - 2
    assert any("does not report every process's memory on GPU 0" in p for p in snap.problems)


def test_own_memory_unknown(use_nvml: Any) -> None:
    use_nvml([gpu(0, compute=[(ME, None), (4242, 4 * GiB)])])
    (g,) = take_snapshot().gpus
    assert g.process_bytes is None
    assert (g.others_bytes, g.others_are_remainder) == (4 * GiB, False)


def test_process_query_error(use_nvml: Any) -> None:
    use_nvml([gpu(0, free=50 * GiB, process_error=3)])
    snap = take_snapshot()
    (g,) = snap.gpus
    assert (g.total_bytes, g.free_bytes, g.process_bytes) == (80 * GiB, 50 * GiB, None)
    assert (g.others_bytes, g.others_are_remainder, g.other_processes) == (30 * GiB, True, ())
    assert (
        "NVML could not list processes on GPU 0 (Not Supported): other processes are counted as the remainder"
    ) in snap.problems


def test_nvml_init_failure_is_reported_and_not_retried(use_nvml: Any) -> None:
    fake = use_nvml([gpu(0)], init_error=12)
    first, second = take_snapshot(), take_snapshot()
    assert first.gpus == second.gpus == ()
    assert any(p.startswith("NVML is unavailable (NVML Shared Library Not Found)") for p in first.problems)
    assert fake.init_calls == 1


def test_nvml_initialised_once(use_nvml: Any) -> None:
    fake = use_nvml([gpu(0)])
    take_snapshot()
    take_snapshot()
    assert fake.init_calls == 1


# --- which NVML device is which torch index --------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "names"),
    [
        (None, ["NVIDIA Fake 0", "NVIDIA Fake 1", "NVIDIA Fake 2"]),
        ("2,0", ["NVIDIA Fake 2", "NVIDIA Fake 0"]),
        ("GPU-1111", ["NVIDIA Fake 1"]),  # a UUID prefix, as CUDA accepts
        ("1,7,0", ["NVIDIA Fake 1"]),  # CUDA stops at the first index it cannot use
        ("", []),
        ("-1", []),
    ],
)
def test_cuda_visible_devices(
    use_nvml: Any, monkeypatch: pytest.MonkeyPatch, env: str | None, names: list[str]
) -> None:
    use_nvml([gpu(0), gpu(1), gpu(2)])
    if env is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    snap = take_snapshot()
    assert [g.name for g in snap.gpus] == names
    assert [g.index for g in snap.gpus] == list(range(len(names)))
    assert (f"no GPU is visible under CUDA_VISIBLE_DEVICES={env!r}" in snap.problems) == (not names)


def test_torch_devices_match_nvml_by_uuid() -> None:
    nvml = [_NvmlDevice(i, uuid=f"GPU-{i}{i}{i}{i}AAAA-0000") for i in range(3)]
    # torch reports UUIDs without "GPU-"; a MIG slice's UUID matches no whole GPU
    torch_uuids: list[str | None] = ["2222aaaa-0000", "GPU-0000aaaa-0000", "MIG-9999"]
    matched = _match_by_uuid(torch_uuids, nvml, by_env=nvml)
    assert [d.index if d else None for d in matched] == [2, 0, None]
    assert [d.index if d else None for d in _match_by_uuid([None, None], nvml, by_env=nvml[1:])] == [1, 2]


def test_problem_sentences_are_short(use_nvml: Any) -> None:
    use_nvml([gpu(0, process_error=3), gpu(1, compute=[(1, None)])])
    snap = take_snapshot()
    assert isinstance(snap, Snapshot) and len(snap.problems) >= 2
    for text in snap.problems:
        assert "\n" not in text and len(text) < 120, text
