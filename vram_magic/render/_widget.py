"""Snapshots and reports as ipywidgets, and the mimebundle both carry.

ipywidgets is imported inside functions, and widgets are built only when ``widget_frontend()`` says a live
view will render. Every bundle's text/plain is our own text rendering (see the Rich anchor in DESIGN.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from html import escape
from typing import Any

from vram_magic._diagnose import failing_gpu
from vram_magic._types import Fix, GpuSnapshot, OOMInfo, ProcessMemory, Report, Snapshot
from vram_magic._units import format_bytes
from vram_magic.render._frontend import widget_frontend
from vram_magic.render._text import (
    FIX_HINT,
    HOLDERS_TITLE,
    details_text,
    failed_where,
    no_gpu_paragraph,
    render_report,
    render_snapshot,
    summary_line,
)

# (label, colour) for each bar segment, left to right.
SEGMENTS = (
    ("PyTorch allocated", "#4c72b0"),
    ("reserved but unallocated", "#9bb7e0"),
    ("non-PyTorch", "#dd8452"),
    ("other processes", "#c44e52"),
    ("free", "#e4e4e4"),
)
MIN_SEGMENT_PX = 3  # a non-zero segment is at least this wide, however small its share

# Colours follow the JupyterLab theme (light or dark); the fallbacks are for frontends without its variables.
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

_BACKTICKED = re.compile(r"`([^`\n]+)`")


def _html(body: str, first: bool = False) -> str:
    """One HTML widget's value: readable line height, and a gap above unless it comes first."""
    gap = "" if first else f";margin-top:{SECTION_GAP}"
    return f'<div style="{LINE_HEIGHT}{gap}">{body}</div>'


def _heading(inner: str) -> str:
    return f'<div style="{HEADING}">{inner}</div>'


def _code(escaped: str) -> str:
    """Inline code around text that is already escaped."""
    return f'<code style="{INLINE_CODE}">{escaped}</code>'


def _prose(text: str) -> str:
    """Escape ``text``, then show its `backticked` names as code."""
    return _BACKTICKED.sub(lambda m: _code(m.group(1)), escape(text))


def mimebundle(obj: Snapshot | Report, rerun: Rerun | None = None) -> dict[str, Any]:
    """The display bundle: the widget view plus our text, or our text alone where widgets cannot render.
    ``rerun(n)`` gives a report's runnable fixes their buttons."""
    text = render_snapshot(obj) if isinstance(obj, Snapshot) else render_report(obj)
    if not widget_frontend():
        return {"text/plain": text}
    widget = snapshot_widget(obj) if isinstance(obj, Snapshot) else report_widget(obj, rerun)
    bundle = dict(widget._repr_mimebundle_() or {})
    bundle["text/plain"] = text
    return bundle


# --- snapshots -----------------------------------------------------------------------------------


def _segment_values(g: GpuSnapshot) -> list[int]:
    return [
        g.allocated_bytes or 0,
        g.unallocated_reserved_bytes or 0,
        g.non_pytorch_bytes or 0,
        g.others_bytes or 0,
        g.free_bytes or 0,
    ]


def bar_html(g: GpuSnapshot, title: str | None = None) -> str:
    """One GPU as a stacked horizontal bar with a cap marker and a legend carrying the figures."""
    heading = escape(title or (f"GPU {g.index}: {g.name}" if g.name else f"GPU {g.index}"))
    parts = [_heading(f"<b>{heading}</b> &mdash; {escape(format_bytes(g.total_bytes))} total")]
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


def cpu_html(s: Snapshot) -> str:
    c = s.cpu
    return (
        f"<div><b>CPU RAM</b> &mdash; this process (RSS) {format_bytes(c.process_rss_bytes)}; "
        f"available {format_bytes(c.available_bytes)} of {format_bytes(c.total_bytes)}</div>"
    )


def snapshot_widget(s: Snapshot) -> Any:
    """``%vram`` as a widget: one bar per GPU (or why there is none), then CPU RAM."""
    import ipywidgets as w

    sections = [bar_html(g) for g in s.gpus]
    if not s.gpus:
        sections.append(_prose(no_gpu_paragraph(s)).replace("%%oomsafe", _code("%%oomsafe")))
    sections.append(cpu_html(s))
    if s.gpus and s.problems:
        items = "".join(f"<li>{_prose(p)}</li>" for p in s.problems)
        sections.append(_heading("<b>Could not read</b>") + f'<ul style="{LIST}">{items}</ul>')
    return w.VBox([w.HTML(_html(body, first=i == 0)) for i, body in enumerate(sections)])


# --- reports -------------------------------------------------------------------------------------


def failure_gpu(r: Report) -> GpuSnapshot | None:
    """The failing GPU as the OOM message saw it; else the snapshot's GPU of that index (or its only one)."""
    oom = r.oom
    index = oom.device_index if oom and oom.device_index is not None else 0
    seen = failing_gpu(r.snapshot, oom)
    if oom is None or oom.total_bytes is None:
        return seen
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


Rerun = Callable[[int], object]


def fix_row(number: int, fix: Fix, rerun: Rerun | None = None) -> Any:
    """One fix: number, title, why and code. With ``rerun`` and a runnable fix: Re-run, Diff and Insert
    buttons, the code shown on demand, and an output area where the re-run prints."""
    import ipywidgets as w

    head = f"<div><b>{number}. {_prose(fix.title)}</b></div>"
    if fix.why:
        head += f'<div style="color:{DIM};">{_prose(fix.why)}</div>'
    children = [w.HTML(_html(head, first=True))]
    code = w.HTML(_html(f'<pre style="{CODE_BLOCK}">{escape(fix.code.strip(chr(10)))}</pre>', True))
    if rerun is None or fix.rewritten_cell is None:
        if fix.code.strip():
            children.append(code)
    else:
        children += _fix_buttons(number, fix, rerun, code)
    return w.VBox(
        children,
        layout=w.Layout(margin="0 0 8px 0", padding="0 0 0 8px", border_left="3px solid #4c72b0"),
    )


