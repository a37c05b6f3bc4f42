"""Snapshots of GPU and CPU memory: PyTorch, NVML and psutil, each allowed to fail.

Nothing here creates a CUDA context just to look: torch is used only if it is already imported,
and its CUDA calls only once CUDA is initialised. Every failure becomes a plain sentence in
``Snapshot.problems``; nothing raises.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any

from vram_magic._types import CpuMemory, GpuSnapshot, ProcessMemory, Snapshot


@dataclass(frozen=True)
class _NvmlDevice:
    """One GPU as NVML sees it. ``processes`` is None when they could not be listed."""

    index: int
    name: str | None = None
    uuid: str | None = None
    total_bytes: int | None = None
    free_bytes: int | None = None
    processes: tuple[ProcessMemory, ...] | None = None
    error: str | None = None
    process_error: str | None = None


@dataclass(frozen=True)
class _TorchFigures:
    """One GPU as this process's PyTorch sees it (only read once CUDA is initialised)."""

    name: str | None = None
    uuid: str | None = None
    total_bytes: int | None = None
    free_bytes: int | None = None
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    fraction: float | None = None
    has_context: bool = False


# (pynvml module or None, why NVML is unavailable or None); set by the first _nvml() call.
_nvml_state: tuple[Any, str | None] | None = None
# NVML's errors when no NVIDIA driver is installed or loaded: then CUDA has no GPU either.
_NO_DRIVER_ERRORS = ("NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded")
_no_driver = False


def cuda_initialized() -> bool:
    """True when torch is imported and has initialised CUDA. Never imports torch."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_initialized())
    except Exception:
        return False


def take_snapshot() -> Snapshot:
    """Every visible GPU, this machine's RAM, and what could not be read."""
    problems: list[str] = []
    try:
        nvml = _nvml_devices()
        torch_ready = cuda_initialized()
        if nvml is None:
            problems.append(_nvml_problem(torch_ready))
        problems.extend(_torch_problems(torch_ready, nvml_ok=nvml is not None))
        pairs = _visible_devices(nvml or [], torch_ready, problems)
        gpus = tuple(_gpu_snapshot(i, nv, tf, problems) for i, (nv, tf) in enumerate(pairs))
    except Exception as exc:  # a bug here must not break the user's cell
        problems.append(f"GPU figures could not be read ({_why(exc)})")
        gpus = ()
    return Snapshot(gpus=gpus, cpu=_cpu_memory(problems), problems=tuple(problems))


# --- NVML ------------------------------------------------------------------------------------------


def _nvml() -> Any:
    """The initialised pynvml module, or None. Initialises once and remembers a failure."""
    global _nvml_state, _no_driver
    if _nvml_state is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml_state = (pynvml, None)
        except ImportError:
            _nvml_state = (None, "nvidia-ml-py is not installed; pip install nvidia-ml-py")
        except Exception as exc:
            _nvml_state = (None, _why(exc))
            _no_driver = type(exc).__name__ in _NO_DRIVER_ERRORS
    return _nvml_state[0]


