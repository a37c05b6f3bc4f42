"""The fixes: each rewrites the user's cell so that it needs less memory, from one reading of it.

Each fix is a function ``(Cell, Options) -> Rewritten`` (its new code and the figures of what it changed),
or raises ``NotApplicable`` saying why not. They only rewrite: whether a fix is worth offering (it
parses, it changes what it should, the estimator says it fits, CPU RAM holds it) is ``vram_magic._checks``'s
check, made on the rewritten cell read again with the same reader.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import partial

import libcst as cst

from vram_magic._errors import NotApplicable
from vram_magic.cell import Cell, read_cell
from vram_magic.fixes import batch, cpu, dtype16, generation, merge, offload, quantize
from vram_magic.fixes._base import Options, Rewritten

Fixer = Callable[[Cell, Options], Rewritten]

FIXES: dict[str, Fixer] = {
    "4bit": partial(quantize.rewrite, bits=4),
    "8bit": partial(quantize.rewrite, bits=8),
    "bf16": dtype16.rewrite,
    "offload": offload.rewrite,
    "cpu": cpu.rewrite,
    "merge-cpu": merge.rewrite,
    "half-batch": batch.rewrite,
    "checkpointing": batch.checkpointing,
    "chunk": generation.chunk,
    "inference-mode": generation.inference_mode,
    "offload-cache": generation.offload_cache,
}
LOAD_FIXES = ("bf16", "8bit", "4bit", "offload", "cpu")
_OPTIONS: dict[str, tuple[str, ...]] = {
    "4bit": ("compute_dtype",),
    "bf16": ("dtype", "dtype_keyword"),
    "offload": ("max_memory", "offload_folder", "compute_dtype"),
    "half-batch": ("factor", "compute_dtype"),
    "checkpointing": ("compute_dtype",),
    "chunk": ("factor",),
}

__all__ = [
    "FIXES",
    "LOAD_FIXES",
    "NotApplicable",
    "Options",
    "Rewritten",
    "apply_fix",
    "diff",
    "rewrite",
]


def apply_fix(cell: Cell, fix: str, options: Options | None = None) -> Rewritten:
    """Fix ``fix`` made on a cell already read; raises ``NotApplicable`` when it does not apply."""
    return FIXES[fix](cell, options or Options())


def rewrite(source: str, fix: str, **options: object) -> str:
    """Return ``source`` with ``fix`` applied; raise ``NotApplicable`` when it would change nothing.

    Fixes: see ``FIXES``. Options: 4bit ``compute_dtype="bfloat16"|"float16"``; bf16 ``dtype`` and
    ``dtype_keyword="dtype"|"torch_dtype"``; offload ``max_memory={0: bytes, "cpu": bytes}``,
    ``offload_folder="offload"``; half-batch and chunk ``factor=2``; half-batch and checkpointing
    ``compute_dtype="float16"`` (a GPU without bfloat16: ``bf16=True`` becomes ``fp16=True``).
    """
    if fix not in FIXES:
        raise ValueError(f"unknown fix {fix!r}; the fixes are: {', '.join(FIXES)}")
    unknown = sorted(set(options) - set(_OPTIONS.get(fix, ())))
    if unknown:
        valid = ", ".join(_OPTIONS.get(fix, ())) or "none"
        raise ValueError(f"unknown option(s) for {fix}: {', '.join(unknown)}; valid: {valid}")
    try:
        cell = read_cell(source)
    except cst.ParserSyntaxError as exc:
        raise NotApplicable(f"this cell is not valid Python ({exc.message})", elsewhere=True) from exc
    return apply_fix(cell, fix, check_options(options)).code


def check_options(options: dict[str, object]) -> Options:
    """``Options`` from keyword options, each checked (a ValueError says what is wrong)."""
    checked: dict[str, object] = {}
    for name in ("compute_dtype", "dtype"):
        if name in options:
            if options[name] not in ("bfloat16", "float16"):
                raise ValueError(f'{name} must be "bfloat16" or "float16", not {options[name]!r}')
            checked[name] = options[name]
    if "dtype_keyword" in options:
        if options["dtype_keyword"] not in ("dtype", "torch_dtype"):
            raise ValueError(
                f'dtype_keyword must be "dtype" or "torch_dtype", not {options["dtype_keyword"]!r}'
            )
        checked["dtype_keyword"] = options["dtype_keyword"]
    if "offload_folder" in options:
        if not isinstance(options["offload_folder"], str):
            raise ValueError(f"offload_folder must be a string, not {options['offload_folder']!r}")
        checked["offload_folder"] = options["offload_folder"]
    if options.get("max_memory") is not None:
        checked["max_memory"] = _max_memory(options["max_memory"])
    if "factor" in options:
        factor = options["factor"]
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 2:
            raise ValueError(f"factor must be an integer of at least 2, not {factor!r}")
        checked["factor"] = factor
    return Options(**checked)  # type: ignore[arg-type]


def _max_memory(value: object) -> dict[int | str, int]:
    if not isinstance(value, dict) or not value:
        raise ValueError(f'max_memory must be a dict like {{0: bytes, "cpu": bytes}}, not {value!r}')
    checked: dict[int | str, int] = {}
    for key, size in value.items():
        good_key = isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool) and key >= 0)
        if not good_key or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"max_memory entries must be GPU index or name -> bytes, not {key!r}: {size!r}")
        checked[key] = size
    return checked


def diff(before: str, after: str) -> str:
    """A unified diff of a cell and its fixed version, for display."""
    return "".join(difflib.unified_diff(_lines(before), _lines(after), fromfile="cell", tofile="fixed cell"))


def _lines(text: str) -> list[str]:
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return lines
