"""Rewrite a notebook cell so that it needs less GPU memory.

The rewrite works on the user's own text with libcst, so comments, layout and quotes survive and the
diff looks like their code. Each fix is one small ``CSTTransformer``; they share the helpers that set or
remove a keyword argument, drop a statement and add a missing import. Nothing here imports torch,
transformers or IPython; the transformers version is read from the installed package metadata.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import libcst as cst
import libcst.matchers as m
from libcst.helpers import get_full_name_for_node

__all__ = ["FIXES", "NotApplicable", "applicable_fixes", "diff", "rewrite"]

FIXES: tuple[str, ...] = ("4bit", "8bit", "bf16", "offload", "cpu", "merge-cpu", "half-batch")

_OPTIONS: dict[str, tuple[str, ...]] = {
    "4bit": ("compute_dtype",),
    "8bit": (),
    "bf16": ("dtype_keyword",),
    "offload": ("max_memory", "offload_folder"),
    "cpu": (),
    "merge-cpu": (),
    "half-batch": ("factor",),
}

# Why a fix does not apply: the cell has nothing it could change ...
_NOTHING: dict[str, str] = {
    "4bit": "this cell has no from_pretrained(...) or pipeline(...) call of a model to quantize",
    "8bit": "this cell has no from_pretrained(...) or pipeline(...) call of a model to quantize",
    "bf16": "this cell has no from_pretrained(...) or pipeline(...) call of a model to load in bfloat16",
    "offload": "this cell has no from_pretrained(...) or pipeline(...) call of a model to offload to the CPU",
    "cpu": "this cell neither loads a model nor moves anything to CUDA",
    "merge-cpu": "this cell has no `merged = model.merge_and_unload()` assignment to run on the CPU",
    "half-batch": "this cell sets no integer batch size and has no TrainingArguments or SFTConfig call",
}
# ... or everything it would change is already the way the fix leaves it.
_ALREADY: dict[str, str] = {
    "4bit": "every model this cell loads is already loaded in 4-bit",
    "8bit": "every model this cell loads is already loaded in 8-bit",
    "bf16": "every model this cell loads is already loaded in bfloat16",
    "offload": "every model this cell loads is already offloaded with these memory limits",
    "cpu": "this cell already runs on the CPU",
    "merge-cpu": "this cell already merges on the CPU",
    "half-batch": (
        "every batch size in this cell is already 1, with gradient checkpointing and the 8-bit optimizer on"
    ),
}
_ADAPTER_ONLY = (
    "this cell only loads a LoRA adapter (PeftModel.from_pretrained); apply the fix to the cell that "
    "loads the base model"
)

# Names of classes whose from_pretrained loads something that is not a model.
_NOT_MODEL_PARTS = ("Tokenizer", "Processor", "Config", "FeatureExtractor")
# device_map values that spread a model instead of naming one device.
_DEVICE_MAP_STRATEGIES = frozenset({"auto", "balanced", "balanced_low_0", "sequential"})
# Method calls that return the model they are called on.
_MODEL_CHAIN = frozenset({"to", "cuda", "eval", "train", "requires_grad_"})
# Calls that wrap a model given as their first argument into another model.
_MODEL_WRAPPERS = frozenset({"get_peft_model", "prepare_model_for_kbit_training"})
_TRAINER_CONFIGS = frozenset(
    {
        "SFTConfig",
        "DPOConfig",
        "ORPOConfig",
        "KTOConfig",
        "CPOConfig",
        "GRPOConfig",
        "RewardConfig",
        "PPOConfig",
    }
)
_ACCUMULATION_NAMES = frozenset(
    {
        "gradient_accumulation_steps",
        "grad_accum",
        "grad_accum_steps",
        "grad_accumulation_steps",
        "accumulation_steps",
        "accum_steps",
    }
)
_IMPORT_LINES: dict[str, str] = {
    "torch": "import torch\n",
    "BitsAndBytesConfig": "from transformers import BitsAndBytesConfig\n",
    "vram_magic": "import vram_magic\n",
}


class NotApplicable(ValueError):
    """The fix does not apply to this cell; ``reason`` says why in plain words. ``already`` is True when
    the cell already does what the fix would do (so it is no way out), False when the cell has nothing the
    fix could change (so it may still apply to code elsewhere, by hand)."""

    def __init__(self, reason: str, *, already: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.already = already


def rewrite(source: str, fix: str, **options: object) -> str:
    """Return ``source`` with ``fix`` applied; raise ``NotApplicable`` when it would change nothing.

    Fixes: "4bit", "8bit", "bf16", "offload", "cpu", "merge-cpu", "half-batch". Options:
    4bit ``compute_dtype="bfloat16"|"float16"``; bf16 ``dtype_keyword="dtype"|"torch_dtype"``;
    offload ``max_memory={0: bytes, "cpu": bytes}``, ``offload_folder="offload"``; half-batch ``factor=2``.
    """
    if fix not in _OPTIONS:
        raise ValueError(f"unknown fix {fix!r}; the fixes are: {', '.join(FIXES)}")
    unknown = sorted(set(options) - set(_OPTIONS[fix]))
    if unknown:
        valid = ", ".join(_OPTIONS[fix]) or "none"
        raise ValueError(f"unknown option(s) for {fix}: {', '.join(unknown)}; valid: {valid}")
    try:
        module = cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        raise NotApplicable(f"this cell is not valid Python ({exc.message})") from exc
    cell = _read_cell(module)
    fixer = _make_fixer(fix, module, cell, options)
    result = module.visit(fixer).code
    if result == source:
        reason = fixer.reason_unchanged(fix)
        raise NotApplicable(reason, already=reason == _ALREADY[fix])
    return result


def applicable_fixes(source: str) -> dict[str, str | None]:
    """Fix name -> None when it applies to ``source`` (default options), else why it does not."""
    reasons: dict[str, str | None] = {}
    for fix in FIXES:
        try:
            rewrite(source, fix)
        except NotApplicable as exc:
            reasons[fix] = exc.reason
        else:
            reasons[fix] = None
    return reasons


def diff(before: str, after: str) -> str:
    """A unified diff of a cell and its fixed version, for display."""
    return "".join(difflib.unified_diff(_lines(before), _lines(after), fromfile="cell", tofile="fixed cell"))


def _lines(text: str) -> list[str]:
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return lines


# --------------------------------------------------------------------------------------------------
# Reading the cell


@dataclass
class _Cell:
    """What the fixes need to know about the whole cell before they change it."""

    imported: dict[str, tuple[str, str]] = field(default_factory=dict)  # local name -> (module, name)
    module_names: dict[str, str] = field(default_factory=dict)  # local name -> module (import x as y)
    assigned: dict[str, cst.BaseExpression] = field(default_factory=dict)  # name -> last value given
    model_names: set[str] = field(default_factory=set)  # names bound to a model loaded in the cell

    def class_name(self, expr: cst.BaseExpression) -> str | None:
        """The real name of a class written as ``Name`` (through import aliases) or ``pkg.Name``."""
        if isinstance(expr, cst.Name):
            return self.imported.get(expr.value, ("", expr.value))[1]
        if isinstance(expr, cst.Attribute):
            return expr.attr.value
        return None

    def origin(self, expr: cst.BaseExpression) -> str | None:
        """The top package a name was imported from in this cell, when it was."""
        if isinstance(expr, cst.Name) and expr.value in self.imported:
            return self.imported[expr.value][0].split(".")[0]
        if isinstance(expr, cst.Attribute) and isinstance(expr.value, cst.Name):
            return self.module_names.get(expr.value.value, expr.value.value).split(".")[0]
        return None

    def is_model_load(self, call: cst.Call) -> bool:
        """``X.from_pretrained(...)`` where X is a transformers/peft model class (not a tokenizer, ...)."""
        receiver = _method_receiver(call, "from_pretrained")
        if receiver is None:
            return False
        name = self.class_name(receiver)
        if name is None or self.origin(receiver) not in (None, "transformers", "peft"):
            return False
        return _is_model_class(name)

    def is_adapter_load(self, call: cst.Call) -> bool:
        """``PeftModel.from_pretrained(base, adapter)``: loads an adapter onto an existing model."""
        receiver = _method_receiver(call, "from_pretrained")
        name = self.class_name(receiver) if receiver is not None else None
        return name is not None and name.startswith("PeftModel")

    def is_pipeline(self, call: cst.Call) -> bool:
        func = call.func
        if isinstance(func, cst.Name):
            module, name = self.imported.get(func.value, ("", func.value))
            return name == "pipeline" and module.split(".")[0] in ("", "transformers")
        return (
            isinstance(func, cst.Attribute)
            and func.attr.value == "pipeline"
            and self.origin(func) == "transformers"
        )

    def is_model_expr(self, expr: cst.BaseExpression) -> bool:
        """A loaded model: a name bound to one, a load call, or ``<model>.eval()`` and the like."""
        if isinstance(expr, cst.Name):
            return expr.value in self.model_names
        if not isinstance(expr, cst.Call):
            return False
        if self.is_model_load(expr):
            return True
        func = expr.func
        if isinstance(func, cst.Attribute) and func.attr.value in _MODEL_CHAIN:
            return self.is_model_expr(func.value)
        wraps = self.is_adapter_load(expr) or (isinstance(func, cst.Name) and func.value in _MODEL_WRAPPERS)
        return (
            wraps
            and bool(expr.args)
            and expr.args[0].keyword is None
            and self.is_model_expr(expr.args[0].value)
        )


def _read_cell(module: cst.Module) -> _Cell:
    cell = _Cell()
    for node in m.findall(module, m.ImportFrom()):
        assert isinstance(node, cst.ImportFrom)
        source = get_full_name_for_node(node.module) if node.module is not None else ""
        if isinstance(node.names, cst.ImportStar):
            continue
        for alias in node.names:
            name = get_full_name_for_node(alias.name) or ""
            local = alias.evaluated_alias or name
            cell.imported[local] = (source or "", name)
    for node in m.findall(module, m.Import()):
        assert isinstance(node, cst.Import)
        for alias in node.names:
            name = get_full_name_for_node(alias.name) or ""
            cell.module_names[alias.evaluated_alias or name.split(".")[0]] = name
    for node in m.findall(module, m.Assign(targets=[m.AssignTarget(target=m.Name())])):
        assert isinstance(node, cst.Assign)
        target = node.targets[0].target
        assert isinstance(target, cst.Name)
        cell.assigned[target.value] = node.value
        if cell.is_model_expr(node.value):
            cell.model_names.add(target.value)
    return cell


def _is_model_class(name: str) -> bool:
    if name.startswith("PeftModel") or any(part in name for part in _NOT_MODEL_PARTS):
        return False
    if name.startswith(("AutoModel", "AutoPeftModel")) or name.endswith("Model"):
        return True
    return re.search(r"For[A-Z]", name) is not None


def _method_receiver(call: cst.Call, method: str) -> cst.BaseExpression | None:
    """``X`` in ``X.method(...)``, else None."""
    func = call.func
    if isinstance(func, cst.Attribute) and func.attr.value == method:
        return func.value
    return None


def _code(node: cst.CSTNode) -> str:
    return cst.Module(body=[]).code_for_node(node)


def _string(text: str, like: cst.BaseExpression | None = None) -> cst.SimpleString:
    """A string literal, in the quotes of ``like`` when that is a plain string."""
    quote = '"'
    if isinstance(like, cst.SimpleString) and like.quote in ("'", '"'):
        quote = like.quote
    return cst.SimpleString(f"{quote}{text}{quote}")


def _string_value(expr: cst.BaseExpression) -> str | None:
    if isinstance(expr, cst.SimpleString):
        value = expr.evaluated_value
        return value if isinstance(value, str) else None
    return None


def _same(old: cst.BaseExpression, new: cst.BaseExpression) -> bool:
    old_text, new_text = _string_value(old), _string_value(new)
    if old_text is not None and new_text is not None:
        return old_text == new_text
    return _code(old) == _code(new)


def _is_cuda_string(expr: cst.BaseExpression) -> bool:
    value = _string_value(expr)
    return value is not None and (value == "cuda" or value.startswith("cuda:"))


def _is_torch_device_call(expr: cst.BaseExpression) -> bool:
    return isinstance(expr, cst.Call) and get_full_name_for_node(expr.func) in ("torch.device", "device")


# --------------------------------------------------------------------------------------------------
# Keyword arguments and dict entries, keeping the call's layout

_NO_SPACE = cst.SimpleWhitespace("")


def _find_arg(call: cst.Call, name: str) -> cst.Arg | None:
    for arg in call.args:
        if arg.keyword is not None and arg.keyword.value == name:
            return arg
    return None


def _set_kwarg(call: cst.Call, name: str, value: cst.BaseExpression, rename: Sequence[str] = ()) -> cst.Call:
    """Give keyword ``name`` the value ``value``: in place, else in place of the first ``rename``
    keyword found (which is renamed), else as a new last argument."""
    for keyword in (name, *rename):
        arg = _find_arg(call, keyword)
        if arg is None:
            continue
        if keyword == name and _same(arg.value, value):
            return call
        new_arg = arg.with_changes(keyword=cst.Name(name), value=value)
        return call.with_changes(args=[new_arg if a is arg else a for a in call.args])
    return _append_arg(
        call,
        cst.Arg(
            value=value,
            keyword=cst.Name(name),
            equal=cst.AssignEqual(whitespace_before=_NO_SPACE, whitespace_after=_NO_SPACE),
        ),
    )


def _append_arg(call: cst.Call, new: cst.Arg) -> cst.Call:
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


def _remove_kwarg(call: cst.Call, name: str) -> cst.Call:
    arg = _find_arg(call, name)
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


def _dict_value(expr: cst.BaseExpression, key: str) -> cst.BaseExpression | None:
    if isinstance(expr, cst.Dict):
        for element in expr.elements:
            if isinstance(element, cst.DictElement) and _string_value(element.key) == key:
                return element.value
    return None


def _set_dict_key(expr: cst.BaseExpression, key: str, value: cst.BaseExpression) -> cst.BaseExpression:
    """``expr`` (a dict literal, or any mapping expression) with ``key`` set to ``value``."""
    if not isinstance(expr, cst.Dict):
        return cst.Dict([cst.StarredDictElement(expr), cst.DictElement(_string(key), value)])
    elements = list(expr.elements)
    for i, element in enumerate(elements):
        if isinstance(element, cst.DictElement) and _string_value(element.key) == key:
            if _same(element.value, value):
                return expr
            elements[i] = element.with_changes(value=value)
            return expr.with_changes(elements=elements)
    new = cst.DictElement(_string(key), value)
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


def _set_model_kwarg(call: cst.Call, key: str, value: cst.BaseExpression) -> cst.Call:
    """Set ``key`` inside a pipeline's ``model_kwargs``, adding the dict when there is none."""
    arg = _find_arg(call, "model_kwargs")
    if arg is None:
        return _set_kwarg(call, "model_kwargs", cst.Dict([cst.DictElement(_string(key), value)]))
    return _set_kwarg(call, "model_kwargs", _set_dict_key(arg.value, key, value))