def surely_no_gpu() -> bool:
    """True when this process surely has no GPU for PyTorch, found without importing torch: no NVIDIA
    driver (or no device CUDA_VISIBLE_DEVICES lets through) and no ROCm device. False when unsure."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            return not torch.cuda.is_available()
        except Exception:
            return False
    if os.path.exists("/dev/kfd"):  # AMD's ROCm: PyTorch's cuda is HIP there, NVML sees nothing
        return False
    devices = _nvml_devices()
    if devices is None:
        return _no_driver
    return not _visible_from_env(devices, os.environ.get("CUDA_VISIBLE_DEVICES"))


def visible_nvml_indices() -> list[int]:
    """The NVML index of each GPU CUDA sees, in CUDA order (CUDA_VISIBLE_DEVICES applied); [] without NVML."""
    devices = _nvml_devices()
    return [d.index for d in _visible_from_env(devices or [], os.environ.get("CUDA_VISIBLE_DEVICES"))]


def nvml_used_bytes(nvml_indices: list[int]) -> list[int | None]:
    """NVML's used memory of each of these GPUs (every process's), None where it cannot be read. Cheap: no
    process list is asked for."""
    nvml = _nvml()
    used: list[int | None] = []
    for index in nvml_indices:
        try:
            info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index))
            used.append(int(info.total) - int(info.free))
        except Exception:
            used.append(None)
    return used


def _nvml_problem(torch_ready: bool) -> str:
    why = _nvml_state[1] if _nvml_state is not None else None
    text = f"NVML is unavailable ({why or 'unknown reason'})"
    return text + (": per-process figures come from PyTorch only" if torch_ready else "")


def _nvml_devices() -> list[_NvmlDevice] | None:
    """Every GPU NVML sees, in NVML order; None when NVML is unavailable."""
    nvml = _nvml()
    if nvml is None:
        return None
    global _nvml_state
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except Exception as exc:
        _nvml_state = (None, f"it could not count GPUs: {_why(exc)}")
        return None
    return [_nvml_device(nvml, i) for i in range(count)]


def _nvml_device(nvml: Any, index: int) -> _NvmlDevice:
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name, uuid = _text(nvml.nvmlDeviceGetName(handle)), _text(nvml.nvmlDeviceGetUUID(handle))
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
    except Exception as exc:
        return _NvmlDevice(index, error=_why(exc))
    try:
        found = list(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
    except Exception as exc:
        return _NvmlDevice(index, name, uuid, int(info.total), int(info.free), process_error=_why(exc))
    with contextlib.suppress(Exception):  # compute processes matter; some GPUs refuse this query
        found += list(nvml.nvmlDeviceGetGraphicsRunningProcesses(handle))
    used: dict[int, int | None] = {}
    for p in found:  # a process doing compute and graphics appears twice: count it once
        before, now = used.get(int(p.pid)), p.usedGpuMemory
        used[int(p.pid)] = max(before or 0, now) if now is not None else before
    procs = tuple(ProcessMemory(pid, b) for pid, b in used.items())
    return _NvmlDevice(index, name, uuid, int(info.total), int(info.free), procs)


# --- torch -----------------------------------------------------------------------------------------


def _torch_problems(torch_ready: bool, nvml_ok: bool) -> list[str]:
    """Why PyTorch adds no GPUs, when it does not (and that matters)."""
    torch = sys.modules.get("torch")
    if torch is None:
        if importlib.util.find_spec("torch") is None:
            return ["torch is not installed"]
        return [] if nvml_ok else ["torch is not imported yet, so it was not asked about GPUs"]
    if torch_ready:
        return []
    version = getattr(torch, "version", None)
    if getattr(version, "cuda", None) is None and getattr(version, "hip", None) is None:
        return ["torch sees no CUDA GPU (this torch build is CPU-only)"]
    if nvml_ok:
        return []  # NVML has the devices; PyTorch holds nothing yet
    try:  # counts devices without creating a context
        available = bool(torch.cuda.is_available())
    except Exception:
        available = False
    if not available:
        return ["torch sees no CUDA GPU (no device or driver is visible to this process)"]
    return ["CUDA is not initialised here yet, and without NVML its GPUs cannot be read"]


def _torch_figures(index: int, problems: list[str]) -> _TorchFigures:
    """PyTorch's figures for one device. Call only when CUDA is initialised."""
    import torch

    name = uuid = None
    total = free = allocated = reserved = None
    fraction = None
    try:
        props = torch.cuda.get_device_properties(index)
        name, total = str(props.name), int(props.total_memory)
        uuid = _norm_uuid(str(getattr(props, "uuid", "")))
    except Exception as exc:
        problems.append(f"PyTorch could not describe GPU {index} ({_why(exc)})")
    try:
        allocated = int(torch.cuda.memory_allocated(index))
        reserved = int(torch.cuda.memory_reserved(index))
    except Exception as exc:
        problems.append(f"PyTorch could not read its memory on GPU {index} ({_why(exc)})")
    context = has_context(index)
    if context:  # mem_get_info would otherwise create a context on this device
        try:
            free, total = (int(x) for x in torch.cuda.mem_get_info(index))
        except Exception as exc:
            problems.append(f"PyTorch could not read free memory on GPU {index} ({_why(exc)})")
    with contextlib.suppress(Exception):  # older torch has no getter; no cap is the common case
        fraction = float(torch.cuda.get_per_process_memory_fraction(index))
    return _TorchFigures(name, uuid, total, free, allocated, reserved, fraction, context)


