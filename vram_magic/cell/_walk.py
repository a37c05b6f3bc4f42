"""The first pass over a cell: every call with where it stands, and the statements and names around them.

One libcst walk (positions and qualified names from libcst's metadata providers) records, for each call:
the top-level statement it belongs to (``with`` blocks opened), whether it surely runs, whether gradients are
off there (``with torch.no_grad()``), whether it is under ``with torch.device("cuda")``, and the statement
that holds it. The second pass (``_reader``) decides what each call is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import libcst as cst
from libcst.metadata import PositionProvider, QualifiedNameProvider, QualifiedNameSource

from vram_magic.cell._values import dotted, is_main_guard

_GRAD_OFF = frozenset({"torch.no_grad", "torch.inference_mode", "no_grad", "inference_mode"})
_COMPOUND = (
    cst.If,
    cst.For,
    cst.While,
    cst.Try,
    cst.TryStar,
    cst.FunctionDef,
    cst.ClassDef,
    cst.Match,
)
_LAZY = (cst.Lambda, cst.ListComp, cst.SetComp, cst.DictComp, cst.GeneratorExp)


@dataclass(frozen=True, eq=False)
class CallSite:
    call: cst.Call
    lines: tuple[int, int]
    step: int
    surely: bool
    grad_off: bool
    gpu_device: bool
    statement: cst.CSTNode  # the innermost statement holding the call
    top: cst.CSTNode  # the top-level statement (or with-block statement) holding it


@dataclass(frozen=True, eq=False)
class Step:
    """One top-level statement, ``with`` blocks opened (the ``with`` line is a step of its own)."""

    node: cst.CSTNode
    lines: tuple[int, int]
    surely: bool


@dataclass(frozen=True)
class Use:
    """A name read by the cell, and the attribute read from it (``model.save_pretrained`` -> that name)."""

    name: str
    step: int
    attribute: str | None


@dataclass
class Walk:
    calls: list[CallSite] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    statements: list[tuple[cst.CSTNode, tuple[int, int]]] = field(default_factory=list)  # simple ones
    chained_on: dict[int, cst.Call] = field(default_factory=dict)  # id(inner call) -> the call on it
    uses: list[Use] = field(default_factory=list)
    top_level_bound: list[str] = field(default_factory=list)
    qualified: dict[int, str] = field(default_factory=dict)  # id(func node) -> qualified name (imports)
    local: set[int] = field(default_factory=set)  # id(func node) of names the cell defines itself
    dicts: list[tuple[cst.Dict, int, bool, tuple[int, int]]] = field(
        default_factory=list
    )  # (node, step, surely, lines)


class Walker(cst.CSTVisitor):
    METADATA_DEPENDENCIES = (PositionProvider, QualifiedNameProvider)

    def __init__(self) -> None:
        super().__init__()
        self.walk = Walk()
        self._step = -1
        self._depth = 0  # inside compound statements that may not run (not with)
        self._lazy = 0  # inside lambdas, comprehensions, conditional branches, later and/or operands
        self._grad_off = 0
        self._gpu_device = 0
        self._lazy_roots: set[int] = set()
        self._statements: list[cst.CSTNode] = []
        self._top: cst.CSTNode | None = None
        self._skip_names: set[int] = set()  # Name nodes that are not reads (targets, attributes, keywords)

    # --- positions -------------------------------------------------------------------------------

    def lines(self, node: cst.CSTNode) -> tuple[int, int]:
        where = self.get_metadata(PositionProvider, node)
        return where.start.line, where.end.line

    # --- statements and steps ---------------------------------------------------------------------

    def _top_level(self) -> bool:
        return self._depth == 0 and self._lazy == 0

    def _new_step(self, node: cst.CSTNode, surely: bool) -> None:
        self._step += 1
        self._top = node
        self.walk.steps.append(Step(node, self.lines(node), surely))

    def on_visit(self, node: cst.CSTNode) -> bool:
        if id(node) in self._lazy_roots:
            self._lazy += 1
        if isinstance(node, cst.SimpleStatementLine):
            if self._top_level():
                self._new_step(node, surely=True)
            self._statements.append(node)
            self.walk.statements.append((node, self.lines(node)))
        elif isinstance(node, cst.With):
            if self._top_level():
                self._new_step(node, surely=True)
            self._statements.append(node)
            self._enter_with(node)
        elif is_main_guard(node) and self._top_level():  # its body runs, statement by statement
            self._new_step(node, surely=True)
            self._statements.append(node)
        elif isinstance(node, _COMPOUND):
            if self._top_level():
                self._new_step(node, surely=False)
            self._statements.append(node)
            self._depth += 1
            if isinstance(node, cst.FunctionDef) and any(
                self._grad_off_call(d.decorator) for d in node.decorators
            ):
                self._grad_off += 1
        elif isinstance(node, _LAZY):
            self._lazy += 1
        elif isinstance(node, cst.IfExp):
            self._lazy_roots.update((id(node.body), id(node.orelse)))
        elif isinstance(node, cst.BooleanOperation):
            self._lazy_roots.add(id(node.right))
        self._mark_non_reads(node)
        return super().on_visit(node)

    def on_leave(self, original_node: cst.CSTNode) -> None:
        super().on_leave(original_node)
        node = original_node
        if isinstance(node, (cst.SimpleStatementLine, cst.With, *_COMPOUND)):
            self._statements.pop()
        if isinstance(node, cst.With):
            self._leave_with(node)
        elif is_main_guard(node) and self._depth == 0:
            pass
        elif isinstance(node, _COMPOUND):
            self._depth -= 1
            if isinstance(node, cst.FunctionDef) and any(
                self._grad_off_call(d.decorator) for d in node.decorators
            ):
                self._grad_off -= 1
        elif isinstance(node, _LAZY):
            self._lazy -= 1
        if id(node) in self._lazy_roots:
            self._lazy -= 1

    def _enter_with(self, node: cst.With) -> None:
        for item in node.items:
            if self._grad_off_call(item.item):
                self._grad_off += 1
            if self._gpu_device_call(item.item):
                self._gpu_device += 1

    def _leave_with(self, node: cst.With) -> None:
        for item in node.items:
            if self._grad_off_call(item.item):
                self._grad_off -= 1
            if self._gpu_device_call(item.item):
                self._gpu_device -= 1

    def _grad_off_call(self, expr: cst.BaseExpression) -> bool:
        """``torch.no_grad()``, ``torch.inference_mode()``, ``torch.set_grad_enabled(False)`` (or bare)."""
        target = expr.func if isinstance(expr, cst.Call) else expr
        name = dotted(target) or ""
        if name in _GRAD_OFF:
            return True
        if name.endswith("set_grad_enabled") and isinstance(expr, cst.Call) and expr.args:
            value = expr.args[0].value
            return isinstance(value, cst.Name) and value.value == "False"
        return False

    def _gpu_device_call(self, expr: cst.BaseExpression) -> bool:
        if not isinstance(expr, cst.Call) or (dotted(expr.func) or "") not in ("torch.device", "device"):
            return False
        if not expr.args or not isinstance(expr.args[0].value, cst.SimpleString):
            return False
        value = expr.args[0].value.evaluated_value
        return isinstance(value, str) and value.startswith("cuda")

    # --- names -----------------------------------------------------------------------------------

    def _mark_non_reads(self, node: cst.CSTNode) -> None:
        skip = self._skip_names
        if isinstance(node, cst.Attribute):
            skip.add(id(node.attr))
        elif isinstance(node, cst.Arg) and node.keyword is not None:
            skip.add(id(node.keyword))
        elif isinstance(node, (cst.FunctionDef, cst.ClassDef, cst.Param)):
            skip.add(id(node.name))
        elif isinstance(node, (cst.Import, cst.ImportFrom)):
            names = node.names if not isinstance(node.names, cst.ImportStar) else ()
            for alias in names:
                for each in _all_names(alias):
                    skip.add(id(each))
            if isinstance(node, cst.ImportFrom) and node.module is not None:
                for each in _all_names(node.module):
                    skip.add(id(each))
        elif isinstance(node, (cst.AssignTarget, cst.For, cst.CompFor)):
            target = node.target
            if isinstance(target, (cst.Name, cst.Tuple, cst.List, cst.StarredElement)):
                for each in _names_in(target):
                    skip.add(id(each))
        elif isinstance(node, (cst.AnnAssign, cst.NamedExpr)) and isinstance(node.target, cst.Name):
            skip.add(id(node.target))
        elif isinstance(node, cst.WithItem) and node.asname is not None:
            for each in _names_in(node.asname.name):
                skip.add(id(each))
        elif isinstance(node, cst.ExceptHandler) and node.name is not None:
            for each in _names_in(node.name.name):
                skip.add(id(each))
        elif isinstance(node, cst.Del):
            for each in _names_in(node.target):
                skip.add(id(each))

    def visit_Name(self, node: cst.Name) -> None:
        if id(node) not in self._skip_names and node.value not in ("True", "False", "None"):
            self.walk.uses.append(Use(node.value, max(self._step, 0), None))

    def visit_Attribute(self, node: cst.Attribute) -> None:
        if isinstance(node.value, cst.Name):
            self.walk.uses.append(Use(node.value.value, max(self._step, 0), node.attr.value))
            self._skip_names.add(id(node.value))

    def visit_Assign(self, node: cst.Assign) -> None:
        if self._top_level():
            for target in node.targets:
                self.walk.top_level_bound.extend(each.value for each in _names_in(target.target))

    def visit_AnnAssign(self, node: cst.AnnAssign) -> None:
        if self._top_level():
            self.walk.top_level_bound.extend(each.value for each in _names_in(node.target))

    # --- calls -----------------------------------------------------------------------------------

    def visit_Call(self, node: cst.Call) -> None:
        func = node.func
        if isinstance(func, cst.Attribute) and isinstance(func.value, cst.Call):
            self.walk.chained_on[id(func.value)] = node
        self._qualify(func)
        surely = self._depth == 0 and self._lazy == 0
        statement = self._statements[-1] if self._statements else node
        self.walk.calls.append(
            CallSite(
                call=node,
                lines=self.lines(node),
                step=max(self._step, 0),
                surely=surely,
                grad_off=self._grad_off > 0,
                gpu_device=self._gpu_device > 0,
                statement=statement,
                top=self._top or statement,
            )
        )

    def visit_Dict(self, node: cst.Dict) -> None:
        self.walk.dicts.append(
            (node, max(self._step, 0), self._depth == 0 and self._lazy == 0, self.lines(node))
        )

    def _qualify(self, func: cst.BaseExpression) -> None:
        target = func.value if isinstance(func, cst.Attribute) else func
        for node in (func, target):
            names: Any = self.get_metadata(QualifiedNameProvider, node, set())
            for name in names:
                if name.source == QualifiedNameSource.IMPORT:
                    self.walk.qualified[id(node)] = name.name
                elif name.source == QualifiedNameSource.LOCAL:
                    self.walk.local.add(id(node))


def _names_in(node: cst.CSTNode) -> list[cst.Name]:
    """The names a binding target binds (``a``, ``a, (b, *c)``); ``x.y`` and ``x[i]`` bind none."""
    if isinstance(node, cst.Name):
        return [node]
    if isinstance(node, (cst.Tuple, cst.List)):
        return [name for element in node.elements for name in _names_in(element.value)]
    if isinstance(node, cst.StarredElement):
        return _names_in(node.value)
    return []


def _all_names(node: cst.CSTNode) -> list[cst.Name]:
    """Every Name node inside ``node`` (an import's dotted names)."""
    found: list[cst.Name] = []
    pending = [node]
    while pending:
        current = pending.pop()
        if isinstance(current, cst.Name):
            found.append(current)
        pending.extend(current.children)
    return found
