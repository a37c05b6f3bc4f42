"""``%vram log``: the per-cell timeline as a plot (matplotlib, where installed) and a compact table.

The display bundle always has text/plain (the table); with matplotlib it also has image/png and a static
text/html (the plot and the biggest growers), which saved notebooks keep.
"""

from __future__ import annotations

import base64
import importlib.util
import io
from html import escape
from typing import Any

from vram_magic._timeline import Timeline, growers
from vram_magic._types import CellRecord, Snapshot
from vram_magic._units import format_bytes
from vram_magic.render._postmortem import grower_items

TABLE_ROWS = 30  # the most recent cells shown per device in the text table
GROWERS = 5


def timeline_bundle(timeline: Timeline, snapshot: Snapshot, tracking: bool) -> dict[str, Any]:
    """What ``%vram log`` displays: the table as text, and the plot where matplotlib is installed."""
    text = timeline_text(timeline, tracking)
    bundle: dict[str, Any] = {"text/plain": text}
    if not timeline or importlib.util.find_spec("matplotlib") is None:
        return bundle
    png = timeline_png(timeline, device_limits(snapshot))
    bundle["image/png"] = base64.b64encode(png).decode("ascii")
    bundle["text/html"] = (
        f'<img src="data:image/png;base64,{bundle["image/png"]}" alt="memory per cell">'
        f"<pre>{escape(growers_text(timeline))}</pre>"
    )
    return bundle


def device_limits(snapshot: Snapshot) -> dict[str, int]:
    """The line drawn on each device's plot: a GPU's cap, else its total; all of the machine's RAM."""
    limits = {}
    for gpu in snapshot.gpus:
        limit = gpu.cap_bytes if gpu.cap_bytes is not None else gpu.total_bytes
        if limit is not None:
            limits[f"cuda:{gpu.index}"] = limit
    if snapshot.cpu.total_bytes is not None:
        limits["cpu"] = snapshot.cpu.total_bytes
    return limits


def timeline_text(timeline: Timeline, tracking: bool) -> str:
    """Per device, the recent cells (peak, end, change, seconds), then the biggest growers."""
    if not timeline:
        how = "it is on" if tracking else "type `%vram track on` first"
        return f"No cells recorded yet ({how}; each cell is recorded when it ends)."
    lines = []
    for device in timeline.devices():
        records = [record for record in timeline if record.device == device]
        what = "RSS of this process" if device == "cpu" else "PyTorch allocated"
        lines.append(f"{device} ({what}), {len(records)} cells")
        lines.append(f"  {'cell':>6}  {'peak':>10}  {'end':>10}  {'change':>11}  {'seconds':>8}  first line")
        shown = records[-TABLE_ROWS:]
        if len(records) > len(shown):
            hidden = len(records) - len(shown)
            lines.append(f"  … {hidden} earlier cells (vram_magic.timeline() has them all)")
        lines += [_row(record) for record in shown]
        lines.append("")
    lines.append(growers_text(timeline))
    return "\n".join(lines).rstrip()


def growers_text(timeline: Timeline) -> str:
    """The cells that grew each device most since its memory was lowest."""
    lines = []
    for device in timeline.devices():
        items = grower_items(tuple(growers(timeline, device, GROWERS)))
        if items:
            lines.append(f"Grew {device} most since it was lowest:")
            lines += [f"  {item}" for item in items]
    return "\n".join(lines) if lines else "No cell grew memory since it was lowest."


def _row(record: CellRecord) -> str:
    cell = f"[{record.cell}]" if record.cell is not None else "[?]"
    sign = "+" if record.delta_bytes > 0 else "-" if record.delta_bytes < 0 else " "
    change = f"{sign}{format_bytes(abs(record.delta_bytes))}"
    return (
        f"  {cell:>6}  {format_bytes(record.peak_bytes):>10}  {format_bytes(record.end_bytes):>10}  "
        f"{change:>11}  {record.seconds:>8.2f}  {record.source}"
    )


def timeline_png(timeline: Timeline, limits: dict[str, int]) -> bytes:
    """One panel per device: memory at the end of each cell (line), each cell's peak (markers), and a
    dashed line at the cap or total. Drawn with matplotlib's object API (no pyplot state is touched)."""
    from matplotlib.figure import Figure

    devices = timeline.devices()
    figure = Figure(figsize=(8, 2.6 * len(devices)), layout="constrained")
    axes = figure.subplots(len(devices), 1, squeeze=False)[:, 0]
    gib = 2**30
    for ax, device in zip(axes, devices, strict=True):
        records = [record for record in timeline if record.device == device]
        x = list(range(len(records)))
        ax.plot(x, [r.end_bytes / gib for r in records], marker=".", label="at the end of the cell")
        peaks = [r.peak_bytes / gib for r in records]
        ax.scatter(x, peaks, marker="^", color="tab:red", label="peak during the cell", zorder=3)
        if device in limits:
            label = "total RAM" if device == "cpu" else "cap or total"
            ax.axhline(limits[device] / gib, linestyle="--", color="grey", label=label)
        ax.set_xticks(x, [str(r.cell) if r.cell is not None else "?" for r in records])
        what = "RSS" if device == "cpu" else "PyTorch allocated"
        ax.set_title(f"{device}: {what}", fontsize=10)
        ax.set_ylabel("GiB")
        ax.set_xlabel("cell")
        ax.legend(fontsize=8, loc="upper left")
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=90)
    return out.getvalue()
