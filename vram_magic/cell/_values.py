"""What an expression of the cell stands for, as far as its text and the notebook's names tell.

A value is either code of the cell (a libcst expression) or a Python object the notebook already holds
(``Held``: a name bound in an earlier cell). ``Names`` resolves a name: a name the cell binds exactly once, in
a top-level ``name = value``, is that value; any other name the cell binds is unknown (the notebook's old
value would mislead); else the notebook's value, if it has one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import libcst as cst

from vram_magic._hf import AUTO_MAPS
from vram_magic._hf import DTYPES as HF_DTYPES

DTYPES = {**HF_DTYPES, "auto": "auto"}  # dtype="auto": the checkpoint's own
# Attributes that hold this process's GPU index: {"": PartialState().process_index}, current_device().
_GPU_INDEX_ATTRIBUTES = frozenset({"process_index", "local_process_index", "current_device", "local_rank"})
_CASTS = {"half": "float16", "bfloat16": "bfloat16", "float": "float32"}
_CONSTANTS = frozenset({"True", "False", "None"})
_DICT_CHANGES = frozenset({"update", "pop", "setdefault", "clear", "popitem"})


@dataclass(frozen=True)
class Held:
    """A Python object the notebook holds (a name bound by an earlier cell)."""

    value: object


class Unknown:
    """A name the cell binds in a way only running it tells (in a loop, twice, in a function...)."""


UNKNOWN = Unknown()
Value = cst.BaseExpression | Held | Unknown | None  # None: no such name


class Names:
    """Resolves the cell's names (see the module's doc)."""

    def __init__(self, module: cst.Module, namespace: Mapping[str, object] | None) -> None:
        self.namespace: Mapping[str, object] = namespace or {}
        self.bound_once: dict[str, cst.BaseExpression] = {}
        self.bound: set[str] = set()
        counts: dict[str, int] = {}
        statements = list(top_level(module))
        for statement in statements:
            for name in bound_names(statement):
                counts[name] = counts.get(name, 0) + 1
        self.bound = set(counts)
        self.entries: dict[str, dict[str, cst.BaseExpression]] = {}  # name["key"] = value, for dict names
        self.mutated: set[str] = set()  # dicts changed some other way (.update(), del d[k])
        for statement in statements:
            target, value = _simple_assignment(statement)
            if target is not None and value is not None and counts.get(target) == 1:
                self.bound_once[target] = value
            self._dict_changes(statement)

    def _dict_changes(self, statement: cst.BaseStatement) -> None:
        """``kwargs["key"] = value`` adds an entry to a dict the cell built; ``kwargs.update(...)``,
        ``del kwargs[key]`` make its entries unknown."""
        if not isinstance(statement, cst.SimpleStatementLine):
            return
        for small in statement.body:
            if isinstance(small, cst.Assign) and len(small.targets) == 1:
                target = small.targets[0].target
                if isinstance(target, cst.Subscript) and isinstance(target.value, cst.Name):
                    index = target.slice[0].slice if len(target.slice) == 1 else None
                    key = self.text(index.value) if isinstance(index, cst.Index) else None
                    if key is None:
                        self.mutated.add(target.value.value)
                    else:
                        self.entries.setdefault(target.value.value, {})[key] = small.value
            elif isinstance(small, cst.Expr) and isinstance(small.value, cst.Call):
                func = small.value.func
                owner = func.value if isinstance(func, cst.Attribute) else None
                if (
                    isinstance(owner, cst.Name)
                    and isinstance(func, cst.Attribute)
                    and func.attr.value in _DICT_CHANGES
                ):
                    self.mutated.add(owner.value)
            elif isinstance(small, cst.Del):
                targets = small.target.elements if isinstance(small.target, cst.Tuple) else [small.target]
                for each in targets:
                    deleted = each.value if isinstance(each, cst.Element) else each
                    if isinstance(deleted, cst.Subscript):  # del kwargs["device_map"]
                        deleted = deleted.value
                    self.mutated.add(_dotted(deleted) or "")

    def resolve(self, name: str) -> Value:
        if name in self.bound_once:
            return self.bound_once[name]
        if name in self.bound:
            return UNKNOWN
        if name in self.namespace:
            return Held(self.namespace[name])
        return None

    def value(self, expr: Value, depth: int = 0) -> Value:
        """``expr`` with names followed to what they are bound to (a few steps at most)."""
        while isinstance(expr, cst.Name) and expr.value not in _CONSTANTS and depth < 5:
            expr = self.resolve(expr.value)
            depth += 1
        return expr

    # --- kinds of values ----------------------------------------------------------------------------

    def text(self, expr: Value) -> str | None:
        """A string literal, or a name bound to a string (or a path)."""
        expr = self.value(expr)
        if isinstance(expr, Held):
            value = expr.value
            return str(value) if isinstance(value, (str, os.PathLike)) else None
        if isinstance(expr, (cst.SimpleString, cst.ConcatenatedString)):
            evaluated = expr.evaluated_value
            return evaluated if isinstance(evaluated, str) else None
        if isinstance(expr, cst.FormattedString) and all(
            isinstance(part, cst.FormattedStringText) for part in expr.parts
        ):
            return _fstring_start(expr)  # f"cuda": no placeholder, a plain string
        return None

    def integer(self, expr: Value) -> int | None:
        expr = self.value(expr)
        if isinstance(expr, Held):
            value = expr.value
            return value if isinstance(value, int) and not isinstance(value, bool) else None
        if isinstance(expr, cst.Integer):
            return int(expr.value.replace("_", ""), 0)
        return None

    def integers(self, expr: Value) -> tuple[int, ...]:
        """The integer values an expression can take: one, or each branch of ``a if c else b``."""
        expr = self.value(expr)
        if isinstance(expr, cst.IfExp):
            body, orelse = self.integers(expr.body), self.integers(expr.orelse)
            return (*body, *orelse) if body and orelse else ()
        single = self.integer(expr)
        return () if single is None else (single,)

    def boolean(self, expr: Value) -> bool | None:
        expr = self.value(expr)
        if isinstance(expr, Held):
            return expr.value if isinstance(expr.value, bool) else None
        if isinstance(expr, cst.Name) and expr.value in ("True", "False"):
            return expr.value == "True"
        return None

    def place(self, expr: Value) -> str:
        """Where a device, device index or ``device_map`` puts things: a place word (see ``_facts``)."""
        expr = self.value(expr)
        if isinstance(expr, Held):
            return _held_place(expr.value)
        if expr is None or isinstance(expr, Unknown):
            return "unknown"
        if isinstance(expr, cst.Integer):
            return "cuda"
        if isinstance(expr, cst.UnaryOperation) and isinstance(expr.operator, cst.Minus):
            return "cpu"  # pipeline(device=-1)
        text = self.text(expr)
        if text is not None:
            return _text_place(text)
        if isinstance(expr, cst.FormattedString):  # f"cuda:{rank}": where its fixed start says
            start = _fstring_start(expr)
            return _text_place(start) if start.startswith(("cuda", "cpu")) else "unknown"
        if isinstance(
            expr, cst.IfExp
        ):  # "cuda" if torch.cuda.is_available() else "cpu": a GPU where there is one
            sides = {self.place(expr.body), self.place(expr.orelse)}
            return "cuda" if "cuda" in sides else sides.pop() if len(sides) == 1 else "unknown"
        if isinstance(expr, cst.BooleanOperation) and isinstance(expr.operator, cst.Or):
            # device or ("cuda" if torch.cuda.is_available() else "cpu"): the default is a GPU
            return "cuda" if "cuda" in {self.place(expr.left), self.place(expr.right)} else "unknown"
        if isinstance(expr, cst.Dict):
            return self._dict_place(expr)
        if isinstance(expr, cst.Call):
            func = expr.func
            if isinstance(func, cst.Attribute) and func.attr.value == "device" and expr.args:
                return self.place(expr.args[0].value)  # torch.device("cuda", 0)
            if isinstance(func, cst.Attribute) and func.attr.value in _GPU_INDEX_ATTRIBUTES:
                return "cuda"
            if isinstance(func, cst.Name) and func.value == "int":
                return "cuda"  # int(os.environ["LOCAL_RANK"])
        if isinstance(expr, cst.Attribute):
            if expr.attr.value in _GPU_INDEX_ATTRIBUTES:
                return "cuda"
            if expr.attr.value == "device":
                owner = expr.value
                if isinstance(owner, cst.Call) or "accelerator" in (_dotted(owner) or "").lower():
                    return "cuda"  # Accelerator().device, accelerator.device: the GPU where there is one
                return "model"  # model.device: follows the model
        return "unknown"

    def _dict_place(self, expr: cst.Dict) -> str:
        places = set()
        for element in expr.elements:
            if not isinstance(element, cst.DictElement):
                return "unknown"
            places.add(self.place(element.value))
        if places <= {"cuda"} and places:
            return "cuda"
        if places <= {"cpu"} and places:
            return "cpu"
        return "unknown"

    def dtype(self, expr: Value) -> str | None:
        """``torch.bfloat16``, ``"bfloat16"``, ``"auto"`` or a name bound to one: the dtype's name, or
        "unknown"."""
        expr = self.value(expr)
        if isinstance(expr, Held):
            name = str(expr.value).removeprefix("torch.")
            return DTYPES.get(name, "unknown")
        if isinstance(expr, cst.Attribute) and _dotted(expr.value) == "torch":
            return DTYPES.get(expr.attr.value, "unknown")
        text = self.text(expr)
        if text is not None:
            return DTYPES.get(text.removeprefix("torch."), "unknown")
        return "unknown"

    def spread(self, expr: Value) -> dict[str, Value] | None:
        """The entries of a ``**kwargs`` mapping (a dict literal, ``dict(...)``, or a dict the notebook
        holds), or None when unknown."""
        if isinstance(expr, cst.Name) and expr.value in self.bound_once:
            if expr.value in self.mutated:
                return None
            built = self.spread(self.bound_once[expr.value])
            added = self.entries.get(expr.value, {})
            return None if built is None else {**built, **added}
        expr = self.value(expr)
        if isinstance(expr, Held):
            value = expr.value
            if isinstance(value, Mapping) and all(isinstance(key, str) for key in value):
                return {key: Held(item) for key, item in value.items()}
            return None
        if isinstance(expr, cst.Dict):
            entries: dict[str, Value] = {}
            for element in expr.elements:
                if isinstance(element, cst.StarredDictElement):
                    inner = self.spread(element.value)
                    if inner is None:
                        return None
                    entries.update(inner)
                    continue
                assert isinstance(element, cst.DictElement)
                key = self.text(element.key)
                if key is None:
                    return None
                entries[key] = element.value
            return entries
        if isinstance(expr, cst.Call) and _dotted(expr.func) == "dict" and not any(a.star for a in expr.args):
            return {a.keyword.value: a.value for a in expr.args if a.keyword is not None}
        return None


def keyword_values(call: cst.Call, names: Names) -> tuple[dict[str, Value], bool]:
    """A call's keyword arguments, ``**kwargs`` opened where their keys are known; and whether every
    ``**kwargs`` was known."""
    found: dict[str, Value] = {}
    known = True
    for arg in call.args:
        if arg.star == "**":
            entries = names.spread(arg.value)
            if entries is None:
                known = False
            else:
                found.update(entries)
        elif arg.keyword is not None:
            found[arg.keyword.value] = arg.value
    return found, known


def cast_of(call: cst.Call) -> str | None:
    """The dtype a cast makes: ``x.half()`` -> "float16", ``x.to(torch.bfloat16)`` -> "bfloat16"."""
    func = call.func
    if not isinstance(func, cst.Attribute):
        return None
    if func.attr.value in _CASTS and not call.args:
        return _CASTS[func.attr.value]
    if func.attr.value == "to":
        for arg in call.args:
            value = arg.value
            wanted = arg.keyword is None or arg.keyword.value == "dtype"
            if wanted and isinstance(value, cst.Attribute) and _dotted(value.value) == "torch":
                return DTYPES.get(value.attr.value)
    return None


def is_main_guard(node: cst.CSTNode) -> bool:
    """``if __name__ == "__main__":`` (no else): always true in a notebook, so its body always runs."""
    if not isinstance(node, cst.If) or node.orelse is not None:
        return False
    test = node.test
    return (
        isinstance(test, cst.Comparison)
        and isinstance(test.left, cst.Name)
        and test.left.value == "__name__"
        and len(test.comparisons) == 1
        and isinstance(test.comparisons[0].operator, cst.Equal)
        and isinstance(test.comparisons[0].comparator, cst.SimpleString)
        and test.comparisons[0].comparator.evaluated_value == "__main__"
    )


def top_level(module: cst.Module) -> Iterator[cst.BaseStatement]:
    """The cell's top-level statements, those of an ``if __name__ == "__main__":`` block among them."""
    for statement in module.body:
        if is_main_guard(statement):
            assert isinstance(statement, cst.If) and isinstance(statement.body, cst.IndentedBlock)
            yield from statement.body.body
        else:
            yield statement