def _pipeline_model(call: cst.Call) -> cst.BaseExpression | None:
    """The model a pipeline is given: ``model=`` or its second positional argument."""
    arg = _find_arg(call, "model")
    if arg is not None:
        return arg.value
    positional = [a for a in call.args if a.keyword is None and not a.star]
    return positional[1].value if len(positional) > 1 else None


# --------------------------------------------------------------------------------------------------
# Statements: what a fix drops or inserts


def _is_plain_reference(expr: cst.BaseExpression) -> bool:
    if isinstance(expr, cst.Name):
        return True
    return isinstance(expr, cst.Attribute) and _is_plain_reference(expr.value)


def _is_trivial(statement: cst.BaseSmallStatement) -> bool:
    """``model`` or ``model = model``: what a removed ``.to(...)`` leaves behind."""
    if isinstance(statement, cst.Expr):
        return _is_plain_reference(statement.value)
    if isinstance(statement, cst.Assign) and len(statement.targets) == 1:
        target = statement.targets[0].target
        return (
            _is_plain_reference(statement.value) and _code(target).strip() == _code(statement.value).strip()
        )
    return False


def _statement_text(statement: cst.BaseStatement) -> str | None:
    if isinstance(statement, cst.SimpleStatementLine) and len(statement.body) == 1:
        return _code(statement.body[0].with_changes(semicolon=cst.MaybeSentinel.DEFAULT)).strip()
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


