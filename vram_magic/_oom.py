"""Recognise out-of-memory errors and read what their messages say.

Pure Python: torch is never imported here. A torch exception can only exist once the user imported torch,
so the type check looks in ``sys.modules`` and nowhere else.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator

from vram_magic._types import OOMInfo, OOMKind
from vram_magic._units import to_bytes

# Every wording that means "out of memory", first match wins. Searched in the message with its runs of
# whitespace made single spaces, so a wrapped message still matches.
OOM_PATTERNS: tuple[tuple[re.Pattern[str], OOMKind], ...] = (
    # torch caching allocator, all versions (c10/cuda/CUDACachingAllocator.cpp):
    # "CUDA out of memory. Tried to allocate ..." in the <=1.13, 2.0-2.2 ("capacty") and >=2.3 shapes
    (re.compile(r"\bCUDA out of memory\b"), "cuda"),
    # torch ROCm builds (the same allocator, hipified): "HIP out of memory. Tried to allocate ..."
    (re.compile(r"\bHIP out of memory\b"), "hip"),
    # torch >= 2.4 (c10/xpu/XPUCachingAllocator.cpp) and intel-extension-for-pytorch: "XPU out of memory. ..."
    (re.compile(r"\bXPU out of memory\b"), "xpu"),
    # torch MPS backend (aten/src/ATen/mps/MPSAllocator.mm): "MPS backend out of memory (...)"
    (re.compile(r"\bMPS backend out of memory\b"), "mps"),
    # torch CPU allocator (c10/core/impl/alloc_cpu.cpp): "can't allocate memory" with posix_memalign,
    # "not enough memory" on Windows and Android
    (re.compile(r"\bDefaultCPUAllocator: (?:can't allocate memory|not enough memory)"), "cpu"),
    # torch C10_CUDA_CHECK / C10_CUDA_DRIVER_CHECK on an allocation outside the caching allocator (CUDA
    # context, kernels, expandable segments): "CUDA error: out of memory", "CUDA driver error: out of memory"
    (re.compile(r"\bCUDA (?:driver )?error: out of memory\b"), "cuda"),
    # torch <= 1.0 (THC): "cuda runtime error (2) : out of memory at .../THCStorage.cu:58"
    (re.compile(r"\bcuda runtime error \(2\) : out of memory\b"), "cuda"),
    # torch ROCm builds, C10_HIP_CHECK: "HIP error: out of memory"
    (re.compile(r"\bHIP error: out of memory\b"), "hip"),
    # cuBLAS/cuDNN/cuSOLVER/cuSPARSE could not allocate a handle or workspace (torch, any version):
    # "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    # "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"
    (re.compile(r"\b(?:CUBLAS|CUDNN|CUSOLVER|CUSPARSE)_STATUS_ALLOC_FAILED\b"), "cuda"),
    # torch ROCm builds, hipBLAS: "HIPBLAS_STATUS_ALLOC_FAILED"
    (re.compile(r"\bHIPBLAS_STATUS_ALLOC_FAILED\b"), "hip"),
    # numpy (numpy/_core/src/multiarray/alloc.c, raised as a MemoryError subclass, _ArrayMemoryError):
    # "Unable to allocate 728. TiB for an array with shape (100000000000000,) and data type float64"
    (re.compile(r"\bUnable to allocate \d+(?:\.\d*)? ?[KMGTPE]?i?B for an array\b"), "cpu"),
    # transformers' bitsandbytes 4/8-bit quantizers (quantizer_bnb_4bit.py, quantizer_bnb_8bit.py) and
    # accelerate utils/bnb.py: a quantized load refused because the device_map sends modules to CPU/disk
    (re.compile(r"\bSome modules are dispatched on the CPU or the disk\b"), "dispatch"),
)

# Raised as torch.OutOfMemoryError but not about memory that freeing could give back: a kernel asked for more
# shared memory than the hardware has (torch inductor's static Triton launcher:
# "out of resource: triton_tem_fused_0 Required: 147456 Hardware limit:101376 ...").
_NOT_OOM_DESPITE_TYPE = re.compile(r"\bout of resource: ")

# A size as torch prints it. c10's format_size prints bytes/KiB/MiB/GiB; the MPS allocator's own format_size
# (MPSAllocator.h) prints KB/MB/GB but divides by powers of 1024, so those are binary units too.
_SIZE = r"(\d+(?:\.\d+)?) ?(bytes|B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)\b"

# One fact per entry, each with the wordings that state it; any may be missing from a message.
_FACTS: dict[str, tuple[re.Pattern[str], ...]] = {
    # every allocator; also the CPU one: "you tried to allocate 1125899906842624 bytes"
    "requested": (
        re.compile(r"[Tt]ried to allocate " + _SIZE),
        re.compile(r"Unable to allocate (\d+(?:\.\d*)?) ?(B|KiB|MiB|GiB|TiB|PiB|EiB) for an array"),  # numpy
    ),
    "total": (
        re.compile(_SIZE + r" total capacity"),  # torch <= 1.13, IPEX: "(GPU 0; 11.17 GiB total capacity;"
        re.compile(r"total capaci?ty of " + _SIZE),  # torch 2.0-2.2 "capacty", >= 2.3 "capacity"
    ),
    "free": (
        re.compile(_SIZE + r" free[;)]"),  # torch <= 1.13: "1.50 GiB free;"
        re.compile(r"of which " + _SIZE + r" is free"),  # torch >= 2.0
    ),
    "allocated": (
        re.compile(_SIZE + r" already allocated"),  # torch <= 1.13, IPEX
        re.compile(r"Of the allocated memory " + _SIZE + r" is allocated by PyTorch"),  # torch >= 2.0
    ),
    "reserved": (
        re.compile(_SIZE + r" reserved in total"),  # torch 1.5-1.13 ("... by PyTorch)" or just ")")
        re.compile(_SIZE + r" cached\)"),  # torch 1.0-1.4: "276.96 MiB cached)"
    ),
    # torch >= 2.0: reserved = allocated + this
    "unallocated": (re.compile(r"and " + _SIZE + r" is reserved by PyTorch but unallocated"),),
    # torch >= 2.1 with NVML
    "process": (re.compile(r"this process has " + _SIZE + r" memory in use"),),
    # a per-process cap (set_per_process_memory_fraction), torch 1.x and 2.x: "4.00 GiB allowed;"
    "allowed": (re.compile(_SIZE + r" allowed;"), re.compile(r"max allowed: " + _SIZE)),  # the second: MPS
    # MPS: heaps held by the MPS allocator, and the rest of this process's Metal memory
    "mps_allocated": (re.compile(r"MPS allocated: " + _SIZE),),
    "mps_other": (re.compile(r"other allocations: " + _SIZE),),
}
# torch <= 1.13 and IPEX: "(GPU 0; ..."; torch >= 2.0: "GPU 0 has a total capacity"
_DEVICE = re.compile(r"\(GPU ?(\d+);|\bGPU (\d+) has a total capac")
# torch >= 2.1 with NVML, once per other process on the GPU: "Process 20417 has 1.10 GiB memory in use."
_OTHER_PROCESS = re.compile(r"\bProcess (\d+) has " + _SIZE + r" memory in use")


def _fact(name: str, text: str) -> int | None:
    for pattern in _FACTS[name]:
        match = pattern.search(text)
        if match:
            return to_bytes(match.group(1), match.group(2))
    return None


def _kind(text: str) -> OOMKind | None:
    for pattern, kind in OOM_PATTERNS:
        if pattern.search(text):
            return kind
    return None


def parse_oom_message(text: str) -> OOMInfo | None:
    """Read an out-of-memory message (type name first or not); None when the text is not one."""
    flat = " ".join(text.split())
    kind = _kind(flat)
    if kind is None:
        return None
    allocated = _fact("allocated", flat)
    reserved = _fact("reserved", flat)
    unallocated = _fact("unallocated", flat)
    if reserved is None and allocated is not None and unallocated is not None:
        reserved = allocated + unallocated
    process = _fact("process", flat)
    if kind == "mps":
        # MPS prints its heaps (what it reserved) and the rest of this process's Metal memory.
        reserved = _fact("mps_allocated", flat)
        other = _fact("mps_other", flat)
        if reserved is not None and other is not None:
            process = reserved + other
    device = _DEVICE.search(flat)
    return OOMInfo(
        kind=kind,
        message=text,
        device_index=int(device.group(1) or device.group(2)) if device else None,
        requested_bytes=_fact("requested", flat),
        total_bytes=_fact("total", flat),
        free_bytes=_fact("free", flat),
        allocated_bytes=allocated,
        reserved_bytes=reserved,
        process_bytes=process,
        allowed_bytes=_fact("allowed", flat),
        other_processes=tuple(
            (int(pid), to_bytes(number, unit)) for pid, number, unit in _OTHER_PROCESS.findall(flat)
        ),
    )


def exception_text(exc: BaseException) -> str:
    """``"QualifiedTypeName: message"`` as Python's traceback prints it (``torch.OutOfMemoryError: ...``)."""
    cls = type(exc)
    name = cls.__qualname__
    if cls.__module__ not in ("builtins", "__main__"):
        name = f"{cls.__module__}.{name}"
    try:
        message = str(exc)
    except Exception:
        message = "<exception str() failed>"
    return f"{name}: {message}" if message else name