def _fix_buttons(number: int, fix: Fix, rerun: Rerun, code: Any) -> list[Any]:
    """Re-run runs the fixed cell in the notebook's namespace; Diff shows the change; Insert explains how
    to get the cell (Jupyter lets only a running cell add a cell, so a button cannot)."""
    import ipywidgets as w

    rerun_button = w.Button(description="Re-run", button_style="primary", icon="play", tooltip=fix.title)
    diff_button = w.ToggleButton(description="Diff", icon="code", tooltip="Show what this fix changes")
    insert_button = w.ToggleButton(
        description="Insert as new cell",
        icon="plus",
        tooltip="Get the fixed cell as a new cell",
        layout=w.Layout(width="auto"),
    )
    status = w.HTML()
    output = w.Output()
    insert_help = w.VBox(
        [
            w.HTML(
                _html(
                    "Copy the fixed cell from here into a new cell, or, while this is the latest report, "
                    f"run <code>%vram fix {number} --insert</code> to have it put below:"
                )
            ),
            w.Textarea(value=f"%%oomsafe\n{fix.rewritten_cell}", layout=w.Layout(width="100%", height="8em")),
        ]
    )
    code.layout.display = "none"
    insert_help.layout.display = "none"

    def show_diff(change: dict[str, Any]) -> None:
        code.layout.display = "" if change["new"] else "none"

    def show_insert(change: dict[str, Any]) -> None:
        insert_help.layout.display = "" if change["new"] else "none"

    def run(_: Any) -> None:
        rerun_button.disabled = True
        status.value = _html(f"<i>Running fix {number}: {escape(fix.title)}…</i>")
        output.clear_output()
        worked = False
        with output:
            try:
                rerun(number)
                worked = True
            except Exception as error:  # the report or the error is already in the output area
                print(f"{type(error).__name__}: {error}")
        ended = "worked" if worked else "did not work: its own report is below"
        status.value = _html(f"<b>Fix {number} {ended}.</b>")
        rerun_button.disabled = False

    diff_button.observe(show_diff, "value")
    insert_button.observe(show_insert, "value")
    rerun_button.on_click(run)
    buttons = w.HBox([rerun_button, diff_button, insert_button, status])
    return [buttons, code, insert_help, output]


def _failed_html(r: Report) -> str:
    a = r.analysis
    if a.failed_line is None and a.failed_statement is None:
        return ""
    html = escape(failed_where(a))
    if not a.failed_statement:
        return f"<div>{html}.</div>"
    statement = escape(a.failed_statement.strip("\n"))
    return f'<div>{html}:</div><pre style="{CODE_BLOCK}">{statement}</pre>'


def _holders_html(r: Report, limit: int = 8) -> str:
    if not r.holders:
        return ""
    head = "".join(
        f'<th style="{CELL}text-align:{align};font-weight:600;border-bottom:1px solid {BORDER};">{name}</th>'
        for name, align in (("name", "left"), ("type", "left"), ("size", "right"), ("shared with", "left"))
    )
    rows = []
    for h in r.holders[:limit]:
        shares = ""
        if h.shared_with:
            names = ", ".join(_code(escape(n)) for n in h.shared_with)
            shares = f"{names} ({format_bytes(h.shared_bytes)})"
        rows.append(
            f'<tr><td style="{CELL}">{_code(escape(h.name))}</td>'
            f'<td style="{CELL}">{escape(h.type_name)}</td>'
            f'<td style="{CELL}text-align:right;white-space:nowrap;">{format_bytes(h.total_bytes)}</td>'
            f'<td style="{CELL}">{shares}</td></tr>'
        )
    more = f"<div>... and {len(r.holders) - limit} more</div>" if len(r.holders) > limit else ""
    table = (
        f'<table style="border-collapse:collapse;"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    return _heading(f"<b>{escape(HOLDERS_TITLE)}</b>") + table + more


def report_widget(r: Report, rerun: Rerun | None = None) -> Any:
    """A report as a VBox: summary, failing GPU's bar, causes, fixes, notes, and a Details accordion."""
    import ipywidgets as w

    children = [w.HTML(_html(f"<b>{escape(summary_line(r))}</b>", first=True))]
    gpu = failure_gpu(r)
    sections = [bar_html(gpu, f"GPU {gpu.index} when it failed")] if gpu is not None else []
    sections += [_failed_html(r), _holders_html(r)]
    if r.causes:
        items = "".join(f"<li>{_prose(c.text)}</li>" for c in r.causes)
        sections.append(_heading("<b>Why</b>") + f'<ol style="{LIST}">{items}</ol>')
    children += [w.HTML(_html(body)) for body in sections if body]
    if r.fixes:
        children.append(w.HTML(_html(_heading(f"<b>Fixes</b> ({escape(FIX_HINT)})"))))
        children.append(w.VBox([fix_row(i, f, rerun) for i, f in enumerate(r.fixes, 1)]))
    if r.notes:
        items = "".join(f"<li>{_prose(n)}</li>" for n in r.notes)
        children.append(w.HTML(_html(_heading("<b>Notes</b>") + f'<ul style="{LIST}">{items}</ul>')))
    details = details_text(r) or (r.oom.message if r.oom else "")
    body = w.HTML(_html(f'<pre style="{TEXT_BLOCK}">{escape(details)}</pre>', first=True))
    accordion = w.Accordion(children=[body], titles=("Details",))
    accordion.layout.margin = f"{SECTION_GAP} 0 0 0"
    children.append(accordion)
    return w.VBox(children)
