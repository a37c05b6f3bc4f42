"""A report or a snapshot as a list of sections: what to say, in order, before any view decides how.

The text view, the static HTML view and the widget each draw these same sections, so they say the same
things in the same order; only the drawing differs (a GPU's figures are rows in text and a bar in HTML).
"""

from __future__ import annotations

from dataclasses import dataclass

from vram_magic._diagnose import failing_gpu
from vram_magic._types import (
    Attempt,
    Cleanup,
    CpuMemory,
    Fix,
    GpuSnapshot,
    Holder,
    OOMInfo,
    ProcessMemory,
    Recording,
    Report,
    Snapshot,
)
from vram_magic._units import format_bytes
from vram_magic.render._postmortem import (
    allocation_items,
    grower_items,
    held_items,
    recording_text,
    render_post_mortem,
)
from vram_magic.render._words import CELL_WORDS, summary_line

HOLDERS_TITLE = "What holds memory (by name)"
HELD_TITLE = "What the failed call held (freed now; `%vram debug` shows every frame)"
RECORDED_TITLE = "Live allocations when it failed, by the line that made them (--record)"
GROWERS_TITLE = "Cells that grew memory most since it was lowest (%vram track)"
FRAMES_TITLE = "The failed call's frames (%vram debug)"
FIX_HINT = "most promising first; run one with %vram fix N, see its change with %vram fix N --diff"


@dataclass(frozen=True)
class Summary:
    """The first line, in bold where a view can."""

    text: str


@dataclass(frozen=True)
class Paragraph:
    """Prose; `backticked` names are code where a view can show code."""

    text: str
    indent_first: bool = False  # text: indent the first line like the rest


@dataclass(frozen=True)
class Figures:
    """Labelled figures (rows of label, value, depth); ``gpu``, when known, is drawn as a bar instead."""

    heading: str
    rows: tuple[tuple[str, str, int], ...]
    gpu: GpuSnapshot | None = None


@dataclass(frozen=True)
class Statement:
    """A line of the user's code, introduced by ``lead``."""

    lead: str
    code: str


@dataclass(frozen=True)
class Holders:
    heading: str
    holders: tuple[Holder, ...]
    limit: int = 8


@dataclass(frozen=True)
class Items:
    """A list under a heading, numbered or bulleted."""

    heading: str
    items: tuple[str, ...]
    numbered: bool = True
    wrap: bool = True  # text: wrap long items (a list of runs keeps one run a line)


@dataclass(frozen=True)
class Fixes:
    heading: str
    hint: str
    fixes: tuple[Fix, ...]


@dataclass(frozen=True)
class Details:
    """Text folded away where a view can fold: the traceback and the error, the failed call's frames."""

    text: str
    title: str = "Details"


Section = Summary | Paragraph | Figures | Statement | Holders | Items | Fixes | Details


def report_sections(report: Report) -> list[Section]:
    """Summary, figures at the failure, what was freed, the failed line, holders, causes, fixes, attempts,
    names already re-bound, details."""
    sections: list[Section] = [Summary(summary_line(report))]
    figures = _oom_figures(report)
    if figures is not None:
        sections.append(figures)
    if report.cleanup.best_bytes > 0:
        sections.append(Paragraph(cleanup_text(report.cleanup, " held by the failed cell")))
    failed = _failed(report)
    if failed is not None:
        sections.append(failed)
    if report.holders:
        sections.append(Holders(HOLDERS_TITLE, report.holders))
    held = held_items(report.post_mortem) if report.post_mortem is not None else ()
    if held:
        sections.append(Items(HELD_TITLE, held, numbered=False))
    if report.recording is not None:
        sections += _recording_sections(report.recording)
    if report.growers:
        sections.append(Items(GROWERS_TITLE, grower_items(report.growers), numbered=False))
    if report.causes:
        sections.append(Items("Why", tuple(cause.text for cause in report.causes)))
    if report.fixes:
        sections.append(Fixes("Fixes", FIX_HINT, report.fixes))
    if report.attempts:
        sections.append(attempts_section(report.attempts))
    if report.rebound_names:
        names = ", ".join(report.rebound_names)
        said = f"Already re-bound by the failed run before it failed: {names} (their old values are gone)."
        sections.append(Paragraph(said, indent_first=True))
    if report.post_mortem is not None:
        sections.append(Details(render_post_mortem(report.post_mortem), FRAMES_TITLE))
    details = details_text(report)
    if details:
        sections.append(Details(details))
    return sections


