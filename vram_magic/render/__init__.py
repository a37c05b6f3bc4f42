"""Rendering, the last layer: reports, snapshots and estimates as text/plain, static HTML and live widgets.

Nothing outside this package words a report; the core hands in data (``vram_magic._types``).
"""

from vram_magic.render._estimate import note_text, render_estimate_table

__all__ = ["note_text", "render_estimate_table"]
