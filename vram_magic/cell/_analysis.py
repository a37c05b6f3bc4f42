"""What kind of work a cell (or the statement that failed) does, and the statement to show for a line."""

from __future__ import annotations

import libcst as cst

from vram_magic._types import CellAnalysis, CellKind
from vram_magic.cell._reader import Cell, read_cell
from vram_magic.cell._values import dotted

_MAX_SHOWN_LINES = 8


def kind_of(cell: Cell, line: int | None = None) -> CellKind:
    """The kind of the statement on ``line`` (1-based), else of the whole cell: merge, then load, then
    training, then generation (a cell that loads and merges is a merge)."""
    if line is not None:
        span = statement_span(cell, line)
        kind = _kind_in(cell, span) if span is not None else "other"
        if kind != "other":
            return kind
    return _kind_in(cell, None)


def statement_span(cell: Cell, line: int) -> tuple[int, int] | None:
    """The first and last line of the innermost simple statement holding ``line``, else of the top-level
    statement that does; None when no statement does."""
    spans = [span for _, span in cell.statements if span[0] <= line <= span[1]]
    if spans:
        return min(spans, key=lambda span: span[1] - span[0])
    for step in cell.steps:
        if step.lines[0] <= line <= step.lines[1]:
            return (line, line)  # the header of a loop or a branch: that line alone
    return None


def analyse_source(source: str, failed_line: int | None = None) -> CellAnalysis:
    """``analyse`` for cell text (a cell that does not parse is "other", with no statement)."""
    try:
        cell = read_cell(source)
    except cst.ParserSyntaxError:
        return CellAnalysis(kind="other", failed_line=failed_line)
    return analyse(cell, failed_line)


def analyse(cell: Cell, failed_line: int | None = None, shown_source: str | None = None) -> CellAnalysis:
    """The kind of the cell, the statement that failed as the user wrote it (``shown_source``: their text,
    when IPython's transforms changed it line for line, e.g. a ``%time`` line), and the names it binds and
    uses."""
    return CellAnalysis(
        kind=kind_of(cell, failed_line),
        failed_line=failed_line,
        failed_statement=_statement_text(cell, failed_line, shown_source),
        assigned_names=cell.assigned_names,
        used_names=cell.used_names,
        loads=sum(1 for load in cell.loads if load.kind in ("model", "peft", "pipeline")),
        generates=bool(cell.generates),
    )


def _statement_text(cell: Cell, line: int | None, shown_source: str | None) -> str | None:
    if line is None:
        return None
    span = statement_span(cell, line)
    if span is None:
        return None
    lines = cell.source.splitlines()
    if shown_source is not None and len(shown_source.splitlines()) == len(lines):
        lines = shown_source.splitlines()
    start, end = span
    if end - start + 1 > _MAX_SHOWN_LINES:  # a long call: the lines around the failed one
        start = max(start, line - _MAX_SHOWN_LINES // 2)
        end = min(end, start + _MAX_SHOWN_LINES - 1)
    text = "\n".join(lines[start - 1 : end])
    return text.strip("\n") or None


def _inside(lines: tuple[int, int], span: tuple[int, int] | None) -> bool:
    return span is None or (lines[0] <= span[1] and span[0] <= lines[1])


def _kind_in(cell: Cell, span: tuple[int, int] | None) -> CellKind:
    if any(_inside(merge.lines, span) for merge in cell.merges):
        return "merge"
    if any(_inside(load.lines, span) for load in cell.loads):
        return "load"
    if _trains_in(cell, span):
        return "training"
    inference = [each.lines for each in (*cell.generates, *cell.pipeline_calls, *cell.forwards)]
    if any(_inside(lines, span) for lines in (*inference, *cell.chunked_lines)):
        return "generation"
    if span is None and cell.batch_sizes:
        return "training"  # a cell that sets batch sizes and does nothing else we know trains, or batches
    return "other"


def _trains_in(cell: Cell, span: tuple[int, int] | None) -> bool:
    if any(_inside(lines, span) for lines in cell.training_lines):
        return True
    if any(_inside(config.lines, span) for config in cell.training_configs):
        return True
    if any(_inside(batch.lines, span) and batch.role == "train" for batch in cell.batch_sizes):
        return True
    return any(_inside(lines, span) for node, lines in _calls_named_train(cell))


def _calls_named_train(cell: Cell) -> list[tuple[cst.Call, tuple[int, int]]]:
    """Calls of functions named ``train...`` or classes named ``...Trainer`` (a training step the cell
    runs through the user's own function)."""
    found = []
    for node, span in cell.statements:
        for call in _calls(node):
            name = (dotted(call.func) or "").rsplit(".", 1)[-1]
            if name.lower().startswith("train") or name.endswith("Trainer"):
                found.append((call, span))
    return found


def _calls(node: cst.CSTNode) -> list[cst.Call]:
    found = []
    pending = [node]
    while pending:
        current = pending.pop()
        if isinstance(current, cst.Call):
            found.append(current)
        pending.extend(current.children)
    return found
