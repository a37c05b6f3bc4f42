"""half-batch and checkpointing: fewer sequences at a time, or less kept per sequence.

half-batch halves every batch size the cell sets (a keyword, a dict entry, a variable of the cell or of an
earlier cell, each branch of ``8 if big else 4``). An odd size keeps its effective batch with the largest
divisor below half (3 -> 1 x 3). Gradient accumulation grows by the same factor only where the code has it:
a ``TrainingArguments``/``SFTConfig`` (the Trainer accumulates), or a loop that already accumulates;
elsewhere the fix says that the effective batch changes. Batches of prompts give the same results in more
steps. checkpointing turns on gradient checkpointing (and the paged 8-bit AdamW where a Trainer runs).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import libcst as cst
import libcst.matchers as m

from vram_magic._errors import NotApplicable
from vram_magic._types import Facts, facts
from vram_magic.cell import BatchSize, Cell, Held, is_batch_name
from vram_magic.cell._values import keyword_values
from vram_magic.fixes._base import Options, Rewritten, finish
from vram_magic.fixes._edit import Edits, code, find_arg, set_kwarg, string, string_value, with_integer


@dataclass
class _Holder:
    """Where a batch size's value is written: an expression of the cell, or a variable of an earlier cell."""

    values: tuple[int, ...]
    roles: set[str] = field(default_factory=set)
    expression: cst.BaseExpression | None = None
    variable: str | None = None  # an earlier cell's variable: re-bound at the top of this cell
    spread: tuple[cst.Arg, str] | None = None  # (``**args`` of an earlier cell's dict, the key in it)
    first_step: int = 0


# sentence-transformers losses that take each anchor's negatives from the rest of its batch: a smaller batch
# gives them fewer, and gradient accumulation does not bring them back.
_IN_BATCH_NEGATIVES = (
    "CachedMultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
    "MultipleNegativesRankingLoss",
    "CachedGISTEmbedLoss",
    "GISTEmbedLoss",
    "MegaBatchMarginLoss",
    "ContrastiveTensionLossInBatchNegatives",
)


def _deepspeed_sets_its_batch(cell: Cell) -> bool:
    """Whether a DeepSpeed config dict of the cell gives its micro batch as a number (not "auto")."""
    for node in m.findall(cell.module, m.Dict()):
        assert isinstance(node, cst.Dict)
        for element in node.elements:
            if (
                isinstance(element, cst.DictElement)
                and string_value(element.key) == "train_micro_batch_size_per_gpu"
                and isinstance(element.value, cst.Integer)
            ):
                return True
    return False


