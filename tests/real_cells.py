"""Other people's notebook cells (tests/fixtures/real_cells/cells.json) and every fix made on each.

``judge()`` puts each fix through the checks the rescue makes before it offers one (``_checks.make_runnable``
on the cell read as the rescue reads it, with the notebook's names its ``context`` gives, on a T4-sized GPU
with 25 GiB of CPU RAM, no config downloaded) and sorts the outcome: a crash (any error of ours), code that
does not compile, a result that breaks the fix's meaning (checked with Python's own ``ast``, independently of
vram_magic's reader), and, against the verdicts a careful engineer gave each cell (``expect``), false
refusals (the engineer would offer it, we did not) and wrong applications (the engineer would not offer it,
we did). Used by tests/test_real_cells.py and benchmarks/advice.py.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from IPython.core.inputtransformer2 import TransformerManager

from vram_magic._checks import Context, Room, make_runnable
from vram_magic._types import Fix
from vram_magic.cell import read_cell
from vram_magic.fixes import LOAD_FIXES, NotApplicable, apply_fix

GiB = 2**30
# What the rescue sees on a T4 (14.75 GiB usable) after the cleanup, with 25 GiB of CPU RAM free.
T4_ROOM = Room(
    gpu_bytes=round(14.5 * GiB),
    gpu_free_without_cap_bytes=round(14.5 * GiB),
    max_memory={0: 13 * GiB, "cpu": 25 * GiB},
    compute_dtype="bfloat16",
    cpu_bytes=25 * GiB,
)

CELLS = Path(__file__).parent / "fixtures" / "real_cells" / "cells.json"
JUDGED_FIXES = (
    "4bit",
    "8bit",
    "bf16",
    "offload",
    "cpu",
    "merge-cpu",
    "half-batch",
    "chunk",
    "inference-mode",
    "offload-cache",
)


@dataclass(frozen=True)
class RealCell:
    id: str
    repo: str
    source: str
    expect: dict[str, str]  # fix -> "apply" | "refuse" | "either"
    why: dict[str, str]
    namespace: dict[str, object]  # the values of earlier cells' names the context gives


@dataclass
class Outcome:
    """What happened to one fix on one cell."""

    cell: str
    fix: str
    applied: bool
    expected: str
    problem: str | None = None  # crash / does not compile / breaks the fix's meaning: what
    reason: str = ""  # the NotApplicable reason, when refused


@dataclass
class Judgement:
    outcomes: list[Outcome] = field(default_factory=list)

    def where(self, test: Callable[[Outcome], bool]) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if test(outcome)]

    @property
    def problems(self) -> list[Outcome]:
        return self.where(lambda o: o.problem is not None)

    @property
    def false_refusals(self) -> list[Outcome]:
        return self.where(lambda o: o.expected == "apply" and not o.applied and o.problem is None)

    @property
    def wrong_applications(self) -> list[Outcome]:
        return self.where(lambda o: o.expected == "refuse" and o.applied)


def load_cells() -> list[RealCell]:
    entries = json.loads(CELLS.read_text())
    return [
        RealCell(
            id=entry["id"],
            repo=entry["repo"],
            source=entry["source"],
            expect={fix: entry["expect"][fix]["verdict"] for fix in JUDGED_FIXES},
            why={fix: entry["expect"][fix]["why"] for fix in JUDGED_FIXES},
            namespace=dict(entry.get("namespace", {})),
        )
        for entry in entries
    ]


def python_of(source: str) -> str | None:
    """The cell as the rescue reads it: the user's text when it is Python, else IPython's transform of it
    (``!pip``, ``%time`` lines become calls); None when neither parses."""
    for text in (source, TransformerManager().transform_cell(source)):
        try:
            ast.parse(text)
        except SyntaxError:
            continue
        return text
    return None


def judge(cells: list[RealCell] | None = None) -> Judgement:
    """Every fix on every cell, through the rescue's checks (see the module's doc)."""
    judgement = Judgement()
    for cell in cells if cells is not None else load_cells():
        text = python_of(cell.source)
        reading = read_cell(text, cell.namespace) if text is not None else None
        for fix in JUDGED_FIXES:
            outcome = Outcome(cell.id, fix, applied=False, expected=cell.expect[fix])
            judgement.outcomes.append(outcome)
            if text is None or reading is None:
                continue  # not Python (a cell that does not parse): nothing to fix, nothing offered
            try:
                context = Context(
                    cell=reading,
                    namespace=cell.namespace,
                    oom=None,
                    room=T4_ROOM,
                    failed_in_load=fix in LOAD_FIXES,
                )
                offered = make_runnable((Fix(fix, ""),), context)
            except Exception as error:  # a crash of ours
                outcome.problem = f"crash: {type(error).__name__}: {error}"
                continue
            if not offered or offered[0].rewritten_cell is None:
                outcome.reason = _why_not(reading, fix)
                continue
            outcome.applied = True
            fixed = offered[0].rewritten_cell
            try:
                tree = ast.parse(fixed)
            except SyntaxError as error:
                outcome.problem = f"does not compile: {error}"
                continue
            broken = MEANINGS[fix](ast.parse(text), tree)
            if broken:
                outcome.problem = f"breaks its meaning: {broken}"
    return judgement


def _why_not(reading: object, fix: str) -> str:
    """The fix's own reason for not applying, or the check's (it fits nothing better, RAM...)."""
    try:
        apply_fix(reading, fix)  # type: ignore[arg-type]
    except NotApplicable as refused:
        return refused.reason
    return "left out by the checks (changes nothing the load needs, or CPU RAM cannot hold it)"


# --------------------------------------------------------------------------------------------------
# What each fix must have done, read with Python's ast (not vram_magic's reader)


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _method(call: ast.Call) -> str | None:
    return call.func.attr if isinstance(call.func, ast.Attribute) else None


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _text(node: ast.expr | None) -> str:
    return ast.unparse(node) if node is not None else ""


def _loads(tree: ast.AST) -> list[ast.Call]:
    """from_pretrained calls of model classes and pipeline(...) calls."""
    found = []
    for call in _calls(tree):
        if _method(call) == "from_pretrained":
            owner = _text(call.func.value) if isinstance(call.func, ast.Attribute) else ""  # type: ignore[union-attr]
            if not any(part in owner for part in ("Tokenizer", "Processor", "Config", "FeatureExtractor")):
                found.append(call)
        elif isinstance(call.func, ast.Name) and call.func.id == "pipeline":
            found.append(call)
    return found


def _quantized_to(bits: str) -> Callable[[ast.AST, ast.AST], str | None]:
    def check(before: ast.AST, after: ast.AST) -> str | None:
        configs = [
            call
            for call in _calls(after)
            if _text(call.func).endswith("BitsAndBytesConfig")
            and _text(_keyword(call, f"load_in_{bits}")) == "True"
        ]
        if not configs:
            return f"no BitsAndBytesConfig(load_in_{bits}=True)"
        for load in _loads(after):
            for flag in ("load_in_4bit", "load_in_8bit"):
                if _keyword(load, flag) is not None:
                    return f"{flag}= left on a load (transformers 5 rejects it)"
        for call in _calls(after):  # no cast or GPU move chained on a quantized load
            inner = call.func.value if isinstance(call.func, ast.Attribute) else None
            if (
                isinstance(inner, ast.Call)
                and inner in _loads(after)
                and _method(call) in ("half", "cuda", "float")
            ):
                return f".{_method(call)}() chained on a quantized load"
        return None

    return check


def _bf16(before: ast.AST, after: ast.AST) -> str | None:
    for load in _loads(after):
        value = _text(_keyword(load, "dtype") or _keyword(load, "torch_dtype"))
        if value in ("torch.bfloat16", "torch.float16"):
            return None
    return "no load asks for dtype=torch.bfloat16"


def _offload(before: ast.AST, after: ast.AST) -> str | None:
    spread_auto = re.search(
        r"""device_map=['"]auto['"]|['"]device_map['"]: ['"]auto['"]""", ast.unparse(after)
    )
    autos = [
        load
        for load in _loads(after)
        if "auto" in _text(_keyword(load, "device_map"))
        or (spread_auto and any(k.arg is None for k in load.keywords))  # in its **kwargs dict
    ]
    if not autos:
        return 'no load has device_map="auto"'
    text = ast.unparse(after)
    quantized = any(word in text for word in ("BitsAndBytesConfig", "load_in_8bit", "load_in_4bit"))
    allowed = "llm_int8_enable_fp32_cpu_offload" in text or "quantization_config" not in ast.unparse(before)
    if quantized and not allowed:
        return "a quantized load offloaded without llm_int8_enable_fp32_cpu_offload=True"
    for call in _calls(after):
        inner = call.func.value if isinstance(call.func, ast.Attribute) else None
        if isinstance(inner, ast.Call) and inner in autos and _method(call) == "cuda":
            return ".cuda() chained on an offloaded load"
    return None


def _cpu(before: ast.AST, after: ast.AST) -> str | None:
    for call in _calls(after):
        if _method(call) == "cuda":
            return ".cuda() left"
        if _method(call) == "half" and any(_method(inner) == "from_pretrained" for inner in _calls(call)):
            return ".half() left on a model loaded on the CPU"
        if any(k.arg == "attn_implementation" and "flash" in ast.unparse(k.value) for k in call.keywords):
            return "FlashAttention (CUDA only) left on the CPU"
        arguments = [*call.args[:1], *(k.value for k in call.keywords if k.arg in ("device", "device_map"))]
        if _method(call) == "to" or _text(call.func) in ("torch.device", "pipeline") or call.keywords:
            for argument in arguments:
                if isinstance(argument, ast.Constant) and str(argument.value).startswith("cuda"):
                    return f"{ast.unparse(call)[:60]} still names cuda"
                if isinstance(argument, ast.JoinedStr) and ast.unparse(argument)[2:].startswith("cuda"):
                    return f"{ast.unparse(call)[:60]} still names cuda (an f-string)"
    return None


def _merge_on_cpu(before: ast.AST, after: ast.AST) -> str | None:
    text = ast.unparse(after)
    merges = [call for call in _calls(after) if _method(call) == "merge_and_unload"]
    if not merges:
        return "the merge is gone"
    first = min(merge.lineno for merge in merges)
    moved = [
        call
        for call in _calls(after)
        if _method(call) == "to"
        and call.args
        and _text(call.args[0]) in ("'cpu'", '"cpu"')
        and call.lineno <= first
    ]
    on_cpu = [load for load in _loads(after) if _text(_keyword(load, "device_map")) in ("'cpu'", '"cpu"')]
    if not moved and not on_cpu:
        return "nothing is moved to the CPU before the merge"
    del text
    return None


def _batch_values(tree: ast.AST) -> list[int]:
    values = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg and node.arg.endswith("batch_size"):
            values += [
                n.value for n in ast.walk(node.value) if isinstance(n, ast.Constant) and type(n.value) is int
            ]
        if isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            if any(name.lower().endswith("batch_size") for name in names):
                values += [
                    n.value
                    for n in ast.walk(node.value)
                    if isinstance(n, ast.Constant) and type(n.value) is int
                ]
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                named = isinstance(key, ast.Constant) and str(key.value).endswith("batch_size")
                if named and isinstance(value, ast.Constant) and type(value.value) is int:
                    values.append(value.value)
        if isinstance(node, ast.arguments):  # def infer(..., batch_size: int = 4)
            parameters = [*node.posonlyargs, *node.args][-len(node.defaults) :] if node.defaults else []
            pairs = [
                *zip(parameters, node.defaults, strict=True),
                *zip(node.kwonlyargs, node.kw_defaults, strict=True),
            ]
            for parameter, default in pairs:
                named = parameter.arg.lower().endswith("batch_size")
                if named and isinstance(default, ast.Constant) and type(default.value) is int:
                    values.append(default.value)
    return values


def _half_batch(before: ast.AST, after: ast.AST) -> str | None:
    old, new = sorted(_batch_values(before)), sorted(_batch_values(after))
    if "batch_size" in ast.unparse(after) and len(new) >= len(old) and sum(new) < sum(old):
        return None
    if len(new) > len(old):  # a variable of an earlier cell, set again at the top
        return None
    return f"no batch size got smaller ({old} -> {new})"


def _chunk(before: ast.AST, after: ast.AST) -> str | None:
    return None if "vram_magic.chunked(" in ast.unparse(after) else "no vram_magic.chunked(...) call"


def _inference_mode(before: ast.AST, after: ast.AST) -> str | None:
    for node in ast.walk(after):
        if isinstance(node, ast.With) and any(
            "inference_mode" in _text(item.context_expr) for item in node.items
        ):
            return None
    return "no `with torch.inference_mode():`"


def _offload_cache(before: ast.AST, after: ast.AST) -> str | None:
    for call in _calls(after):
        if _method(call) == "generate" and _text(_keyword(call, "cache_implementation")) in (
            "'offloaded'",
            '"offloaded"',
        ):
            return None
    return 'no generate(..., cache_implementation="offloaded")'


MEANINGS: dict[str, Callable[[ast.AST, ast.AST], str | None]] = {
    "4bit": _quantized_to("4bit"),
    "8bit": _quantized_to("8bit"),
    "bf16": _bf16,
    "offload": _offload,
    "cpu": _cpu,
    "merge-cpu": _merge_on_cpu,
    "half-batch": _half_batch,
    "chunk": _chunk,
    "inference-mode": _inference_mode,
    "offload-cache": _offload_cache,
}
