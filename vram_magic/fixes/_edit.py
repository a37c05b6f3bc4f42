"""Editing a cell's syntax tree while keeping the user's layout: the one pass every fix goes through.

A fix decides what to change (``Edits``: functions keyed by the original nodes the reading found, calls to
unwrap, statements to insert around others or to wrap in a ``with``, imports it needs); ``apply`` makes all
of it in one libcst pass over the reading's own tree, so comments, quotes and line breaks stay as written.
A statement a fix reduces to ``model`` or ``model = model`` (a removed ``model.to("cuda")``) is dropped, and
the comments above it move to the next statement.

Imports go after the cell's last import that comes before their first use (at the top when there is none):
libcst's ``AddImportsVisitor`` puts them above a leading ``%pip`` line and repeats an import made later in
the cell, which a notebook cell often has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import libcst as cst
import libcst.matchers as m
from libcst.helpers import get_full_name_for_node

_NO_SPACE = cst.SimpleWhitespace("")
IMPORT_LINES: dict[str, str] = {
    "torch": "import torch\n",
    "BitsAndBytesConfig": "from transformers import BitsAndBytesConfig\n",
    "vram_magic": "import vram_magic\n",
}


@dataclass
class Edits:
    """What a fix changes, keyed by ``id`` of the original nodes of the reading."""

    on_node: dict[int, list[Callable[[Any], Any]]] = field(default_factory=dict)
    unwrap: set[int] = field(default_factory=set)  # chained calls replaced by their receiver
    before: dict[int, list[str]] = field(default_factory=dict)  # statement -> statements to put before it
    after: dict[int, list[str]] = field(default_factory=dict)
    wrap: dict[int, str] = field(default_factory=dict)  # statement -> the with-item to run it under
    needs: set[str] = field(default_factory=set)  # imports the new code needs (keys of IMPORT_LINES)

    def change(self, node: cst.CSTNode, function: Callable[[Any], Any]) -> None:
        self.on_node.setdefault(id(node), []).append(function)

    def add_before(self, statement: cst.CSTNode, code: str) -> None:
        self.before.setdefault(id(statement), []).append(code)

    def add_after(self, statement: cst.CSTNode, code: str) -> None:
        self.after.setdefault(id(statement), []).append(code)

    def __bool__(self) -> bool:
        return bool(self.on_node or self.unwrap or self.before or self.after or self.wrap)


def apply(module: cst.Module, edits: Edits) -> str:
    """The cell's code with ``edits`` made."""
    return module.visit(_Apply(edits)).code


# --------------------------------------------------------------------------------------------------
# Literals and names


def code(node: cst.CSTNode) -> str:
    return cst.Module(body=[]).code_for_node(node)


def string(text: str, like: cst.BaseExpression | None = None) -> cst.SimpleString:
    """A string literal, in the quotes of ``like`` when that is a plain string."""
    quote = '"'
    if isinstance(like, cst.SimpleString) and like.quote in ("'", '"'):
        quote = like.quote
    return cst.SimpleString(f"{quote}{text}{quote}")


def string_value(expr: cst.BaseExpression | None) -> str | None:
    if isinstance(expr, cst.SimpleString):
        value = expr.evaluated_value
        return value if isinstance(value, str) else None
    return None


def same(old: cst.BaseExpression, new: cst.BaseExpression) -> bool:
    old_text, new_text = string_value(old), string_value(new)
    if old_text is not None and new_text is not None:
        return old_text == new_text
    return code(old).strip() == code(new).strip()


def is_plain_reference(expr: cst.BaseExpression) -> bool:
    if isinstance(expr, cst.Name):
        return True
    return isinstance(expr, cst.Attribute) and is_plain_reference(expr.value)


# --------------------------------------------------------------------------------------------------
# Keyword arguments and dict entries, keeping the call's layout


def find_arg(call: cst.Call, name: str) -> cst.Arg | None:
    for arg in call.args:
        if arg.keyword is not None and arg.keyword.value == name:
            return arg
    return None


