"""What the load fixes share: setting and removing a load's keywords wherever they are written, and taking
casts and moves off a model that is now placed by ``device_map``.

A keyword may be written on the call, in a ``**kwargs`` dict literal (inline, or bound once in the cell), or
in a dict an earlier cell made. Each is changed where it is, never added a second time (``TypeError: got
multiple values``): a dict of an earlier cell is overridden at the call (``**{**kw, "device_map": "auto"}``).
A pipeline takes ``device``, ``device_map`` and ``dtype`` itself and the rest in ``model_kwargs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import libcst as cst

from vram_magic._errors import NotApplicable
from vram_magic.cell import Cell, Held, Load, Move
from vram_magic.cell._values import keyword_values
from vram_magic.fixes._edit import (
    Edits,
    code,
    find_arg,
    remove_dict_key,
    remove_kwarg,
    set_dict_key,
    set_kwarg,
    string,
)

_PIPELINE_OWN = frozenset({"device", "device_map", "dtype", "torch_dtype"})
_DTYPE_ALIASES = {"torch_dtype": "dtype"}
_LEGACY_FLAGS = ("load_in_4bit", "load_in_8bit", "llm_int8_enable_fp32_cpu_offload")
_CASTS = frozenset({"half", "float", "bfloat16"})


def compute_code(cell: Cell, load: Load, default: str) -> str:
    """The dtype 4-bit layers compute in, as code: the load's own 16-bit dtype (a ``torch_dtype`` variable
    of the notebook's included: it is often bfloat16 or float16 by the GPU), else ``default``."""
    if load.dtype in ("float16", "bfloat16"):
        return f"torch.{load.dtype}"
    if load.dtype == "unknown":
        keywords, _ = keyword_values(load.call, cell.names)
        written = keywords.get("dtype", keywords.get("torch_dtype"))
        if isinstance(written, (cst.Name, cst.Attribute)):
            return code(written).strip()
    return f"torch.{default}"


@dataclass
class LoadEdit:
    """The keyword changes of one load, made into ``Edits`` by ``finish``."""

    cell: Cell
    load: Load
    edits: Edits
    sets: dict[str, str] = field(default_factory=dict)  # keyword -> code of its new value
    removals: set[str] = field(default_factory=set)
    renames: dict[str, str] = field(default_factory=dict)  # new keyword -> the old one it replaces in place

    def assign(self, key: str, value: str, *, instead_of: str | None = None) -> None:
        self.sets[key] = value
        self.removals.discard(key)
        if instead_of is not None:
            self.renames[key] = instead_of

    def remove(self, key: str) -> None:
        self.removals.add(key)
        self.sets.pop(key, None)

    def finish(self) -> None:
        call = self.load.call
        if self.load.kind == "pipeline":
            own = {k: v for k, v in self.sets.items() if k in _PIPELINE_OWN}
            inner = {k: v for k, v in self.sets.items() if k not in _PIPELINE_OWN}
            own_removals = {k for k in self.removals if k in _PIPELINE_OWN}
            inner_removals = {k for k in self.removals if k not in _PIPELINE_OWN}
            # What the call now says itself must not be said in model_kwargs too ("You cannot use both").
            said = {_DTYPE_ALIASES.get(key, key) for key in (*own, *own_removals)}
            inner_removals |= {
                key for key in self.model_kwargs_keys() if _DTYPE_ALIASES.get(key, key) in said
            }
            if next(iter(self.sets), "") in _PIPELINE_OWN:  # in the order the fix set them
                self._on_call(own, own_removals)
                self._in_model_kwargs(inner, inner_removals)
            else:
                self._in_model_kwargs(inner, inner_removals)
                self._on_call(own, own_removals)
            return
        spreads = [arg for arg in call.args if arg.star == "**"]
        sets, removals = dict(self.sets), set(self.removals)
        for arg in spreads:
            self._in_spread(arg, sets, removals)
        self._on_call(sets, removals)

    def model_kwargs_keys(self) -> set[str]:
        """The keys of a pipeline's ``model_kwargs``, as far as the cell and the notebook tell."""
        written = find_arg(self.load.call, "model_kwargs")
        entries = self.cell.names.spread(written.value) if written is not None else None
        return set(entries or ())

    def _on_call(self, sets: dict[str, str], removals: set[str]) -> None:
        if not sets and not removals:
            return
        renames = dict(self.renames)

        def change(call: cst.Call) -> cst.Call:
            for key, value in sets.items():  # first: a keyword set in place of an old one keeps its spot
                old = renames.get(key)
                expression = cst.parse_expression(value)
                call = set_kwarg(call, key, expression, rename=(old,) if old else ())
            for key in removals:
                call = remove_kwarg(call, key)
            return call

        self.edits.change(self.load.call, change)

    def _in_spread(self, arg: cst.Arg, sets: dict[str, str], removals: set[str]) -> None:
        """Make the changes that belong to one ``**kwargs`` there; take them out of ``sets``/``removals``."""
        names = self.cell.names
        entries = names.spread(arg.value)
        if entries is not None:
            ours = {k: v for k, v in sets.items() if k in entries}
            gone = {k for k in removals if k in entries}
        else:  # unknown keys: override what we set, so nothing is passed twice
            ours = {k: v for k, v in sets.items() if find_arg(self.load.call, k) is None}
            gone = set()
        if not ours and not gone:
            return
        for key in ours:
            sets.pop(key)
        removals.difference_update(gone)
        target = arg.value
        bound = names.value(target)
        # A dict the cell also changes by key (``kw["load_in_8bit"] = True``) is overridden at the call.
        changed_by_key = isinstance(target, cst.Name) and bool(names.entries.get(target.value))
        if isinstance(target, cst.Dict) or (
            isinstance(target, cst.Name)
            and isinstance(bound, (cst.Dict, cst.Call))
            and not isinstance(bound, Held)
            and not changed_by_key
        ):
            literal = target if isinstance(target, cst.Dict) else bound
            assert isinstance(literal, (cst.Dict, cst.Call))
            self.edits.change(literal, lambda node: _edit_mapping(node, ours, gone))
            return
        self.edits.change(arg, lambda node: node.with_changes(value=_override(node.value, ours, gone)))

    def _in_model_kwargs(self, sets: dict[str, str], removals: set[str]) -> None:
        if not sets and not removals:
            return
        call = self.load.call
        existing = find_arg(call, "model_kwargs")
        if existing is None:
            if not sets:
                return
            entries = ", ".join(f'"{key}": {value}' for key, value in sets.items())
            self._on_call({"model_kwargs": "{" + entries + "}"}, set())
            return
        value = existing.value
        bound = self.cell.names.value(value)
        if isinstance(value, cst.Name) and isinstance(bound, cst.Dict):
            self.edits.change(bound, lambda node: _edit_mapping(node, sets, removals))
            return
        self.edits.change(
            existing, lambda node: node.with_changes(value=_edit_mapping(node.value, sets, removals))
        )


