"""cpu: run the cell on the CPU: loads get ``device_map="cpu"``, CUDA devices become ``"cpu"``.

What is a CUDA device is decided by its value, not its name: ``"cuda"``, ``"cuda:1"``, a GPU index,
``torch.device("cuda")``, ``"cuda" if torch.cuda.is_available() else "cpu"``, or a variable bound to one (in
the cell, or by an earlier cell); a variable the notebook does not hold counts when its name says it is a
device. A pipeline given a model object gets ``device="cpu"``; FlashAttention (CUDA only) becomes ``"sdpa"``,
and ``.half()`` becomes ``.float()``.
Not offered for a cell that trains (far too slow on a CPU). Whether the model fits in CPU RAM is checked
before it is offered (``vram_magic._checks``).
"""

from __future__ import annotations

import re

import libcst as cst
import libcst.matchers as m

from vram_magic._errors import NotApplicable
from vram_magic.cell import Cell, Load, dotted
from vram_magic.fixes._base import Options, Rewritten, finish
from vram_magic.fixes._edit import Edits, code, find_arg, string, string_value
from vram_magic.fixes._loads import LoadEdit, translate_legacy_flags

_DEVICE_VARIABLE = re.compile(r"^(\w*_)?device$", re.IGNORECASE)


def rewrite(cell: Cell, options: Options) -> Rewritten:
    if cell.trains:
        raise NotApplicable("this cell trains, which would take far too long on the CPU")
    if _runs_a_model_from_elsewhere(cell):
        raise NotApplicable(
            "the model was placed by an earlier cell: moving only this cell's inputs to the CPU would leave "
            "them on another device than the model; load it on the CPU there",
            elsewhere=True,
        )
    edits = Edits()
    found = _loads(cell, options, edits) + _moves(cell, edits) + _devices(cell, edits)
    if not edits:
        if found:
            raise NotApplicable("this cell already runs on the CPU", already=True)
        raise NotApplicable("this cell neither loads a model nor moves anything to CUDA", elsewhere=True)
    return finish(cell, "cpu", edits)


def _runs_a_model_from_elsewhere(cell: Cell) -> bool:
    """Whether the cell runs a model (generate, a forward, a pipeline) that no load of this cell made and no
    move of this cell places: it stays wherever an earlier cell put it."""
    own = {load.bound_to for load in cell.loads if load.bound_to}
    moved = {move.receiver_name for move in cell.moves if move.of_model and move.receiver_name}
    runs = [g.receiver_name for g in cell.generates] + [f.receiver_name for f in cell.forwards]
    runs += [p.receiver_name for p in cell.pipeline_calls]
    return any(name is None or name.split(".")[0] not in own | moved for name in runs)


def _is_cuda(cell: Cell, expr: cst.BaseExpression) -> bool:
    place = cell.names.place(expr)
    if place == "cuda":
        return True
    return place == "unknown" and isinstance(expr, cst.Name) and "device" in expr.value.lower()


def _to_cpu(expr: cst.BaseExpression) -> cst.BaseExpression:
    """A "cpu" literal in the quotes the device was written in."""
    if isinstance(expr, cst.IfExp):
        expr = expr.body if isinstance(expr.body, cst.SimpleString) else expr.orelse
    return string("cpu", expr)