@dataclass
class _Insert:
    """Statements to put around one statement of the cell."""

    before: list[cst.SimpleStatementLine]
    after: list[cst.SimpleStatementLine]


class _Fix(cst.CSTTransformer):
    """Shared machinery: drop emptied statements, insert statements, add the imports new code needs."""

    def __init__(self, cell: _Cell) -> None:
        super().__init__()
        self.cell = cell
        self.found = 0  # places in the cell this fix is about (changed or already fixed)
        self.needs: set[str] = set()  # names the new code uses: "torch", "BitsAndBytesConfig", ...
        self._dropped: list[cst.BaseStatement] = []
        self._inserts: list[tuple[cst.BaseStatement, _Insert]] = []

    def reason_unchanged(self, fix: str) -> str:
        return _ALREADY[fix] if self.found else _NOTHING[fix]

    # Statements ---------------------------------------------------------------------------------

    def _kept(
        self, original: Sequence[cst.BaseSmallStatement], updated: Sequence[cst.BaseSmallStatement]
    ) -> list[cst.BaseSmallStatement]:
        """The small statements left once those this fix reduced to ``model`` / ``model = model`` go."""
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
        """Add the imports the new code needs and the cell lacks, after the cell's last top-level import
        that comes before their first use (at the top when there is none)."""
        missing = [name for name in _IMPORT_LINES if name in self.needs and name not in _imported_names(body)]
        if not missing:
            return body
        uses = [i for i, s in enumerate(body) if any(m.findall(s, m.Name(name)) for name in missing)]
        first_use = uses[0] if uses else len(body)
        imports = [i for i in range(first_use) if _is_import_line(body[i])]
        position = imports[-1] + 1 if imports else 0
        lines = [cst.parse_statement(_IMPORT_LINES[name]) for name in missing]
        return [*body[:position], *lines, *body[position:]]

    # Moves of a model -------------------------------------------------------------------------

    def _without_move(
        self, original: cst.Call, updated: cst.Call, moved: Callable[[cst.BaseExpression], bool]
    ) -> cst.BaseExpression | None:
        """``model`` for ``model.to(device)`` / ``model.cuda()`` when ``moved(model)``, else None."""
        if not _is_device_move(original) or not isinstance(original.func, cst.Attribute):
            return None
        if not moved(original.func.value):
            return None
        assert isinstance(updated.func, cst.Attribute)
        receiver = updated.func.value
        if updated.lpar and not receiver.lpar:
            receiver = receiver.with_changes(lpar=updated.lpar, rpar=updated.rpar)
        return receiver