def _is_torch_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    # torch.OutOfMemoryError in recent torch; torch.cuda.OutOfMemoryError (the same class there) since 1.13
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(
        getattr(torch, "cuda", None), "OutOfMemoryError", None
    )
    return isinstance(oom_type, type) and isinstance(exc, oom_type)


def exception_chain(
    exc: BaseException, caught_by_user: Callable[[BaseException], bool] = lambda _: False
) -> Iterator[BaseException]:
    """``exc``, then its causes and contexts, breadth first, each exception once (so cycles end). A cause or
    context the user's own code caught is not followed: what they raised from it is their own error."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for linked in (current.__cause__, current.__context__):  # `raise X from e`, or raised while handling
            if linked is not None and not caught_by_user(linked):
                todo.append(linked)


def _own_oom(exc: BaseException) -> OOMInfo | None:
    """The OOM this one exception is, ignoring its chain."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return None
    text = exception_text(exc)
    info = parse_oom_message(text)
    if info is None and _is_torch_oom(exc) and not _NOT_OOM_DESPITE_TYPE.search(text):
        info = OOMInfo(kind="cuda", message=text)
    if info is None and isinstance(exc, MemoryError):  # Python/numpy ran out of host RAM
        info = OOMInfo(kind="cpu", message=text)
    return info


def oom_from_exception(
    exc: BaseException, *, caught_by_user: Callable[[BaseException], bool] | None = None
) -> OOMInfo | None:
    """The first out-of-memory error in ``exc`` and its ``__cause__``/``__context__`` chain; else None.

    ``caught_by_user(e)``: True when the user's own code (a notebook cell) caught ``e``. An error raised
    while the user's handler deals with an OOM is a different failure (a bug in their fallback), so such a
    context is not followed; a library that turns an OOM it caught into another error still reports the OOM.
    """
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return None
    for link in exception_chain(exc, caught_by_user or (lambda _: False)):
        info = _own_oom(link)
        if info is not None:
            return info
    return None


def is_oom(exc: BaseException) -> bool:
    """True when ``exc``, or one it was raised from or while handling, is out of memory in substance."""
    return oom_from_exception(exc) is not None