def bound_names(node: cst.CSTNode) -> set[str]:
    """Every name ``node`` binds or deletes, wherever in it (conservatively: inside functions too)."""
    found: set[str] = set()
    for each in _walk(node):
        targets = (cst.AssignTarget, cst.AnnAssign, cst.AugAssign, cst.For, cst.CompFor, cst.NamedExpr)
        if isinstance(each, targets):
            found |= target_names(each.target)
        elif isinstance(each, cst.WithItem) and each.asname is not None:
            found |= target_names(each.asname.name)
        elif isinstance(each, cst.Del):
            found |= target_names(each.target)
        elif isinstance(each, (cst.FunctionDef, cst.ClassDef)):
            found.add(each.name.value)
        elif isinstance(each, cst.ExceptHandler) and each.name is not None:
            found |= target_names(each.name.name)
        elif isinstance(each, cst.ImportAlias):
            name = _dotted(each.name) or ""
            found.add(each.evaluated_alias or name.split(".")[0])
    return found


def target_names(target: cst.BaseExpression) -> set[str]:
    if isinstance(target, cst.Name):
        return {target.value}
    if isinstance(target, (cst.Tuple, cst.List)):
        return set().union(*(target_names(element.value) for element in target.elements))
    if isinstance(target, cst.StarredElement):
        return target_names(target.value)
    return set()


