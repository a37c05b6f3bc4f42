"""The report widget's fix buttons in a real JupyterLab and in Notebook 7: Diff shows the change, Insert says
how to get the fixed cell, Re-run runs it in the notebook's namespace and says whether it worked.

The notebook's training step raises a CUDA out-of-memory error (a real message) above batch 4, so no GPU is
needed. Batch 16 fails; the half-batch fix (batch 8) fails again and its report appears under the buttons;
that report's half-batch fix (batch 4, accumulation 4) works, and the notebook sees the new values.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from tests.browser.conftest import Lab
from tests.test_magics import TRAINING_CELL, TRAINING_SETUP

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

CELLS = [
    "%load_ext vram_magic\n" + TRAINING_SETUP,
    "%%oomsafe\n" + TRAINING_CELL,  # batch 16, accumulation 1
    'print("state:", batch_size, gradient_accumulation_steps)',
]
HALF_BATCH = re.compile(r"^\d+\. Halve the batch \(\d+ → \d+\) and double gradient accumulation")


def _notebook() -> dict[str, Any]:
    return {
        "cells": [
            {
                "cell_type": "code",
                "id": f"cell-{i}",
                "metadata": {},
                "source": source,
                "outputs": [],
                "execution_count": None,
            }
            for i, source in enumerate(CELLS, 1)
        ],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def _half_batch_row(scope: Locator) -> Locator:
    """The first half-batch fix row in ``scope``: the widget box around its "N. Halve the batch…" title."""
    title = scope.get_by_text(HALF_BATCH).first
    return title.locator("xpath=ancestor::div[contains(concat(' ', @class, ' '), ' widget-vbox ')][1]")


def _own(row: Locator, name: str) -> Locator:
    """The row's own button labelled ``name`` (a report shown under its buttons has buttons named alike).
    Found by its text: the icon's glyph, drawn by CSS, is part of a button's accessible name."""
    return row.locator("button").filter(has_text=re.compile(f"^{re.escape(name)}$")).first


def test_diff_and_rerun_buttons_apply_the_fix_in_the_notebook(lab: Lab, lab_page: Page) -> None:
    from playwright.sync_api import expect

    page = lab_page
    (lab.root / "oom.ipynb").write_text(json.dumps(_notebook(), indent=1))
    page.goto(lab.notebook_url("oom.ipynb"))
    cells = page.locator(".jp-Notebook .jp-Cell")
    expect(cells).to_have_count(len(CELLS))
    lab.wait_for_an_idle_kernel()  # Run All before the kernel is connected runs nothing
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

    # The report widget of cell 2.
    outputs = cells.nth(1).locator(".jp-Cell-outputArea")
    report = outputs.locator(".widget-vbox").first
    expect(report.locator(".widget-html").first).to_contain_text("out of memory", ignore_case=True)
    row = _half_batch_row(report)
    number = int(row.get_by_text(HALF_BATCH).first.inner_text().split(".")[0])

    # Diff: the change is hidden until the toggle is pressed.
    diff = row.get_by_text("+batch_size = 8")
    expect(diff).to_be_hidden()
    _own(row, "Diff").click()
    expect(diff).to_be_visible()
    expect(row).to_contain_text("-batch_size = 16")

    # Insert as new cell: says how to get the fixed cell, and holds it for copying.
    _own(row, "Insert as new cell").click()
    expect(row.get_by_text(f"%vram fix {number} --insert")).to_be_visible()
    expect(row.locator("textarea").first).to_have_value(re.compile(r"^%%oomsafe\nbatch_size = 8\n"))

    # Re-run: batch 8 still runs out of memory; the new report appears under the buttons.
    _own(row, "Re-run").click()
    nested = row.locator(".widget-output .widget-vbox").first
    expect(nested.locator(".widget-html").first).to_contain_text("out of memory", ignore_case=True)
    expect(row).to_contain_text(f"Fix {number} did not work: its own report is below.")

    # Re-run on that report's half-batch fix: batch 4 with accumulation 4 fits.
    again = _half_batch_row(nested)
    again_number = int(again.get_by_text(HALF_BATCH).first.inner_text().split(".")[0])
    _own(again, "Re-run").click()
    expect(again).to_contain_text(f"Fix {again_number} worked.")
    expect(again.locator(".widget-output")).to_contain_text(f"Fix {again_number} worked: Halve the batch")

    # The notebook's namespace has the fixed values: run cell 3 (again).
    cells.nth(2).locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")
    expect(cells.nth(2).locator(".jp-Cell-outputArea")).to_contain_text("state: 4 4")
