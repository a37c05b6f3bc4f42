"""Preflight: before a ``%%oomsafe`` cell runs, estimate its model loads against the room on the GPU.

The cell is read with ``ast`` (no run): ``X.from_pretrained(MODEL, ...)`` of model classes, where MODEL is a
string or a name bound to one in the notebook. Estimates come from ``_estimate`` (the config alone). A cell
without ``from_pretrained`` costs one substring test.

Preflight stops a cell from running, so it judges only what will surely run and surely go to the GPU:
loads in the cell's top-level statements (and ``with`` blocks), not in functions, branches, loops or ``try``
blocks (often the user's own fallback); loads that go to the GPU (a cuda ``device_map``, a quantized load,
``.to("cuda")``, ``with torch.device("cuda")``), not those transformers loads into CPU RAM (no
``device_map``), those accelerate places (``device_map="auto"`` without quantization offloads what does not
fit) or those whose ``device_map`` cannot be read. Those run, and an OOM they cause is rescued as any other.
After an OOM, ``load_at`` finds the load that failed, so its fixes are judged with its own figures.
"""

from __future__ import annotations

import ast
from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

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
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_UNKNOWN = object()  # a name the cell binds to something only known when it runs
# _NO_FIGURES: estimating a model the user chose can fail for reasons of its own (no config to read, an
# architecture transformers cannot build on the meta device, a placement accelerate cannot split). Preflight
# and the rescue then go on without figures: they must never stop a cell with an error of their own.


@dataclass(frozen=True)
class Load:
    """One model load a cell makes, as far as its text and the notebook's names tell."""

    model: str
    dtype: str | None = None
    quantization: str | None = None
    device_map: str | None = None
    lines: tuple[int, int] = field(default=(0, 0), compare=False)  # the call's first and last line


@dataclass(frozen=True)
class Verdict:
    """The loads of a cell judged (each with its estimate) and what they need at their peak, against the
    room."""

    loads: tuple[Load, ...]
    estimates: tuple[Estimate, ...]
    need_bytes: int
    room_bytes: int

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.room_bytes

    @property
    def biggest(self) -> tuple[Load, Estimate]:
        """The load that needs the most, with its estimate."""
        return max(zip(self.loads, self.estimates, strict=True), key=lambda pair: pair[1].peak_bytes)


def loads_in(cell: str, namespace: Mapping[str, object]) -> tuple[Load, ...]:
    """The model loads ``cell`` surely makes onto the GPU, whose model is known without running it, in
    order. Surely: in top-level statements and ``with`` blocks. Onto the GPU: a cuda ``device_map`` (or an
    auto one), a quantized load (bitsandbytes puts it on the GPU), ``.to("cuda")``/``.cuda()`` on the load or
    later on the name it is bound to, or ``with torch.device("cuda")``; without one of these transformers
    loads into CPU RAM."""
    tree = _parse(cell)
    if tree is None:
        return ()
    names = _names_in(tree, namespace)
    loads = []
    for call, in_cuda_block in _calls_surely_run(tree.body, names):
        load = _load_of(call, names)
        if load is None:
            continue
        moved = in_cuda_block or _moved_to_gpu(call, tree, names)
        if load.device_map is None and load.quantization is None and not moved:
            continue  # loaded into CPU RAM
        loads.append(load)
    return tuple(loads)


def load_at(cell: str, namespace: Mapping[str, object], line: int) -> Load | None:
    """The model load of ``cell`` whose call spans ``line`` (1 = the cell's first line), if its model is
    known: the load that failed, after an OOM."""
    tree = _parse(cell)
    if tree is None:
        return None
    names = _names_in(tree, namespace)
    for call in (node for node in ast.walk(tree) if isinstance(node, ast.Call)):
        load = _load_of(call, names)
        if load is not None and load.lines[0] <= line <= load.lines[1]:
            return load
    return None


def check(cell: str, namespace: Mapping[str, object], room_bytes: int) -> Verdict | None:
    """The verdict on the cell's loads, or None when it has none we can estimate (then say nothing)."""
    loads, estimates = [], []
    for load in loads_in(cell, namespace):
        if _placed_by_accelerate(load):
            continue
        try:
            found = estimate(
                load.model, dtype=load.dtype, quantization=load.quantization, device_map=load.device_map
            )
        except Exception:  # no verdict on this load (see _NO_FIGURES)
            continue
        loads.append(load)
        estimates.append(found)
    if not estimates:
        return None
    need = sum(e.weights_bytes for e in estimates) + max(e.peak_bytes - e.weights_bytes for e in estimates)
    return Verdict(tuple(loads), tuple(estimates), need, room_bytes)


def load_needs(load: Load, room_bytes: int | None) -> dict[str, int]:
    """What each load fix would need at its peak for ``load`` (bytes, by fix key: ``8bit``, ``4bit``,
    ``offload``, and ``bf16`` where the load is in float32, the one case bf16 shrinks); empty when it cannot
    be estimated. ``room_bytes`` sizes the offload."""
    try:
        rows = plans(load.model, free_bytes=room_bytes, dtype=load.dtype)
        needs = {plan.key: plan.need_bytes for plan in rows[1:]}  # rows[0] is the load as written
        if rows[0].estimate.dtype == "float32":
            needs["bf16"] = estimate(load.model, dtype="bfloat16").peak_bytes
    except Exception:  # no figures (see _NO_FIGURES)
        return {}
    return needs


