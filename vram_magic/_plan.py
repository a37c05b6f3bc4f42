"""The fix ladder: make diagnosed fixes runnable (the user's cell, rewritten) and estimate which fit.

Pure Python: no IPython. Whether a fix fits is judged from the estimator's figures for the cell's model
when the caller has them (``needs``), else roughly (a share of what the failed allocation asked for). The
judgement decides what ``--auto`` skips, never what is shown.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from vram_magic._diagnose import failing_gpu
from vram_magic._render_text import format_bytes
from vram_magic._rewrite import NotApplicable, diff, rewrite
from vram_magic._types import Fix, GpuSnapshot, MemorySnapshot, OOMInfo

REWRITE_FIXES = frozenset({"bf16", "8bit", "offload", "4bit", "cpu", "merge-cpu", "half-batch"})
# What a load needs after the fix, as a share of what it asked for as written (16-bit weights assumed):
# int8 weights plus the layers bitsandbytes keeps in 16-bit; NF4 weights plus quantization state.
_LOAD_SHARE = {"8bit": 0.6, "4bit": 0.35}
_FLOAT32 = re.compile(r"\bfloat32\b|\btorch\.float\b")
_ALWAYS_FITS = frozenset({"offload", "cpu", "merge-cpu"})
_GPU_HEADROOM = 0.1  # of each GPU's free memory, kept for activations and the CUDA context
_MIN_GPU_HEADROOM_BYTES = 512 * 2**20
_CPU_HEADROOM_BYTES = 2 * 2**30
_LIFT_CAP = "import torch\ntorch.cuda.set_per_process_memory_fraction(1.0)\n"


@dataclass(frozen=True)
class Room:
    """What the failed cell could use now, after the cleanup."""

    gpu_bytes: int | None
    gpu_free_without_cap_bytes: int | None
    max_memory: dict[int | str, int]
    compute_dtype: str


def room_after_cleanup(snapshot: MemorySnapshot, oom: OOMInfo | None, freed_bytes: int) -> Room:
    """Room on the failing GPU (the live snapshot when there is one, else the message plus what was freed)."""
    gpu = failing_gpu(snapshot, oom)
    if gpu is not None:
        room = _gpu_room(gpu)
        free = gpu.free_bytes
    else:
        room = oom.room_bytes(freed_bytes) if oom else None
        free = None if oom is None or oom.free_bytes is None else oom.free_bytes + freed_bytes
    max_memory: dict[int | str, int] = {}
    for each in snapshot.gpus:
        each_room = _gpu_room(each)
        if each_room is not None:
            headroom = max(int(each_room * _GPU_HEADROOM), _MIN_GPU_HEADROOM_BYTES)
            max_memory[each.index] = max(each_room - headroom, 0)
    if snapshot.cpu.available_bytes is not None:
        max_memory["cpu"] = max(snapshot.cpu.available_bytes - _CPU_HEADROOM_BYTES, 0)
    return Room(room, free, max_memory, _compute_dtype())


def make_runnable(
    fixes: tuple[Fix, ...],
    cell: str,
    oom: OOMInfo | None,
    room: Room,
    needs: Mapping[str, int] | None = None,
) -> tuple[Fix, ...]:
    """Attach to each fix the cell it runs (and a diff to show), and whether it is expected to fit. A fix
    the cell already has (bf16 on a bfloat16 load) is dropped; one the cell gives it nothing to change for
    stays as advice, with the reason. ``needs``: the estimator's peak bytes per load fix key, for the
    model the cell loads."""
    requested = oom.requested_bytes if oom else None
    planned: list[Fix] = []
    for fix in fixes:
        if fix.key in REWRITE_FIXES:
            try:
                fixed_cell = rewrite(cell, fix.key, **_options(fix.key, room))
            except NotApplicable as reason:
                if not reason.already:  # a fix the cell already has is no way out: it is dropped
                    planned.append(replace(fix, why=f"{fix.why} (Apply it by hand: {reason.reason}.)"))
                continue
            fix = replace(fix, rewritten_cell=fixed_cell, code=diff(cell, fixed_cell))
        elif fix.key == "free":
            fix = replace(fix, rewritten_cell=cell)
        elif fix.key == "lift-cap":
            fix = replace(fix, rewritten_cell=_LIFT_CAP + cell)
        planned.append(_estimate(fix, requested, room, cell, needs or {}))
    return tuple(planned)


def _estimate(fix: Fix, requested: int | None, room: Room, cell: str, needs: Mapping[str, int]) -> Fix:
    if fix.key in _ALWAYS_FITS:
        return replace(fix, fits=True)
    if fix.fits is not None:  # "free" was judged by the diagnosis
        return fix
    needed: int | None = None
    available = room.gpu_bytes
    if fix.key in needs:  # from the model's config: see _estimate.plans
        needed = needs[fix.key]
    elif requested is None:
        return fix
    elif fix.key in _LOAD_SHARE:
        needed = int(requested * _LOAD_SHARE[fix.key])
    elif fix.key == "bf16" and _FLOAT32.search(cell):
        needed = requested // 2  # only a load the cell asks for in float32 is known to halve
    elif fix.key == "lift-cap":
        needed, available = requested, room.gpu_free_without_cap_bytes
    if needed is None or available is None:
        return replace(fix, needed_bytes=needed)
    fits = needed <= available
    if not fits:
        fix = replace(fix, why=f"{fix.why} Estimated not to fit: needs about {format_bytes(needed)}.")
    return replace(fix, needed_bytes=needed, fits=fits)


def _options(fix_key: str, room: Room) -> dict[str, object]:
    if fix_key == "4bit":
        return {"compute_dtype": room.compute_dtype}
    if fix_key == "offload" and any(isinstance(key, int) for key in room.max_memory):
        # Without a GPU's figures, limits would name only the CPU and keep the whole model off the GPU:
        # device_map="auto" alone lets accelerate measure the GPUs itself.
        return {"max_memory": room.max_memory}
    return {}


def _gpu_room(gpu: GpuSnapshot) -> int | None:
    if gpu.free_bytes is None:
        return None
    if gpu.cap_bytes is None or gpu.reserved_bytes is None:
        return gpu.free_bytes
    return max(min(gpu.free_bytes, gpu.cap_bytes - gpu.reserved_bytes), 0)


def _compute_dtype() -> str:
    """bfloat16 where the GPU supports it (Ampere and newer) or there is no GPU; else float16."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "float16"
    return "bfloat16"
