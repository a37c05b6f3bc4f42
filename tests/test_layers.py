"""The layers hold (import-linter checks the imports in `make lint`; this checks what imports cannot show):
only the runner touches the IPython shell's internals, and importing vram_magic costs no heavy import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import vram_magic

PACKAGE = Path(vram_magic.__file__).parent
# Attributes of IPython's shell (and its parts) that are internal, or that run or display cells.
SHELL_INTERNALS = frozenset(
    {
        "_filename_map",
        "InteractiveTB",
        "SyntaxTB",
        "displayhook",
        "last_execution_result",
        "user_ns_hidden",
        "user_global_ns",
        "transform_cell",
        "transform_ast",
        "ast_node_interactivity",
        "set_next_input",
        "exec_result",
    }
)


def test_only_the_runner_touches_the_shells_internals() -> None:
    touched = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_runner.py":
            continue
        names = {
            node.attr for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute)
        }
        if names & SHELL_INTERNALS:
            touched[str(path.relative_to(PACKAGE))] = sorted(names & SHELL_INTERNALS)
    assert touched == {}


def test_importing_vram_magic_imports_no_heavy_library() -> None:
    heavy = ("torch", "transformers", "IPython", "libcst", "ipywidgets", "accelerate")
    code = f"import sys, vram_magic; print([m for m in {heavy!r} if m in sys.modules])"
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert printed.strip() == "[]"


def test_the_public_names_are_importable_and_say_they_are_vram_magics() -> None:
    for name in vram_magic.__all__:
        assert hasattr(vram_magic, name), name
    for error in (vram_magic.NotApplicable, vram_magic.OutOfMemoryHandled, vram_magic.CellSyntaxError):
        assert error.__module__ == "vram_magic"
    for data in ("Estimate", "Report", "Fix", "Snapshot", "Cause", "Holder", "OOMInfo"):
        assert data in vram_magic.__all__, data
