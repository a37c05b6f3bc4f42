"""Snapshots and reports as plain text: the one true wording.

Pure: no IPython, ipywidgets or torch. The widget view reuses ``summary_line`` and ``format_bytes``,
and every bundle carries ``render_report``/``render_snapshot`` as its text/plain.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable

from vram_magic._types import (
    Attempt,
    CellAnalysis,
    CellKind,
    Cleanup,
    CpuMemory,
    Fix,
    GpuSnapshot,
    Holder,
    OOMInfo,
    OOMKind,
    Report,
    Snapshot,
)
from vram_magic._units import format_bytes

WIDTH = 88
LABEL_WIDTH = 30
HOLDERS_TITLE = "What holds memory (by name)"
FIX_HINT = "most promising first; run one with %vram fix N, see its change with %vram fix N --diff"

OOM_HEADS: dict[OOMKind, str] = {
    "cuda": "CUDA out of memory",
    "hip": "ROCm (HIP) out of memory",
    "xpu": "Intel XPU out of memory",
    "mps": "Apple MPS out of memory",
    "cpu": "CPU RAM out of memory",
    "dispatch": "Not enough GPU memory (modules would be dispatched to CPU or disk)",
}

CELL_WORDS: dict[CellKind, str] = {
    "load": "a model load",
    "merge": "a LoRA merge",
    "training": "a training step",
    "generation": "generation",
    "other": "this cell",
}


def _row(label: str, value: str, indent: int = 2) -> str:
    """``label`` padded to a column, then ``value``; long labels just get two spaces."""
    pad = max(LABEL_WIDTH - indent, len(label) + 2)
    return f"{' ' * indent}{label:<{pad}}{value}"


def _wrap(text: str, indent: str, first: str | None = None) -> list[str]:
    first = indent if first is None else first
    lines = textwrap.wrap(
        text,
        WIDTH,
        initial_indent=first,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )
    return lines or [first.rstrip()]


def summary_line(r: Report) -> str:
    """One line: what ran out, where, the figures that matter, and what was freed."""
    if r.headline is not None:
        return r.headline
    oom = r.oom
    head = OOM_HEADS[oom.kind] if oom else "Out of memory"
    text = f"{head} in {CELL_WORDS[r.analysis.kind]}"
    figures: list[str] = []
    if oom is not None:
        free = oom.room_bytes()
        if oom.requested_bytes is not None:
            figures.append(f"asked for {format_bytes(oom.requested_bytes)}")
            if free is not None:
                figures.append(f"with {format_bytes(free)} free")
        elif free is not None:
            figures.append(f"{format_bytes(free)} free")
        if oom.allowed_bytes is not None:
            figures.append(f"under a {format_bytes(oom.allowed_bytes)} cap")
    if figures:
        text += ": " + " ".join(figures)
    freed = r.cleanup.best_bytes
    if freed > 0:
        text += f"; freed {format_bytes(freed)}"
    return text + "."


# --- snapshots -----------------------------------------------------------------------------------


def _gpu_lines(g: GpuSnapshot) -> list[str]:
    lines = [f"GPU {g.index}: {g.name}" if g.name else f"GPU {g.index}"]
    lines.append(_row("total", format_bytes(g.total_bytes)))
    lines.append(_row("free", format_bytes(g.free_bytes)))
    lines.append(_row("this process", format_bytes(g.process_bytes)))
    for label, value in (
        ("PyTorch allocated", g.allocated_bytes),
        ("reserved but unallocated", g.unallocated_reserved_bytes),
        ("non-PyTorch", g.non_pytorch_bytes),
    ):
        if value is not None:
            lines.append(_row(label, format_bytes(value), indent=4))
    if g.others_are_remainder:
        others = f"{format_bytes(g.others_bytes)}  (remainder: total - free - this process)"
        lines.append(_row("other processes", others))
    elif g.other_processes:
        known = [p.used_bytes for p in g.other_processes if p.used_bytes is not None]
        total = g.others_bytes if g.others_bytes is not None else sum(known)
        lines.append(_row("other processes", format_bytes(total)))
        lines += [_row(f"pid {p.pid}", format_bytes(p.used_bytes), indent=4) for p in g.other_processes]
    else:
        lines.append(_row("other processes", format_bytes(g.others_bytes)))
    if g.cap_bytes is not None:
        lines.append(_row("cap on this process", format_bytes(g.cap_bytes)))
    return lines


def _cpu_lines(c: CpuMemory) -> list[str]:
    return [
        "CPU RAM",
        _row("this process (RSS)", format_bytes(c.process_rss_bytes)),
        _row("available", f"{format_bytes(c.available_bytes)} of {format_bytes(c.total_bytes)}"),
    ]


def no_gpu_paragraph(s: Snapshot) -> str:
    """Why there are no GPU figures, and what still works."""
    missing = "; ".join(s.problems) if s.problems else "no GPU is visible to this process"
    return (
        f"No GPU figures: {missing}. What still works: the CPU RAM figures below, and %%oomsafe "
        "still catches out-of-memory errors and frees what a cell pinned."
    )


def render_snapshot(s: Snapshot) -> str:
    """``%vram`` as text: each GPU's figures, then CPU RAM."""
    lines: list[str] = []
    if not s.gpus:
        lines += _wrap(no_gpu_paragraph(s), "")
        lines.append("")
    for g in s.gpus:
        lines += _gpu_lines(g)
        lines.append("")
    lines += _cpu_lines(s.cpu)
    if s.gpus and s.problems:
        lines += ["", "Could not read"]
        for p in s.problems:
            lines += _wrap(p, "    ", "  - ")
    return "\n".join(lines)