def has_context(index: int) -> bool:
    """Whether this process has a CUDA context on GPU ``index`` (asking creates none)."""
    import torch

    try:
        probe = getattr(torch._C, "_cuda_hasPrimaryContext", None)
        if probe is not None:
            return bool(probe(index))
        return index == torch.cuda.current_device()
    except Exception:
        return False


# --- matching torch devices to NVML devices --------------------------------------------------------


def _visible_devices(
    nvml: list[_NvmlDevice], torch_ready: bool, problems: list[str]
) -> list[tuple[_NvmlDevice | None, _TorchFigures | None]]:
    """(NVML device, PyTorch figures) for each GPU this process can use, in CUDA order."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    by_env = _visible_from_env(nvml, env)
    if not torch_ready:
        if nvml and not by_env:
            problems.append(f"no GPU is visible under CUDA_VISIBLE_DEVICES={env!r}")
        return [(nv, None) for nv in by_env]
    import torch

    figures = [_torch_figures(i, problems) for i in range(int(torch.cuda.device_count()))]
    matched = _match_by_uuid([tf.uuid for tf in figures], nvml, by_env)
    if nvml:
        for i, nv in enumerate(matched):
            if nv is None:
                problems.append(f"GPU {i} has no matching NVML device (a MIG slice?): PyTorch figures only")
    return list(zip(matched, figures, strict=True))


def _visible_from_env(nvml: list[_NvmlDevice], env: str | None) -> list[_NvmlDevice]:
    """The NVML devices CUDA_VISIBLE_DEVICES lets CUDA see, in CUDA order (CUDA's own parsing:
    indices or GPU-UUID prefixes; the first entry it cannot use ends the list)."""
    if env is None:
        return list(nvml)
    visible: list[_NvmlDevice] = []
    for token in (t.strip() for t in env.split(",")):
        if token.lstrip("-").isdigit():
            hits = [d for d in nvml if d.index == int(token)]
        elif token.startswith("GPU-"):
            want = _norm_uuid(token) or "?"
            hits = [d for d in nvml if (_norm_uuid(d.uuid) or "").startswith(want)]
        else:
            hits = []  # MIG-... and anything else: not mapped here
        if len(hits) != 1 or hits[0] in visible:
            break
        visible.append(hits[0])
    return visible


def _match_by_uuid(
    torch_uuids: list[str | None], nvml: list[_NvmlDevice], by_env: list[_NvmlDevice]
) -> list[_NvmlDevice | None]:
    """The NVML device for each torch index: by UUID, or by position in ``by_env`` when UUIDs are
    unknown on either side."""
    nvml_uuids = {_norm_uuid(d.uuid): d for d in nvml if d.uuid}
    matched: list[_NvmlDevice | None] = []
    for i, uuid in enumerate(torch_uuids):
        if _norm_uuid(uuid) and nvml_uuids:
            matched.append(nvml_uuids.get(_norm_uuid(uuid)))
        else:
            matched.append(by_env[i] if i < len(by_env) else None)
    return matched


def _norm_uuid(uuid: str | None) -> str | None:
    """'GPU-ABCD-...' (NVML) and 'abcd-...' (torch) compare equal."""
    if not uuid:
        return None
    uuid = uuid.strip().lower()
    return uuid.removeprefix("gpu-") or None


# --- one GPU ---------------------------------------------------------------------------------------


def _gpu_snapshot(
    index: int, nv: _NvmlDevice | None, tf: _TorchFigures | None, problems: list[str]
) -> GpuSnapshot:
    """Merge NVML's and PyTorch's view of GPU ``index`` (torch numbering)."""
    if nv is not None and nv.error:
        problems.append(f"NVML could not read GPU {index} ({nv.error})")
    # total and free come as a pair from one source: CUDA's own view first, else NVML's.
    total: int | None
    free: int | None
    if tf is not None and tf.free_bytes is not None:
        total, free = tf.total_bytes, tf.free_bytes
    elif nv is not None and nv.total_bytes is not None:
        total, free = nv.total_bytes, nv.free_bytes
    else:
        total, free = (tf.total_bytes if tf else None), None
    allocated: int | None = tf.allocated_bytes if tf else 0
    reserved: int | None = tf.reserved_bytes if tf else 0
    cap = None
    if tf and tf.fraction is not None and tf.fraction < 1.0 and tf.total_bytes is not None:
        # a share of PyTorch's own total (CUDA's), not NVML's larger one (79.65 vs 79.18 GiB on an H100)
        cap = int(tf.fraction * tf.total_bytes)
    in_use_here = bool(tf and (tf.has_context or (tf.reserved_bytes or 0) > 0))
    procs = nv.processes if nv is not None else None
    mine, others, others_bytes, remainder = _split_processes(procs, total, free, reserved, in_use_here)
    if nv is not None and nv.process_error:
        problems.append(
            f"NVML could not list processes on GPU {index} ({nv.process_error}): "
            "other processes are counted as the remainder"
        )
    elif procs is not None and remainder:
        problems.append(
            f"NVML does not list this process on GPU {index} (a container's PID namespace?): "
            "other processes are counted as the remainder"
            if mine is None and in_use_here
            else f"NVML does not report every process's memory on GPU {index}: "
            "other processes are counted as the remainder"
        )
    return GpuSnapshot(
        index=index,
        name=(nv.name if nv else None) or (tf.name if tf else None),
        total_bytes=total,
        free_bytes=free,
        allocated_bytes=allocated,
        reserved_bytes=reserved,
        process_bytes=mine,
        cap_bytes=cap,
        other_processes=others,
        others_bytes=others_bytes,
        others_are_remainder=remainder,
    )


def _split_processes(
    procs: tuple[ProcessMemory, ...] | None,
    total: int | None,
    free: int | None,
    reserved: int | None,
    in_use_here: bool,
) -> tuple[int | None, tuple[ProcessMemory, ...], int | None, bool]:
    """(this process's bytes, other processes, their bytes, whether that is a remainder).

    The remainder is total - free - this process (NVML's figure, else PyTorch's reserved), used
    whenever NVML cannot name every other process's memory.
    """

    def remainder(mine: int | None) -> int | None:
        used_here = mine if mine is not None else reserved or 0
        return max(total - free - used_here, 0) if total is not None and free is not None else None

    if procs is None:
        left = remainder(None)
        return None, (), left, left is not None
    pid = os.getpid()
    own = [p for p in procs if p.pid == pid]
    others = tuple(p for p in procs if p.pid != pid)
    if not own and in_use_here:  # NVML lists pids of another namespace: none of them is knowably us
        left = remainder(None)
        return None, (), left, left is not None
    mine = own[0].used_bytes if own else 0
    if any(p.used_bytes is None for p in others):
        left = remainder(mine)
        return mine, others, left, left is not None
    return mine, others, sum(p.used_bytes or 0 for p in others), False


# --- CPU -------------------------------------------------------------------------------------------


def _cpu_memory(problems: list[str]) -> CpuMemory:
    """This machine's RAM and this process's resident set (psutil)."""
    try:
        import psutil
    except ImportError:
        problems.append("psutil is not installed, so RAM figures are missing")
        return CpuMemory(None, None, None)
    total = available = rss = None
    try:
        vm = psutil.virtual_memory()
        total, available = int(vm.total), int(vm.available)
        rss = int(psutil.Process().memory_info().rss)
    except Exception as exc:
        problems.append(f"psutil could not read RAM ({_why(exc)})")
    return CpuMemory(total_bytes=total, available_bytes=available, process_rss_bytes=rss)


# --- small helpers ---------------------------------------------------------------------------------


def _why(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value) if value is not None else None