def _loads(cell: Cell, options: Options, edits: Edits) -> int:
    """Loads of this cell put on the CPU (``device_map="cpu"``; a pipeline's ``device="cpu"``); return how
    many loads the cell has that are, or now go, there."""
    found = 0
    for load in cell.loads:
        if load.kind not in ("model", "peft", "pipeline") or (
            load.kind == "pipeline" and load.model_is_object
        ):
            continue
        found += 1
        edit = LoadEdit(cell, load, edits)
        if load.kind == "pipeline":
            device, written_map = find_arg(load.call, "device"), find_arg(load.call, "device_map")
            mapped = written_map is not None or "device_map" in edit.model_kwargs_keys()
            if mapped and load.device_map != "cpu":  # on the call or in model_kwargs
                edit.assign("device_map", code(string("cpu", written_map.value if written_map else None)))
            elif device is not None and _is_cuda(cell, device.value):
                edit.assign("device", code(_to_cpu(device.value)))
            elif device is None and not mapped:
                edit.assign("device", '"cpu"')
        elif load.where not in ("cpu", "ram") or load.device_map not in (None, "cpu"):
            written = find_arg(load.call, "device_map")
            edit.assign("device_map", code(string("cpu", written.value if written else None)))
        if edit.sets and load.legacy_flag:  # only on a load this fix moves
            translate_legacy_flags(edit, offload=False)
        if edit.sets:
            _float_on_the_cpu(load, edits)
        attention = find_arg(load.call, "attn_implementation")
        if edit.sets and attention is not None and (string_value(attention.value) or "").startswith("flash"):
            edit.assign(
                "attn_implementation", code(string("sdpa", attention.value))
            )  # FlashAttention needs CUDA
        edit.finish()
    return found


def _float_on_the_cpu(load: Load, edits: Edits) -> None:
    """``.half()`` chained on a model now loaded on the CPU becomes ``.float()``: half-precision matmuls on a
    CPU are slow, where they run at all (ChatGLM's own instructions say ``.float()`` for the CPU)."""
    for link in load.chain:
        func = link.func
        if isinstance(func, cst.Attribute) and func.attr.value == "half" and not link.args:
            edits.change(
                link, lambda call: call.with_changes(func=call.func.with_changes(attr=cst.Name("float")))
            )


def _moves(cell: Cell, edits: Edits) -> int:
    found = 0
    for move in cell.moves:
        func = move.call.func
        assert isinstance(func, cst.Attribute)
        if func.attr.value == "cuda":
            found += 1
            edits.unwrap.add(id(move.call))
        elif move.target == "cpu":
            found += 1
    return found


def _devices(cell: Cell, edits: Edits) -> int:
    """``device=``/``device_map=`` arguments, ``.to(<cuda>)``, ``torch.device("cuda")``,
    ``torch.set_default_device("cuda")`` and ``device = <cuda>`` become the CPU."""
    found = 0
    used_as_device: set[str] = set()
    # A pipeline given a model object is no load of ours: its device= moves that model (made the CPU here).
    loads = {id(load.call) for load in cell.loads if not (load.kind == "pipeline" and load.model_is_object)}
    for call in m.findall(cell.module, m.Call()):
        assert isinstance(call, cst.Call)
        name = dotted(call.func) or ""
        method = call.func.attr.value if isinstance(call.func, cst.Attribute) else name
        for index, arg in enumerate(call.args):
            keyword = arg.keyword.value if arg.keyword else None
            positional_device = (
                keyword is None
                and index == 0
                and not arg.star
                and (method == "to" or name in ("torch.device", "torch.set_default_device"))
            )
            if not (positional_device or keyword in ("device", "device_map")) or id(call) in loads:
                continue
            if string_value(arg.value) == "cpu":
                found += 1
            elif isinstance(arg.value, cst.Name) and arg.value.value in cell.names.bound:
                found += 1  # a variable of this cell: its own value is made the CPU where it is set
                if keyword != "device_map":
                    used_as_device.add(arg.value.value)
            elif _is_cuda(cell, arg.value) and not (
                method == "to" and cell.names.place(arg.value) == "model"
            ):
                found += 1
                edits.change(arg, lambda node: node.with_changes(value=_to_cpu(node.value)))
    for node, _ in cell.statements:
        assert isinstance(node, cst.SimpleStatementLine)
        for small in node.body:
            if not isinstance(small, cst.Assign) or len(small.targets) != 1:
                continue
            target = small.targets[0].target
            value = small.value
            if not isinstance(target, cst.Name):
                continue
            if not _DEVICE_VARIABLE.match(target.value) and target.value not in used_as_device:
                continue
            if isinstance(value, (cst.Name, cst.Call)) or cell.names.place(value) != "cuda":
                continue
            found += 1
            edits.change(small, lambda node: node.with_changes(value=_to_cpu(node.value)))
    return found