def _leading_lines(statement: cst.BaseStatement) -> Sequence[cst.EmptyLine]:
    if isinstance(statement, (cst.SimpleStatementLine, cst.BaseCompoundStatement)):
        return statement.leading_lines
    return ()


def _follows(out: Sequence[cst.BaseStatement], statement: cst.SimpleStatementLine) -> bool:
    return bool(out) and _statement_text(out[-1]) == _statement_text(statement)


def _precedes(rest: Sequence[cst.BaseStatement], statement: cst.SimpleStatementLine) -> bool:
    return bool(rest) and _statement_text(rest[0]) == _statement_text(statement)


def _is_dtype(expr: cst.BaseExpression) -> bool:
    """``torch.float16`` and the like, or a name that says it is a dtype."""
    if isinstance(expr, cst.Attribute):
        return get_full_name_for_node(expr.value) == "torch" and expr.attr.value != "device"
    return isinstance(expr, cst.Name) and "dtype" in expr.value.lower()


def _move_target(call: cst.Call) -> cst.BaseExpression | None:
    """The device in ``x.to(device)`` / ``x.to(device=...)``."""
    device = _find_arg(call, "device")
    if device is not None:
        return device.value
    if call.args and call.args[0].keyword is None and not call.args[0].star:
        return call.args[0].value
    return None


def _is_device_move(call: cst.Call) -> bool:
    """``x.cuda(...)`` or ``x.to(<a device other than "cpu">)``; ``x.to(torch.float16)`` is a cast."""
    func = call.func
    if not isinstance(func, cst.Attribute):
        return False
    if func.attr.value == "cuda":
        return True
    if func.attr.value != "to":
        return False
    target = _move_target(call)
    return target is not None and not _is_dtype(target) and _string_value(target) != "cpu"


# --------------------------------------------------------------------------------------------------
# The fixes