def _edit_mapping(node: cst.BaseExpression, sets: dict[str, str], removals: set[str]) -> cst.BaseExpression:
    """A dict literal or ``dict(...)`` call with entries set and removed."""
    if isinstance(node, cst.Call):
        for key in removals:
            node = remove_kwarg(node, key)
        for key, value in sets.items():
            node = set_kwarg(node, key, cst.parse_expression(value))
        return node
    if isinstance(node, cst.Dict):
        for key in removals:
            node = remove_dict_key(node, key)
        result: cst.BaseExpression = node
        for key, value in sets.items():
            result = set_dict_key(result, key, cst.parse_expression(value))
        return result
    return _override(node, sets, removals)


def _override(node: cst.BaseExpression, sets: dict[str, str], removals: set[str]) -> cst.BaseExpression:
    """``{**kw, "key": value}``: a mapping of an earlier cell with our keys set (and some left out)."""
    source = code(node).strip()
    if removals:
        left_out = ", ".join(f'"{key}"' for key in sorted(removals))
        source = f"{{k: v for k, v in {source}.items() if k not in ({left_out},)}}"
    entries = "".join(f', "{key}": {value}' for key, value in sets.items())
    return cst.parse_expression(f"{{**{source}{entries}}}")


def no_load_reason(cell: Cell, what: str) -> NotApplicable:
    """Why a load fix has nothing to change here: only an adapter is loaded, or no model at all."""
    if any(load.kind == "adapter" for load in cell.loads):
        return NotApplicable(
            "this cell only loads a LoRA adapter (PeftModel.from_pretrained); apply the fix to the cell that "
            "loads the base model",
            elsewhere=True,
        )
    if any(load.kind == "foreign" for load in cell.loads):
        return NotApplicable(
            f"this cell loads its model with another library's loader, which vram_magic does not {what}"
        )
    return NotApplicable(
        f"this cell has no from_pretrained(...) or pipeline(...) call of a model to {what}", elsewhere=True
    )


def release_pipelines(cell: Cell, changed: list[Load], edits: Edits) -> None:
    """A pipeline given a model that is now placed by ``device_map`` must not be given a ``device`` too
    (transformers refuses to move a model accelerate placed)."""
    for load in cell.loads:
        if load.kind != "pipeline" or not load.model_is_object or find_arg(load.call, "device") is None:
            continue
        model = find_arg(load.call, "model")
        positional = [arg.value for arg in load.call.args if arg.keyword is None and not arg.star]
        given = model.value if model else positional[1] if len(positional) > 1 else None
        source = cell_source_load(cell, given, load.lines[0])
        if source is not None and source in changed:
            edits.change(load.call, lambda call: remove_kwarg(call, "device"))


