"""Checked fixes: each fix the diagnosis suggests is made on the user's cell and checked before it is offered.

A fix is offered only if it applies to this cell (the same reading preflight uses), its result parses, it
changes something, and, where it changes a load, the estimator says what the fixed cell needs: a fix that
needs as much as the cell as written ("bfloat16" for a checkpoint that already loads in bfloat16) is not
offered. A fix that would move a model to the CPU is offered only if CPU RAM holds it: one that does not would
kill the kernel and lose every variable, which is worse than the OOM. Fixes estimated to fit come first, then
those that may, then advice to follow by hand, then those estimated not to fit; the diagnosis' order holds
within each group. Pure Python: no IPython.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace

import libcst as cst

from vram_magic._caps import NO_BF16, rehearsed_card
from vram_magic._diagnose import failing_gpu
from vram_magic._errors import NotApplicable
from vram_magic._types import Fix, GpuSnapshot, OOMInfo, Snapshot, facts
from vram_magic.cell import Cell, Held, Load, read_cell
from vram_magic.fixes import FIXES, Options, apply_fix, diff

_GPU_HEADROOM = 0.1  # of each GPU's free memory, kept for activations and the CUDA context
_MIN_GPU_HEADROOM_BYTES = 512 * 2**20
_CPU_HEADROOM_BYTES = 2 * 2**30
_DISK_HEADROOM_BYTES = 2 * 2**30
OFFLOAD_FOLDER = "offload"  # where the offload fix puts what neither the GPU nor CPU RAM holds
_LIFT_CAP = "import torch\ntorch.cuda.set_per_process_memory_fraction(1.0)\n"
_ADVICE = frozenset({"lift-cap", "expandable-segments", "other-process"})


@dataclass(frozen=True)
class Room:
    """What the failed cell could use now, after the cleanup."""

    gpu_bytes: int | None
    gpu_free_without_cap_bytes: int | None
    max_memory: dict[int | str, int]
    compute_dtype: str
    cpu_bytes: int | None = None  # CPU RAM available, less headroom


@dataclass(frozen=True)
class Context:
    """What checking a fix needs: the cell as read (with the notebook's names), the text the fixes rewrite,
    the room, and whether the failure was in a model load (then the loads' estimates are the whole need)."""

    cell: Cell
    namespace: Mapping[str, object]
    oom: OOMInfo | None
    room: Room
    failed_in_load: bool = True
    advise_elsewhere: frozenset[str] = frozenset()  # fixes worth advising by hand when not in this cell
    failed_load: int | None = None  # the index, among the cell's loads, of the load that failed
    # Training preflight: the training fixes are sized by its estimate (with a GPU here, or the cap planned
    # for without one), and a smaller batch is made as small as it must be to fit.
    training_preflight: bool = False
    gpu_here: bool = True


def room_after_cleanup(snapshot: Snapshot, oom: OOMInfo | None, freed_bytes: int) -> Room:
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
    cpu = None
    if snapshot.cpu.available_bytes is not None:
        cpu = max(snapshot.cpu.available_bytes - _CPU_HEADROOM_BYTES, 0)
        max_memory["cpu"] = cpu
    return Room(room, free, max_memory, _compute_dtype(), cpu)


def make_runnable(fixes: tuple[Fix, ...], context: Context) -> tuple[Fix, ...]:
    """Each fix with the cell it runs (and a diff to show) once checked, ranked fits first (see the
    module's doc); fixes that fail a check are left out."""
    planned: list[Fix] = []
    for fix in fixes:
        if fix.key in FIXES:
            checked = _checked(fix, context)
            if checked is not None:
                planned.append(checked)
        elif fix.key == "free":
            planned.append(replace(fix, rewritten_cell=context.cell.source))
        elif fix.key == "lift-cap":
            planned.append(_lift_cap(replace(fix, rewritten_cell=_LIFT_CAP + context.cell.source), context))
        else:
            planned.append(fix)
    return tuple(sorted(planned, key=_group))


def _group(fix: Fix) -> int:
    """0: runnable and estimated to fit; 1: runnable, may fit; 2: advice, fixes that undo a setting, and a
    smaller evaluation batch (a training step that ran out is rarely its evaluation); 3: estimated not to
    fit."""
    if fix.fits is False:
        return 3
    if not fix.runnable or fix.key in _ADVICE or only_the_evaluation_batch(fix):
        return 2
    return 0 if fix.fits else 1


def only_the_evaluation_batch(fix: Fix) -> bool:
    return fix.key == "half-batch" and fix.fact("role") == "eval"


def _checked(fix: Fix, context: Context) -> Fix | None:
    if context.training_preflight and fix.key == "half-batch":
        return _split_to_fit(fix, context)
    return _made(fix, context, _options(fix.key, context.room))


def _split_to_fit(fix: Fix, context: Context) -> Fix | None:
    """The batch made 2, 4, 8... times smaller (and the accumulation as many times larger) until the
    training estimate fits; the smallest split tried when none does."""
    options = _options(fix.key, context.room)
    made = None
    factor = 2
    while True:
        tried = _made(fix, context, replace(options, factor=factor))
        if tried is None:
            return made
        made = tried
        if made.fits is not False or made.fact("new", 1) <= 1:
            return made
        factor *= 2


def _made(fix: Fix, context: Context, options: Options) -> Fix | None:
    try:
        rewritten = _rewritten(fix, context, options)
    except NotApplicable as reason:
        if reason.elsewhere and fix.key in context.advise_elsewhere:  # code of an earlier cell: by hand
            return replace(fix, by_hand=reason.reason)
        return None
    if rewritten is None:
        return None
    fix, after = rewritten
    if fix.key in ("bf16", "8bit", "4bit"):
        return _sized_load(fix, context, after)
    if fix.key == "offload":
        return _sized_offload(fix, context)
    if fix.key in ("cpu", "merge-cpu"):
        return _sized_on_cpu(fix, context, after)
    if context.training_preflight and fix.key in ("half-batch", "checkpointing"):
        return _sized_training(fix, context, after)
    return fix


def _rewritten(fix: Fix, context: Context, options: Options) -> tuple[Fix, Cell] | None:
    """The fix made on the cell, with its diff, and the fixed cell read; None when it changes nothing or
    would hand back broken code (a fix never does). Raises NotApplicable."""
    made = apply_fix(context.cell, fix.key, options)
    if made.code == context.cell.source:
        return None  # changes nothing
    try:
        compile(made.code, "<fixed cell>", "exec")
        after = read_cell(made.code, context.namespace)
    except (SyntaxError, cst.ParserSyntaxError):
        return None
    code = diff(context.cell.source, made.code)
    return replace(fix, change=made.change, rewritten_cell=made.code, code=code), after


def _sized_training(fix: Fix, context: Context, after: Cell) -> Fix:
    """The training estimate of the fixed cell against the room: it fits when the whole estimate does."""
    from vram_magic._train_preflight import check_training

    room = context.room.gpu_bytes
    verdict = check_training(after, room, context.gpu_here) if room is not None else None
    if verdict is None:
        return fix
    return replace(fix, needed_bytes=verdict.estimate_bytes, fits=verdict.surely_fits)


def _sized_load(fix: Fix, context: Context, after: Cell) -> Fix | None:
    """The estimator's need for the fixed cell's loads against the room; None when it needs no less than
    the cell as written."""
    from vram_magic._preflight import need

    shrinks = _shrinks(context, after)
    if shrinks is False:
        return None  # changes nothing the load needs
    if (
        shrinks is None
        and fix.key == "bf16"
        and not any(load.dtype == "float32" for load in context.cell.loads)
    ):
        return None  # without figures, only a load the cell asks for in float32 is known to shrink
    after_need = need(_sized_loads(after, context.failed_load))
    if after_need is None:
        return fix
    needed = after_need[0]
    room = context.room.gpu_bytes
    if room is None:
        return replace(fix, needed_bytes=needed)
    fits: bool | None = needed <= room
    if fits and not context.failed_in_load:
        fits = None  # the load fits, but the step that failed needs more than its weights
    return replace(fix, needed_bytes=needed, fits=fits)


def _shrinks(context: Context, after: Cell) -> bool | None:
    """Whether the fix makes the load that failed (else the biggest one judged) need less: None without
    figures. Fixes keep a cell's loads in order, so the same index names the same load."""
    from vram_magic._preflight import estimate_load

    loads = _sized_loads(context.cell, context.failed_load)
    if context.failed_load is not None and context.failed_load < len(context.cell.loads):
        index = context.failed_load
    elif loads:
        index = context.cell.loads.index(loads[-1])
    else:
        return None
    if index >= len(after.loads):
        return None
    try:
        before = estimate_load(context.cell.loads[index]).peak_bytes
        fixed = estimate_load(after.loads[index]).peak_bytes
    except Exception:  # no figures (see _preflight's _NO_FIGURES)
        return None
    return fixed < before


def _sized_loads(cell: Cell, failed: int | None = None) -> list[Load]:
    """The loads preflight judges, and the load that failed even where the text does not say it goes to
    the GPU (a ``.to(device)`` of an earlier cell's device): it did. A fix keeps the loads in order."""
    from vram_magic._preflight import judged, sizable

    loads = list(judged(cell))
    if failed is not None and failed < len(cell.loads):
        load = cell.loads[failed]
        if load not in loads and sizable(load) and load.where != "cpu":
            loads.append(replace(load, moved="cuda"))
            loads.sort(key=lambda each: each.lines[0])
    return loads


def _sized_offload(fix: Fix, context: Context) -> Fix:
    """Offloading fits the GPU by construction (``max_memory``); what goes to CPU RAM must fit there, and
    what RAM cannot hold goes to disk (``offload_folder``), which must hold it."""
    from vram_magic._preflight import estimate_load

    room = context.room
    limit = room.max_memory.get(0)
    if limit is None and room.gpu_bytes is not None:  # no live GPU figures: the room planned for
        limit = max(room.gpu_bytes - max(int(room.gpu_bytes * _GPU_HEADROOM), _MIN_GPU_HEADROOM_BYTES), 0)
    loads = _sized_loads(context.cell, context.failed_load)
    if limit is None or not loads:
        return fix
    try:
        spilled = sum(
            estimate_load(load, device_map="auto", gpu_bytes=limit).offloaded_bytes for load in loads
        )
    except Exception:  # no figures (see _preflight's _NO_FIGURES)
        return fix
    fix = replace(fix, fits=_fits_if_the_load_failed(context))
    ram = room.cpu_bytes
    if ram is None or spilled <= ram:
        return fix
    # More than CPU RAM holds: accelerate puts the rest on disk, in an offload_folder (bitsandbytes cannot).
    to_disk, disk = spilled - ram, _disk_free_bytes()
    quantized = any(load.quantized for load in loads)
    if quantized or disk is None or to_disk > disk:
        too_small = facts(disk_free=disk) if not quantized and disk is not None else ()
        return _cpu_ram_verdict(replace(fix, change=fix.change + too_small), spilled, context)
    try:
        remade = _rewritten(fix, context, replace(_options(fix.key, room), offload_folder=OFFLOAD_FOLDER))
    except NotApplicable:
        remade = None
    if remade is None:
        return _cpu_ram_verdict(fix, spilled, context)
    made, _ = remade
    return replace(made, change=made.change + facts(disk_bytes=to_disk, offload_folder=OFFLOAD_FOLDER))


def _disk_free_bytes() -> int | None:
    """Disk free where ``offload_folder`` goes (the kernel's working folder), less headroom."""
    try:
        free = shutil.disk_usage(os.getcwd()).free
    except OSError:
        return None
    return max(free - _DISK_HEADROOM_BYTES, 0)


def _sized_on_cpu(fix: Fix, context: Context, after: Cell) -> Fix:
    """A fix that puts a model in CPU RAM: offered to run only if RAM holds it."""
    needed = _cpu_bytes(fix.key, context, after)
    fits = True if fix.key == "merge-cpu" else _fits_if_the_load_failed(context)
    if needed is None:
        return replace(fix, fits=True) if fix.key == "merge-cpu" else fix
    return _cpu_ram_verdict(replace(fix, fits=fits), needed, context)


def _fits_if_the_load_failed(context: Context) -> bool | None:
    """Placing the weights where they fit fixes a load that failed; a later step (generation, a forward)
    may need more than its weights, which nothing here sizes."""
    return True if context.failed_in_load else None


def _cpu_ram_verdict(fix: Fix, needed: int, context: Context) -> Fix:
    available = context.room.cpu_bytes
    if available is None or needed <= available:
        return fix
    return replace(fix, rewritten_cell=None, fits=False, ram_bytes=(needed, available))


def _cpu_bytes(key: str, context: Context, after: Cell) -> int | None:
    """CPU RAM the fix needs: the weights it loads or moves there."""
    from vram_magic._preflight import estimate_load

    cell = context.cell
    if key == "cpu":
        loads = [_as_fixed(load, cell, after) for load in _sized_loads(cell, context.failed_load)]
        try:
            return (
                sum(estimate_load(load, device_map="cpu").offloaded_bytes for load in loads)
                if loads
                else None
            )
        except Exception:
            return None
    total = 0
    for merge in cell.merges:
        name = merge.receiver_name
        held = cell.names.resolve(name.split(".")[0]) if name else None
        model = _attribute_path(held.value, name) if isinstance(held, Held) and name else None
        if model is not None:
            total += _tensor_bytes(model)
        elif merge.load is not None and merge.load.base is not None:
            base = next(
                (
                    load
                    for load in cell.loads
                    if load.call is merge.load.base or load.bound_to == _name(merge.load.base)
                ),
                None,
            )
            if base is not None and base.model is not None:
                try:
                    total += estimate_load(base, device_map="cpu").offloaded_bytes
                except Exception:
                    return None
    return total or None


def _as_fixed(load: Load, cell: Cell, after: Cell) -> Load:
    """``load`` in the dtype the fixed cell gives it (the CPU fix turns ``.half()`` into ``.float()``). Fixes
    keep a cell's loads in order, so the same index names the same load."""
    index = next((i for i, each in enumerate(cell.loads) if each.lines == load.lines), None)
    if index is None or index >= len(after.loads):
        return load
    return replace(load, dtype=after.loads[index].dtype)


def _attribute_path(value: object, dotted: str) -> object:
    for part in dotted.split(".")[1:]:
        value = getattr(value, "__dict__", {}).get(part)
    return value


def _name(expr: object) -> str | None:
    return expr.value if isinstance(expr, cst.Name) else None


def _tensor_bytes(model: object) -> int:
    """Bytes of every distinct storage a model holds (counted by ``_who``, no copy made)."""
    from vram_magic._who import tensors_in

    seen: dict[int, int] = {}
    for device in ("cuda", "cpu"):
        for tensor in tensors_in(model, device):
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _lift_cap(fix: Fix, context: Context) -> Fix:
    requested = context.oom.requested_bytes if context.oom else None
    available = context.room.gpu_free_without_cap_bytes
    if requested is None or available is None:
        return fix
    return replace(fix, needed_bytes=requested, fits=requested <= available)


def _options(fix_key: str, room: Room) -> Options:
    if fix_key == "offload" and any(isinstance(key, int) for key in room.max_memory):
        # Without a GPU's figures, limits would name only the CPU and keep the whole model off the GPU:
        # device_map="auto" alone lets accelerate measure the GPUs itself.
        return Options(compute_dtype=room.compute_dtype, max_memory=room.max_memory)
    dtype = room.compute_dtype
    return Options(compute_dtype=dtype, dtype=dtype)


def _gpu_room(gpu: GpuSnapshot) -> int | None:
    """What this process can still allocate on ``gpu``: the driver's free memory plus what PyTorch holds
    in its cache unallocated (it reuses that first, and empties it before it gives up), within the cap."""
    if gpu.free_bytes is None:
        return None
    room = gpu.free_bytes + (gpu.unallocated_reserved_bytes or 0)
    if gpu.cap_bytes is None or gpu.reserved_bytes is None:
        return room
    held = gpu.reserved_bytes if gpu.allocated_bytes is None else gpu.allocated_bytes
    return max(min(room, gpu.cap_bytes - held), 0)


def _compute_dtype() -> str:
    """bfloat16 where the GPU supports it (Ampere and newer) or there is no GPU; else float16, and also
    while ``%vram cap`` rehearses a card without bfloat16 (a T4), whatever this GPU is."""
    if rehearsed_card() in NO_BF16:
        return "float16"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "float16"
    return "bfloat16"