# --- reports -------------------------------------------------------------------------------------


def _oom_lines(oom: OOMInfo) -> list[str]:
    rows = [
        ("requested", oom.requested_bytes),
        ("free on the GPU", oom.free_bytes),
        ("total", oom.total_bytes),
        ("allowed (cap)", oom.allowed_bytes),
        ("PyTorch allocated", oom.allocated_bytes),
        ("reserved but unallocated", oom.unallocated_reserved_bytes),
        ("this process", oom.process_bytes),
    ]
    lines = [_row(label, format_bytes(v)) for label, v in rows if v is not None]
    for i, (pid, used) in enumerate(oom.other_processes):
        lines.append(_row("other processes" if i == 0 else "", f"pid {pid}: {format_bytes(used)}"))
    if not lines:
        return []
    where = f" (GPU {oom.device_index})" if oom.device_index is not None else ""
    return [f"Memory when it failed{where}", *lines]


def _cleanup_line(c: Cleanup) -> list[str]:
    return _wrap(render_cleanup(c, " held by the failed cell"), "  ", "") if c.best_bytes > 0 else []


def render_cleanup(c: Cleanup, held: str = "") -> str:
    """``Freed 3.00 GiB (released: a, b).`` or ``Nothing was freed.`` (what ``%vram free`` prints)."""
    text = f"Freed {format_bytes(c.best_bytes)}{held}" if c.best_bytes > 0 else "Nothing was freed"
    if c.released:
        text += f" (released: {', '.join(c.released)})"
    return text + "."


def failed_where(a: CellAnalysis) -> str:
    """``Failed at line 3 of a model load cell`` (``of the cell`` when the kind is unknown)."""
    where = f"line {a.failed_line}" if a.failed_line is not None else "a line"
    cell = "the cell" if a.kind == "other" else f"{CELL_WORDS[a.kind]} cell"
    return f"Failed at {where} of {cell}"


def _failed_lines(r: Report) -> list[str]:
    a = r.analysis
    if a.failed_line is None and a.failed_statement is None:
        return []
    lines = [failed_where(a) + (":" if a.failed_statement else ".")]
    if a.failed_statement:
        lines += ["    " + ln for ln in a.failed_statement.strip("\n").splitlines()]
    return lines


def render_holders(holders: Iterable[Holder], device: str, limit: int = 20) -> str:
    """``%vram who``: the names holding memory on ``device``, biggest first, with what they share."""
    lines = _holder_lines(holders, f"Names holding {device} memory", limit)
    return "\n".join(lines) if lines else f"No name in the notebook holds {device} memory."


def _holder_lines(holders: Iterable[Holder], title: str = HOLDERS_TITLE, limit: int = 8) -> list[str]:
    hs = list(holders)
    if not hs:
        return []
    shown = hs[:limit]
    name_w = max(len(h.name) for h in shown) + 2
    type_w = max(len(h.type_name) for h in shown) + 2
    lines = [title]
    for h in shown:
        line = f"  {h.name:<{name_w}}{h.type_name:<{type_w}}{format_bytes(h.total_bytes):>11}"
        if h.shared_with:
            line += f"  shares {format_bytes(h.shared_bytes)} with {', '.join(h.shared_with)}"
        lines.append(line)
    if len(hs) > limit:
        lines.append(f"  ... and {len(hs) - limit} more")
    return lines


def _numbered(items: Iterable[str]) -> list[str]:
    lines: list[str] = []
    for i, text in enumerate(items, 1):
        lines += _wrap(text, "     ", f"  {i}. ")
    return lines