def smaller(value: int, factor: int) -> tuple[int, int] | None:
    """(new size, how many times smaller) for a batch of ``value``; None at 1. An odd size takes its largest
    divisor up to ``value / factor``, so size x accumulation stays the same (3 -> 1 x 3, 9 -> 3 x 3)."""
    if value <= 1:
        return None
    if value % factor == 0:
        return value // factor, factor
    divisor = next((d for d in range(value // factor, 0, -1) if value % d == 0), 1)
    return divisor, value // divisor


def rewrite(cell: Cell, options: Options) -> Rewritten:
    if _deepspeed_sets_its_batch(cell):
        raise NotApplicable(
            "the DeepSpeed config sets its own batch sizes, which must agree with TrainingArguments': set "
            'them to "auto" there, then halve per_device_train_batch_size'
        )
    holders, unknown = _holders(cell)
    if not holders:
        if unknown:
            raise NotApplicable(
                f"the batch size (`{unknown[0]}`) is only known when the cell runs; halve it by hand",
                elsewhere=True,
            )
        raise NotApplicable("this cell sets no batch size", elsewhere=True)
    edits = Edits()
    overrides: dict[int, tuple[cst.Arg, dict[str, int]]] = {}
    accumulates = bool(cell.training_configs or cell.accumulations)
    changes: list[tuple[str, int, int]] = []  # (role, old, new)
    multiplier = 0
    for holder in holders:
        new_values = [smaller(v, options.factor) for v in holder.values]
        if any(n is None for n in new_values):
            continue
        role = _role_of(holder.roles, accumulates)
        if role == "train" and not multiplier:
            multiplier = new_values[0][1] if len(new_values) == 1 else options.factor  # type: ignore[index]
        _set_values(cell, edits, overrides, holder, [n[0] for n in new_values])  # type: ignore[index]
        changes.append((role, holder.values[0], new_values[0][0]))  # type: ignore[index]
    if not changes:
        raise NotApplicable("every batch size in this cell is already 1", already=True)
    accumulation = _accumulate(cell, edits, overrides, multiplier) if multiplier and accumulates else False
    for arg, entries in overrides.values():
        edits.change(arg, _overridden(entries))
    negatives = next((loss for loss in _IN_BATCH_NEGATIVES if loss in cell.source), None)
    change = _change(changes, multiplier, accumulation) + facts(in_batch_negatives=negatives)
    return finish(cell, "half-batch", edits, change + _float16_training(cell, options, edits))


def _float16_training(cell: Cell, options: Options, edits: Edits) -> Facts:
    """On a GPU without bfloat16 (a T4, or ``%vram cap t4``): ``bf16=True`` in the training configs becomes
    ``fp16=True``, which that GPU runs (TrainingArguments refuses bf16 there)."""
    if options.compute_dtype != "float16":
        return ()
    changed = 0
    for config in cell.training_configs:
        keywords, _ = keyword_values(config.call, cell.names)
        if cell.names.boolean(keywords.get("bf16")) is not True or find_arg(config.call, "bf16") is None:
            continue
        edits.change(config.call, lambda call: set_kwarg(call, "fp16", cst.Name("True"), rename=("bf16",)))
        changed += 1
    return facts(fp16=True) if changed else ()


def _overridden(entries: dict[str, int]) -> Callable[[cst.Arg], cst.Arg]:
    """An edit of ``**args`` (a dict of an earlier cell) into ``**{**args, "key": value}``."""
    override = "".join(f', "{key}": {value}' for key, value in entries.items())

    def change(arg: cst.Arg) -> cst.Arg:
        return arg.with_changes(value=cst.parse_expression(f"{{**{code(arg.value).strip()}{override}}}"))

    return change


def _holders(cell: Cell) -> tuple[list[_Holder], list[str]]:
    by_node: dict[int, _Holder] = {}
    by_variable: dict[str, _Holder] = {}
    unknown: list[str] = []
    names = cell.names
    for site in cell.batch_sizes:
        holder = _holder_of(cell, site, by_node, by_variable)
        if holder is None:
            if site.values == () and not (site.variable and site.variable in by_variable):
                unknown.append(site.variable or site.name)
            continue
        holder.roles.add(site.role)
        holder.first_step = min(holder.first_step, site.step)
    for config in cell.training_configs:  # TrainingArguments(**args) with args from an earlier cell
        for arg in config.call.args:
            held = names.value(arg.value) if arg.star == "**" else None
            if isinstance(held, Held) and isinstance(held.value, dict):
                for key, value in held.value.items():
                    if isinstance(key, str) and is_batch_name(key) and isinstance(value, int):
                        role = "eval" if "eval" in key else "train"
                        holder = _Holder((value,), {role}, spread=(arg, key), first_step=config.step)
                        by_node.setdefault(id(arg) + hash(key), holder)
    return [*by_node.values(), *by_variable.values()], unknown


def _holder_of(
    cell: Cell, site: BatchSize, by_node: dict[int, _Holder], by_variable: dict[str, _Holder]
) -> _Holder | None:
    names = cell.names
    if site.variable is not None and site.from_namespace:
        values = names.integers(cst.Name(site.variable))
        if not values:
            return None
        return by_variable.setdefault(
            site.variable, _Holder(values, variable=site.variable, first_step=site.step)
        )
    expression = names.bound_once.get(site.variable) if site.variable else _value_node(site.node)
    if expression is None or not names.integers(expression):
        return None
    if isinstance(expression, cst.Name):
        return None
    return by_node.setdefault(
        id(expression), _Holder(names.integers(expression), expression=expression, first_step=site.step)
    )


def _value_node(node: cst.CSTNode) -> cst.BaseExpression | None:
    if isinstance(node, (cst.Arg, cst.DictElement, cst.Assign)):
        return node.value
    if isinstance(node, cst.Param):
        return node.default
    return None


def _set_values(
    cell: Cell,
    edits: Edits,
    overrides: dict[int, tuple[cst.Arg, dict[str, int]]],
    holder: _Holder,
    new: list[int],
) -> None:
    if holder.spread is not None:
        arg, key = holder.spread
        overrides.setdefault(id(arg), (arg, {}))[1][key] = new[0]
        return
    if holder.variable is not None:
        step = cell.steps[holder.first_step].node
        edits.add_before(step, f"{holder.variable} = {new[0]}")
        return
    expression = holder.expression
    assert expression is not None
    if isinstance(expression, cst.IfExp):
        integers = [node for node in (expression.body, expression.orelse) if isinstance(node, cst.Integer)]
        for node, value in zip(integers, new, strict=False):
            edits.change(node, with_integer(value))
    elif isinstance(expression, cst.Integer):
        edits.change(expression, with_integer(new[0]))


def _accumulate(
    cell: Cell, edits: Edits, overrides: dict[int, tuple[cst.Arg, dict[str, int]]], factor: int
) -> tuple[int, int] | bool:
    """Multiply gradient accumulation by ``factor`` where the code sets it, or add it to the training
    configs; (old, new) when the figures are known, True when only the code is."""
    result: tuple[int, int] | bool = True
    touched: set[int] = set()
    for config in cell.training_configs:
        written = find_arg(config.call, "gradient_accumulation_steps")
        keywords, _ = keyword_values(config.call, cell.names)
        for arg in config.call.args:  # in a dict of an earlier cell: override it at the call
            held = cell.names.value(arg.value) if arg.star == "**" else None
            if isinstance(held, Held) and isinstance(held.value, dict):
                steps = held.value.get("gradient_accumulation_steps")
                if isinstance(steps, int):
                    overrides.setdefault(id(arg), (arg, {}))[1]["gradient_accumulation_steps"] = (
                        steps * factor
                    )
                    result = (steps, steps * factor)
        if written is None and "gradient_accumulation_steps" not in keywords:
            edits.change(
                config.call,
                lambda call: set_kwarg(call, "gradient_accumulation_steps", cst.Integer(str(factor))),
            )
            result = (1, factor)
    for site in cell.accumulations:
        value = site.value
        if site.from_namespace and site.variable:
            step = cell.steps[site.step].node
            if value is not None:
                edits.add_before(step, f"{site.variable} = {value * factor}")
                result = (value, value * factor)
            continue
        node = site.node
        expression: cst.BaseExpression | None = _value_node(node)
        if site.variable is not None and site.variable in cell.names.bound_once:
            expression = cell.names.bound_once[site.variable]
        if expression is None or id(expression) in touched:
            continue
        touched.add(id(expression))
        if _follows_the_batch(expression):
            continue  # ``64 // batch_size`` grows as the batch shrinks: multiplying it too would double it
        if isinstance(expression, cst.Integer) and value is not None:
            edits.change(expression, with_integer(value * factor))
            result = (value, value * factor)
        elif isinstance(node, cst.Arg) and not isinstance(expression, cst.Integer):
            edits.change(node, lambda n: n.with_changes(value=_times(n.value, factor)))
    return result


def _follows_the_batch(expression: cst.BaseExpression) -> bool:
    """Whether an accumulation is computed from a batch size (``64 // batch_size``)."""
    return any(
        is_batch_name(name.value) for name in m.findall(expression, m.Name()) if isinstance(name, cst.Name)
    )


def _times(expression: cst.BaseExpression, factor: int) -> cst.BaseExpression:
    """``expression * factor``, in parentheses unless it is a name, a call, an attribute or an index."""
    written = code(expression).strip()
    if not isinstance(expression, (cst.Name, cst.Attribute, cst.Call, cst.Subscript, cst.Integer)):
        written = f"({written})"
    return cst.parse_expression(f"{written} * {factor}")


def _role_of(roles: set[str], accumulates: bool) -> str:
    """What a batch feeds: training (or anything, where the code accumulates gradients), evaluation,
    inference, or unknown (a DataLoader in a cell that does not say)."""
    if "train" in roles or (accumulates and roles - {"eval", "inference"}):
        return "train"
    for role in ("eval", "inference"):
        if role in roles:
            return role
    return "unknown"


def _change(
    changes: list[tuple[str, int, int]], multiplier: int, accumulation: tuple[int, int] | bool
) -> Facts:
    """The batch the title names (the training one where there is one) and the accumulation steps: their
    sizes when the cell says them, True when it accumulates by an amount it does not say, None when not."""
    role, old, new = next(((r, o, n) for r, o, n in changes if r == "train"), changes[0])
    steps = None if accumulation is False else accumulation
    return facts(role=role, old=old, new=new, multiplier=multiplier, accumulation=steps)


# Optimizers whose state is already small (Adafactor's factored moments, 8-bit and paged states, GaLore's
# projections, LOMO's none): the checkpointing fix keeps them rather than switch to paged 8-bit AdamW.
_LIGHT_OPTIMIZER = re.compile(r"adafactor|8bit|paged|galore|lomo|sgd", re.IGNORECASE)


def checkpointing(cell: Cell, options: Options) -> Rewritten:
    """Gradient checkpointing (and the paged 8-bit AdamW) in the training configs, or, for a loop of the
    user's, ``model.gradient_checkpointing_enable()`` before it."""
    if cell.generates and not cell.trains:
        raise NotApplicable("this cell generates, and nothing in it trains")
    edits = Edits()
    already, checkpointing, optimizer = 0, False, False
    for config in cell.training_configs:
        keywords, _ = keyword_values(config.call, cell.names)
        wanted = cell.names.boolean(keywords.get("gradient_checkpointing")) is True
        light = _LIGHT_OPTIMIZER.search(cell.names.text(keywords.get("optim")) or "") is not None
        if wanted and light:
            already += 1
            continue
        checkpointing, optimizer = checkpointing or not wanted, optimizer or not light

        def change(call: cst.Call, wanted: bool = wanted, light: bool = light) -> cst.Call:
            if not wanted:
                call = set_kwarg(call, "gradient_checkpointing", cst.Name("True"))
            if not light:
                old = find_arg(call, "optim")
                call = set_kwarg(call, "optim", string("paged_adamw_8bit", old.value if old else None))
            return call

        edits.change(config.call, change)
    if not cell.training_configs:
        checkpointing = _checkpoint_a_loop(cell, edits)
    float16 = _float16_training(cell, options, edits) if edits else ()
    if not edits:
        if already:
            raise NotApplicable(
                "gradient checkpointing and a memory-light optimizer are already on", already=True
            )
        raise NotApplicable(
            "this cell has no TrainingArguments or SFTConfig and no training loop of a model it can name",
            elsewhere=True,
        )
    return finish(
        cell, "checkpointing", edits, facts(checkpointing=checkpointing, optimizer=optimizer) + float16
    )


def _checkpoint_a_loop(cell: Cell, edits: Edits) -> bool:
    """``model.gradient_checkpointing_enable()`` before the user's own training loop; True if added."""
    if not cell.trains:
        return False
    forward = next((f for f in cell.forwards if f.receiver_name and f.in_training), None)
    if forward is None or forward.receiver_name is None:
        return False
    name = forward.receiver_name
    held = cell.names.resolve(name.split(".")[0])
    supported = isinstance(held, Held) and hasattr(held.value, "gradient_checkpointing_enable")
    if not supported and not any(load.bound_to == name for load in cell.loads):
        return False
    if f"{name}.gradient_checkpointing_enable" in cell.source:
        return False
    edits.add_before(cell.steps[forward.step].node, f"{name}.gradient_checkpointing_enable()")
    return True