def set_kwarg(call: cst.Call, name: str, value: cst.BaseExpression, rename: Sequence[str] = ()) -> cst.Call:
    """Give keyword ``name`` the value ``value``: in place, else in place of the first ``rename`` keyword
    found (which is renamed), else as a new last argument."""
    for keyword in (name, *rename):
        arg = find_arg(call, keyword)
        if arg is None:
            continue
        if keyword == name and same(arg.value, value):
            return call
        new_arg = arg.with_changes(keyword=cst.Name(name), value=value)
        return call.with_changes(args=[new_arg if a is arg else a for a in call.args])
    return append_arg(
        call,
        cst.Arg(
            value=value,
            keyword=cst.Name(name),
            equal=cst.AssignEqual(whitespace_before=_NO_SPACE, whitespace_after=_NO_SPACE),
        ),
    )


def append_arg(call: cst.Call, new: cst.Arg) -> cst.Call:
    args = list(call.args)
    if not args:
        return call.with_changes(args=[new])
    last = args[-1]
    comma = last.comma
    tail = comma.whitespace_after if isinstance(comma, cst.Comma) else last.whitespace_after_arg
    separators = [a.comma.whitespace_after for a in args[:-1] if isinstance(a.comma, cst.Comma)]
    between, end = _split_tail(tail, [call.whitespace_before_args, *separators])
    if isinstance(comma, cst.Comma):
        args[-1] = last.with_changes(comma=comma.with_changes(whitespace_after=between))
        new = new.with_changes(comma=cst.Comma(whitespace_after=end))
    else:
        args[-1] = last.with_changes(
            comma=cst.Comma(whitespace_after=between), whitespace_after_arg=_NO_SPACE
        )
        new = new.with_changes(whitespace_after_arg=end)
    return call.with_changes(args=[*args, new])


def _split_tail(
    tail: cst.BaseParenthesizableWhitespace, layout: Sequence[cst.BaseParenthesizableWhitespace]
) -> tuple[cst.BaseParenthesizableWhitespace, cst.BaseParenthesizableWhitespace]:
    """Split the whitespace after the last item into (after the old last item, after the new one).

    One item per line stays one item per line, indented like the others; ``layout`` holds the whitespace
    before the items, where their indentation is found."""
    if not isinstance(tail, cst.ParenthesizedWhitespace):
        return cst.SimpleWhitespace(" "), tail
    indent = tail.indent
    last_line = cst.SimpleWhitespace(tail.last_line.value + "    ")
    for ws in layout:
        if isinstance(ws, cst.ParenthesizedWhitespace):
            indent, last_line = ws.indent, ws.last_line
            break
    between = cst.ParenthesizedWhitespace(
        first_line=tail.first_line, empty_lines=tail.empty_lines, indent=indent, last_line=last_line
    )
    end = cst.ParenthesizedWhitespace(indent=tail.indent, last_line=tail.last_line)
    return between, end


def _join_tail(
    between: cst.BaseParenthesizableWhitespace, tail: cst.BaseParenthesizableWhitespace
) -> cst.BaseParenthesizableWhitespace:
    """The whitespace after an item whose following (last) item is removed: keep the item's own comment."""
    if not isinstance(between, cst.ParenthesizedWhitespace):
        return tail
    if isinstance(tail, cst.ParenthesizedWhitespace):
        return between.with_changes(indent=tail.indent, last_line=tail.last_line)
    return between.with_changes(last_line=_NO_SPACE)


def remove_kwarg(call: cst.Call, name: str) -> cst.Call:
    arg = find_arg(call, name)
    if arg is None:
        return call
    args = [a for a in call.args if a is not arg]
    if not args:
        return call.with_changes(args=[], whitespace_before_args=_NO_SPACE)
    if call.args[-1] is arg:  # the one before becomes last and takes over the removed one's ending
        previous = args[-1]
        assert isinstance(previous.comma, cst.Comma)
        if isinstance(arg.comma, cst.Comma):
            after = _join_tail(previous.comma.whitespace_after, arg.comma.whitespace_after)
            args[-1] = previous.with_changes(comma=previous.comma.with_changes(whitespace_after=after))
        else:
            after = _join_tail(previous.comma.whitespace_after, arg.whitespace_after_arg)
            args[-1] = previous.with_changes(comma=cst.MaybeSentinel.DEFAULT, whitespace_after_arg=after)
    return call.with_changes(args=args)


