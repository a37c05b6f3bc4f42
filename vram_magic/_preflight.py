"""Preflight: before a ``%%oomsafe`` cell runs, estimate its model loads against the room on the GPU.

A load is judged only if it surely runs and surely goes to the GPU (``judged``, from the cell's one reading):
in the cell's top-level statements or ``with`` blocks, with a cuda ``device_map``, a GPU move, ``with
torch.device("cuda")`` or bitsandbytes quantization, and with its model, dtype and quantization known from the
text and the notebook's names. Estimates come from ``estimator`` (the config alone). The same arithmetic sizes
the fixes: a fixed cell is read again and judged the same way (``vram_magic._checks``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vram_magic._types import Estimate
from vram_magic.cell import Cell, Load
from vram_magic.estimator import estimate

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


def judged(cell: Cell) -> tuple[Load, ...]:
    """The loads preflight judges: they surely run, surely go to the GPU, and their size is known from the
    text (model, dtype and quantization), not only by running them."""
    return tuple(
        load
        for load in cell.loads
        if load.surely and sizable(load) and (load.where == "gpu" or (load.where == "auto" and _stays(load)))
    )


def sizable(load: Load) -> bool:
    """Whether the estimator can size this load from what the cell says (its model and quantization)."""
    return (
        load.kind == "model"
        and load.model is not None
        and not load.sized_by_run
        and load.quantization in (None, "4bit", "8bit")
    )


def _stays(load: Load) -> bool:
    """An auto ``device_map`` that cannot offload: bitsandbytes refuses to put layers on the CPU unless
    ``llm_int8_enable_fp32_cpu_offload`` is set (accelerate places any other auto load so that it fits)."""
    return load.quantized and not load.offload_allowed


def estimate_load(load: Load, **extra: object) -> Estimate:
    """The estimator's figures for one load as the cell writes it (may raise: see _NO_FIGURES)."""
    options: dict[str, object] = {
        "dtype": load.dtype if load.dtype not in (None, "auto", "unknown") else None,
        "quantization": load.quantization if load.quantized else None,
    }
    options.update(extra)
    return estimate(load.model or "", **options)  # type: ignore[arg-type]


def need(loads: Sequence[Load]) -> tuple[int, list[Load], list[Estimate]] | None:
    """The most the GPU holds at once while ``loads`` run: each load's own peak plus the weights of earlier
    loads still held (a name deleted or bound again in between lets its model go); None without figures."""
    kept, estimates = [], []
    for load in loads:
        try:
            found = estimate_load(load, device_map="cuda" if load.where == "gpu" else load.device_map)
        except Exception:  # no verdict on this load (see _NO_FIGURES)
            continue
        kept.append(load)
        estimates.append(found)
    if not estimates:
        return None
    most = max(
        estimates[i].peak_bytes
        + sum(estimates[j].weights_bytes for j in range(i) if kept[j].alive_at(kept[i].step))
        for i in range(len(kept))
    )
    return most, kept, estimates


def check(cell: Cell, room_bytes: int) -> Verdict | None:
    """The verdict on the cell's judged loads, or None when it has none we can estimate (then say nothing)."""
    found = need(judged(cell))
    if found is None:
        return None
    most, loads, estimates = found
    return Verdict(tuple(loads), tuple(estimates), most, room_bytes)


def load_at(cell: Cell, line: int) -> Load | None:
    """The model load on ``line`` (1 = the cell's first line): the innermost load whose call spans the line,
    else the only load of the statement that holds it."""
    spanning = [
        load for load in cell.loads if load.kind == "model" and load.lines[0] <= line <= load.lines[1]
    ]
    if spanning:
        return min(spanning, key=lambda load: (load.lines[1] - load.lines[0], -load.lines[0]))
    for step in cell.steps:
        start, end = step.lines
        if start <= line <= end:
            inside = [load for load in cell.loads if load.kind == "model" and start <= load.lines[0] <= end]
            return inside[0] if len(inside) == 1 else None
    return None
