"""bf16: load the model in 16-bit (``dtype=torch.bfloat16``; float16 where the GPU has no bfloat16).

Only a float32 load shrinks: transformers 5 already loads a checkpoint in its own dtype (bfloat16 for most
LLMs), so whether this changes anything is the estimator's call (``vram_magic._checks``). A load already in
16-bit, or quantized, is left alone.
"""

from __future__ import annotations

from vram_magic._errors import NotApplicable
from vram_magic._types import facts
from vram_magic.cell import Cell, Load
from vram_magic.fixes._base import PREQUANTIZED, Options, Rewritten, finish, models_changed
from vram_magic.fixes._edit import Edits
from vram_magic.fixes._loads import LoadEdit, no_load_reason


def rewrite(cell: Cell, options: Options) -> Rewritten:
    loads = [load for load in cell.loads if load.kind in ("model", "peft", "pipeline")]
    if not loads:
        raise no_load_reason(cell, "load in 16-bit")
    reasons: list[str] = []
    targets = [load for load in loads if _why_not(load, reasons) is None]
    if not targets:
        raise NotApplicable(reasons[0], already=all(r.startswith("already") for r in reasons))
    edits = Edits()
    for load in targets:
        edit = LoadEdit(cell, load, edits)
        other = "torch_dtype" if options.dtype_keyword == "dtype" else "dtype"
        edits.needs.add("torch")
        edit.assign(options.dtype_keyword, f"torch.{options.dtype}", instead_of=other)
        edit.remove(other)
        for link in load.chain:  # a .float() chained on the load undoes it
            if link.func.attr.value == "float":  # type: ignore[attr-defined]
                edits.unwrap.add(id(link))
        edit.finish()
    return finish(cell, "bf16", edits, models_changed(targets) + facts(dtype=options.dtype))


def _why_not(load: Load, reasons: list[str]) -> str | None:
    reason = None
    if load.kind == "pipeline" and load.model_is_object:
        reason = "its pipeline is given a model loaded elsewhere"
    elif load.where == "cpu":
        reason = "the model is loaded on the CPU on purpose (device_map='cpu')"
    elif load.quantization is not None or (load.model and PREQUANTIZED.search(load.model)):
        reason = "already quantized, which takes less memory than 16-bit"
    elif load.dtype in ("bfloat16", "float16"):
        reason = f"already loaded in {load.dtype}"
    elif load.dtype == "unknown":
        reason = "its dtype is only known when the cell runs"
    if reason is not None:
        reasons.append(reason)
    return reason
