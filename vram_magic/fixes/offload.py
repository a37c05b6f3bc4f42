"""offload: ``device_map="auto"`` with ``max_memory``: what does not fit on the GPU runs from CPU RAM.

GPU moves of the model go (they would pull it all back); a quantized load gets
``llm_int8_enable_fp32_cpu_offload=True`` (bitsandbytes refuses to put layers on the CPU without it); old
``load_in_8bit=True`` keywords become a ``quantization_config``. Not offered where the cell trains: offloaded
layers cannot be trained.
"""

from __future__ import annotations

import libcst as cst

from vram_magic._errors import NotApplicable
from vram_magic.cell import Cell, Held, Load
from vram_magic.cell._values import keyword_values
from vram_magic.fixes._base import Options, Rewritten, finish, models_changed
from vram_magic.fixes._edit import Edits, render_max_memory, set_dict_key, set_kwarg
from vram_magic.fixes._loads import (
    LoadEdit,
    device_map_auto,
    drop_gpu_moves,
    no_load_reason,
    release_pipelines,
    translate_legacy_flags,
)

_OFFLOAD_FLAG = "llm_int8_enable_fp32_cpu_offload"


def rewrite(cell: Cell, options: Options) -> Rewritten:
    loads = [load for load in cell.loads if load.kind in ("model", "peft", "pipeline")]
    if not loads:
        raise no_load_reason(cell, "offload to the CPU")
    if cell.trains:
        raise NotApplicable("this cell trains, and layers offloaded to the CPU cannot be trained")
    reasons: list[str] = []
    targets = [load for load in loads if _why_not(load, options, reasons) is None]
    if not targets:
        raise NotApplicable(reasons[0], already=all(r.startswith("already") for r in reasons))
    edits = Edits()
    for load in targets:
        _offload(cell, load, options, edits)
    release_pipelines(cell, targets, edits)
    return finish(cell, "offload", edits, models_changed(targets))


def _why_not(load: Load, options: Options, reasons: list[str]) -> str | None:
    reason = None
    if load.kind == "pipeline" and load.model_is_object:
        reason = "its pipeline is given a model loaded elsewhere"
    elif load.where == "cpu":
        reason = "the model is loaded on the CPU on purpose (device_map='cpu')"
    elif load.where == "ram":
        reason = "the model loads into CPU RAM here (no device_map, and nothing in this cell moves it)"
    elif load.quantization in ("other", "unknown"):
        reason = "its quantization is not bitsandbytes', whose offloading vram_magic knows"
    elif (
        load.device_map == "auto"
        and options.max_memory is None
        and (not load.quantized or load.offload_allowed)
    ):
        reason = "already offloaded by device_map='auto'"
    if reason is not None:
        reasons.append(reason)
    return reason


def _offload(cell: Cell, load: Load, options: Options, edits: Edits) -> None:
    folded = drop_gpu_moves(cell, load, edits, casts=False)
    edit = LoadEdit(cell, load, edits)
    if load.dtype_by_cast and folded in ("float16", "bfloat16"):
        for link in load.chain:
            if isinstance(link.func, cst.Attribute) and link.func.attr.value in ("half", "bfloat16"):
                edits.unwrap.add(id(link))
        edits.needs.add("torch")
        edit.assign(options.dtype_keyword, f"torch.{folded}")
    device_map_auto(edit, keep_dicts=False, keep_unknown=False)
    if options.max_memory is not None:
        edit.assign("max_memory", render_max_memory(options.max_memory))
    if options.offload_folder is not None:
        edit.assign("offload_folder", f'"{options.offload_folder}"')
    if load.quantized and not load.offload_allowed:
        if load.legacy_flag:
            translate_legacy_flags(edit, offload=True)
        else:
            _allow_cpu_offload(cell, load, edit)
    elif load.legacy_flag:
        translate_legacy_flags(edit, offload=load.offload_allowed)
    edit.finish()


def _allow_cpu_offload(cell: Cell, load: Load, edit: LoadEdit) -> None:
    """``llm_int8_enable_fp32_cpu_offload=True`` in the load's ``BitsAndBytesConfig``: where it is built in
    the cell, else set on the config object an earlier cell made, just before the load."""
    keywords, _ = keyword_values(load.call, cell.names)
    written = keywords.get("quantization_config")
    config = cell.names.value(written)
    true = cst.Name("True")
    if isinstance(config, cst.Call):
        edit.edits.change(config, lambda call: set_kwarg(call, _OFFLOAD_FLAG, true))
    elif isinstance(config, cst.Dict):
        edit.edits.change(config, lambda node: set_dict_key(node, _OFFLOAD_FLAG, true))
    elif isinstance(config, Held) and isinstance(written, cst.Name):
        statement = next(
            (node for node, (start, end) in cell.statements if start <= load.lines[0] <= end), None
        )
        if statement is not None:
            edit.edits.add_before(statement, f"{written.value}.{_OFFLOAD_FLAG} = True")
