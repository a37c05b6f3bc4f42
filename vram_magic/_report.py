"""One report for one failure: read the cell, diagnose, make the fixes runnable and checked.

Pure Python (no IPython): the magics hand in what they observed (the error's figures, a snapshot, the
holders, what the cleanup freed) and get back the ``Report`` every renderer reads. Preflight's report, for a
load that was not run, is made the same way.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import libcst as cst

from vram_magic._checks import Context, Room, make_runnable, room_after_cleanup
from vram_magic._diagnose import ADVISE_BY_HAND, LOAD_FIXES, TRAINING_FIXES, diagnose
from vram_magic._preflight import Verdict, load_at
from vram_magic._train_preflight import TrainingVerdict, replanned, split_that_fits
from vram_magic._types import (
    Cause,
    CellAnalysis,
    Cleanup,
    Fix,
    Holder,
    OOMInfo,
    Preflight,
    Report,
    Snapshot,
    facts,
)
from vram_magic.cell import Cell, analyse, read_cell

# Reading costs about half a millisecond per syntax node: a cell larger than this (a long literal, generated
# code) is not read, and gets the advice that needs no reading of it.
MAX_READ_NODES = 8000
PREFLIGHT_READ_NODES = 1500  # before every run of a cell: at most about 0.7 s


def read(
    source: str, body: str, namespace: Mapping[str, object], max_nodes: int = MAX_READ_NODES
) -> Cell | None:
    """The reading of the text fixes rewrite: the user's own text when it is Python (diffs then look like
    their code), else IPython's transform of it; None when neither parses, the cell has more than
    ``max_nodes`` syntax nodes, or it nests deeper than the reader can follow."""
    for text in (source, body):
        try:
            tree = ast.parse(text)
            if sum(1 for _ in ast.walk(tree)) > max_nodes:
                return None
            return read_cell(text, namespace)
        except (SyntaxError, cst.ParserSyntaxError, ValueError):
            continue
        except RecursionError:  # a chain or sum hundreds of terms deep: too deep for libcst
            return None
    return None


def explain(
    *,
    oom: OOMInfo,
    error_text: str,
    traceback_text: str,
    source: str,
    body: str,
    failed_line: int | None,
    snapshot: Snapshot,
    holders: tuple[Holder, ...],
    cleanup: Cleanup,
    namespace: Mapping[str, object],
    bytes_freed_by: Callable[[Sequence[str]], int],
) -> Report:
    """The report of an OOM in a cell. ``failed_line`` counts the ``%%oomsafe`` line as line 1."""
    cell = read(source, body, namespace)
    line = failed_line - 1 if failed_line is not None else None
    if cell is None:
        analysis = CellAnalysis(kind="other", failed_line=failed_line)
    else:
        analysis = replace(analyse(cell, line, shown_source=source), failed_line=failed_line)
    causes, fixes = diagnose(oom, snapshot, holders, analysis, cleanup, bytes_freed_by)
    room = room_after_cleanup(snapshot, oom, cleanup.best_bytes)
    planned = fixes
    if cell is not None:
        failed = load_at(cell, line) if line is not None else None
        context = Context(
            cell=cell,
            namespace=namespace,
            oom=oom,
            room=room,
            failed_in_load=analysis.kind == "load",
            advise_elsewhere=ADVISE_BY_HAND.get(analysis.kind, frozenset()),
            failed_load=cell.loads.index(failed) if failed is not None else None,
        )
        planned = make_runnable(fixes, context)
    return Report(
        error_text=error_text,
        oom=oom,
        cell=source,
        analysis=analysis,
        snapshot=snapshot,
        holders=holders,
        cleanup=cleanup,
        causes=causes,
        fixes=planned,
        traceback_text=traceback_text,
    )


def preflight_report(
    cell: Cell, verdict: Verdict, snapshot: Snapshot, room: Room, namespace: Mapping[str, object]
) -> Report:
    """A load estimated not to fit, as a report: why, and the load fixes with the estimator's verdicts."""
    load, first = verdict.biggest
    context = Context(
        cell=cell,
        namespace=namespace,
        oom=None,
        room=replace(room, gpu_bytes=verdict.room_bytes),
        advise_elsewhere=ADVISE_BY_HAND["load"],
        failed_load=cell.loads.index(load) if load in cell.loads else None,
    )
    preflight = Preflight(verdict.need_bytes, verdict.room_bytes, on_gpu=bool(snapshot.gpus))
    cause = Cause("estimate", facts(estimate=first))
    return _not_run(cell, snapshot, cause, make_runnable(LOAD_FIXES, context), preflight)


