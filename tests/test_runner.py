"""Canaries for the IPython internals the runner uses: each fails with a message naming the IPython version,
so that an IPython release that renames one is found here, not by a user whose memory is not freed."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import IPython
import pytest

from vram_magic._runner import CellRunner, check_shell

VERSION = f"IPython {IPython.__version__}"


def test_the_shell_has_every_attribute_the_runner_uses(session_shell: Any) -> None:
    check_shell(session_shell)  # raises ImportError naming the missing attribute and the version


def test_a_shell_without_one_stops_the_load_saying_which(session_shell: Any) -> None:
    lacking = SimpleNamespace(**{name: getattr(session_shell, name) for name in ("displayhook", "SyntaxTB")})
    with pytest.raises(
        ImportError, match=r"shell\.compile\._filename_map, which IPython [\d.]+ does not have"
    ):
        check_shell(lacking)


def test_ipython_keeps_the_last_traceback_where_the_runner_drops_it(session_shell: Any) -> None:
    session_shell.run_cell("raise ValueError('canary')")
    kept = getattr(session_shell.InteractiveTB, "tb", None)
    assert kept is not None, f"{VERSION} no longer keeps the last traceback in InteractiveTB.tb"
    result = session_shell.last_execution_result
    assert isinstance(result.error_in_exec, ValueError), (
        f"{VERSION}: last_execution_result.error_in_exec moved"
    )
    runner = CellRunner(session_shell)
    assert runner.kept_errors() == [result.error_in_exec]
    assert runner.drop_kept_errors() is True
    assert session_shell.InteractiveTB.tb is None and result.error_in_exec is None


def test_ipython_names_its_cells_by_file_name(session_shell: Any) -> None:
    filename = session_shell.compile.cache("x = 1\n", 41)
    assert session_shell.compile._filename_map.get(filename) == 41, f"{VERSION}: _filename_map changed"
    assert "In[41]" in " ".join(session_shell.compile.format_code_name(filename) or ()), VERSION


def test_the_display_hook_says_which_cell_runs_and_whether_a_semicolon_hides_it(session_shell: Any) -> None:
    session_shell.run_cell("from IPython import get_ipython; seen = get_ipython().displayhook.exec_result")
    seen = session_shell.user_ns.pop("seen")
    assert seen is not None and seen.info.raw_cell.startswith("from IPython"), f"{VERSION}: exec_result moved"
    assert session_shell.displayhook.semicolon_at_end_of_expression("x = 1;") is True, VERSION
