"""What every part of the reading shares: the cell's names, qualified names of what it calls, and
which expression is a model (a load of this cell, followed through chains, wrappers and names)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import libcst as cst

from vram_magic.cell._facts import (
    Load,
)
from vram_magic.cell._values import (
    Held,
    Names,
    bound_names,
    dotted,
)
from vram_magic.cell._walk import Walk

_CHAIN_METHODS = frozenset(
    {"to", "cuda", "cpu", "half", "float", "bfloat16", "eval", "train", "requires_grad_"}
)

_WRAPPERS = frozenset(
    {"get_peft_model", "prepare_model_for_kbit_training", "prepare_model_for_int8_training"}
)

# A name the notebook does not hold, read as a model by its name: moved (``base_model.to(...)``), or called on
# inputs (``model(**inputs)``; not ``get_peft_model(model)``, a function).
_MODEL_NAME = re.compile(r"(?:^|_)model$", re.IGNORECASE)
_CALLED_MODEL = re.compile(
    r"^(?:base_|peft_|merged_|lora_|ref_|reward_|policy_|draft_)?model$", re.IGNORECASE
)


# Libraries whose model classes vram_magic reads and rewrites loads of.
_MODEL_LIBRARIES = frozenset({"transformers", "peft"})


def _library(module: str) -> str:
    return module.split(".")[0]


class ReaderBase:
    """The cell as read so far: its text, tree, names and first walk, and the loads found."""

    def __init__(self, source: str, module: cst.Module, names: Names, walk: Walk) -> None:
        self.source, self.module, self.names, self.walk = source, module, names, walk
        self.step_binds = [_binds(step.node) for step in walk.steps]
        self.assignments = _assignments(walk)
        self.loads_by_call: dict[int, Load] = {}  # id(call) -> the load it makes, once loads are read

    def qualified(self, node: cst.BaseExpression) -> str | None:
        """The dotted name a class or function comes from: the cell's imports, else the notebook's object."""
        if id(node) in self.walk.qualified:
            return self.walk.qualified[id(node)]
        if id(node) in self.walk.local:
            return None
        text = dotted(node)
        if text is None:
            return None
        head, *rest = text.split(".")
        if head not in self.names.namespace:
            return None
        found: object = self.names.namespace[head]
        for index, part in enumerate(rest):
            attributes = getattr(found, "__dict__", None)
            if not isinstance(attributes, Mapping) or part not in attributes:
                if isinstance(found, type(re)):  # loaded lazily (``transformers.Trainer``): as written
                    return ".".join([found.__name__, *rest[index:]])
                return None
            found = attributes[part]
        if isinstance(found, type(re)):
            return found.__name__
        module, qualname = getattr(found, "__module__", None), getattr(found, "__qualname__", None)
        if isinstance(found, type) and isinstance(module, str) and _library(module) not in _MODEL_LIBRARIES:
            # A subclass of a library's model, defined in a module of the user's, loads as the library does.
            base = next((b for b in found.__mro__ if _library(b.__module__) in _MODEL_LIBRARIES), None)
            if base is not None:
                module = base.__module__
        return f"{module}.{qualname}" if isinstance(module, str) and isinstance(qualname, str) else None

    def _class_name(self, node: cst.BaseExpression) -> tuple[str, str | None]:
        """(the class's own name, the library it comes from or None when unknown)."""
        qualified = self.qualified(node)
        written = (dotted(node) or "").rsplit(".", 1)[-1]
        if qualified is None or qualified.startswith("__main__."):  # unknown, or the notebook's own wrapper
            return written, None
        return qualified.rsplit(".", 1)[-1], qualified.split(".")[0]

    def _source_load(self, expr: cst.BaseExpression, line: int, depth: int = 0) -> Load | None:
        """The load of this cell whose model ``expr`` is, before ``line``: the load itself, a cast, move or
        mode chained on it, a wrapper around it (``get_peft_model(model, ...)``), or a name bound to one."""
        if depth > 8:
            return None
        if isinstance(expr, cst.Call):
            if id(expr) in self.loads_by_call:
                load = self.loads_by_call[id(expr)]
                if load.kind == "adapter" and load.base is not None:
                    return self._source_load(load.base, line, depth + 1) or load
                return load
            func = expr.func
            if isinstance(func, cst.Attribute) and func.attr.value in _CHAIN_METHODS | {"merge_and_unload"}:
                return self._source_load(func.value, line, depth + 1)
            if dotted(func) in _WRAPPERS and expr.args:
                return self._source_load(expr.args[0].value, line, depth + 1)
            return None
        if isinstance(expr, cst.Name):
            found = self._assignment_before(expr.value, line)
            if found is None:
                return None
            value, start = found  # what the value names is looked up before its own assignment
            return self._source_load(value, start, depth + 1)
        return None

    def _own_load(self, expr: cst.BaseExpression, line: int) -> Load | None:
        """The load of this cell ``expr`` is, or is bound to (not following an adapter to its base)."""
        if isinstance(expr, cst.Name):
            value = self._value_before(expr.value, line)
            expr = value if value is not None else expr
        return self.loads_by_call.get(id(expr)) if isinstance(expr, cst.Call) else None

    def _value_before(self, name: str, line: int) -> cst.BaseExpression | None:
        """What ``name`` was last assigned (``name = value``) by a statement that ended before ``line``."""
        found = self._assignment_before(name, line)
        return None if found is None else found[0]

    def _assignment_before(self, name: str, line: int) -> tuple[cst.BaseExpression, int] | None:
        """The value of the last ``name = value`` that ended before ``line``, and the line it starts on."""
        found = None
        for end, target, value, start in self.assignments:
            if target == name and end < line:
                found = (value, start)
            elif start >= line:
                break
        return found

    def is_model(
        self, expr: cst.BaseExpression, line: int, *, by_name: re.Pattern[str] | None = None
    ) -> bool:
        """A loaded model: a load of this cell (through chains, wrappers and names), or a model the notebook
        holds (a torch module); a name the notebook does not hold (the cell read alone) when ``by_name``
        matches it."""
        by_name = by_name or _MODEL_NAME
        load = self._source_load(expr, line)
        if load is not None:
            return load.kind != "pipeline"
        if isinstance(expr, cst.Name) and self._value_before(expr.value, line) is None:
            value = self.names.resolve(expr.value)
            if value is None:  # a name the notebook does not hold (the cell read alone): by its name
                return by_name.search(expr.value) is not None
            return isinstance(value, Held) and _is_torch_module(value.value)
        if isinstance(expr, cst.Attribute) and isinstance(expr.value, cst.Name):
            owner = self.names.resolve(expr.value.value)
            if isinstance(owner, Held):
                attributes = getattr(owner.value, "__dict__", {})
                return (
                    _is_torch_module(attributes.get(expr.attr.value))
                    if isinstance(attributes, dict)
                    else False
                )
        return False

    def _chain(self, call: cst.Call) -> list[cst.Call]:
        """Casts, moves and modes chained on ``call``, innermost first: ``load(...).half().cuda()``."""
        chain: list[cst.Call] = []
        current = call
        while id(current) in self.walk.chained_on:
            outer = self.walk.chained_on[id(current)]
            func = outer.func
            if not (isinstance(func, cst.Attribute) and func.attr.value in _CHAIN_METHODS):
                break
            chain.append(outer)
            current = outer
        return chain


def _binds(node: cst.CSTNode) -> set[str]:
    """The names a step binds or deletes; a ``with`` step binds only its ``as`` names (its body is steps)."""
    if isinstance(node, cst.With):
        return set().union(*(bound_names(item) for item in node.items))
    return bound_names(node)


def _assignments(walk: Walk) -> list[tuple[int, str, cst.BaseExpression, int]]:
    """(last line, name, value, first line) of every assignment to a name, in order."""
    found = []
    for node, (start, end) in walk.statements:
        assert isinstance(node, cst.SimpleStatementLine)
        for small in node.body:
            found += [(end, name, value, start) for name, value in bindings(small)]
    return found


def bindings(small: cst.BaseSmallStatement) -> list[tuple[str, cst.BaseExpression]]:
    """The names an assignment binds and the value each gets: ``a = b = value``, ``x: T = value``,
    ``model, tok = load(...), load(...)`` (pair by pair), and ``model, info = load(...,
    output_loading_info=True)`` (the model)."""
    if isinstance(small, cst.AnnAssign) and small.value is not None:
        return [(small.target.value, small.value)] if isinstance(small.target, cst.Name) else []
    if not isinstance(small, cst.Assign):
        return []
    found: list[tuple[str, cst.BaseExpression]] = []
    for assign_target in small.targets:
        target, value = assign_target.target, small.value
        if isinstance(target, cst.Name):
            found.append((target.value, value))
        elif isinstance(target, (cst.Tuple, cst.List)) and isinstance(value, (cst.Tuple, cst.List)):
            if len(target.elements) == len(value.elements):
                found += [
                    (each.value.value, given.value)
                    for each, given in zip(target.elements, value.elements, strict=True)
                    if isinstance(each.value, cst.Name) and not isinstance(given, cst.StarredElement)
                ]
        elif isinstance(target, (cst.Tuple, cst.List)) and _returns_loading_info(value) and target.elements:
            first = target.elements[0].value
            if isinstance(first, cst.Name):
                found.append((first.value, value))
    return found


def _returns_loading_info(value: cst.BaseExpression) -> bool:
    return isinstance(value, cst.Call) and any(
        arg.keyword is not None and arg.keyword.value == "output_loading_info" for arg in value.args
    )


def _class_names(value: object) -> list[str]:
    return [klass.__name__ for klass in type(value).__mro__]


def _is_torch_module(value: object) -> bool:
    """A torch module with weights (a loss function such as ``nn.CrossEntropyLoss()`` has none)."""
    if "Module" not in _class_names(value) or not hasattr(value, "parameters"):
        return False
    try:
        return next(iter(value.parameters()), None) is not None
    except Exception:
        return False


def _device_argument(call: cst.Call) -> cst.BaseExpression | None:
    for arg in call.args:
        if arg.keyword is not None and arg.keyword.value == "device":
            return arg.value
    first = call.args[0] if call.args else None
    return first.value if first is not None and first.keyword is None and not first.star else None


def cast_of_expr(expr: cst.BaseExpression) -> bool:
    """``torch.float16`` and the like: a dtype given to ``.to()``, not a device."""
    return isinstance(expr, cst.Attribute) and dotted(expr.value) == "torch" and expr.attr.value != "device"