def dict_value(expr: cst.BaseExpression, key: str) -> cst.BaseExpression | None:
    if isinstance(expr, cst.Dict):
        for element in expr.elements:
            if isinstance(element, cst.DictElement) and string_value(element.key) == key:
                return element.value
    return None


def set_dict_key(expr: cst.BaseExpression, key: str, value: cst.BaseExpression) -> cst.BaseExpression:
    """``expr`` (a dict literal, or any mapping expression) with ``key`` set to ``value``."""
    if not isinstance(expr, cst.Dict):
        return cst.Dict([cst.StarredDictElement(expr), cst.DictElement(string(key), value)])
    elements = list(expr.elements)
    for i, element in enumerate(elements):
        if isinstance(element, cst.DictElement) and string_value(element.key) == key:
            if same(element.value, value):
                return expr
            elements[i] = element.with_changes(value=value)
            return expr.with_changes(elements=elements)
    new = cst.DictElement(string(key), value)
    if not elements:
        return expr.with_changes(elements=[new])
    last = elements[-1]
    comma = last.comma
    tail = comma.whitespace_after if isinstance(comma, cst.Comma) else expr.rbrace.whitespace_before
    separators = [e.comma.whitespace_after for e in elements[:-1] if isinstance(e.comma, cst.Comma)]
    between, end = _split_tail(tail, [expr.lbrace.whitespace_after, *separators])
    if isinstance(comma, cst.Comma):
        elements[-1] = last.with_changes(comma=comma.with_changes(whitespace_after=between))
        return expr.with_changes(
            elements=[*elements, new.with_changes(comma=cst.Comma(whitespace_after=end))]
        )
    elements[-1] = last.with_changes(comma=cst.Comma(whitespace_after=between))
    rbrace = expr.rbrace.with_changes(whitespace_before=end)
    return expr.with_changes(elements=[*elements, new], rbrace=rbrace)


def remove_dict_key(expr: cst.Dict, key: str) -> cst.Dict:
    elements = [
        e for e in expr.elements if not (isinstance(e, cst.DictElement) and string_value(e.key) == key)
    ]
    if len(elements) == len(expr.elements):
        return expr
    if elements and len(elements) < len(expr.elements) and expr.elements[-1] not in elements:
        last = elements[-1]
        elements[-1] = last.with_changes(comma=cst.MaybeSentinel.DEFAULT)
    return expr.with_changes(elements=elements)


def set_in_mapping_call(call: cst.Call, key: str, value: cst.BaseExpression) -> cst.Call:
    """``dict(a=1)`` with keyword ``key`` set (a ``dict(...)`` call is edited as keywords)."""
    return set_kwarg(call, key, value)


def with_integer(value: int) -> Callable[[cst.Integer], cst.Integer]:
    """An edit that gives an integer literal a new value."""

    def change(node: cst.Integer) -> cst.Integer:
        return node.with_changes(value=str(value))

    return change


def with_keyword(name: str, value: cst.BaseExpression) -> Callable[[cst.Call], cst.Call]:
    """An edit that sets keyword ``name`` of a call."""

    def change(node: cst.Call) -> cst.Call:
        return set_kwarg(node, name, value)

    return change


def render_max_memory(max_memory: dict[int | str, int]) -> str:
    """``{0: "7.5GiB", "cpu": "30.0GiB"}``: GPUs in order first, sizes rounded down to 0.1 GiB."""
    gpus: list[int | str] = sorted(key for key in max_memory if isinstance(key, int))
    others: list[int | str] = [key for key in max_memory if isinstance(key, str)]
    parts = []
    for key in gpus + others:
        tenths = max_memory[key] * 10 // 2**30
        label = str(key) if isinstance(key, int) else f'"{key}"'
        parts.append(f'{label}: "{tenths // 10}.{tenths % 10}GiB"')
    return "{" + ", ".join(parts) + "}"


# --------------------------------------------------------------------------------------------------
# Statements


def _is_trivial(statement: cst.BaseSmallStatement) -> bool:
    """``model`` or ``model = model``: what a removed ``.to(...)`` leaves behind."""
    if isinstance(statement, cst.Expr):
        return is_plain_reference(statement.value)
    if isinstance(statement, cst.Assign) and len(statement.targets) == 1:
        target = statement.targets[0].target
        return is_plain_reference(statement.value) and code(target).strip() == code(statement.value).strip()
    return False


