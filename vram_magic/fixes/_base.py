"""The shape of a fix: options in, the rewritten cell (with the figures of what it changed) out."""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass, field

from vram_magic._types import Facts, facts
from vram_magic.cell import Cell, Load
from vram_magic.fixes._edit import Edits, apply

# Hub ids of checkpoints saved already quantized: their own config decides how they load.
PREQUANTIZED = re.compile(r"gptq|awq|bnb|[-_.](?:int4|int8|4bit|8bit|nf4|fp8|exl2)\b|gguf", re.IGNORECASE)


@dataclass(frozen=True)
class Options:
    """What a fix needs to know beyond the cell: ``compute_dtype`` and ``dtype`` (float16 where the GPU has
    no bfloat16), the keyword transformers takes for a dtype, ``max_memory`` per GPU and CPU for offloading,
    and how much smaller a batch gets."""

    compute_dtype: str = "bfloat16"
    dtype: str = "bfloat16"
    dtype_keyword: str = field(default_factory=lambda: default_dtype_keyword())
    max_memory: dict[int | str, int] | None = None
    offload_folder: str | None = None
    factor: int = 2


@dataclass(frozen=True)
class Rewritten:
    """A fix made: the new cell and what it changed (``Fix.change``: the models, the batch sizes, ...)."""

    key: str
    code: str
    change: Facts = ()


def finish(cell: Cell, key: str, edits: Edits, change: Facts = ()) -> Rewritten:
    return Rewritten(key, apply(cell.module, edits), change)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def models_changed(loads: list[Load]) -> Facts:
    """How many loads a fix changed, and the Hub id of the one model when it is known (a local folder's path
    says little and can be long)."""
    models = list(dict.fromkeys(load.model for load in loads if load.model))
    hub_id = models[0] if len(models) == 1 and _HUB_ID.match(models[0]) else None
    return facts(model=hub_id, count=len(loads))


def default_dtype_keyword() -> str:
    """``dtype`` from transformers 5 on (``torch_dtype`` works there but warns), else ``torch_dtype``."""
    try:
        major = int(importlib.metadata.version("transformers").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return "dtype"
    return "dtype" if major >= 5 else "torch_dtype"