def _recording_sections(recording: Recording) -> list[Section]:
    sections: list[Section] = []
    if recording.groups:
        sections.append(Items(RECORDED_TITLE, allocation_items(recording.groups), numbered=False))
    saved = recording_text(recording)
    if saved:
        sections.append(Paragraph(saved, indent_first=True))
    return sections


def snapshot_sections(snapshot: Snapshot) -> list[Section]:
    """Each GPU's figures (or why there are none), CPU RAM, and what could not be read."""
    sections: list[Section] = []
    if not snapshot.gpus:
        sections.append(Paragraph(no_gpu_text(snapshot)))
    sections += [gpu_figures(gpu) for gpu in snapshot.gpus]
    sections.append(_cpu_figures(snapshot.cpu))
    if snapshot.gpus and snapshot.problems:
        sections.append(Items("Could not read", snapshot.problems, numbered=False))
    return sections


def gpu_figures(g: GpuSnapshot, heading: str | None = None) -> Figures:
    rows = [
        ("total", format_bytes(g.total_bytes), 0),
        ("free", format_bytes(g.free_bytes), 0),
        ("this process", format_bytes(g.process_bytes), 0),
    ]
    for label, value in (
        ("PyTorch allocated", g.allocated_bytes),
        ("reserved but unallocated", g.unallocated_reserved_bytes),
        ("non-PyTorch", g.non_pytorch_bytes),
    ):
        if value is not None:
            rows.append((label, format_bytes(value), 1))
    if g.others_are_remainder:
        rows.append(
            (
                "other processes",
                f"{format_bytes(g.others_bytes)}  (remainder: total - free - this process)",
                0,
            )
        )
    elif g.other_processes:
        known = [p.used_bytes for p in g.other_processes if p.used_bytes is not None]
        total = g.others_bytes if g.others_bytes is not None else sum(known)
        rows.append(("other processes", format_bytes(total), 0))
        rows += [(f"pid {p.pid}", format_bytes(p.used_bytes), 1) for p in g.other_processes]
    else:
        rows.append(("other processes", format_bytes(g.others_bytes), 0))
    if g.cap_bytes is not None:
        rows.append(("cap on this process", format_bytes(g.cap_bytes), 0))
    title = heading or (f"GPU {g.index}: {g.name}" if g.name else f"GPU {g.index}")
    return Figures(title, tuple(rows), g)


def _cpu_figures(c: CpuMemory) -> Figures:
    available = f"{format_bytes(c.available_bytes)} of {format_bytes(c.total_bytes)}"
    rows = (("this process (RSS)", format_bytes(c.process_rss_bytes), 0), ("available", available, 0))
    return Figures("CPU RAM", rows)


def no_gpu_text(s: Snapshot) -> str:
    """Why there are no GPU figures, and what still works."""
    missing = "; ".join(s.problems) if s.problems else "no GPU is visible to this process"
    return (
        f"No GPU figures: {missing}. What still works: the CPU RAM figures below, and `%%oomsafe` "
        "still catches out-of-memory errors and frees what a cell pinned."
    )


