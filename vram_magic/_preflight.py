"""Preflight: before a ``%%oomsafe`` cell runs, estimate its model loads against the room on the GPU.

The cell is read with ``ast`` (no run): ``X.from_pretrained(MODEL, ...)`` of model classes, where MODEL is a
string or a name bound to one in the notebook. Estimates come from ``_estimate`` (the config alone). A cell
without ``from_pretrained`` costs one substring test.

Preflight stops a cell from running, so it judges only what will surely run and surely go to the GPU:
loads in the cell's top-level statements (and ``with`` blocks), not in functions, branches, loops or ``try``
blocks (often the user's own fallback); and not loads that accelerate places (``device_map="auto"`` without
quantization offloads what does not fit) or whose ``device_map`` cannot be read. Those run, and an OOM
they cause is rescued as any other.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass, replace

from vram_magic._cells import analyse_cell
from vram_magic._diagnose import LOAD_FIXES
from vram_magic._estimate import Estimate, estimate, plans
from vram_magic._plan import Room, make_runnable
from vram_magic._render_text import format_bytes
from vram_magic._types import Cause, Cleanup, MemorySnapshot, Report

# Classes whose from_pretrained loads no weights onto the GPU (or an adapter on an already-loaded base).
_NOT_MODELS = ("Tokenizer", "Processor", "Config", "FeatureExtractor", "ImageProcessor", "PeftModel")
_DTYPES = {"bfloat16", "float16", "float32", "half", "float", "bf16", "fp16", "fp32"}
_AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class Load:
    """One model load a cell makes, as far as its text and the notebook's names tell."""

    model: str
    dtype: str | None = None
    quantization: str | None = None
    device_map: str | None = None


@dataclass(frozen=True)
class Verdict:
    """The loads of a cell and what they need at their peak, against the room."""

    loads: tuple[Load, ...]
    estimates: tuple[Estimate, ...]
    need_bytes: int
    room_bytes: int

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.room_bytes


def loads_in(cell: str, namespace: Mapping[str, object]) -> tuple[Load, ...]:
    """The model loads ``cell`` surely makes (top-level statements and ``with`` blocks) whose model is
    known without running it, in order."""
    if "from_pretrained" not in cell:
        return ()
    try:
        tree = ast.parse(cell)
    except SyntaxError:
        return ()
    loads = []
    for call in _calls_surely_run(tree.body):
        if not _is_model_load(call):
            continue
        keywords = {k.arg: k.value for k in call.keywords if k.arg}
        model = _text(call.args[0] if call.args else keywords.get("pretrained_model_name_or_path"), namespace)
        device_map = _text(keywords.get("device_map"), namespace)
        if model is None or (device_map is None and "device_map" in keywords):
            continue  # the model, or where it goes, is only known when the cell runs
        loads.append(
            Load(
                model=model,
                dtype=_dtype(keywords.get("dtype") or keywords.get("torch_dtype"), namespace),
                quantization=_quantization(keywords, namespace),
                device_map=device_map,
            )
        )
    return tuple(loads)


def _calls_surely_run(statements: list[ast.stmt]) -> list[ast.Call]:
    """The calls in ``statements`` that run whenever the cell runs: not in branches, loops, ``try`` blocks,
    functions, classes or lambdas."""
    calls: list[ast.Call] = []
    for statement in statements:
        if isinstance(statement, (ast.With, ast.AsyncWith)):
            calls.extend(_calls_surely_run(statement.body))
        elif isinstance(statement, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Expr)):
            pending: list[ast.AST] = [statement]
            while pending:
                node = pending.pop()
                if isinstance(node, ast.Lambda):
                    continue
                if isinstance(node, ast.Call):
                    calls.append(node)
                pending.extend(ast.iter_child_nodes(node))
    return sorted(calls, key=lambda call: (call.lineno, call.col_offset))


def check(cell: str, namespace: Mapping[str, object], room_bytes: int) -> Verdict | None:
    """The verdict on the cell's loads, or None when it has none we can estimate (then say nothing)."""
    loads = tuple(load for load in loads_in(cell, namespace) if not _placed_by_accelerate(load))
    estimates = []
    for load in loads:
        try:
            estimates.append(
                estimate(
                    load.model, dtype=load.dtype, quantization=load.quantization, device_map=load.device_map
                )
            )
        except ValueError:  # no config to read (or an option we cannot estimate): no verdict on this load
            continue
    if not estimates:
        return None
    need = sum(e.weights_bytes for e in estimates) + max(e.peak_bytes - e.weights_bytes for e in estimates)
    return Verdict(loads, tuple(estimates), need, room_bytes)