def _parse(cell: str) -> ast.Module | None:
    if "from_pretrained" not in cell:
        return None
    try:
        return ast.parse(cell)
    except SyntaxError:
        return None


def _load_of(call: ast.Call, names: Mapping[str, object]) -> Load | None:
    """The load ``call`` makes: a model's ``from_pretrained`` whose model and placement are known."""
    if not _is_model_load(call):
        return None
    keywords = {k.arg: k.value for k in call.keywords if k.arg}
    model = _text(call.args[0] if call.args else keywords.get("pretrained_model_name_or_path"), names)
    placement = keywords.get("device_map")
    device_map = "cuda" if placement is not None and _is_gpu_index(placement) else _text(placement, names)
    if model is None or (device_map is None and "device_map" in keywords):
        return None  # the model, or where it goes, is only known when the cell runs
    return Load(
        model=model,
        dtype=_dtype(keywords.get("dtype") or keywords.get("torch_dtype"), names),
        quantization=_quantization(keywords, names),
        device_map=device_map,
        lines=(call.lineno, call.end_lineno or call.lineno),
    )


def _names_in(tree: ast.Module, namespace: Mapping[str, object]) -> Mapping[str, object]:
    """The notebook's names as the cell sees them: a name the cell binds to a string literal (at top level)
    has that value; one it binds to anything else is unknown (the notebook's old value would mislead)."""
    literal: dict[str, object] = {}
    other: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            other.add(node.id)
    for statement in tree.body:
        if (
            isinstance(statement, ast.Assign)
            and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)
            and isinstance(statement.value, ast.Constant)
            and isinstance(statement.value.value, str)
        ):
            literal[statement.targets[0].id] = statement.value.value
    unknown = {name: _UNKNOWN for name in other - set(literal)}
    return ChainMap(literal, unknown, dict(namespace))


def _calls_surely_run(statements: list[ast.stmt], names: Mapping[str, object]) -> list[tuple[ast.Call, bool]]:
    """The calls in ``statements`` that run whenever the cell runs, each with whether it runs inside
    ``with torch.device("cuda")``: not in branches, loops, ``try`` blocks, functions, classes, lambdas,
    conditional expressions, the later operands of ``and``/``or``, or comprehensions."""
    found: list[tuple[ast.Call, bool]] = []
    for statement in statements:
        if isinstance(statement, (ast.With, ast.AsyncWith)):
            cuda = any(_is_cuda_device(item.context_expr, names) for item in statement.items)
            found.extend((call, cuda or inner) for call, inner in _calls_surely_run(statement.body, names))
        elif isinstance(statement, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Expr)):
            found.extend((call, False) for call in _unconditional_calls(statement))
    return sorted(found, key=lambda pair: (pair[0].lineno, pair[0].col_offset))


def _unconditional_calls(statement: ast.stmt) -> list[ast.Call]:
    calls: list[ast.Call] = []
    pending: list[ast.AST] = [statement]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Lambda, ast.IfExp, *_COMPREHENSIONS)):
            continue
        if isinstance(node, ast.BoolOp):
            pending.append(node.values[0])  # the others may not run
            continue
        if isinstance(node, ast.Call):
            calls.append(node)
        pending.extend(ast.iter_child_nodes(node))
    return calls


def _moved_to_gpu(load: ast.Call, tree: ast.Module, names: Mapping[str, object]) -> bool:
    """``X.from_pretrained(...).to("cuda")`` / ``.cuda()``, or the name it is bound to moved so later in the
    cell's top-level statements (``model.to("cuda")``, ``model = model.cuda()``)."""
    bound_to = None
    for statement in tree.body:
        for node in ast.walk(statement):
            if isinstance(node, ast.Call) and _is_move(node, names):
                moved = node.func.value  # type: ignore[attr-defined]
                if moved is load or (bound_to is not None and _is_name(moved, bound_to)):
                    return True
        if bound_to is None and isinstance(statement, ast.Assign) and _contains(statement.value, load):
            target = statement.targets[0]
            bound_to = target.id if isinstance(target, ast.Name) else None
    return False


def _is_move(call: ast.Call, names: Mapping[str, object]) -> bool:
    """``x.cuda()`` or ``x.to(<a cuda device>)``."""
    func = call.func
    if not isinstance(func, ast.Attribute):
        return False
    if func.attr == "cuda":
        return True
    device = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "device"), None)
    return func.attr == "to" and device is not None and _is_cuda_device(device, names)


def _is_cuda_device(node: ast.expr, names: Mapping[str, object]) -> bool:
    """``"cuda"``, ``"cuda:1"``, a GPU index, ``torch.device("cuda")``, or a name bound to one of these."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "device":
        return bool(node.args) and _is_cuda_device(node.args[0], names)
    if isinstance(node, ast.Constant):
        return _is_gpu_index(node) or (isinstance(node.value, str) and node.value.startswith("cuda"))
    if isinstance(node, ast.Name):
        bound = names.get(node.id)
        return str(getattr(bound, "type", bound)).startswith("cuda")  # a string, or a torch.device
    return False


def _is_gpu_index(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int


def _is_name(node: ast.expr, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _contains(tree: ast.AST, node: ast.AST) -> bool:
    return any(each is node for each in ast.walk(tree))


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


def preflight_report(cell: str, verdict: Verdict, snapshot: MemorySnapshot, room: Room) -> Report:
    """A load estimated not to fit, as a report: why, and the load fixes with the estimator's verdicts."""
    load, first = verdict.biggest
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
    needs = load_needs(load, verdict.room_bytes)
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