class _LoadFix(_Fix):
    """Base of the fixes that change how models are loaded (4bit, 8bit, bf16, offload)."""

    moves_forbidden = False  # True when the loaded model can no longer be moved with .to()/.cuda()

    def __init__(self, cell: _Cell) -> None:
        super().__init__(cell)
        self.adapter_loads = 0

    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.BaseExpression:
        if self.moves_forbidden:
            unmoved = self._without_move(original_node, updated_node, self.cell.is_model_expr)
            if unmoved is not None:
                return unmoved
        if self.cell.is_model_load(original_node):
            self.found += 1
            return self.fix_load(updated_node)
        if self.cell.is_pipeline(original_node):
            model = _pipeline_model(original_node)
            if model is not None and self.cell.is_model_expr(model):  # the load itself gets the fix
                return _remove_kwarg(updated_node, "device") if self.moves_forbidden else updated_node
            self.found += 1
            return self.fix_pipeline(updated_node)
        return updated_node

    def reason_unchanged(self, fix: str) -> str:
        if not self.found and self.adapter_loads:
            return _ADAPTER_ONLY
        return super().reason_unchanged(fix)

    def visit_Call(self, node: cst.Call) -> bool:
        if self.cell.is_adapter_load(node):
            self.adapter_loads += 1
        return True

    def fix_load(self, call: cst.Call) -> cst.Call:
        raise NotImplementedError

    def fix_pipeline(self, call: cst.Call) -> cst.Call:
        raise NotImplementedError

    def _is_single_device(self, expr: cst.BaseExpression) -> bool:
        """``0``, ``"cuda"``, ``"cuda:0"``, ``torch.device(...)``, or a name the cell sets to one."""
        if isinstance(expr, cst.Integer) or _is_torch_device_call(expr):
            return True
        value = _string_value(expr)
        if value is not None:
            return value not in _DEVICE_MAP_STRATEGIES
        if isinstance(expr, cst.Name) and expr.value in self.cell.assigned:
            assigned = self.cell.assigned[expr.value]
            return not isinstance(assigned, cst.Name) and self._is_single_device(assigned)
        return False

    def _auto_device_map(self, call: cst.Call, keep: Callable[[cst.BaseExpression], bool]) -> cst.Call:
        """``device_map="auto"``, unless the call's device_map is one ``keep`` accepts."""
        arg = _find_arg(call, "device_map")
        if arg is not None and keep(arg.value):
            return call
        return _set_kwarg(call, "device_map", _string("auto", arg.value if arg else None))


class _Quantize(_LoadFix):
    """4bit / 8bit: ``quantization_config=BitsAndBytesConfig(...)`` and ``device_map="auto"``."""

    moves_forbidden = True

    def __init__(self, cell: _Cell, bits: int, compute_dtype: str) -> None:
        super().__init__(cell)
        self.bits = bits
        self.compute_dtype = compute_dtype

    def _config(self) -> cst.BaseExpression:
        self.needs.add("BitsAndBytesConfig")
        if self.bits == 8:
            return cst.parse_expression("BitsAndBytesConfig(load_in_8bit=True)")
        self.needs.add("torch")
        return cst.parse_expression(
            'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", '
            f"bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.{self.compute_dtype})"
        )

    def _is_wanted_config(self, expr: cst.BaseExpression | None) -> bool:
        """A ``BitsAndBytesConfig(load_in_<bits>bit=True, ...)``, or a name the cell binds to one."""
        if isinstance(expr, cst.Name) and expr.value in self.cell.assigned:
            expr = self.cell.assigned[expr.value]
        if not isinstance(expr, cst.Call) or self.cell.class_name(expr.func) != "BitsAndBytesConfig":
            return False
        flag = _find_arg(expr, f"load_in_{self.bits}bit")
        return flag is not None and _code(flag.value).strip() == "True"

    def fix_load(self, call: cst.Call) -> cst.Call:
        existing = _find_arg(call, "quantization_config")
        if existing is None or not self._is_wanted_config(existing.value):
            call = _set_kwarg(
                call, "quantization_config", self._config(), rename=("load_in_4bit", "load_in_8bit")
            )
        call = _remove_kwarg(_remove_kwarg(call, "load_in_4bit"), "load_in_8bit")
        return self._auto_device_map(call, keep=lambda value: not self._is_single_device(value))

    def fix_pipeline(self, call: cst.Call) -> cst.Call:
        kwargs = _find_arg(call, "model_kwargs")
        existing = _dict_value(kwargs.value, "quantization_config") if kwargs is not None else None
        if not self._is_wanted_config(existing):
            call = _set_model_kwarg(call, "quantization_config", self._config())
        call = _remove_kwarg(call, "device")  # device= would override device_map
        return self._auto_device_map(call, keep=lambda value: not self._is_single_device(value))


class _Bfloat16(_LoadFix):
    """bf16: ``dtype=torch.bfloat16`` (``torch_dtype=`` before transformers 5)."""

    def __init__(self, cell: _Cell, keyword: str) -> None:
        super().__init__(cell)
        self.keyword = keyword

    def _set_dtype(self, call: cst.Call) -> cst.Call:
        other = "torch_dtype" if self.keyword == "dtype" else "dtype"
        arg = _find_arg(call, self.keyword)
        if arg is None or not _same(arg.value, cst.parse_expression("torch.bfloat16")):
            self.needs.add("torch")
            call = _set_kwarg(call, self.keyword, cst.parse_expression("torch.bfloat16"), rename=(other,))
        return _remove_kwarg(call, other)

    def fix_load(self, call: cst.Call) -> cst.Call:
        return self._set_dtype(call)

    def fix_pipeline(self, call: cst.Call) -> cst.Call:
        return self._set_dtype(call)