def _statement_text(statement: cst.BaseStatement) -> str | None:
    if isinstance(statement, cst.SimpleStatementLine) and len(statement.body) == 1:
        return code(statement.body[0].with_changes(semicolon=cst.MaybeSentinel.DEFAULT)).strip()
    return None


def _is_import_line(statement: cst.BaseStatement) -> bool:
    return isinstance(statement, cst.SimpleStatementLine) and all(
        isinstance(small, (cst.Import, cst.ImportFrom)) for small in statement.body
    )


def _imported_names(body: Sequence[cst.BaseStatement]) -> set[str]:
    """Names bound by the cell's top-level imports (a star import from transformers binds its names)."""
    names: set[str] = set()
    for statement in body:
        if not _is_import_line(statement):
            continue
        assert isinstance(statement, cst.SimpleStatementLine)
        for small in statement.body:
            if isinstance(small, cst.ImportFrom) and isinstance(small.names, cst.ImportStar):
                if small.module is not None and get_full_name_for_node(small.module) == "transformers":
                    names.add("BitsAndBytesConfig")
                continue
            assert isinstance(small, (cst.Import, cst.ImportFrom))
            assert not isinstance(small.names, cst.ImportStar)
            for alias in small.names:
                name = get_full_name_for_node(alias.name) or ""
                names.add(
                    alias.evaluated_alias or (name.split(".")[0] if isinstance(small, cst.Import) else name)
                )
    return names


def _leading_lines(statement: cst.BaseStatement) -> Sequence[cst.EmptyLine]:
    if isinstance(statement, (cst.SimpleStatementLine, cst.BaseCompoundStatement)):
        return statement.leading_lines
    return ()


def _parsed(lines: list[str]) -> list[cst.SimpleStatementLine]:
    parsed = []
    for text in lines:
        statement = cst.parse_statement(text if text.endswith("\n") else text + "\n")
        assert isinstance(statement, cst.SimpleStatementLine)
        parsed.append(statement)
    return parsed


@dataclass
class _Insert:
    before: list[cst.SimpleStatementLine]
    after: list[cst.SimpleStatementLine]


