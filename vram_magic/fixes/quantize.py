"""4bit / 8bit: load the model with bitsandbytes (``quantization_config=BitsAndBytesConfig(...)``).

Casts and GPU moves of the model go (transformers refuses ``.half()`` and ``.to()`` on a quantized model, and
bitsandbytes places it); ``load_in_4bit=True`` becomes a ``quantization_config``. Not offered for a load that
is on the CPU on purpose or runs in CPU RAM, a checkpoint already quantized, another library's loader, a cell
that trains the whole model without adapters (quantized weights cannot be trained without LoRA), or LoftQ
(it needs the full-precision weights).
"""

from __future__ import annotations

from vram_magic._errors import NotApplicable
from vram_magic._hf import bitsandbytes_config
from vram_magic.cell import Cell, Load
from vram_magic.fixes._base import PREQUANTIZED, Options, Rewritten, finish, models_changed
from vram_magic.fixes._edit import Edits
from vram_magic.fixes._loads import (
    LoadEdit,
    compute_code,
    device_map_auto,
    drop_gpu_moves,
    legacy_flags,
    no_load_reason,
    release_pipelines,
)

_WORDS = {4: "4-bit (NF4)", 8: "8-bit"}


def rewrite(cell: Cell, options: Options, bits: int) -> Rewritten:
    key = f"{bits}bit"
    loads = [load for load in cell.loads if load.kind in ("model", "peft", "pipeline")]
    if not loads:
        raise no_load_reason(cell, "quantize")
    if cell.merges:
        raise NotApplicable(
            "this cell merges LoRA adapters into the model: merged into 4-bit or 8-bit weights they lose "
            "precision, and the merged model would be saved quantized"
        )
    if cell.trains and not cell.uses_adapters:
        raise NotApplicable(
            "this cell trains the whole model, and quantized weights cannot be trained without adapters "
            "(LoRA: peft's get_peft_model)"
        )
    reasons: list[str] = []
    targets = [load for load in loads if _why_not(cell, load, bits, reasons) is None]
    if not targets:
        raise NotApplicable(reasons[0], already=all(r.startswith("already") for r in reasons))
    edits = Edits()
    for load in targets:
        _quantize(cell, load, bits, options, edits)
    release_pipelines(cell, targets, edits)
    return finish(cell, key, edits, models_changed(targets))


def _why_not(cell: Cell, load: Load, bits: int, reasons: list[str]) -> str | None:
    reason = None
    if load.kind == "pipeline" and load.model_is_object:
        reason = "its pipeline is given a model loaded elsewhere"
    elif load.where == "cpu":
        reason = "the model is loaded on the CPU on purpose (device_map='cpu')"
    elif load.where == "ram" and not cell.trains:
        # bitsandbytes would put it on the GPU, and the inputs this cell makes would stay on the CPU.
        reason = "the model runs in CPU RAM here (no device_map, and nothing in this cell moves it)"
    elif _loftq(cell):
        reason = "LoftQ initialises the adapters from the full-precision weights: it quantizes them itself"
    elif load.model and PREQUANTIZED.search(load.model):
        reason = f"already quantized: {load.model} is a quantized checkpoint"
    elif load.quantization == f"{bits}bit":
        reason = f"already loaded in {_WORDS[bits]}"
    elif load.quantization == "4bit" and bits == 8:
        reason = "already loaded in 4-bit, which needs less memory than 8-bit"
    elif load.quantization in ("other", "unknown"):
        reason = "already quantized another way"
    if reason is not None:
        reasons.append(reason)
    return reason


def _quantize(cell: Cell, load: Load, bits: int, options: Options, edits: Edits) -> None:
    folded = drop_gpu_moves(cell, load, edits, casts=True)
    default = folded if folded in ("float16", "bfloat16") else options.compute_dtype
    compute = compute_code(cell, load, default)
    edit = LoadEdit(cell, load, edits)
    edits.needs.add("BitsAndBytesConfig")
    if bits == 4:
        edits.needs.add("torch")
    written = legacy_flags(edit)
    edit.assign(
        "quantization_config",
        bitsandbytes_config(bits, compute),
        instead_of=written[0] if written else None,
    )
    if load.dtype_by_cast and folded in ("float16", "bfloat16"):
        edits.needs.add("torch")
        edit.assign(options.dtype_keyword, f"torch.{folded}")
    device_map_auto(edit, keep_dicts=True)
    edit.finish()


def _loftq(cell: Cell) -> bool:
    """Whether the cell sets up LoftQ (peft's ``LoftQConfig`` or ``init_lora_weights="loftq"``)."""
    return "LoftQConfig" in cell.source or '"loftq"' in cell.source or "'loftq'" in cell.source
