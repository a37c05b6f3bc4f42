"""Estimates and load plans as a text table (``%vram estimate``, ``str(estimate)``), and their notes."""

from __future__ import annotations

import textwrap
from collections.abc import Iterable

from vram_magic._types import Estimate, LoadPlan, Note
from vram_magic._units import format_bytes


def render_estimate_table(rows: Iterable[Estimate | LoadPlan]) -> str:
    """Estimates or plans as a plain text table, then their notes (each once)."""
    items = list(rows)
    if not items:
        return "No estimates."
    estimates = [item.estimate if isinstance(item, LoadPlan) else item for item in items]
    models = list(dict.fromkeys(found.model for found in estimates))
    columns: list[tuple[str, list[str]]] = []
    if len(models) > 1:
        columns.append(("model", [found.model for found in estimates]))
    columns.append(("plan", [item.label for item in items]))
    columns.append(("weights on GPU", [format_bytes(found.weights_bytes) for found in estimates]))
    if any(found.offloaded_bytes for found in estimates):
        columns.append(("in CPU RAM", [_maybe_bytes(found.offloaded_bytes or None) for found in estimates]))
    if any(found.kv_cache_bytes for found in estimates):
        columns.append(("KV cache", [_maybe_bytes(found.kv_cache_bytes) for found in estimates]))
    if any(found.activations_bytes for found in estimates):
        columns.append(("activations", [_maybe_bytes(found.activations_bytes) for found in estimates]))
    if any(found.training_bytes for found in estimates):
        columns.append(("grads+optimizer", [_maybe_bytes(found.training_bytes) for found in estimates]))
    columns.append(("peak needed", [format_bytes(found.peak_bytes) for found in estimates]))
    if any(isinstance(item, LoadPlan) for item in items):
        columns.append(
            ("room", [_maybe_bytes(item.room_bytes) if isinstance(item, LoadPlan) else "" for item in items])
        )
        columns.append(("fits", [_fits_word(item) for item in items]))
    widths = [max(len(title), *(len(cell) for cell in cells)) for title, cells in columns]
    lines = []
    if len(models) == 1:
        first = estimates[0]
        lines.append(f"{first.model} ({_count(first.params)} parameters, {first.model_class})")
    lines.append(
        "  "
        + "  ".join(title.ljust(width) for (title, _), width in zip(columns, widths, strict=True)).rstrip()
    )
    for index in range(len(items)):
        row = [cells[index].ljust(width) for (_, cells), width in zip(columns, widths, strict=True)]
        lines.append("  " + "  ".join(row).rstrip())
    labels = [item.label for item in items]
    notes: dict[str, list[str]] = {}  # each note once, with the rows it belongs to
    for label, found in zip(labels, estimates, strict=True):
        for note in found.notes:
            notes.setdefault(note, []).append(label)
    if notes:
        lines.append("How this was estimated:")
    for note, owners in notes.items():
        prefix = "" if len(items) == 1 or len(owners) == len(items) else f"{', '.join(owners)}: "
        lines.extend(textwrap.wrap(prefix + note, 88, initial_indent="  - ", subsequent_indent="    "))
    return "\n".join(lines)


def note_text(note: Note) -> str:
    """A note of an estimate in plain words."""
    return note.key


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def _maybe_bytes(n: int | None) -> str:
    return "" if n is None else format_bytes(n)


def _fits_word(item: Estimate | LoadPlan) -> str:
    if not isinstance(item, LoadPlan) or item.fits is None:
        return "?" if isinstance(item, LoadPlan) else ""
    return "yes" if item.fits else "no"
