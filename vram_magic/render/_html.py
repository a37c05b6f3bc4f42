"""The HTML view: each section as a self-contained piece of HTML with inline styles.

The static report (text/html: what nbconvert, GitHub and a saved Kaggle notebook show) joins the pieces; the
widget shows the same pieces in HTML widgets and adds buttons. Every text is escaped; `backticked` names in
prose become code. Colours follow the JupyterLab theme, with light fallbacks elsewhere.
"""

from __future__ import annotations

import re
from html import escape

from vram_magic._types import Fix, GpuSnapshot, Report, Snapshot
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
    report_sections,
    snapshot_sections,
)
from vram_magic.render._words import holder_size, holders_footnote

# (label, colour) for each bar segment, left to right.
SEGMENTS = (
    ("PyTorch allocated", "#4c72b0"),
    ("reserved but unallocated", "#9bb7e0"),
    ("non-PyTorch", "#dd8452"),
    ("other processes", "#c44e52"),
    ("free", "#e4e4e4"),
)
MIN_SEGMENT_PX = 3  # a non-zero segment is at least this wide, however small its share

CODE_BG = "var(--jp-layout-color2,#f6f6f6)"
DIM = "var(--jp-content-font-color2,#444)"
BORDER = "var(--jp-border-color1,#999)"
INK = "var(--jp-ui-font-color0,#000)"

# ipywidgets gives .widget-html-content a 28 px line height, which double-spaces every wrapped line.
LINE_HEIGHT = "line-height:1.4"
SECTION_GAP = "10px"
HEADING = "margin:0 0 4px 0"
LIST = "margin:0;padding-left:2em"
# JupyterLab styles output <pre> with pre-wrap and break-all, which breaks code and words mid-way.
CODE_BLOCK = (
    f"margin:4px 0;padding:6px 8px;background:{CODE_BG};border-radius:3px;"
    "white-space:pre;word-break:normal;overflow-x:auto;"
)
TEXT_BLOCK = "margin:4px 0;white-space:pre-wrap;word-break:normal;overflow-wrap:anywhere;"
INLINE_CODE = f"padding:0 3px;background:{CODE_BG};border-radius:3px;"
CELL = "padding:2px 16px 2px 0;vertical-align:top;"
FIX_BOX = "margin:0 0 8px 0;padding:0 0 0 8px;border-left:3px solid #4c72b0"

_BACKTICKED = re.compile(r"`([^`\n]+)`")


def report_html(report: Report) -> str:
    """The whole report as one static HTML block: the details folded in a ``<details>``."""
    return _page([section_html(section) for section in report_sections(report)])


def snapshot_html(snapshot: Snapshot) -> str:
    return _page([section_html(section) for section in snapshot_sections(snapshot)])


def _page(pieces: list[str]) -> str:
    return "".join(block(piece, first=i == 0) for i, piece in enumerate(piece for piece in pieces if piece))


def block(body: str, first: bool = False) -> str:
    """One section: readable line height, and a gap above unless it comes first."""
    gap = "" if first else f";margin-top:{SECTION_GAP}"
    return f'<div style="{LINE_HEIGHT}{gap}">{body}</div>'


def heading(inner: str) -> str:
    return f'<div style="{HEADING}">{inner}</div>'


def code(escaped: str) -> str:
    """Inline code around text that is already escaped."""
    return f'<code style="{INLINE_CODE}">{escaped}</code>'


def prose(text: str) -> str:
    """Escape ``text``, then show its `backticked` names as code."""
    return _BACKTICKED.sub(lambda m: code(m.group(1)), escape(text))


def code_block(text: str) -> str:
    return f'<pre style="{CODE_BLOCK}">{escape(text)}</pre>'


def section_html(section: Section) -> str:
    """One section's HTML (the static view's; the widget draws ``Fixes`` and ``Details`` itself)."""
    if isinstance(section, Summary):
        return f"<b>{escape(section.text)}</b>"
    if isinstance(section, Paragraph):
        return f"<div>{prose(section.text)}</div>"
    if isinstance(section, Figures):
        return _figures_html(section)
    if isinstance(section, Statement):
        return f"<div>{escape(section.lead)}</div>{code_block(section.code)}"
    if isinstance(section, Holders):
        return holders_html(section)
    if isinstance(section, Items):
        tag = "ol" if section.numbered else "ul"
        items = "".join(f"<li>{prose(item)}</li>" for item in section.items)
        return heading(f"<b>{escape(section.heading)}</b>") + f'<{tag} style="{LIST}">{items}</{tag}>'
    if isinstance(section, Fixes):
        rows = "".join(
            f'<div style="{FIX_BOX}">{fix_head(number, fix)}{code_block(fix.code.strip(chr(10)))}</div>'
            for number, fix in enumerate(section.fixes, 1)
        )
        return fixes_heading(section) + rows
    if isinstance(section, Details):
        return f"<details><summary>{escape(section.title)}</summary>{text_block(section.text)}</details>"
    raise TypeError(f"no HTML for {section!r}")


def fixes_heading(section: Fixes) -> str:
    return heading(f"<b>{escape(section.heading)}</b> ({escape(section.hint)})")


