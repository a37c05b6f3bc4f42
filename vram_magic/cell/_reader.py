"""The second pass: what each call of the cell is (a load, a move, a merge, a generation...).

``read_cell`` parses once with libcst, walks once (``_walk``), then decides, in source order, what every
call is, using the cell's own bindings and the notebook's namespace (``_values.Names``): loads and moves
(``_loads``), the work done with models (``_work``), batch sizes (``_batches``), on what they share
(``_base``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import libcst as cst
from libcst.metadata import MetadataWrapper

from vram_magic.cell._base import ReaderBase
from vram_magic.cell._batches import BatchReading
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
from vram_magic.cell._loads import LoadReading
from vram_magic.cell._values import Names, bound_names, dotted, target_names
from vram_magic.cell._walk import Step, Walker
from vram_magic.cell._work import WorkReading


@dataclass(frozen=True, eq=False)
class Cell:
    """One reading of a cell: its text, its syntax tree, and what it does (see ``_facts``)."""

    source: str
    module: cst.Module
    names: Names
    steps: tuple[Step, ...]
    loads: tuple[Load, ...]
    moves: tuple[Move, ...]
    batch_sizes: tuple[BatchSize, ...]
    accumulations: tuple[Accumulation, ...]
    training_configs: tuple[TrainingConfig, ...]
    trainer_runs: tuple[TrainerRun, ...]  # ``trainer.train()``: of a trainer the cell builds, or one it holds
    merges: tuple[Merge, ...]
    generates: tuple[Generate, ...]
    forwards: tuple[Forward, ...]
    pipeline_calls: tuple[PipelineCall, ...]
    trains: bool  # trainer.train(), loss.backward()
    uses_adapters: bool  # LoRA: peft in the cell, or the model it trains is a PeftModel
    training_lines: tuple[tuple[int, int], ...]
    chunked_lines: tuple[tuple[int, int], ...]  # vram_magic.chunked(...)(...): generation or inference
    assigned_names: tuple[str, ...]
    used_names: tuple[str, ...]
    statements: tuple[tuple[cst.CSTNode, tuple[int, int]], ...]

    def loads_to_gpu(self) -> tuple[Load, ...]:
        """Loads that put weights on a GPU (or may: an unknown place), not those meant for the CPU."""
        return tuple(load for load in self.loads if load.kind != "foreign" and load.where != "cpu")


def read_cell(source: str, namespace: Mapping[str, object] | None = None) -> Cell:
    """Read ``source`` (Python: IPython's transforms already applied). Raises ``libcst.ParserSyntaxError``."""
    module = cst.parse_module(source)
    wrapper = MetadataWrapper(module, unsafe_skip_copy=True)
    walker = Walker()
    wrapper.visit(walker)
    return _Reader(source, module, Names(module, namespace), walker.walk).cell()


class _Reader(LoadReading, WorkReading, BatchReading):
    """Every part of the reading, on one cell."""

    def cell(self) -> Cell:
        loads = [load for site in self.walk.calls if (load := self._load(site)) is not None]
        self.loads_by_call = {id(load.call): load for load in loads}
        moves = [move for site in self.walk.calls if (move := self._move(site)) is not None]
        loads = self._given_to_pipelines([self._placed(load, moves) for load in loads])
        self.loads_by_call = {id(load.call): load for load in loads}
        moves = [replace(move, load=self._source_load(move.receiver, move.lines[0])) for move in moves]
        trains, training_lines = self._training()
        chunked = tuple(
            site.lines
            for site in self.walk.calls
            if isinstance(site.call.func, cst.Call) and dotted(site.call.func.func) == "vram_magic.chunked"
        )
        uses_adapters = self._uses_adapters()
        configs = [config for site in self.walk.calls if (config := self._training_config(site))]
        trainer_runs = [run for site in self.walk.calls if (run := self._trainer_run(site)) is not None]
        merges = [merge for site in self.walk.calls if (merge := self._merge(site)) is not None]
        generates = [g for site in self.walk.calls if (g := self._generate(site)) is not None]
        forwards = [f for site in self.walk.calls if (f := self._forward(site, trains)) is not None]
        pipeline_calls = [p for site in self.walk.calls if (p := self._pipeline_call(site)) is not None]
        batches = self._batch_sizes(trains, {id(c.call) for c in configs})
        return Cell(
            source=self.source,
            module=self.module,
            names=self.names,
            steps=tuple(self.walk.steps),
            loads=tuple(loads),
            moves=tuple(moves),
            batch_sizes=tuple(batches),
            accumulations=tuple(self._accumulations()),
            training_configs=tuple(configs),
            trainer_runs=tuple(trainer_runs),
            merges=tuple(merges),
            generates=tuple(generates),
            forwards=tuple(forwards),
            pipeline_calls=tuple(pipeline_calls),
            trains=trains,
            uses_adapters=uses_adapters,
            training_lines=training_lines,
            chunked_lines=chunked,
            assigned_names=self._assigned_names(),
            used_names=tuple(dict.fromkeys(use.name for use in self.walk.uses)),
            statements=tuple(self.walk.statements),
        )

    def _assigned_names(self) -> tuple[str, ...]:
        """The names the cell binds in its own scope, in order: assignments, imports, defs, loop and with
        targets, also inside branches and loops (not inside functions, lambdas or comprehensions)."""
        names: list[str] = []
        for step in self.walk.steps:
            pending: list[cst.CSTNode] = [step.node]
            while pending:
                node = pending.pop(0)
                if isinstance(node, (cst.FunctionDef, cst.ClassDef)):
                    names.append(node.name.value)
                    continue
                if isinstance(node, (cst.Lambda, cst.ListComp, cst.SetComp, cst.DictComp, cst.GeneratorExp)):
                    continue
                if isinstance(node, cst.For):
                    names.extend(sorted(target_names(node.target), key=self.source.find))
                elif isinstance(
                    node, (cst.Assign, cst.AnnAssign, cst.AugAssign, cst.WithItem, cst.Import, cst.ImportFrom)
                ):
                    names.extend(sorted(bound_names(node), key=self.source.find))
                if isinstance(node, cst.With) and step.node is node:
                    for item in node.items:
                        names.extend(sorted(bound_names(item)))
                    continue  # its body is steps of its own
                pending.extend(node.children)
        return tuple(dict.fromkeys(names))


__all__ = ["Cell", "ReaderBase", "read_cell"]