def cell_source_load(cell: Cell, expr: cst.BaseExpression | None, line: int) -> Load | None:
    """The load of this cell whose model ``expr`` names (a name bound to the load, before ``line``)."""
    if not isinstance(expr, cst.Name):
        return None
    found = None
    for load in cell.loads:
        if load.bound_to == expr.value and load.lines[1] < line:
            found = load
    return found


def later_moves(cell: Cell, load: Load) -> list[Move]:
    """Moves and casts of the model this load makes, after the load (not chained on it)."""
    chained = {id(link) for link in load.chain}
    return [move for move in cell.moves if move.load is load and id(move.call) not in chained]


def drop_gpu_moves(cell: Cell, load: Load, edits: Edits, *, casts: bool) -> str | None:
    """Take GPU moves (and, with ``casts``, dtype casts) off the model this load makes, chained on the load or
    later; return the dtype of a cast chained on the load, for the load's own ``dtype=``."""
    folded = None
    for link in load.chain:
        func = link.func
        assert isinstance(func, cst.Attribute)
        method = func.attr.value
        if method in ("cuda", "to") and not _to_cpu(cell, link):
            edits.unwrap.add(id(link))
        elif method in _CASTS or (method == "to" and not _device_of_to(link)):
            if casts:
                edits.unwrap.add(id(link))
            folded = {"half": "float16", "bfloat16": "bfloat16", "float": "float32"}.get(method, folded)
    for move in later_moves(cell, load):
        if move.target in ("cuda", "unknown", "model") or (
            casts and move.cast is not None and move.target is None
        ):
            edits.unwrap.add(id(move.call))
    return folded


def _to_cpu(cell: Cell, call: cst.Call) -> bool:
    device = _device_of_to(call)
    return device is not None and cell.names.place(device) == "cpu"


def _device_of_to(call: cst.Call) -> cst.BaseExpression | None:
    for arg in call.args:
        if arg.keyword is not None and arg.keyword.value == "device":
            return arg.value
    if call.args and call.args[0].keyword is None:
        value = call.args[0].value
        if not (
            isinstance(value, cst.Attribute)
            and isinstance(value.value, cst.Name)
            and value.value.value == "torch"
        ):
            return value
    return None


def legacy_flags(edit: LoadEdit) -> list[str]:
    """Remove ``load_in_4bit=`` / ``load_in_8bit=`` (transformers 5 rejects them) wherever they are written;
    return those written on the call itself, in order (a ``quantization_config`` takes the first's place)."""
    keywords, _ = keyword_values(edit.load.call, edit.cell.names)
    inner = edit.model_kwargs_keys() if edit.load.kind == "pipeline" else set()
    for flag in _LEGACY_FLAGS:
        if flag in keywords or flag in inner:
            edit.remove(flag)
    return [flag for flag in _LEGACY_FLAGS if find_arg(edit.load.call, flag) is not None]


def translate_legacy_flags(edit: LoadEdit, *, offload: bool) -> None:
    """A load quantized with ``load_in_8bit=True`` or ``load_in_4bit=True`` gets the same quantization as a
    ``quantization_config`` (the old 4-bit flag meant FP4 without double quantization: it stays so)."""
    written = legacy_flags(edit)
    bits = edit.load.quantization
    if not written and "load_in_4bit" not in edit.removals and "load_in_8bit" not in edit.removals:
        return
    if bits not in ("4bit", "8bit"):
        return
    edit.edits.needs.add("BitsAndBytesConfig")
    extra = ", llm_int8_enable_fp32_cpu_offload=True" if offload else ""
    config = f"BitsAndBytesConfig(load_in_{bits}=True{extra})"
    edit.assign("quantization_config", config, instead_of=written[0] if written else None)


def device_map_auto(edit: LoadEdit, *, keep_dicts: bool, keep_unknown: bool = True) -> None:
    """``device_map="auto"`` (in the quotes of the old one), unless the load already spreads itself, or
    (``keep_unknown``) its map is only known when the cell runs, or (``keep_dicts``) it is a dict such as
    ``{"": 0}``."""
    load = edit.load
    if load.device_map == "auto" or (keep_unknown and load.device_map == "unknown"):
        return
    keywords, _ = keyword_values(load.call, edit.cell.names)
    written = keywords.get("device_map")
    resolved = edit.cell.names.value(written)
    if keep_dicts and (
        isinstance(resolved, cst.Dict) or (isinstance(resolved, Held) and isinstance(resolved.value, dict))
    ):
        return
    if load.kind == "pipeline" and find_arg(load.call, "device") is not None:
        edit.remove("device")  # device= would fight with device_map
    like = written if isinstance(written, cst.BaseExpression) else None
    edit.assign("device_map", code(string("auto", like)))