def fix_head(number: int, fix: Fix) -> str:
    """A fix's number, title (``by hand`` when it has no cell to run) and why."""
    hand = "" if fix.runnable else " <i>(by hand)</i>"
    head = f"<div><b>{number}. {prose(fix.title)}</b>{hand}</div>"
    if fix.why:
        head += f'<div style="color:{DIM};">{prose(fix.why)}</div>'
    return head


def text_block(text: str) -> str:
    return f'<pre style="{TEXT_BLOCK}">{escape(text)}</pre>'


def _figures_html(section: Figures) -> str:
    if section.gpu is not None:
        return bar_html(section.gpu, section.heading)
    rows = "".join(
        f'<tr><td style="{CELL}padding-left:{depth}em;">{escape(label)}</td>'
        f'<td style="{CELL}text-align:right;white-space:nowrap;">{escape(value)}</td></tr>'
        for label, value, depth in section.rows
    )
    table = f'<table style="border-collapse:collapse;">{rows}</table>'
    return heading(f"<b>{escape(section.heading)}</b>") + table


def holders_html(section: Holders) -> str:
    head = "".join(
        f'<th style="{CELL}text-align:{align};font-weight:600;border-bottom:1px solid {BORDER};">{name}</th>'
        for name, align in (("name", "left"), ("type", "left"), ("size", "right"), ("shared with", "left"))
    )
    rows = []
    for h in section.holders[: section.limit]:
        shares = ""
        if h.shared_with:
            names = ", ".join(code(escape(n)) for n in h.shared_with)
            shares = f"{names} ({format_bytes(h.shared_bytes)})"
        rows.append(
            f'<tr><td style="{CELL}">{code(escape(h.name))}</td>'
            f'<td style="{CELL}">{escape(h.type_name)}</td>'
            f'<td style="{CELL}text-align:right;white-space:nowrap;">{escape(holder_size(h))}</td>'
            f'<td style="{CELL}">{shares}</td></tr>'
        )
    hidden = len(section.holders) - section.limit
    more = f"<div>... and {hidden} more</div>" if hidden > 0 else ""
    footnote = holders_footnote(section.holders)
    if footnote:
        more += f"<div>{prose(footnote)}</div>"
    table = (
        f'<table style="border-collapse:collapse;"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    return heading(f"<b>{escape(section.heading)}</b>") + table + more


def _segment_values(g: GpuSnapshot) -> list[int]:
    return [
        g.allocated_bytes or 0,
        g.unallocated_reserved_bytes or 0,
        g.non_pytorch_bytes or 0,
        g.others_bytes or 0,
        g.free_bytes or 0,
    ]


def bar_html(g: GpuSnapshot, title: str) -> str:
    """One GPU as a stacked horizontal bar with a cap marker and a legend carrying the figures."""
    parts = [heading(f"<b>{escape(title)}</b> &mdash; {escape(format_bytes(g.total_bytes))} total")]
    values = _segment_values(g)
    scale = max(g.total_bytes or 0, sum(values))
    if scale > 0:
        # Grow factors in proportion, from a zero basis, so that a segment held at its minimum width
        # takes that width from the others and the bar stays exactly full; a spacer stands for bytes
        # that no segment accounts for.
        divs = "".join(
            f'<div title="{escape(label)}: {format_bytes(v)}" '
            f'style="flex:{100 * v / scale:.4f} 1 0px;min-width:{MIN_SEGMENT_PX}px;'
            f'background:{colour};"></div>'
            for (label, colour), v in zip(SEGMENTS, values, strict=True)
            if v > 0
        )
        if scale > sum(values):
            divs += f'<div style="flex:{100 * (scale - sum(values)) / scale:.4f} 1 0px;"></div>'
        if g.cap_bytes is not None:
            left = min(100 * g.cap_bytes / scale, 100)
            divs += (
                f'<div class="vram-cap" title="cap on this process: {format_bytes(g.cap_bytes)}" '
                f'style="position:absolute;left:{left:.3f}%;top:-4px;bottom:-4px;'
                f'border-left:2px dashed {INK};"></div>'
            )
        parts.append(
            '<div style="position:relative;display:flex;width:100%;max-width:640px;height:18px;'
            f'margin:4px 0;border:1px solid {BORDER};border-radius:3px;">{divs}</div>'
        )
    legend = [
        f'<span style="display:inline-block;width:10px;height:10px;background:{colour};'
        f'border:1px solid {BORDER};margin-right:4px;vertical-align:-1px;"></span>'
        f"{escape(label)} {format_bytes(v)}"
        for (label, colour), v in zip(SEGMENTS, values, strict=True)
    ]
    if g.cap_bytes is not None:
        legend.append(f"&#9478; cap on this process {format_bytes(g.cap_bytes)}")
    items = " ".join(f'<span style="margin-right:12px;white-space:nowrap;">{item}</span>' for item in legend)
    parts.append(f'<div style="font-size:90%;">{items}</div>')
    notes = []
    if g.others_are_remainder:
        notes.append("other processes = remainder: total - free - this process")
    elif g.other_processes:
        notes.append(
            "other processes: "
            + ", ".join(f"pid {p.pid}: {format_bytes(p.used_bytes)}" for p in g.other_processes)
        )
    notes.append(f"this process {format_bytes(g.process_bytes)}")
    parts.append(f'<div style="font-size:90%;color:{DIM};">{escape("; ".join(notes))}</div>')
    return "".join(parts)