def _oom_figures(report: Report) -> Figures | None:
    """The figures of the message; drawn as the failing GPU's bar where a view draws bars."""
    oom = report.oom
    rows: list[tuple[str, str, int]] = []
    if oom is not None:
        for label, value in (
            ("requested", oom.requested_bytes),
            ("free on the GPU", oom.free_bytes),
            ("total", oom.total_bytes),
            ("allowed (cap)", oom.allowed_bytes),
            ("PyTorch allocated", oom.allocated_bytes),
            ("reserved but unallocated", oom.unallocated_reserved_bytes),
            ("this process", oom.process_bytes),
        ):
            if value is not None:
                rows.append((label, format_bytes(value), 0))
        for i, (pid, used) in enumerate(oom.other_processes):
            rows.append(("other processes" if i == 0 else "", f"pid {pid}: {format_bytes(used)}", 0))
    gpu = gpu_when_it_failed(report)
    if not rows and gpu is None:
        return None
    index = oom.device_index if oom is not None and oom.device_index is not None else None
    where = f" (GPU {index})" if index is not None else ""
    return Figures(f"Memory when it failed{where}", tuple(rows), gpu)


def gpu_when_it_failed(r: Report) -> GpuSnapshot | None:
    """The failing GPU as the OOM message saw it; else as the snapshot after the cleanup sees it."""
    oom, seen = r.oom, failing_gpu(r.snapshot, r.oom)
    if oom is None or oom.total_bytes is None:
        return seen
    index = oom.device_index if oom.device_index is not None else 0
    return _gpu_from_oom(oom, index, seen.name if seen else None)


def _gpu_from_oom(oom: OOMInfo, index: int, name: str | None) -> GpuSnapshot:
    others = None
    remainder = False
    if oom.other_processes:
        others = sum(used for _, used in oom.other_processes)
    elif oom.total_bytes is not None and oom.free_bytes is not None and oom.process_bytes is not None:
        others = max(oom.total_bytes - oom.free_bytes - oom.process_bytes, 0)
        remainder = True
    return GpuSnapshot(
        index=index,
        name=name,
        total_bytes=oom.total_bytes,
        free_bytes=oom.free_bytes,
        allocated_bytes=oom.allocated_bytes,
        reserved_bytes=oom.reserved_bytes,
        process_bytes=oom.process_bytes,
        cap_bytes=oom.allowed_bytes,
        other_processes=tuple(ProcessMemory(pid, used) for pid, used in oom.other_processes),
        others_bytes=others,
        others_are_remainder=remainder,
    )


def _failed(report: Report) -> Statement | Paragraph | None:
    a = report.analysis
    if a.failed_line is None and a.failed_statement is None:
        return None
    where = f"line {a.failed_line}" if a.failed_line is not None else "a line"
    cell = "the cell" if a.kind == "other" else f"{CELL_WORDS[a.kind]} cell"
    lead = f"Failed at {where} of {cell}"
    if not a.failed_statement:
        return Paragraph(lead + ".")
    return Statement(lead + ":", a.failed_statement.strip("\n"))


def cleanup_text(c: Cleanup, held: str = "") -> str:
    """``Freed 3.00 GiB (released: a, b).`` or ``Nothing was freed.`` (what ``%vram free`` prints)."""
    text = f"Freed {format_bytes(c.best_bytes)}{held}" if c.best_bytes > 0 else "Nothing was freed"
    if c.released:
        text += f" (released: {', '.join(c.released)})"
    return text + "."


def attempts_section(attempts: tuple[Attempt, ...]) -> Items:
    total = sum(a.seconds for a in attempts)
    items = tuple(
        f"{a.label}: {'worked' if a.succeeded else a.error or 'out of memory'} ({a.seconds:.1f} s)"
        for a in attempts
    )
    return Items(f"Attempts by --auto ({len(attempts)} runs, {total:.1f} s)", items, wrap=False)


def details_text(r: Report) -> str:
    """The traceback, then the error unless the traceback already ends with it (it usually does)."""
    body = r.traceback_text.rstrip()
    error = r.error_text.strip()
    if error.split(": ", 1)[-1] not in body:
        body = f"{body}\n{error}".strip()
    return body
