"""One reading of a notebook cell: what it loads, moves, merges, generates and trains, and with what sizes.

Every part of vram_magic that needs to know what a cell does asks this package: preflight (which loads go to
the GPU), the diagnosis (what kind of cell failed, at which statement), and the fixes (what to rewrite). The
cell is parsed once with libcst; its names are resolved against the cell itself and the notebook's namespace.
Pure: no IPython, no torch (a namespace's objects are only inspected, never called).
"""

from __future__ import annotations

from vram_magic.cell._analysis import analyse, analyse_source, kind_of, statement_span
from vram_magic.cell._batches import ACCUMULATION_NAMES, is_batch_name
from vram_magic.cell._facts import (
    Accumulation,
    BatchSize,
    Forward,
    Generate,
    Load,
    Merge,
    Move,
    PipelineCall,
    TrainerRun,
    TrainingConfig,
)
from vram_magic.cell._reader import Cell, read_cell
from vram_magic.cell._values import Held, Names, dotted

__all__ = [
    "ACCUMULATION_NAMES",
    "Accumulation",
    "BatchSize",
    "Cell",
    "Forward",
    "Generate",
    "Held",
    "Load",
    "Merge",
    "Move",
    "Names",
    "PipelineCall",
    "TrainerRun",
    "TrainingConfig",
    "analyse",
    "analyse_source",
    "dotted",
    "is_batch_name",
    "kind_of",
    "read_cell",
    "statement_span",
]
