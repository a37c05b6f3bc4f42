"""Run notebooks headless, as "Restart kernel and run all" would, and keep what they showed.

    python notebooks/run.py NOTEBOOK [NOTEBOOK ...]

Each notebook runs on this interpreter's own ``python3`` kernel (the venv's, not a user-wide one), in the
notebook's folder, and leaves ``<name>.executed.ipynb`` and ``<name>.html`` next to it. A cell that fails
stops the run and the exit status is 1, unless the cell is tagged ``raises-exception`` (a cell whose error
is the point, such as a ``%%oomsafe`` cell ending in ``OutOfMemoryHandled``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
import zmq
from jinja2 import DictLoader
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from nbconvert import HTMLExporter

KERNEL_NAME = "python3"
CELL_TIMEOUT_S = 600

# The HTML shows widgets through @jupyter-widgets/html-manager, loaded from unpkg.com; offline, or before it
# loads, a widget output would be blank. So each one also carries its text/plain: CSS (:has) shows the text
# while the widget's area is empty and hides it once the widget has rendered there.
HTML_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block extra_css -%}
<style>
.widget-text-fallback:has(+ .jupyter-widgets .widget-subarea) { display: none; }
.widget-text-fallback + .jupyter-widgets:not(:has(.widget-subarea)) { display: none; }
</style>
{%- endblock extra_css -%}
{%- block data_widget_view scoped -%}
{%- if 'text/plain' in output.data -%}
<div class="jp-RenderedText jp-OutputArea-output widget-text-fallback" data-mime-type="text/plain">
<pre>{{ output.data['text/plain'] | escape_html }}</pre>
</div>
{%- endif -%}
{{ super() }}
{%- endblock data_widget_view -%}
"""


class VenvKernelManager(AsyncKernelManager):
    """Starts the ``python3`` kernel of this interpreter's prefix (the venv), whatever else is installed.

    ``make venv`` installs it with ``ipykernel install --sys-prefix``; its command is ``python``, which
    jupyter_client runs as ``sys.executable``. Searching only this prefix keeps a ``python3`` kernelspec
    in ``~/.local/share/jupyter`` (another Python, without vram_magic) from taking its place. Without a
    kernelspec there, jupyter_client falls back to ipykernel's own spec, which also runs ``sys.executable``.
    """

    def __init__(self, **kwargs: Any) -> None:
        kernels = Path(sys.prefix, "share", "jupyter", "kernels")
        kwargs.setdefault("kernel_spec_manager", KernelSpecManager(kernel_dirs=[str(kernels)]))
        if "transport_encryption" in self.class_trait_names() and zmq.has("curve"):
            kwargs.setdefault("transport_encryption", "auto")  # no "running over TCP without encryption"
        super().__init__(**kwargs)


def html_exporter() -> HTMLExporter:
    """nbconvert's lab HTML, with a text copy of each widget output for readers without its JavaScript."""
    return HTMLExporter(
        extra_loaders=[DictLoader({"run.html.j2": HTML_TEMPLATE})], template_file="run.html.j2"
    )


def outputs_of(notebook: Path) -> tuple[Path, Path]:
    """Where the executed copy and its HTML go: next to the notebook."""
    stem = notebook.with_suffix("")
    return stem.with_name(stem.name + ".executed.ipynb"), stem.with_name(stem.name + ".html")


def run_notebook(notebook: Path, timeout_s: int = CELL_TIMEOUT_S) -> nbformat.NotebookNode:
    """Execute ``notebook`` in its folder and write the executed copy and HTML next to it.

    Raises ``CellExecutionError`` for a failing cell not tagged ``raises-exception``; the files are
    written first, so the failure can be read in them too.
    """
    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(
        nb,
        kernel_manager_class=VenvKernelManager,
        kernel_name=KERNEL_NAME,
        timeout=timeout_s,
        resources={"metadata": {"path": str(notebook.resolve().parent)}},
    )
    try:
        client.execute()
    finally:
        executed, html = outputs_of(notebook)
        nbformat.write(nb, executed)
        body, _ = html_exporter().from_notebook_node(nb)
        html.write_text(body, encoding="utf-8")
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path, metavar="NOTEBOOK")
    parser.add_argument("--timeout", type=int, default=CELL_TIMEOUT_S, help="seconds per cell")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.notebooks if not path.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    failed = 0
    for notebook in args.notebooks:
        start = time.perf_counter()
        try:
            run_notebook(notebook, args.timeout)
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as error:
            print(f"{notebook}  FAILED after {time.perf_counter() - start:.1f} s\n{error}", file=sys.stderr)
            failed += 1
            continue
        print(f"{notebook}  {time.perf_counter() - start:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