class _Offload(_LoadFix):
    """offload: ``device_map="auto"``, ``max_memory`` and ``offload_folder``: layers spill to the CPU."""

    moves_forbidden = True

    def __init__(
        self, cell: _Cell, max_memory: dict[int | str, int] | None, offload_folder: str | None
    ) -> None:
        super().__init__(cell)
        self.max_memory = max_memory
        self.offload_folder = offload_folder

    def _settings(self) -> list[tuple[str, cst.BaseExpression]]:
        settings: list[tuple[str, cst.BaseExpression]] = []
        if self.max_memory is not None:
            settings.append(("max_memory", cst.parse_expression(_render_max_memory(self.max_memory))))
        if self.offload_folder is not None:
            settings.append(("offload_folder", _string(self.offload_folder)))
        return settings

    @staticmethod
    def _is_strategy(value: cst.BaseExpression) -> bool:
        return _string_value(value) in _DEVICE_MAP_STRATEGIES

    def fix_load(self, call: cst.Call) -> cst.Call:
        call = self._auto_device_map(call, keep=self._is_strategy)
        for name, value in self._settings():
            call = _set_kwarg(call, name, value)
        return call

    def fix_pipeline(self, call: cst.Call) -> cst.Call:
        call = self._auto_device_map(_remove_kwarg(call, "device"), keep=self._is_strategy)
        for name, value in self._settings():
            call = _set_model_kwarg(call, name, value)
        return call


def _render_max_memory(max_memory: dict[int | str, int]) -> str:
    """``{0: "7.5GiB", "cpu": "30.0GiB"}``: GPUs in order first, sizes rounded down to 0.1 GiB."""
    gpus: list[int | str] = sorted(key for key in max_memory if isinstance(key, int))
    others: list[int | str] = [key for key in max_memory if isinstance(key, str)]
    parts = []
    for key in gpus + others:
        tenths = max_memory[key] * 10 // 2**30
        label = str(key) if isinstance(key, int) else f'"{key}"'
        parts.append(f'{label}: "{tenths // 10}.{tenths % 10}GiB"')
    return "{" + ", ".join(parts) + "}"


class _Cpu(_Fix):
    """cpu: loads get ``device_map="cpu"``; CUDA devices given to ``.to()``, ``device=``, ``device_map=``,
    ``torch.device()`` and ``device = ...`` become "cpu"; ``.cuda()`` is dropped."""

    def _is_cuda(self, expr: cst.BaseExpression) -> bool:
        """A CUDA device: "cuda", "cuda:N", an index, ``torch.device("cuda")``, ``"cuda" if ... else ...``,
        or a name with "device" in it that the cell does not set (it comes from an earlier cell)."""
        if isinstance(expr, cst.Integer) or _is_cuda_string(expr):
            return True
        if _is_torch_device_call(expr):
            assert isinstance(expr, cst.Call)
            return bool(expr.args) and self._is_cuda(expr.args[0].value)
        if isinstance(expr, cst.IfExp):
            return self._is_cuda(expr.body) or self._is_cuda(expr.orelse)
        if isinstance(expr, cst.Name):
            return "device" in expr.value.lower() and expr.value not in self.cell.assigned
        return False

    def _cpu(self, expr: cst.BaseExpression) -> cst.BaseExpression:
        """A "cpu" string literal, in the quotes ``expr`` used for the device."""
        if isinstance(expr, cst.IfExp):
            expr = expr.body if isinstance(expr.body, cst.SimpleString) else expr.orelse
        return _string("cpu", expr)

    def _cpu_arg(self, call: cst.Call, name: str) -> cst.Call:
        """Make keyword ``name`` (or the first positional argument, for ``name=""``) "cpu" if it is CUDA."""
        for i, arg in enumerate(call.args):
            wanted = arg.keyword.value == name if arg.keyword else (not name and i == 0 and not arg.star)
            if wanted and _string_value(arg.value) == "cpu":
                self.found += 1  # already on the CPU
            elif wanted and self._is_cuda(arg.value):
                self.found += 1
                new = arg.with_changes(value=self._cpu(arg.value))
                return call.with_changes(args=[*call.args[:i], new, *call.args[i + 1 :]])
        return call

    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.BaseExpression:
        func = original_node.func
        method = func.attr.value if isinstance(func, cst.Attribute) else None
        if method == "cuda":
            self.found += 1
            return self._without_move(original_node, updated_node, lambda _: True) or updated_node
        if self.cell.is_model_load(original_node):
            self.found += 1
            return self._cpu_device_map(updated_node)
        if self.cell.is_pipeline(original_node):
            self.found += 1
            if _find_arg(updated_node, "device") is None and _find_arg(updated_node, "device_map") is None:
                return _set_kwarg(updated_node, "device", _string("cpu"))
            call = self._cpu_arg(updated_node, "device")
            return self._cpu_device_map(call) if _find_arg(call, "device_map") else call
        call = updated_node
        if method == "to" or get_full_name_for_node(func) in ("torch.device", "torch.set_default_device"):
            call = self._cpu_arg(call, "")
        return self._cpu_arg(self._cpu_arg(call, "device"), "device_map")

    def _cpu_device_map(self, call: cst.Call) -> cst.Call:
        arg = _find_arg(call, "device_map")
        return _set_kwarg(call, "device_map", _string("cpu", arg.value if arg else None))

    def leave_Assign(self, original_node: cst.Assign, updated_node: cst.Assign) -> cst.Assign:
        target = original_node.targets[0].target
        if len(original_node.targets) != 1 or not isinstance(target, cst.Name):
            return updated_node
        value = original_node.value
        if "device" not in target.value.lower() or isinstance(value, cst.Name) or not self._is_cuda(value):
            return updated_node
        if isinstance(updated_node.value, cst.Call):  # torch.device("cuda"): already rewritten by leave_Call
            return updated_node
        self.found += 1
        return updated_node.with_changes(value=self._cpu(value))


