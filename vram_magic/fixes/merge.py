"""merge-cpu: merge the LoRA adapter into the base model on the CPU, where RAM is usually larger.

Every way a notebook merges is handled: ``merged = model.merge_and_unload()``, a bare
``model.merge_and_unload()``, ``model = model.merge_and_unload()``, and a merge chained on an adapter load
(``PeftModel.from_pretrained(base, path).merge_and_unload()``). A model the notebook already holds is moved to
the CPU first (``model = model.to("cpu")``); a base or adapter model the cell loads itself is loaded there
(``device_map="cpu"``). The merged model goes back to the GPU only where the cell goes on using it (not just
saving it), and only if it fits (``vram_magic.to_gpu_if_it_fits``). Whether the model fits in CPU RAM is
checked before it is offered (``vram_magic._checks``).
"""

from __future__ import annotations

import sys

import libcst as cst
import libcst.matchers as m

from vram_magic._errors import NotApplicable
from vram_magic._types import facts
from vram_magic.cell import Cell, Held, Load, Merge
from vram_magic.fixes._base import Options, Rewritten, finish
from vram_magic.fixes._edit import Edits, code, find_arg, string
from vram_magic.fixes._loads import LoadEdit, drop_gpu_moves


def rewrite(cell: Cell, options: Options) -> Rewritten:
    if not cell.merges:
        raise NotApplicable("this cell has no merge_and_unload() to run on the CPU", elsewhere=True)
    edits = Edits()
    reasons = []
    back = False
    for merge in cell.merges:
        reason = _on_cpu(cell, merge, edits)
        if reason is not None:
            reasons.append(reason)
            continue
        back = _back_to_gpu(cell, merge, edits) or back
    if not edits:
        raise NotApplicable(reasons[0], already=all(r.startswith("already") for r in reasons))
    return finish(cell, "merge-cpu", edits, facts(back=back))


def _on_cpu(cell: Cell, merge: Merge, edits: Edits) -> str | None:
    """Make the model merge on the CPU; say why not when it cannot or already does."""
    name: str | None
    if _runs_elsewhere(merge):
        return (
            "the merge runs inside a comprehension, a lambda or a function: move its model to the CPU by hand"
        )
    load = merge.load
    if load is not None and load.kind in ("adapter", "peft"):
        base = _base_load(cell, load)
        loaded = base if base is not None else (load if load.kind == "peft" else None)
        if loaded is not None:
            if loaded.where in ("cpu", "ram"):
                return "already merges on the CPU: the model is loaded there"
            _load_on_cpu(cell, loaded, edits)
            return None
        if load.base is not None and _is_plain(load.base):
            name = code(load.base).strip()
            if _held_on_cpu(cell, name) or _all_on_cpu(cell):
                return "already merges on the CPU: the base model is there"
            edits.add_before(_statement_of(cell, load), f'{name} = {name}.to("cpu")')
            return None
        return "the base model is not a plain name, so it cannot be moved to the CPU"
    name = merge.receiver_name
    if name is None:
        return "the merged model is not a plain name, so it cannot be moved to the CPU"
    own = next(
        (
            each
            for each in cell.loads
            if each.kind in ("model", "peft")
            and each.bound_to == name.split(".")[0]
            and each.step <= merge.step
        ),
        None,
    )
    moved = any(
        move.receiver_name == name and move.target == "cpu" and move.step <= merge.step for move in cell.moves
    )
    if moved or (own is not None and own.where in ("cpu", "ram")) or _held_on_cpu(cell, name):
        return "already merges on the CPU: the model is there"
    if own is not None and name == own.bound_to and not _runs_before(cell, merge.step):
        # Loaded here only to be merged: load it on the CPU (accelerate refuses .to() on a model that
        # device_map="auto" offloaded in part).
        _load_on_cpu(cell, own, edits)
        return None
    edits.add_before(merge.statement, f'{name} = {name}.to("cpu")')
    return None


def _runs_elsewhere(merge: Merge) -> bool:
    """Whether the merge sits in a comprehension, lambda or function, whose names the statement lacks."""
    scopes = m.ListComp() | m.SetComp() | m.DictComp() | m.GeneratorExp() | m.Lambda() | m.FunctionDef()
    return any(
        any(inner is merge.call for inner in m.findall(scope, m.Call()))
        for scope in m.findall(merge.statement, scopes)
    )


def _all_on_cpu(cell: Cell) -> bool:
    """Whether the cell loads its models into CPU RAM and moves nothing to CUDA (a base model taken from
    one of them, ``getattr(model, "thinker")``, is there too)."""
    models = [load for load in cell.loads if load.kind == "model"]
    return (
        bool(models)
        and all(load.where in ("cpu", "ram") for load in models)
        and not any(move.target == "cuda" for move in cell.moves)
    )


def _runs_before(cell: Cell, step: int) -> bool:
    """Whether the cell trains, generates or calls a model before top-level statement ``step``."""
    runs = [g.step for g in cell.generates] + [f.step for f in cell.forwards]
    return cell.trains or any(each < step for each in runs)


def _back_to_gpu(cell: Cell, merge: Merge, edits: Edits) -> bool:
    """Where the cell moves or uses the merged model after the merge: move it back if it fits. True if so."""
    kept = merge.target or merge.receiver_name
    later = [
        move
        for move in cell.moves
        if kept is not None
        and move.receiver_name == kept
        and move.step > merge.step
        and move.target == "cuda"
    ]
    chained = [move for move in cell.moves if move.receiver is merge.call and move.target == "cuda"]
    for move in later + chained:
        edits.unwrap.add(id(move.call))
    if kept is None or (merge.saved_after and not (later or chained or merge.used_after)):
        return False  # saved from the CPU: moving it back would only cost time
    edits.needs.add("vram_magic")
    edits.add_after(merge.statement, f"{kept} = vram_magic.to_gpu_if_it_fits({kept})")
    return True


def _base_load(cell: Cell, adapter: Load) -> Load | None:
    """The load of this cell that makes an adapter load's base model."""
    if adapter.base is None:
        return None
    for load in cell.loads:
        if load.kind == "model" and (
            load.call is adapter.base
            or (isinstance(adapter.base, cst.Name) and load.bound_to == adapter.base.value)
        ):
            return load
    return None


def _load_on_cpu(cell: Cell, load: Load, edits: Edits) -> None:
    drop_gpu_moves(cell, load, edits, casts=False)
    edit = LoadEdit(cell, load, edits)
    written = find_arg(load.call, "device_map")
    edit.assign("device_map", code(string("cpu", written.value if written else None)))
    edit.finish()


def _statement_of(cell: Cell, load: Load) -> cst.CSTNode:
    return next(node for node, (start, end) in cell.statements if start <= load.lines[0] <= end)


def _is_plain(expr: cst.BaseExpression) -> bool:
    return isinstance(expr, cst.Name) or (isinstance(expr, cst.Attribute) and _is_plain(expr.value))


def _held_on_cpu(cell: Cell, name: str) -> bool:
    """Whether a model the notebook holds under ``name`` is on the CPU (its ``.device``). Without a GPU
    every model is on the CPU, which then says nothing about where the failing cell meant it to be."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return False
    held = cell.names.resolve(name.split(".")[0])
    if not isinstance(held, Held):
        return False
    value: object = held.value
    for part in name.split(".")[1:]:
        value = getattr(value, "__dict__", {}).get(part)
    try:
        device = getattr(value, "device", None)
    except Exception:
        return False
    return getattr(device, "type", None) == "cpu"
