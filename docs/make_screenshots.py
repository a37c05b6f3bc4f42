"""Take the README screenshots in a real browser: the %%oomsafe report widget and the %vram widget.

Run from the repository root:  .venv/bin/python docs/make_screenshots.py
Needs: pip install jupyterlab playwright (into the venv), apt-get install chromium (used as /usr/bin/chromium;
playwright's own browsers are not needed). Writes docs/report-widget.png and docs/snapshot-widget.png.

No GPU is needed: the failing cell calls a stand-in ``from_pretrained`` that raises a CUDA OOM with the exact
message a real T4 gave (shared/oom-messages/torch2_1_other_process.txt) from a frame holding a tensor, the way
transformers' caching_allocator_warmup fails. Without a GPU, %vram honestly shows the no-GPU view and CPU RAM.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from playwright.sync_api import FloatRect, Locator, Page, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WIDTH = 1000  # width of the screenshots, px
PAD = 4  # white margin left and right of the outputs, px
START_WIDTH = 1150  # window width before it is fitted to WIDTH
HEIGHT = 3000  # tall enough for the whole report to be on screen: JupyterLab skips painting off-screen cells

# The message a T4 with another process on it gave (torch 2.1 wording, its "capacty" typo included).
OOM_MESSAGE = (
    "CUDA out of memory. Tried to allocate 172.00 MiB. GPU 0 has a total capacty of 14.75 GiB of which "
    "41.06 MiB is free. Process 20417 has 1.10 GiB memory in use. Including non-PyTorch memory, this process "
    "has 13.60 GiB memory in use. Of the allocated memory 12.91 GiB is allocated by PyTorch, and 455.37 MiB "
    "is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
    "max_split_size_mb to avoid fragmentation.  See documentation for Memory Management and "
    "PYTORCH_CUDA_ALLOC_CONF"
)

SETUP = f"""\
import torch

old_model = torch.nn.Linear(4096, 4096)  # an earlier experiment, still held

# No GPU on the machine that makes these screenshots: this stand-in fails as transformers does
# on a full GPU, from a frame holding a tensor, with the message a real T4 gave.
T4_OOM = {OOM_MESSAGE!r}

class AutoModelForCausalLM:
    @staticmethod
    def from_pretrained(name, **kwargs):
        weights = torch.ones(64 * 2**20 // 4)
        raise torch.OutOfMemoryError(T4_OOM)
"""
LOAD = """\
%%oomsafe
model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.1-8B", dtype=torch.bfloat16,
                                             device_map="cuda")
"""
CELLS = ["%load_ext vram_magic", SETUP, "%vram", LOAD]
SNAPSHOT_CELL, REPORT_CELL = 2, 3


def notebook() -> dict[str, Any]:
    cells: list[dict[str, Any]] = [
        {"cell_type": "code", "metadata": {}, "source": src, "outputs": [], "execution_count": None}
        for src in CELLS
    ]
    return {
        "cells": cells,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_server(port: int, server: subprocess.Popen[bytes], limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"jupyter lab exited with {server.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"jupyter lab did not listen on port {port} within {limit} s")


def bounds(locator: Locator) -> FloatRect:
    box = locator.bounding_box()
    assert box is not None, f"{locator} is not displayed"
    return box


def shoot(page: Page, cell_index: int, ready: str, path: Path) -> None:
    """Wait for ``ready`` in the cell's output, then screenshot its outputs (without the prompt column)."""
    area = page.locator(".jp-Notebook .jp-Cell").nth(cell_index).locator(".jp-Cell-outputArea")
    area.locator(ready).first.wait_for(state="visible", timeout=60_000)
    page.wait_for_timeout(500)  # let the widget finish laying out
    whole, first = bounds(area), bounds(area.locator(".jp-OutputArea-output").first)
    x, width = first["x"] - PAD, first["width"] + 2 * PAD
    page.screenshot(path=str(path), clip=FloatRect(x=x, y=whole["y"], width=width, height=whole["height"]))
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KB)")


def main() -> None:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="vram-shots-"))
    (work / "shots.ipynb").write_text(json.dumps(notebook(), indent=1))
    port, token = free_port(), secrets.token_hex(16)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--allow-root",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={work}",
            f"--LabApp.workspaces_dir={work / 'workspaces'}",
            f"--LabApp.user_settings_dir={work / 'settings'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        wait_for_server(port, server)
        with sync_playwright() as p:
            # A fresh profile: playwright passes it to chromium as --user-data-dir.
            browser = p.chromium.launch_persistent_context(
                work / "chromium",
                executable_path=CHROMIUM,
                args=FLAGS,
                viewport={"width": START_WIDTH, "height": HEIGHT},
            )
            page = browser.pages[0] if browser.pages else browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"http://127.0.0.1:{port}/lab/tree/shots.ipynb?token={token}&reset")
            page.locator(".jp-Notebook .jp-Cell").nth(len(CELLS) - 1).wait_for()
            page.add_style_tag(content=".Toastify { display: none !important; }")  # the "Jupyter news?" toast
            # Close the file browser.
            page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").click()
            # Resize the window so that outputs (as wide as the cell editors) are WIDTH - 2 * PAD px wide.
            page.wait_for_timeout(300)
            editor = bounds(page.locator(".jp-Notebook .jp-Cell .jp-InputArea-editor").first)
            window = START_WIDTH + WIDTH - 2 * PAD - editor["width"]
            page.set_viewport_size({"width": round(window), "height": HEIGHT})
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
            shoot(page, SNAPSHOT_CELL, ".widget-vbox", DOCS / "snapshot-widget.png")
            shoot(page, REPORT_CELL, ".widget-accordion", DOCS / "report-widget.png")
            browser.close()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    shutil.rmtree(work, ignore_errors=True)
    print(f"done in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