def load_needs(cell: str, namespace: Mapping[str, object], room_bytes: int | None) -> dict[str, int]:
    """What each load fix would need at its peak (bytes, by fix key: ``bf16``, ``8bit``, ``4bit``...) for the
    cell's first model load that can be estimated; empty when none can. ``room_bytes`` sizes the offload."""
    for load in loads_in(cell, namespace):
        try:
            rows = plans(load.model, free_bytes=room_bytes, dtype=load.dtype)
            needs = {plan.key: plan.need_bytes for plan in rows}
            if "bf16" not in needs:
                needs["bf16"] = estimate(load.model, dtype="bfloat16").peak_bytes
        except ValueError:  # no config to read: the next load, or no figures
            continue
        return needs
    return {}


def _placed_by_accelerate(load: Load) -> bool:
    """An unquantized ``device_map="auto"`` load: accelerate offloads what does not fit, so it loads."""
    return load.quantization is None and load.device_map in _AUTO_MAPS


def _is_model_load(call: ast.Call) -> bool:
    func = call.func
    if not (isinstance(func, ast.Attribute) and func.attr == "from_pretrained"):
        return False
    owner = func.value.id if isinstance(func.value, ast.Name) else getattr(func.value, "attr", "")
    return not any(part in owner for part in _NOT_MODELS)


def _text(node: ast.expr | None, namespace: Mapping[str, object]) -> str | None:
    """A string literal, or a name the notebook binds to a string (or a path)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int)):
        return str(node.value)
    if isinstance(node, ast.Name):
        value = namespace.get(node.id)
        if isinstance(value, str) or type(value).__name__.endswith("Path"):
            return str(value)
    return None


def _dtype(node: ast.expr | None, namespace: Mapping[str, object]) -> str | None:
    if isinstance(node, ast.Attribute) and node.attr in _DTYPES:  # torch.bfloat16
        return node.attr
    text = _text(node, namespace)
    return text if text in _DTYPES else None


def _quantization(keywords: Mapping[str, ast.expr], namespace: Mapping[str, object]) -> str | None:
    for flag, name in (("load_in_4bit", "4bit"), ("load_in_8bit", "8bit")):
        value = keywords.get(flag)
        if isinstance(value, ast.Constant) and value.value is True:
            return name
    config = keywords.get("quantization_config")
    if isinstance(config, ast.Call):
        for keyword in config.keywords:
            if (
                keyword.arg in ("load_in_4bit", "load_in_8bit")
                and getattr(keyword.value, "value", None) is True
            ):
                return "4bit" if keyword.arg == "load_in_4bit" else "8bit"
    if isinstance(config, ast.Name):
        bound = namespace.get(config.id)
        if getattr(bound, "load_in_4bit", False):
            return "4bit"
        if getattr(bound, "load_in_8bit", False):
            return "8bit"
    return None


def preflight_report(
    cell: str, namespace: Mapping[str, object], verdict: Verdict, snapshot: MemorySnapshot, room: Room
) -> Report:
    """A load estimated not to fit, as a report: why, and the load fixes with the estimator's verdicts."""
    first = verdict.estimates[0]
    where = "on this GPU" if snapshot.gpus else "under the cap planned for (no GPU here)"
    headline = (
        f"Not run: the model load would need about {format_bytes(verdict.need_bytes)} at its peak, "
        f"more than the {format_bytes(verdict.room_bytes)} {where}."
    )
    cause = Cause(
        "estimate",
        f"Loading {first.model} ({first.label}) needs about {format_bytes(first.peak_bytes)} at its peak: "
        f"{format_bytes(first.weights_bytes)} of weights, reserved in one allocation while loading. "
        "Run it anyway with `%%oomsafe --force`.",
    )
    needs = load_needs(cell, namespace, verdict.room_bytes)
    fixes = make_runnable(LOAD_FIXES, cell, None, replace(room, gpu_bytes=verdict.room_bytes), needs)
    return Report(
        error_text=headline,
        oom=None,
        cell=cell,
        analysis=analyse_cell(cell),
        snapshot=snapshot,
        holders=(),
        cleanup=Cleanup(released=(), reclaimed_bytes=None, freed_tensor_bytes=0),
        causes=(cause,),
        fixes=fixes,
        headline=headline,
    )
