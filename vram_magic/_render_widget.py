"""Snapshots and reports as ipywidgets, and the mimebundle both carry.

ipywidgets is imported inside functions, and widgets are built only when ``widget_frontend()`` says a live
view will render. Every bundle's text/plain is our own text rendering (see the Rich anchor in DESIGN.md).
"""

from __future__ import annotations

from html import escape
from typing import Any

from vram_magic._frontend import widget_frontend
from vram_magic._render_text import (
    CELL_WORDS,
    FIX_HINT,
    HOLDERS_TITLE,
    format_bytes,
    no_gpu_paragraph,
    render_report,
    render_snapshot,
    summary_line,
)
from vram_magic._types import Fix, GpuSnapshot, MemorySnapshot, OOMInfo, ProcessMemory, Report

# (label, colour) for each bar segment, left to right.
SEGMENTS = (
    ("PyTorch allocated", "#4c72b0"),
    ("reserved but unallocated", "#9bb7e0"),
    ("non-PyTorch", "#dd8452"),
    ("other processes", "#c44e52"),
    ("free", "#e4e4e4"),
)


def mimebundle(obj: MemorySnapshot | Report) -> dict[str, Any]:
    """The display bundle: the widget view plus our text, or our text alone where widgets cannot render."""
    text = render_snapshot(obj) if isinstance(obj, MemorySnapshot) else render_report(obj)
    if not widget_frontend():
        return {"text/plain": text}
    widget = snapshot_widget(obj) if isinstance(obj, MemorySnapshot) else report_widget(obj)
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
    parts = [f"<div><b>{heading}</b> &mdash; {escape(format_bytes(g.total_bytes))} total</div>"]
    values = _segment_values(g)
    scale = max(g.total_bytes or 0, sum(values))
    if scale > 0:
        divs = "".join(
            f'<div title="{escape(label)}: {format_bytes(v)}" '
            f'style="flex:0 0 {100 * v / scale:.3f}%;background:{colour};"></div>'
            for (label, colour), v in zip(SEGMENTS, values, strict=True)
            if v > 0
        )
        if g.cap_bytes is not None:
            left = min(100 * g.cap_bytes / scale, 100)
            divs += (
                f'<div class="vram-cap" title="cap on this process: {format_bytes(g.cap_bytes)}" '
                f'style="position:absolute;left:{left:.3f}%;top:-4px;bottom:-4px;'
                'border-left:2px dashed #000;"></div>'
            )
        parts.append(
            '<div style="position:relative;display:flex;width:100%;max-width:640px;height:18px;'
            f'margin:4px 0;border:1px solid #999;border-radius:3px;">{divs}</div>'
        )
    legend = [
        f'<span style="margin-right:12px;white-space:nowrap;">'
        f'<span style="display:inline-block;width:10px;height:10px;background:{colour};'
        f'border:1px solid #999;margin-right:4px;"></span>{escape(label)} {format_bytes(v)}</span>'
        for (label, colour), v in zip(SEGMENTS, values, strict=True)
    ]
    if g.cap_bytes is not None:
        legend.append(f"<span>&#9478; cap on this process {format_bytes(g.cap_bytes)}</span>")
    parts.append(f'<div style="font-size:90%;">{"".join(legend)}</div>')
    notes = []
    if g.others_are_remainder:
        notes.append("other processes = remainder: total - free - this process")
    elif g.other_processes:
        notes.append(
            "other processes: "
            + ", ".join(f"pid {p.pid} {format_bytes(p.used_bytes)}" for p in g.other_processes)
        )
    notes.append(f"this process {format_bytes(g.process_bytes)}")
    parts.append(f'<div style="font-size:90%;color:#555;">{escape("; ".join(notes))}</div>')
    return "".join(parts)


def cpu_html(s: MemorySnapshot) -> str:
    c = s.cpu
    return (
        f"<div><b>CPU RAM</b> &mdash; this process (RSS) {format_bytes(c.process_rss_bytes)}; "
        f"available {format_bytes(c.available_bytes)} of {format_bytes(c.total_bytes)}</div>"
    )