class _Apply(cst.CSTTransformer):
    def __init__(self, edits: Edits) -> None:
        super().__init__()
        self.edits = edits
        self._dropped: list[cst.BaseStatement] = []
        self._inserts: list[tuple[cst.BaseStatement, _Insert]] = []

    def on_leave(self, original_node: Any, updated_node: Any) -> Any:
        for function in self.edits.on_node.get(id(original_node), ()):
            updated_node = function(updated_node)
        if id(original_node) in self.edits.unwrap and isinstance(updated_node, cst.Call):
            updated_node = _receiver(updated_node)
        result = super().on_leave(original_node, updated_node)
        if isinstance(result, cst.BaseStatement) and not any(result is each for each in self._dropped):
            key = id(original_node)
            if key in self.edits.wrap:
                result = _wrapped(result, self.edits.wrap[key])
            if key in self.edits.before or key in self.edits.after:
                insert = _Insert(
                    _parsed(self.edits.before.get(key, [])), _parsed(self.edits.after.get(key, []))
                )
                self._inserts.append((result, insert))
        return result

    def _kept(
        self, original: Sequence[cst.BaseSmallStatement], updated: Sequence[cst.BaseSmallStatement]
    ) -> list[cst.BaseSmallStatement]:
        """The small statements left once those the fix reduced to ``model`` / ``model = model`` go."""
        kept = [
            new
            for old, new in zip(original, updated, strict=True)
            if _is_trivial(old) or not _is_trivial(new)
        ]
        if kept and len(kept) < len(updated):
            kept[-1] = kept[-1].with_changes(semicolon=cst.MaybeSentinel.DEFAULT)
        return kept

    def leave_SimpleStatementLine(
        self, original_node: cst.SimpleStatementLine, updated_node: cst.SimpleStatementLine
    ) -> cst.BaseStatement:
        if len(original_node.body) != len(updated_node.body):
            return updated_node
        kept = self._kept(original_node.body, updated_node.body)
        if not kept:  # dropped by the enclosing block, which moves the comments above it along
            self._dropped.append(updated_node)
            return updated_node
        return updated_node if kept == list(updated_node.body) else updated_node.with_changes(body=kept)

    def leave_SimpleStatementSuite(
        self, original_node: cst.SimpleStatementSuite, updated_node: cst.SimpleStatementSuite
    ) -> cst.BaseSuite:
        kept = self._kept(original_node.body, updated_node.body)
        return updated_node.with_changes(body=kept or [cst.Pass()])

    def _edit_body(
        self, body: Sequence[cst.BaseStatement]
    ) -> tuple[list[cst.BaseStatement], list[cst.EmptyLine]]:
        """Apply drops and inserts to one block; return it and the comment lines left at its end."""
        out: list[cst.BaseStatement] = []
        carried: list[cst.EmptyLine] = []  # comments above a dropped statement move to the next one
        for i, statement in enumerate(body):
            if any(statement is dropped for dropped in self._dropped):
                carried.extend(_leading_lines(statement))
                continue
            insert = next((ins for s, ins in self._inserts if s is statement), None)
            before = [] if insert is None else [b for b in insert.before if not _follows(out, b)]
            after = [] if insert is None else [a for a in insert.after if not _precedes(body[i + 1 :], a)]
            if before:
                before[0] = before[0].with_changes(leading_lines=[*carried, *_leading_lines(statement)])
                statement = statement.with_changes(leading_lines=[])
            elif carried:
                statement = statement.with_changes(leading_lines=[*carried, *_leading_lines(statement)])
            carried = []
            out.extend([*before, statement, *after])
        return out, carried

    def leave_IndentedBlock(
        self, original_node: cst.IndentedBlock, updated_node: cst.IndentedBlock
    ) -> cst.BaseSuite:
        body, carried = self._edit_body(updated_node.body)
        if not body:
            body = [cst.SimpleStatementLine([cst.Pass()], leading_lines=carried)]
            carried = []
        return updated_node.with_changes(body=body, footer=[*carried, *updated_node.footer])

    def leave_Module(self, original_node: cst.Module, updated_node: cst.Module) -> cst.Module:
        body, carried = self._edit_body(updated_node.body)
        return updated_node.with_changes(
            body=self._add_imports(body), footer=[*carried, *updated_node.footer]
        )

    def _add_imports(self, body: list[cst.BaseStatement]) -> list[cst.BaseStatement]:
        """The imports the edits need and the cell does not make before their first use (an ``import
        torch`` further down comes too late for a ``torch.bfloat16`` written above it)."""
        needs = self.edits.needs

        def used_from(name: str) -> int:
            uses = [i for i, s in enumerate(body) if not _is_import_line(s) and m.findall(s, m.Name(name))]
            return uses[0] if uses else len(body)

        missing = [
            name
            for name in IMPORT_LINES
            if name in needs and name not in _imported_names(body[: used_from(name)])
        ]
        if not missing:
            return body
        first_use = min(used_from(name) for name in missing)
        imports = [i for i in range(first_use) if _is_import_line(body[i])]
        position = imports[-1] + 1 if imports else 0
        lines = [cst.parse_statement(IMPORT_LINES[name]) for name in missing]
        return [*body[:position], *lines, *body[position:]]


def _receiver(call: cst.Call) -> cst.BaseExpression:
    """``x`` for ``x.cuda()``, keeping parentheses written around the call."""
    assert isinstance(call.func, cst.Attribute)
    receiver = call.func.value
    if call.lpar and not receiver.lpar:
        receiver = receiver.with_changes(lpar=call.lpar, rpar=call.rpar)
    return receiver


def _wrapped(statement: cst.BaseStatement, item: str) -> cst.With:
    """``with <item>:`` around ``statement`` (its comments stay above the ``with``)."""
    leading = _leading_lines(statement)
    inner = statement.with_changes(leading_lines=[])
    return cst.With(
        items=[cst.WithItem(cst.parse_expression(item))],
        body=cst.IndentedBlock([inner]),
        leading_lines=leading,
    )


def _follows(out: Sequence[cst.BaseStatement], statement: cst.SimpleStatementLine) -> bool:
    return bool(out) and _statement_text(out[-1]) == _statement_text(statement)


def _precedes(rest: Sequence[cst.BaseStatement], statement: cst.SimpleStatementLine) -> bool:
    return bool(rest) and _statement_text(rest[0]) == _statement_text(statement)
