"""Rendering, the last layer: reports, snapshots and estimates as text/plain, static HTML and live widgets.

Nothing outside this package words a report; the core hands in data (``vram_magic._types``).
"""

from vram_magic.render._estimate import estimate_label, note_text, plan_label, render_estimate_table

__all__ = ["estimate_label", "note_text", "plan_label", "render_estimate_table"]