def snapshot_widget(s: MemorySnapshot) -> Any:
    """``%vram`` as a widget: one bar per GPU (or why there is none), then CPU RAM."""
    import ipywidgets as w

    children = [w.HTML(bar_html(g)) for g in s.gpus]
    if not s.gpus:
        children.append(w.HTML(f"<p>{escape(no_gpu_paragraph(s))}</p>"))
    children.append(w.HTML(cpu_html(s)))
    if s.gpus and s.problems:
        items = "".join(f"<li>{escape(p)}</li>" for p in s.problems)
        children.append(w.HTML(f"<div>Could not read:<ul>{items}</ul></div>"))
    return w.VBox(children)


# --- reports -------------------------------------------------------------------------------------


def failure_gpu(r: Report) -> GpuSnapshot | None:
    """The failing GPU as the OOM message saw it; else the snapshot's GPU of that index (or its only one)."""
    oom = r.oom
    index = oom.device_index if oom and oom.device_index is not None else 0
    known = {g.index: g for g in r.snapshot.gpus}
    seen = known.get(index) or (r.snapshot.gpus[0] if len(r.snapshot.gpus) == 1 else None)
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


def fix_row(number: int, fix: Fix) -> Any:
    """One fix: its number, title, why and code. A VBox, so buttons can be appended later."""
    import ipywidgets as w

    head = w.HTML(
        f'<div><b>{number}. {escape(fix.title)}</b></div><div style="color:#444;">{escape(fix.why)}</div>'
    )
    code = w.HTML(
        '<pre style="margin:4px 0;padding:6px;background:#f6f6f6;border-radius:3px;'
        f'overflow-x:auto;">{escape(fix.code)}</pre>'
    )
    return w.VBox(
        [head, code],
        layout=w.Layout(margin="0 0 8px 0", padding="0 0 0 8px", border_left="3px solid #4c72b0"),
    )


def _failed_html(r: Report) -> str:
    a = r.analysis
    if a.failed_line is None and a.failed_statement is None:
        return ""
    where = f"line {a.failed_line}" if a.failed_line is not None else "a line"
    html = f"<div>Failed at {where} of {escape(CELL_WORDS[a.kind])} cell"
    if a.failed_statement:
        html += f":<pre style='margin:2px 0 0 16px;'>{escape(a.failed_statement.strip())}</pre>"
    return html + "</div>"


def _holders_html(r: Report, limit: int = 8) -> str:
    if not r.holders:
        return ""
    rows = []
    for h in r.holders[:limit]:
        shares = ""
        if h.shared_with:
            shares = f"shares {format_bytes(h.shared_bytes)} with {', '.join(h.shared_with)}"
        rows.append(
            f"<tr><td><code>{escape(h.name)}</code></td><td>{escape(h.type_name)}</td>"
            f"<td style='text-align:right;'>{format_bytes(h.total_bytes)}</td><td>{escape(shares)}</td></tr>"
        )
    more = f"<div>... and {len(r.holders) - limit} more</div>" if len(r.holders) > limit else ""
    return f"<div><b>{escape(HOLDERS_TITLE)}</b><table>{''.join(rows)}</table>{more}</div>"


def report_widget(r: Report) -> Any:
    """A report as a VBox: summary, failing GPU's bar, causes, fixes, notes, and a Details accordion."""
    import ipywidgets as w

    children = [w.HTML(f"<b>{escape(summary_line(r))}</b>")]
    gpu = failure_gpu(r)
    if gpu is not None:
        children.append(w.HTML(bar_html(gpu, f"GPU {gpu.index} when it failed")))
    extra = _failed_html(r) + _holders_html(r)
    if extra:
        children.append(w.HTML(extra))
    if r.causes:
        items = "".join(f"<li>{escape(c.text)}</li>" for c in r.causes)
        children.append(w.HTML(f"<div><b>Why</b><ol>{items}</ol></div>"))
    if r.fixes:
        children.append(w.HTML(f"<b>Fixes</b> ({escape(FIX_HINT)})"))
        children.append(w.VBox([fix_row(i, f) for i, f in enumerate(r.fixes, 1)]))
    if r.notes:
        items = "".join(f"<li>{escape(n)}</li>" for n in r.notes)
        children.append(w.HTML(f"<div><b>Notes</b><ul>{items}</ul></div>"))
    message = r.oom.message if r.oom else r.error_text
    details = w.VBox(
        [
            w.HTML(f"<pre style='white-space:pre-wrap;'>{escape(message)}</pre>"),
            w.HTML(f"<pre>{escape(r.traceback_text)}</pre>"),
        ]
    )
    children.append(w.Accordion(children=[details], titles=("Details",)))
    return w.VBox(children)
