"""Preflight: before a ``%%oomsafe`` cell runs, estimate its model loads against the room on the GPU.

Which loads are judged is ``_loads.loads_in``: those that surely run and surely go to the GPU, whose model is
known without running the cell. Estimates come from ``_estimate`` (the config alone). A cell without
``from_pretrained`` costs one substring test. After an OOM, ``load_needs`` sizes the fixes for the load that
failed (``_loads.load_at``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from vram_magic._cells import analyse_cell
from vram_magic._diagnose import LOAD_FIXES
from vram_magic._estimate import Estimate, estimate, plans
from vram_magic._loads import Load, loads_in, placed_by_accelerate
from vram_magic._plan import Room, make_runnable
from vram_magic._render_text import format_bytes
from vram_magic._types import Cause, Cleanup, MemorySnapshot, Report

# _NO_FIGURES: estimating a model the user chose can fail for reasons of its own (no config to read, an
# architecture transformers cannot build on the meta device, a placement accelerate cannot split). Preflight
# and the rescue then go on without figures: they must never stop a cell with an error of their own.


@dataclass(frozen=True)
class Verdict:
    """The loads of a cell judged (each with its estimate) and the most the GPU must hold at once while
    they run, against the room."""

    loads: tuple[Load, ...]
    estimates: tuple[Estimate, ...]
    need_bytes: int
    room_bytes: int

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.room_bytes

    @property
    def biggest(self) -> tuple[Load, Estimate]:
        """The load that needs the most, with its estimate."""
        return max(zip(self.loads, self.estimates, strict=True), key=lambda pair: pair[1].peak_bytes)


def check(cell: str, namespace: Mapping[str, object], room_bytes: int) -> Verdict | None:
    """The verdict on the cell's loads, or None when it has none we can estimate (then say nothing).

    Each load needs its own peak plus the weights of the earlier loads still held when it runs (a name
    deleted or bound again in between lets its model go)."""
    loads, estimates = [], []
    for load in loads_in(cell, namespace):
        if placed_by_accelerate(load):
            continue
        try:
            found = estimate(
                load.model, dtype=load.dtype, quantization=load.quantization, device_map=load.device_map
            )
        except Exception:  # no verdict on this load (see _NO_FIGURES)
            continue
        loads.append(load)
        estimates.append(found)
    if not estimates:
        return None
    need = max(
        estimates[i].peak_bytes
        + sum(estimates[j].weights_bytes for j in range(i) if loads[j].alive_at(loads[i].step))
        for i in range(len(loads))
    )
    return Verdict(tuple(loads), tuple(estimates), need, room_bytes)


def load_needs(load: Load, room_bytes: int | None) -> dict[str, int]:
    """What each load fix would need at its peak for ``load`` (bytes, by fix key: ``8bit``, ``4bit``,
    ``offload``, and ``bf16`` where the load is in float32, the one case bf16 shrinks); empty when it cannot
    be estimated. ``room_bytes`` sizes the offload."""
    try:
        rows = plans(load.model, free_bytes=room_bytes, dtype=load.dtype)
        needs = {plan.key: plan.need_bytes for plan in rows[1:]}  # rows[0] is the load as written
        if rows[0].estimate.dtype == "float32":
            needs["bf16"] = estimate(load.model, dtype="bfloat16").peak_bytes
    except Exception:  # no figures (see _NO_FIGURES)
        return {}
    return needs


def preflight_report(cell: str, verdict: Verdict, snapshot: MemorySnapshot, room: Room) -> Report:
    """A load estimated not to fit, as a report: why, and the load fixes with the estimator's verdicts."""
    load, first = verdict.biggest
    where = "on this GPU" if snapshot.gpus else "under the cap planned for (no GPU here)"
    headline = (
        f"Not run: the model load would need about {format_bytes(verdict.need_bytes)} at its peak, "
        f"more than the {format_bytes(verdict.room_bytes)} {where}."
    )
    cause = Cause(
        "estimate",
        f"Loading {first.model} ({first.label}) needs about {format_bytes(first.peak_bytes)} at its peak: "
        f"{format_bytes(first.weights_bytes)} of weights, reserved in one allocation while loading. "
        "Run it anyway with `%%oomsafe --force`.",
    )
    needs = load_needs(load, verdict.room_bytes)
    fixes = make_runnable(LOAD_FIXES, cell, None, replace(room, gpu_bytes=verdict.room_bytes), needs)
    return Report(
        error_text=headline,
        oom=None,
        cell=cell,
        analysis=analyse_cell(cell),
        snapshot=snapshot,
        holders=(),
        cleanup=Cleanup(released=(), reclaimed_bytes=None, freed_tensor_bytes=0),
        causes=(cause,),
        fixes=fixes,
        headline=headline,
    )
