"""Rendering, the last layer: reports, snapshots and estimates for people.

Nothing outside this package words a report: the core hands in data (``vram_magic._types``); ``_words`` says
causes and fixes, ``_sections`` orders what a report says, and three views draw those sections: ``_text``
(text/plain), ``_html`` (text/html, static: nbconvert, GitHub, saved notebooks) and ``_widget`` (live, with
buttons). ``_estimate`` writes estimate tables and their notes.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Any

from vram_magic._types import Report, Snapshot
from vram_magic.render._estimate import (
    estimate_label,
    note_text,
    plan_label,
    render_estimate_table,
    render_training,
)
from vram_magic.render._frontend import widget_frontend
from vram_magic.render._html import report_html, snapshot_html
from vram_magic.render._postmortem import render_post_mortem
from vram_magic.render._text import (
    render_auto_result,
    render_cap,
    render_cleanup,
    render_fix_worked,
    render_holders,
    render_report,
    render_snapshot,
)
from vram_magic.render._timeline import timeline_bundle
from vram_magic.render._widget import report_widget, snapshot_widget
from vram_magic.render._words import cause_text, fix_title, fix_why, summary_line

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

__all__ = [
    "WIDGET_VIEW",
    "cause_text",
    "estimate_label",
    "fix_title",
    "fix_why",
    "mimebundle",
    "note_text",
    "plan_label",
    "render_auto_result",
    "render_cap",
    "render_cleanup",
    "render_estimate_table",
    "render_fix_worked",
    "render_holders",
    "render_post_mortem",
    "render_report",
    "render_snapshot",
    "render_training",
    "report_widget",
    "snapshot_widget",
    "summary_line",
    "timeline_bundle",
]


def mimebundle(
    obj: Report | Snapshot,
    rerun: Callable[[int], object] | None = None,
    include: Container[str] | None = None,
    exclude: Container[str] | None = None,
) -> dict[str, Any]:
    """The display bundle: text/plain and static text/html always, and the live widget where a widget view
    renders (``rerun(n)`` gives a report's runnable fixes their buttons). ``include``/``exclude`` are
    IPython's: the mimetypes wanted, and those not."""

    def wanted(mimetype: str) -> bool:
        return (include is None or mimetype in include) and (exclude is None or mimetype not in exclude)

    views: tuple[Callable[[], str], Callable[[], str], Callable[[], Any]]
    if isinstance(obj, Report):
        report = obj
        views = (
            lambda: render_report(report),
            lambda: report_html(report),
            lambda: report_widget(report, rerun),
        )
    else:
        snapshot = obj
        views = (
            lambda: render_snapshot(snapshot),
            lambda: snapshot_html(snapshot),
            lambda: snapshot_widget(snapshot),
        )
    text, html, widget = views
    bundle: dict[str, Any] = {}
    if wanted("text/plain"):
        bundle["text/plain"] = text()
    if wanted("text/html"):
        bundle["text/html"] = html()
    if wanted(WIDGET_VIEW) and widget_frontend():
        view = (widget()._repr_mimebundle_() or {}).get(WIDGET_VIEW)
        if view is not None:
            bundle[WIDGET_VIEW] = view
    return bundle
