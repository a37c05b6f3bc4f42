"""Rules: (OOM message, live snapshot, holders, cell) -> ranked causes and fixes.

Pure Python. Each rule reads the evidence and, when it applies, adds one cause (a key and its figures; the
renderer words it) and the fixes that follow from it. Fixes are ranked: freeing what is not needed first,
then the changes to the cell that lose the least quality.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vram_magic._hf import bitsandbytes_config
from vram_magic._types import (
    Cause,
    CellAnalysis,
    Cleanup,
    CpuMemory,
    Fix,
    GpuSnapshot,
    Holder,
    OOMInfo,
    Snapshot,
    facts,
)

_GiB = 2**30
# Below these sizes a holder or a fragmented pool is not worth a line in the report.
_NOTABLE_HOLDER_BYTES = 64 * 2**20
_NOTABLE_FRAGMENTATION_BYTES = 64 * 2**20
_NOTABLE_NON_PYTORCH_BYTES = 2 * _GiB


@dataclass(frozen=True)
class Evidence:
    """Everything the rules read."""

    oom: OOMInfo | None
    gpu: GpuSnapshot | None
    holders: tuple[Holder, ...]
    analysis: CellAnalysis
    cleanup: Cleanup
    bytes_freed_by: Callable[[Sequence[str]], int]
    cpu: CpuMemory | None = None
    other_gpus: tuple[GpuSnapshot, ...] = ()  # the visible GPUs that did not run out

    @property
    def requested_bytes(self) -> int | None:
        return self.oom.requested_bytes if self.oom else None

    @property
    def in_ram(self) -> bool:
        """The error is about CPU RAM (the CPU allocator, numpy, a MemoryError), not a GPU."""
        return self.oom is not None and self.oom.kind == "cpu"

    @property
    def room_bytes(self) -> int | None:
        """How much more this process could take when it failed: by the message, or CPU RAM available."""
        if self.in_ram:
            return self.cpu.available_bytes if self.cpu else None
        return self.oom.room_bytes() if self.oom else None

    @property
    def limit_bytes(self) -> int | None:
        """What this process may use at most: the cap when one is set, else the GPU's total (the machine's
        RAM for an error about CPU RAM)."""
        if self.in_ram:
            return self.cpu.total_bytes if self.cpu else None
        for value in (
            self.oom.allowed_bytes if self.oom else None,
            self.gpu.cap_bytes if self.gpu else None,
            self.oom.total_bytes if self.oom else None,
            self.gpu.total_bytes if self.gpu else None,
        ):
            if value is not None:
                return value
        return None


@dataclass
class Diagnosis:
    causes: list[Cause] = field(default_factory=list)
    fixes: list[Fix] = field(default_factory=list)
    demoted: set[str] = field(default_factory=set)  # fixes that cannot be enough alone: after the cell fixes

    def rank(self, fix: Fix) -> float:
        if fix.key in self.demoted:
            return _CELL_FIX_RANK + 0.5
        return _FIX_RANK.get(fix.key, _CELL_FIX_RANK)


def failing_gpu(snapshot: Snapshot, oom: OOMInfo | None) -> GpuSnapshot | None:
    """The GPU named in the message, else the only/first one."""
    wanted = oom.device_index if oom and oom.device_index is not None else 0
    for gpu in snapshot.gpus:
        if gpu.index == wanted:
            return gpu
    return snapshot.gpus[0] if snapshot.gpus else None


def diagnose(
    oom: OOMInfo | None,
    snapshot: Snapshot,
    holders: tuple[Holder, ...],
    analysis: CellAnalysis,
    cleanup: Cleanup,
    bytes_freed_by: Callable[[Sequence[str]], int],
) -> tuple[tuple[Cause, ...], tuple[Fix, ...]]:
    """Ranked causes and fixes for one OOM. ``bytes_freed_by(names)``: what deleting those names would free
    (storage they share with names that stay does not count; see ``_who.bytes_only_in``)."""
    failing = failing_gpu(snapshot, oom)
    others = tuple(gpu for gpu in snapshot.gpus if failing is not None and gpu.index != failing.index)
    evidence = Evidence(
        oom, failing, holders, analysis, cleanup, bytes_freed_by, snapshot.cpu, other_gpus=others
    )
    result = Diagnosis()
    rules = (_too_big_for_the_gpu, _cap, _earlier_holders, _other_processes, _fragmentation, _idle_gpus)
    for rule in rules:
        rule(evidence, result)
    result.fixes.extend(_cell_fixes(evidence))
    _non_pytorch(evidence, result)
    if not result.causes:
        result.causes.append(Cause("unknown", facts(message=_first_line(evidence))))
    fixes = sorted(result.fixes, key=result.rank)
    if any(cause.key == "too-big" for cause in result.causes):
        # One allocation larger than the whole limit: freeing or defragmenting cannot help.
        fixes = [fix for fix in fixes if fix.key not in _FREEING_FIXES]
    return tuple(result.causes), tuple(fixes)


def _too_big_for_the_gpu(evidence: Evidence, result: Diagnosis) -> None:
    requested, limit = evidence.requested_bytes, evidence.limit_bytes
    if evidence.oom and evidence.oom.kind == "dispatch":
        result.causes.append(Cause("dispatch"))
        return
    if requested is None:
        return
    kind = evidence.analysis.kind
    if limit is not None and requested > limit:
        figures = facts(kind=kind, requested=requested, limit=limit, in_ram=evidence.in_ram)
        result.causes.append(Cause("too-big", figures))
        return
    free = evidence.oom.free_bytes if evidence.oom else None
    result.causes.append(
        Cause("need", facts(kind=kind, requested=requested, room=evidence.room_bytes, free=free))
    )


def _cap(evidence: Evidence, result: Diagnosis) -> None:
    cap = evidence.oom.allowed_bytes if evidence.oom and evidence.oom.allowed_bytes else None
    if cap is None and evidence.gpu is not None:
        cap = evidence.gpu.cap_bytes
    if cap is None:
        return
    result.causes.append(Cause("cap", facts(cap=cap)))
    result.fixes.append(Fix("lift-cap", "import torch\ntorch.cuda.set_per_process_memory_fraction(1.0)"))


def _earlier_holders(evidence: Evidence, result: Diagnosis) -> None:
    """Names from earlier cells that hold memory the failed cell does not use (or re-binds), and the fix
    that deletes them. A name whose memory all stays with other names frees nothing and is left out."""
    used = set(evidence.analysis.used_names)
    shortfall = _shortfall_bytes(evidence)
    notable = _NOTABLE_HOLDER_BYTES if not shortfall else min(_NOTABLE_HOLDER_BYTES, shortfall)
    candidates = [h.name for h in evidence.holders if h.total_bytes >= notable and h.name not in used]
    total = evidence.bytes_freed_by(candidates) if candidates else 0
    names = list(candidates)
    for name in candidates:  # drop each name the others free as much without
        rest = [each for each in names if each != name]
        if evidence.bytes_freed_by(rest) == total:
            names = rest
    if not names:
        return
    holders = {h.name: h for h in evidence.holders}
    for name in names:
        holder = holders[name]
        figures = facts(
            name=name,
            type_name=holder.type_name,
            total_bytes=holder.total_bytes,
            rebound=name in evidence.analysis.assigned_names,
            staying=tuple(each for each in holder.shared_with if each not in names),
        )
        result.causes.append(Cause("holder", figures))
    if shortfall is not None and total < shortfall:
        result.demoted.add("free")
    result.fixes.append(
        Fix(
            "free",
            f"%vram free {' '.join(names)}",
            free_names=tuple(names),
            fits=None if shortfall is None else total >= shortfall,
            change=facts(freed_bytes=total, shortfall_bytes=shortfall),
        )
    )


def _shortfall_bytes(evidence: Evidence) -> int | None:
    """How much more room the failed allocation needed."""
    room = evidence.room_bytes
    if evidence.requested_bytes is None or room is None:
        return None
    return max(evidence.requested_bytes - room, 0)


def _other_processes(evidence: Evidence, result: Diagnosis) -> None:
    pairs = list(evidence.oom.other_processes) if evidence.oom else []
    if not pairs and evidence.gpu is not None:
        pairs = [(p.pid, p.used_bytes or 0) for p in evidence.gpu.other_processes]
    notable = [(pid, used) for pid, used in pairs if used >= _NOTABLE_HOLDER_BYTES]
    for pid, used in notable:
        result.causes.append(Cause("other-process", facts(pid=pid, used_bytes=used)))
    gpu = evidence.gpu
    if not notable and gpu is not None and gpu.others_are_remainder and (gpu.others_bytes or 0) > _GiB:
        result.causes.append(Cause("other-process", facts(pid=None, used_bytes=gpu.others_bytes)))
        notable = [(0, gpu.others_bytes or 0)]
    if notable:
        result.fixes.append(
            Fix("other-process", "!nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv")
        )


def _idle_gpus(evidence: Evidence, result: Diagnosis) -> None:
    """Another visible GPU with room this process hardly uses (Kaggle's second T4): a load with
    ``device_map="auto"`` or a ``max_memory`` per GPU would use it."""
    if evidence.in_ram or evidence.gpu is None:
        return
    wanted = max(evidence.requested_bytes or 0, _GiB)
    for gpu in evidence.other_gpus:
        free, used = gpu.free_bytes, gpu.process_bytes or gpu.reserved_bytes or 0
        if free is not None and free >= wanted and used * 20 < (gpu.total_bytes or free):
            figures = facts(index=gpu.index, free_bytes=free, failed=evidence.gpu.index)
            result.causes.append(Cause("idle-gpu", figures))


def _fragmentation(evidence: Evidence, result: Diagnosis) -> None:
    unallocated = evidence.oom.unallocated_reserved_bytes if evidence.oom else None
    requested = evidence.requested_bytes or 0
    if unallocated is None or unallocated < max(requested, _NOTABLE_FRAGMENTATION_BYTES):
        return
    result.causes.append(Cause("fragmentation", facts(unallocated=unallocated, requested=requested)))
    result.fixes.append(
        Fix(
            "expandable-segments",
            "import os\nos.environ['PYTORCH_CUDA_ALLOC_CONF'] = 'expandable_segments:True'",
        )
    )


def _non_pytorch(evidence: Evidence, result: Diagnosis) -> None:
    gpu = evidence.gpu
    outside = gpu.non_pytorch_bytes if gpu else None
    if outside is not None and outside >= _NOTABLE_NON_PYTORCH_BYTES:
        result.causes.append(Cause("non-pytorch", facts(outside=outside)))


def _first_line(evidence: Evidence) -> str:
    return evidence.oom.message.splitlines()[0] if evidence.oom else "The cell ran out of memory"


_BNB_IMPORT = "from transformers import BitsAndBytesConfig\n"
# What each fix changes, as code to type where it cannot be made on the cell itself.
_IN_LOAD = "# in from_pretrained(...):\n"
LOAD_FIXES = (
    Fix("bf16", _IN_LOAD + "dtype=torch.bfloat16"),
    Fix("8bit", _BNB_IMPORT + _IN_LOAD + f'quantization_config={bitsandbytes_config(8)}, device_map="auto"'),
    Fix("4bit", _BNB_IMPORT + _IN_LOAD + f'quantization_config={bitsandbytes_config(4)}, device_map="auto"'),
    Fix("offload", _IN_LOAD + 'device_map="auto"'),
    Fix("cpu", _IN_LOAD + 'device_map="cpu"\n# and drop .to("cuda") / .cuda() of the model'),
)
_SEEDS = {fix.key: fix for fix in LOAD_FIXES} | {
    fix.key: fix
    for fix in (
        Fix("merge-cpu", 'model = model.to("cpu")\nmerged = model.merge_and_unload()'),
        Fix(
            "half-batch",
            "# in TrainingArguments(...):\n"
            "per_device_train_batch_size=<half>, gradient_accumulation_steps=<double>",
        ),
        Fix(
            "checkpointing",
            '# in TrainingArguments(...):\ngradient_checkpointing=True, optim="paged_adamw_8bit"',
        ),
        Fix("chunk", "vram_magic.chunked(model.generate, chunks=2)(**inputs)"),
        Fix("inference-mode", "with torch.inference_mode():\n    outputs = model(**inputs)"),
        Fix("offload-cache", '# in generate(...):\ncache_implementation="offloaded"'),
        Fix("smaller-generation", "# in generate(...):\nmax_new_tokens=<smaller>"),
    )
}
# What preflight offers for training that would not fit: a smaller batch (same effective batch), then
# checkpointing with a lighter optimizer.
TRAINING_FIXES = (_SEEDS["half-batch"], _SEEDS["checkpointing"])
# The fixes to try for each kind of cell, most promising first; load fixes join where the cell also loads.
_CELL_FIXES: dict[str, tuple[str, ...]] = {
    "load": ("bf16", "8bit", "4bit", "offload", "cpu"),
    "merge": ("merge-cpu",),
    "training": ("half-batch", "checkpointing"),
    "generation": ("inference-mode", "chunk", "half-batch", "offload-cache"),
    "other": (),
}
_WITH_LOADS: dict[str, tuple[str, ...]] = {
    "training": ("8bit", "4bit"),
    "generation": ("8bit", "4bit", "offload", "cpu"),
}
# Fixes worth advising by hand when what they change is in an earlier cell (a Trainer built there).
ADVISE_BY_HAND: dict[str, frozenset[str]] = {
    "load": frozenset(_CELL_FIXES["load"]),
    "training": frozenset({"half-batch", "checkpointing"}),
}


# Fix order: free what is not needed, then change the cell (in the order above), then the fixes that need a
# restart or undo a deliberate setting.
_CELL_FIX_RANK = 2
_FIX_RANK = {"free": 0, "other-process": 1, "expandable-segments": 3, "lift-cap": 4}
_FREEING_FIXES = {"free", "other-process", "expandable-segments"}


def _cell_fixes(evidence: Evidence) -> tuple[Fix, ...]:
    """Changes to the cell itself for its kind, most promising first."""
    if evidence.oom is not None and evidence.oom.kind == "dispatch":
        return tuple(_SEEDS[key] for key in ("4bit", "offload", "cpu"))
    kind = evidence.analysis.kind
    keys = _CELL_FIXES[kind]
    if evidence.analysis.loads:
        keys += _WITH_LOADS.get(kind, ())
    if kind == "generation" and evidence.analysis.generates:  # fewer new tokens: only where tokens are made
        keys += ("smaller-generation",)
    return tuple(_SEEDS[key] for key in keys)