class _MergeOnCpu(_Fix):
    """merge-cpu: ``X = X.to("cpu")`` before ``Y = X.merge_and_unload()``, and
    ``Y = vram_magic.to_gpu_if_it_fits(Y)`` after it, in place of any move of Y to the GPU."""

    def __init__(self, cell: _Cell) -> None:
        super().__init__(cell)
        self.merged: set[str] = set()  # what merges are assigned to: "merged", "trainer.model"

    def visit_Assign(self, node: cst.Assign) -> bool:
        merge = _merge_parts(node)
        if merge is not None:
            self.merged.add(merge[1])
        return True

    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.BaseExpression:
        def is_merged(expr: cst.BaseExpression) -> bool:
            if _is_plain_reference(expr):
                return _code(expr).strip() in self.merged
            return isinstance(expr, cst.Call) and _method_receiver(expr, "merge_and_unload") is not None

        return self._without_move(original_node, updated_node, is_merged) or updated_node

    def leave_SimpleStatementLine(
        self, original_node: cst.SimpleStatementLine, updated_node: cst.SimpleStatementLine
    ) -> cst.BaseStatement:
        line = super().leave_SimpleStatementLine(original_node, updated_node)
        for small in original_node.body:
            merge = _merge_parts(small) if isinstance(small, cst.Assign) else None
            if merge is None:
                continue
            self.found += 1
            self.needs.add("vram_magic")
            source, target = merge
            before = cst.parse_statement(f'{source} = {source}.to("cpu")\n')
            after = cst.parse_statement(f"{target} = vram_magic.to_gpu_if_it_fits({target})\n")
            assert isinstance(before, cst.SimpleStatementLine) and isinstance(after, cst.SimpleStatementLine)
            self._inserts.append((line, _Insert(before=[before], after=[after])))
        return line


def _merge_parts(node: cst.Assign) -> tuple[str, str] | None:
    """(X, Y) for ``Y = X.merge_and_unload(...)`` (optionally followed by ``.to(...)``/``.cuda()``)."""
    if len(node.targets) != 1 or not _is_plain_reference(node.targets[0].target):
        return None
    value = node.value
    while isinstance(value, cst.Call) and _is_device_move(value):
        assert isinstance(value.func, cst.Attribute)
        value = value.func.value
    if not isinstance(value, cst.Call):
        return None
    source = _method_receiver(value, "merge_and_unload")
    if source is None or not _is_plain_reference(source):
        return None
    return _code(source).strip(), _code(node.targets[0].target).strip()


# half-batch -----------------------------------------------------------------------------------------


def _is_batch_name(name: str) -> bool:
    lowered = name.lower()
    return lowered == "batch_size" or lowered.endswith("_batch_size")


def _is_training_config(name: str | None) -> bool:
    return name is not None and (name.endswith("TrainingArguments") or name in _TRAINER_CONFIGS)


def _integer(expr: cst.BaseExpression) -> int | None:
    return int(expr.value, 0) if isinstance(expr, cst.Integer) else None


def _top_level_literals(module: cst.Module, wanted: Callable[[str], bool]) -> dict[str, cst.Integer]:
    """``name = <int>`` / ``name: int = <int>`` at the top of the cell, for names ``wanted`` accepts."""
    found: dict[str, cst.Integer] = {}
    for statement in module.body:
        if not isinstance(statement, cst.SimpleStatementLine):
            continue
        for small in statement.body:
            if isinstance(small, cst.Assign) and len(small.targets) == 1:
                target, value = small.targets[0].target, small.value
            elif isinstance(small, cst.AnnAssign) and small.value is not None:
                target, value = small.target, small.value
            else:
                continue
            if isinstance(target, cst.Name) and isinstance(value, cst.Integer) and wanted(target.value):
                found[target.value] = value
    return found