def _walk(node: cst.CSTNode) -> Iterator[cst.CSTNode]:
    pending = [node]
    while pending:
        current = pending.pop()
        yield current
        pending.extend(current.children)


def _simple_assignment(statement: cst.BaseStatement) -> tuple[str | None, cst.BaseExpression | None]:
    """(name, value) for a top-level ``name = value`` or ``name: T = value``."""
    if not isinstance(statement, cst.SimpleStatementLine) or len(statement.body) != 1:
        return None, None
    small = statement.body[0]
    if isinstance(small, cst.Assign) and len(small.targets) == 1:
        target, value = small.targets[0].target, small.value
    elif isinstance(small, cst.AnnAssign) and small.value is not None:
        target, value = small.target, small.value
    else:
        return None, None
    return (target.value, value) if isinstance(target, cst.Name) else (None, None)


def _text_place(text: str) -> str:
    lowered = text.strip().lower()
    if lowered == "cuda" or lowered.startswith("cuda:") or lowered == "gpu":
        return "cuda"
    if lowered in ("cpu", "cpu:0"):
        return "cpu"
    if lowered in AUTO_MAPS:
        return "auto"
    if lowered in ("disk", "meta"):
        return lowered
    return "unknown"


def _held_place(value: object) -> str:
    """The place a notebook variable names. "cpu" is read as unknown: a variable of an earlier cell is often
    the CPU only because that machine has no GPU (``"cuda" if torch.cuda.is_available() else "cpu"``),
    and what the cell means is what its text says."""
    device_type = getattr(value, "type", None)  # a torch.device
    if isinstance(device_type, str) and type(value).__name__ == "device":
        return "cuda" if device_type == "cuda" else "unknown"
    if isinstance(value, bool):
        return "unknown"
    if isinstance(value, int):
        return "cuda" if value >= 0 else "unknown"
    if isinstance(value, str):
        place = _text_place(value)
        return "unknown" if place == "cpu" else place
    if isinstance(value, Mapping):
        places = {_held_place(item) for item in value.values()}
        return places.pop() if places == {"cuda"} else "unknown"
    return "unknown"


def _dotted(expr: cst.CSTNode) -> str | None:
    """``torch.cuda`` for an Attribute chain of names, ``x`` for a Name; else None."""
    if isinstance(expr, cst.Name):
        return expr.value
    if isinstance(expr, cst.Attribute):
        inner = _dotted(expr.value)
        return None if inner is None else f"{inner}.{expr.attr.value}"
    return None


dotted = _dotted


def _fstring_start(expr: cst.FormattedString) -> str:
    """The text of an f-string up to its first placeholder."""
    start = ""
    for part in expr.parts:
        if not isinstance(part, cst.FormattedStringText):
            break
        start += part.value
    return start