def _fix_lines(r: Report) -> list[str]:
    if not r.fixes:
        return []
    lines = [f"Fixes ({FIX_HINT})"]
    for i, fix in enumerate(r.fixes, 1):
        title = fix.title if fix.runnable else f"{fix.title} (by hand)"
        lines += _wrap(title, "     ", f"  {i}. ")
        if fix.why:
            lines += _wrap(fix.why, "     ")
        if fix.code.strip():
            lines += [("       " + ln).rstrip() for ln in fix.code.strip("\n").splitlines()]
        lines.append("")
    return lines[:-1]


def details_text(r: Report) -> str:
    """The traceback, then the error unless the traceback already ends with it (it usually does)."""
    body = r.traceback_text.rstrip()
    error = r.error_text.strip()
    if error.split(": ", 1)[-1] not in body:
        body = f"{body}\n{error}".strip()
    return body


def _details_lines(r: Report) -> list[str]:
    body = details_text(r)
    if not body:
        return []
    return ["Details", *("  " + ln if ln else "" for ln in body.splitlines())]


def render_report(r: Report) -> str:
    """A report as text: summary, figures, freed, failed line, holders, causes, fixes, notes, details."""
    sections = [
        [summary_line(r)],
        _oom_lines(r.oom) if r.oom else [],
        _cleanup_line(r.cleanup),
        _failed_lines(r),
        _holder_lines(r.holders),
        ["Why", *_numbered(c.text for c in r.causes)] if r.causes else [],
        _fix_lines(r),
        _attempt_lines(r.attempts),
        _rebound_lines(r.rebound_names),
        ["Notes", *(ln for n in r.notes for ln in _wrap(n, "    ", "  - "))] if r.notes else [],
        _details_lines(r),
    ]
    return "\n\n".join("\n".join(s) for s in sections if s)


def _rebound_lines(names: tuple[str, ...]) -> list[str]:
    if not names:
        return []
    listed = ", ".join(names)
    return _wrap(
        f"Already re-bound by the failed run before it failed: {listed} (their old values are gone).", "  "
    )


def _attempt_lines(attempts: tuple[Attempt, ...]) -> list[str]:
    if not attempts:
        return []
    total = sum(a.seconds for a in attempts)
    lines = [f"Attempts by --auto ({len(attempts)} runs, {total:.1f} s)"]
    for i, attempt in enumerate(attempts, 1):
        ended = "worked" if attempt.succeeded else attempt.error or "out of memory"
        lines.append(f"  {i}. {attempt.label}: {ended} ({attempt.seconds:.1f} s)")
    return lines


_QUANTIZED = {"8bit": "8-bit", "4bit": "4-bit"}


def _numerics_note(fix: Fix) -> list[str]:
    if fix.key not in _QUANTIZED:
        return []
    note = (
        f"Note: the model now runs with {_QUANTIZED[fix.key]} weights, which changes its numerics slightly; "
        "check its outputs before you rely on them."
    )
    if fix.key == "8bit":
        note += (
            " Its 8-bit matmuls compute in float16 (LLM.int8), so bitsandbytes warns that bfloat16 inputs "
            "are cast: vram_magic shows that warning once, not on every matmul."
        )
    return _wrap(note, "")


def _gpu_now(s: Snapshot) -> list[str]:
    return [
        f"GPU {g.index} now: {format_bytes(g.free_bytes)} free of {format_bytes(g.total_bytes)}"
        + (f" (cap {format_bytes(g.cap_bytes)})" if g.cap_bytes is not None else "")
        + "."
        for g in s.gpus
    ]


def render_fix_worked(number: int, fix: Fix, seconds: float, s: Snapshot) -> str:
    """What ``%vram fix N`` says when the fixed cell ran."""
    lines = [f"Fix {number} worked: {fix.title} ({seconds:.1f} s).", *_numerics_note(fix), *_gpu_now(s)]
    return "\n".join(lines)


def render_auto_result(report: Report, number: int, fix: Fix, s: Snapshot) -> str:
    """What ``%%oomsafe --auto`` says when a fix worked: what failed, which fix worked, the attempts and
    their cost, the code that ran. ``report`` is the first run's, with the attempts."""
    attempts = report.attempts
    lines = [f"The cell as written: {summary_line(report)}", ""]
    lines += [f"--auto: fix {number} worked: {fix.title}.", *_numerics_note(fix), *_gpu_now(s), ""]
    lines += _attempt_lines(attempts)
    if fix.rewritten_cell is not None:
        lines += [
            "",
            "The code that ran (your cell is unchanged; `%vram fix " + str(number) + " --insert` keeps it):",
        ]
        lines += ["    " + line for line in fix.rewritten_cell.rstrip("\n").splitlines()]
    return "\n".join(lines)