class _HalveBatch(_Fix):
    """half-batch: integer batch sizes divided by ``factor`` (not below 1), gradient accumulation
    multiplied by it; when no batch size can shrink, gradient checkpointing and a paged 8-bit optimizer."""

    def __init__(self, cell: _Cell, module: cst.Module, factor: int) -> None:
        super().__init__(cell)
        self.factor = factor
        self.no_training_config = True
        self._numbers: dict[int, int] = {}  # id(original Integer) -> new value
        self._call_edits: dict[int, list[tuple[str, cst.BaseExpression]]] = {}  # id(original Call) -> kwargs
        self._plan(module)

    def reason_unchanged(self, fix: str) -> str:
        if self.found and self.no_training_config:
            return (
                "every batch size in this cell is already 1 and there is no TrainingArguments or SFTConfig "
                "call to turn on gradient checkpointing in"
            )
        return super().reason_unchanged(fix)

    def _halve(self, node: cst.Integer) -> bool:
        value = _integer(node)
        assert value is not None
        self.found += 1
        if value <= 1:
            return False
        self._numbers[id(node)] = max(1, value // self.factor)
        return True

    def _more_steps(self, arg: cst.Arg | None, variables: dict[str, cst.Integer], call: cst.Call) -> None:
        """Multiply a gradient_accumulation_steps keyword (or the variable it names) by the factor."""
        if arg is None:
            self._call_edits.setdefault(id(call), []).append(
                ("gradient_accumulation_steps", cst.Integer(str(self.factor)))
            )
        elif isinstance(arg.value, cst.Integer):
            self._multiply(arg.value)
        elif isinstance(arg.value, cst.Name) and arg.value.value in variables:
            self._multiply(variables[arg.value.value])
        elif isinstance(arg.value, cst.Name):
            steps = cst.parse_expression(f"{arg.value.value} * {self.factor}")
            self._call_edits.setdefault(id(call), []).append(("gradient_accumulation_steps", steps))

    def _multiply(self, node: cst.Integer) -> None:
        """Multiply an integer literal by the factor (once, however many reasons there are)."""
        self._numbers[id(node)] = (_integer(node) or 1) * self.factor

    def _plan(self, module: cst.Module) -> None:
        batch_vars = _top_level_literals(module, _is_batch_name)
        int_vars = _top_level_literals(module, lambda name: True)
        step_vars = _top_level_literals(module, lambda name: name.lower() in _ACCUMULATION_NAMES)
        halved_vars = {name for name, node in batch_vars.items() if self._halve(node)}
        train_halved_outside = any("eval" not in name.lower() for name in halved_vars)
        other_step_args: list[tuple[cst.Arg, cst.Call]] = []
        training_calls: list[cst.Call] = []
        for call in m.findall(module, m.Call()):
            assert isinstance(call, cst.Call)
            if isinstance(call.func, cst.Attribute) and call.func.attr.value in ("map", "filter"):
                continue  # datasets preprocessing: its batch_size is not GPU memory
            is_training = _is_training_config(self.cell.class_name(call.func))
            train_changed = False
            for arg in call.args:
                if arg.keyword is None or not _is_batch_name(arg.keyword.value):
                    continue
                is_train = "eval" not in arg.keyword.value
                # A name given as a batch size (bs = 8; f(batch_size=bs)) halves that variable.
                if isinstance(arg.value, cst.Name) and arg.value.value in int_vars:
                    name = arg.value.value
                    if name not in batch_vars and self._halve(int_vars[name]):
                        halved_vars.add(name)
                    changed = name in halved_vars
                else:
                    changed = isinstance(arg.value, cst.Integer) and self._halve(arg.value)
                train_changed = train_changed or (changed and is_train)
            steps = _find_arg(call, "gradient_accumulation_steps")
            if is_training:
                self.no_training_config = False
                training_calls.append(call)
                if train_changed:
                    self._more_steps(steps, step_vars, call)
            else:
                train_halved_outside = train_halved_outside or train_changed
                if steps is not None:
                    other_step_args.append((steps, call))
        if train_halved_outside:
            for steps, call in other_step_args:
                self._more_steps(steps, step_vars, call)
            if halved_vars:
                for node in step_vars.values():
                    if id(node) not in self._numbers:
                        self._multiply(node)
        if not self._numbers and not self._call_edits:
            self.found += len(training_calls)
            for call in training_calls:
                self._call_edits[id(call)] = [
                    ("gradient_checkpointing", cst.Name("True")),
                    ("optim", _string("paged_adamw_8bit")),
                ]

    def leave_Integer(self, original_node: cst.Integer, updated_node: cst.Integer) -> cst.BaseExpression:
        new = self._numbers.get(id(original_node))
        return updated_node if new is None else updated_node.with_changes(value=str(new))

    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.BaseExpression:
        call = updated_node
        for name, value in self._call_edits.get(id(original_node), []):
            arg = _find_arg(call, name)
            call = _set_kwarg(
                call, name, _string("paged_adamw_8bit", arg.value) if name == "optim" and arg else value
            )
        return call


# --------------------------------------------------------------------------------------------------
# Options


def _make_fixer(fix: str, module: cst.Module, cell: _Cell, options: dict[str, object]) -> _Fix:
    if fix in ("4bit", "8bit"):
        compute_dtype = options.get("compute_dtype", "bfloat16")
        if compute_dtype not in ("bfloat16", "float16"):
            raise ValueError(f'compute_dtype must be "bfloat16" or "float16", not {compute_dtype!r}')
        return _Quantize(cell, 4 if fix == "4bit" else 8, str(compute_dtype))
    if fix == "bf16":
        keyword = options.get("dtype_keyword", _default_dtype_keyword())
        if keyword not in ("dtype", "torch_dtype"):
            raise ValueError(f'dtype_keyword must be "dtype" or "torch_dtype", not {keyword!r}')
        return _Bfloat16(cell, str(keyword))
    if fix == "offload":
        folder = options.get("offload_folder")
        if folder is not None and not isinstance(folder, str):
            raise ValueError(f"offload_folder must be a string, not {folder!r}")
        return _Offload(cell, _max_memory_option(options.get("max_memory")), folder)
    if fix == "cpu":
        return _Cpu(cell)
    if fix == "merge-cpu":
        return _MergeOnCpu(cell)
    factor = options.get("factor", 2)
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 2:
        raise ValueError(f"factor must be an integer of at least 2, not {factor!r}")
    return _HalveBatch(cell, module, factor)


def _max_memory_option(value: object) -> dict[int | str, int] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise ValueError(f'max_memory must be a dict like {{0: bytes, "cpu": bytes}}, not {value!r}')
    checked: dict[int | str, int] = {}
    for key, size in value.items():
        good_key = isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool) and key >= 0)
        if not good_key or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"max_memory entries must be GPU index or name -> bytes, not {key!r}: {size!r}")
        checked[key] = size
    return checked


def _default_dtype_keyword() -> str:
    """``dtype`` from transformers 5 on (``torch_dtype`` works there but warns), else ``torch_dtype``."""
    try:
        major = int(importlib.metadata.version("transformers").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return "dtype"
    return "dtype" if major >= 5 else "torch_dtype"
