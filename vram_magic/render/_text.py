"""The text view: every report, snapshot and message as plain text (text/plain, terminals, ``print``).

Pure: no IPython, ipywidgets or torch.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable

from vram_magic._types import Caps, Cleanup, Fix, Holder, Report, Snapshot
from vram_magic._units import format_bytes
from vram_magic.render._sections import (
    Details,
    Figures,
    Fixes,
    Holders,
    Items,
    Paragraph,
    Section,
    Statement,
    Summary,
    attempts_section,
    cleanup_text,
    report_sections,
    snapshot_sections,
)
from vram_magic.render._words import holder_size, holders_footnote, numerics_note, summary_line

WIDTH = 88
LABEL_WIDTH = 30


def render_report(report: Report) -> str:
    return _sections_text(report_sections(report))


def render_snapshot(snapshot: Snapshot) -> str:
    return _sections_text(snapshot_sections(snapshot))


def render_holders(holders: Iterable[Holder], device: str, limit: int = 20) -> str:
    """``%vram who``: the names holding memory on ``device``, biggest first, with what they share."""
    found = tuple(holders)
    if not found:
        return f"No name in the notebook holds {device} memory."
    return "\n".join(_holder_lines(Holders(f"Names holding {device} memory", found, limit)))


def render_cleanup(cleanup: Cleanup) -> str:
    """What ``%vram free`` freed."""
    return cleanup_text(cleanup)


def render_fix_worked(number: int, fix: Fix, seconds: float, snapshot: Snapshot) -> str:
    """What ``%vram fix N`` says when the fixed cell ran."""
    lines = [f"Fix {number} worked: {fix.title} ({seconds:.1f} s).", *_note(fix), *_gpu_now(snapshot)]
    return "\n".join(lines)


def render_auto_result(report: Report, number: int, fix: Fix, snapshot: Snapshot) -> str:
    """What ``%%oomsafe --auto`` says when a fix worked: what failed, which fix worked, the attempts and
    their cost, the code that ran. ``report`` is the first run's, with the attempts."""
    lines = [f"The cell as written: {summary_line(report)}", ""]
    lines += [f"--auto: fix {number} worked: {fix.title}.", *_note(fix), *_gpu_now(snapshot), ""]
    lines += _section_lines(attempts_section(report.attempts))
    if fix.rewritten_cell is not None:
        keep = f"`%vram fix {number} --insert` keeps it"
        lines += ["", f"The code that ran (your cell is unchanged; {keep}):"]
        lines += ["    " + line for line in fix.rewritten_cell.rstrip("\n").splitlines()]
    return "\n".join(lines)


def render_cap(caps: Caps) -> str:
    """What ``%vram cap`` says: the caps now, and how to lift them."""
    capped = [(i, cap) for i, cap in caps.gpu_caps if cap is not None]
    label = f" ({caps.label})" if caps.label else ""
    if caps.action == "show":
        lines = [f"GPU {i} is capped at {format_bytes(cap)}." for i, cap in capped]
        if caps.target_bytes is not None:
            lines.append(f"No GPU here; estimates and preflight plan for {format_bytes(caps.target_bytes)}.")
        return "\n".join(lines) or "No cap is set. Type `%vram cap t4` to rehearse a T4."
    if caps.action == "off":
        return "No cap now: the whole GPU is this process's again." if caps.gpu_caps else "No cap now."
    rules = ""
    if caps.no_bf16:
        rules = (
            f" As on a {caps.label}, fixes use float16, not bfloat16 (the card has none), and training fixes "
            "set fp16=True."
        )
    if not caps.gpu_caps:
        return (
            f"No GPU here: estimates and preflight will plan for {format_bytes(caps.target_bytes)}{label}."
            + rules
        )
    lines = [
        f"GPU {i} capped at {format_bytes(cap)}{label}: allocations past it raise an OOM."
        for i, cap in capped
    ]
    memory_only = (
        "The cap is of memory only: speed and kernels stay this GPU's." + rules if caps.label else ""
    )
    return "\n".join([*lines, *([memory_only] if memory_only else []), "`%vram cap off` lifts the cap."])


def _sections_text(sections: list[Section]) -> str:
    return "\n\n".join("\n".join(lines) for lines in map(_section_lines, sections) if lines)


def _section_lines(section: Section) -> list[str]:
    if isinstance(section, Summary):
        return [section.text]
    if isinstance(section, Paragraph):
        return _wrap(section.text, "  ", "  " if section.indent_first else "")
    if isinstance(section, Figures):
        if not section.rows:
            return []
        return [section.heading, *(_row(label, value, 2 + 2 * depth) for label, value, depth in section.rows)]
    if isinstance(section, Statement):
        return [section.lead, *("    " + line for line in section.code.splitlines())]
    if isinstance(section, Holders):
        return _holder_lines(section)
    if isinstance(section, Items):
        return [section.heading, *_items(section)]
    if isinstance(section, Fixes):
        return _fix_lines(section)
    if isinstance(section, Details):
        return [section.title, *("  " + line if line else "" for line in section.text.splitlines())]
    raise TypeError(f"no text for {section!r}")


def _row(label: str, value: str, indent: int) -> str:
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


def _items(section: Items) -> list[str]:
    lines: list[str] = []
    for i, text in enumerate(section.items, 1):
        first, rest = (f"  {i}. ", "     ") if section.numbered else ("  - ", "    ")
        lines += _wrap(text, rest, first) if section.wrap else [first + text]
    return lines


def _holder_lines(section: Holders) -> list[str]:
    shown = section.holders[: section.limit]
    name_w = max(len(h.name) for h in shown) + 2
    type_w = max(len(h.type_name) for h in shown) + 2
    lines = [section.heading]
    for h in shown:
        line = f"  {h.name:<{name_w}}{h.type_name:<{type_w}}{holder_size(h):>11}"
        if h.shared_with:
            line += f"  shares {format_bytes(h.shared_bytes)} with {', '.join(h.shared_with)}"
        lines.append(line)
    if len(section.holders) > section.limit:
        lines.append(f"  ... and {len(section.holders) - section.limit} more")
    footnote = holders_footnote(section.holders)
    if footnote:
        lines += _wrap(footnote, "  ", "  ")
    return lines


def _fix_lines(section: Fixes) -> list[str]:
    lines = [f"{section.heading} ({section.hint})"]
    for i, fix in enumerate(section.fixes, 1):
        title = fix.title if fix.runnable else f"{fix.title} (by hand)"
        lines += _wrap(title, "     ", f"  {i}. ")
        if fix.why:
            lines += _wrap(fix.why, "     ")
        if fix.code.strip():
            lines += [("       " + line).rstrip() for line in fix.code.strip("\n").splitlines()]
        lines.append("")
    return lines[:-1]


def _note(fix: Fix) -> list[str]:
    note = numerics_note(fix)
    return _wrap(note, "") if note else []


def _gpu_now(snapshot: Snapshot) -> list[str]:
    return [
        f"GPU {g.index} now: {format_bytes(g.free_bytes)} free of {format_bytes(g.total_bytes)}"
        + (f" (cap {format_bytes(g.cap_bytes)})" if g.cap_bytes is not None else "")
        + "."
        for g in snapshot.gpus
    ]
