"""The widget view: the HTML view's sections in ipywidgets, with Re-run, Diff and Insert buttons on each fix
that has a cell to run, and the details in an accordion. ipywidgets is imported only here, inside functions.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from typing import Any

from vram_magic._types import Fix, Report, Snapshot
from vram_magic.render._html import (
    SECTION_GAP,
    block,
    code_block,
    fix_head,
    fixes_heading,
    section_html,
    text_block,
)
from vram_magic.render._sections import Details, Fixes, Section, report_sections, snapshot_sections

Rerun = Callable[[int], object]


def report_widget(report: Report, rerun: Rerun | None = None) -> Any:
    """A report as a VBox, section by section; ``rerun(n)`` gives runnable fixes their buttons."""
    return _sections_widget(report_sections(report), rerun)


def snapshot_widget(snapshot: Snapshot) -> Any:
    return _sections_widget(snapshot_sections(snapshot), None)


def _sections_widget(sections: list[Section], rerun: Rerun | None) -> Any:
    import ipywidgets as w

    children = []
    for i, section in enumerate(sections):
        if isinstance(section, Fixes):
            children.append(w.HTML(block(fixes_heading(section))))
            children.append(w.VBox([fix_row(n, fix, rerun) for n, fix in enumerate(section.fixes, 1)]))
        elif isinstance(section, Details):
            accordion = w.Accordion(
                children=[w.HTML(block(text_block(section.text), True))], titles=(section.title,)
            )
            accordion.layout.margin = f"{SECTION_GAP} 0 0 0"
            children.append(accordion)
        else:
            children.append(w.HTML(block(section_html(section), first=i == 0)))
    return w.VBox(children)


def fix_row(number: int, fix: Fix, rerun: Rerun | None = None) -> Any:
    """One fix: number, title, why and code. With ``rerun`` and a runnable fix: Re-run, Diff and Insert
    buttons, the code shown on demand, and an output area where the re-run prints."""
    import ipywidgets as w

    children = [w.HTML(block(fix_head(number, fix), first=True))]
    code = w.HTML(block(code_block(fix.code.strip("\n")), True))
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
                block(
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
        status.value = block(f"<i>Running fix {number}: {escape(fix.title)}…</i>")
        output.clear_output()
        worked = False
        with output:
            try:
                rerun(number)
                worked = True
            except Exception as error:  # the report or the error is already in the output area
                print(f"{type(error).__name__}: {error}")
        ended = "worked" if worked else "did not work: its own report is below"
        status.value = block(f"<b>Fix {number} {ended}.</b>")
        rerun_button.disabled = False

    diff_button.observe(show_diff, "value")
    insert_button.observe(show_insert, "value")
    rerun_button.on_click(run)
    buttons = w.HBox([rerun_button, diff_button, insert_button, status])
    return [buttons, code, insert_help, output]