def _not_run(
    cell: Cell, snapshot: Snapshot, cause: Cause, fixes: tuple[Fix, ...], found: Preflight
) -> Report:
    """The report of a cell preflight did not run: nothing failed, nothing was freed."""
    return Report(
        error_text="",
        oom=None,
        cell=cell.source,
        analysis=analyse(cell),
        snapshot=snapshot,
        holders=(),
        cleanup=Cleanup(released=(), reclaimed_bytes=None, freed_tensor_bytes=0),
        causes=(cause,),
        fixes=fixes,
        preflight=found,
    )


def training_preflight_report(
    cell: Cell, verdict: TrainingVerdict, snapshot: Snapshot, room: Room, namespace: Mapping[str, object]
) -> Report:
    """Training estimated not to fit, as a report: the floor and its parts, and the training fixes with the
    estimate of each fixed cell."""
    step = verdict.step
    context = Context(
        cell=cell,
        namespace=namespace,
        oom=None,
        room=replace(room, gpu_bytes=verdict.room_bytes),
        failed_in_load=False,
        advise_elsewhere=ADVISE_BY_HAND["training"],
        training_preflight=True,
        gpu_here=bool(snapshot.gpus),
    )
    found = facts(
        model=step.model_name,
        batch_size=step.batch_size,
        sequence=step.sequence,
        need_bytes=verdict.need_bytes,
        estimate_bytes=verdict.estimate_bytes,
        parts=verdict.parts,
        checkpointing=step.checkpointing,
        optimizer=step.optimizer,
    )
    fixes = _for_a_held_trainer(make_runnable(TRAINING_FIXES, context), verdict)
    preflight = Preflight(verdict.need_bytes, verdict.room_bytes, on_gpu=bool(snapshot.gpus), kind="training")
    return _not_run(cell, snapshot, Cause("training-estimate", found), fixes, preflight)


def _for_a_held_trainer(fixes: tuple[Fix, ...], verdict: TrainingVerdict) -> tuple[Fix, ...]:
    """For a trainer an earlier cell built, the settings to write there, each sized by the estimate: the
    batch split that fits, and checkpointing with the paged 8-bit optimizer."""
    held = verdict.step.held_trainer
    if held is None:
        return fixes
    where = f"# in the TrainingArguments of the cell that built `{held}`:\n"
    by_hand = f"`{held}` was built in an earlier cell: change its TrainingArguments there, build it again"
    lighter = replanned(verdict, checkpointing=True, optimizer="paged_adamw_8bit")
    made = {
        "checkpointing": Fix(
            "checkpointing",
            where + 'gradient_checkpointing=True, optim="paged_adamw_8bit"',
            needed_bytes=lighter.estimate_bytes,
            fits=lighter.surely_fits,
            by_hand=by_hand,
        )
    }
    split = split_that_fits(verdict)
    if split is not None:
        old, new = verdict.step, split.step
        made["half-batch"] = Fix(
            "half-batch",
            where + f"per_device_train_batch_size={new.batch_size}, "
            f"gradient_accumulation_steps={new.accumulation}",
            needed_bytes=split.estimate_bytes,
            fits=True,
            change=facts(
                role="train",
                old=old.batch_size,
                new=new.batch_size,
                multiplier=old.batch_size // new.batch_size,
                accumulation=(old.accumulation, new.accumulation),
            ),
            by_hand=by_hand,
        )
    return tuple(made.get(fix.key, fix) for fix in fixes)
