"""The session's path of an OOM without IPython: a fake runner runs cells with ``exec`` in a plain dict, and a
training step raises a real-format CUDA out-of-memory error above batch 4 (no GPU needed)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.test_magics import SHORTFALL_OOM
from vram_magic import OutOfMemoryHandled, Refused, Report
from vram_magic._oom import exception_text, oom_from_exception
from vram_magic._session import Failure, Ran, Session

SETUP = f"""
def train_step(batch_size, gradient_accumulation_steps):
    if batch_size > 4:
        raise CudaOOM({SHORTFALL_OOM!r})
    return batch_size * gradient_accumulation_steps
"""
CELL = (
    "batch_size = 16\ngradient_accumulation_steps = 1\n"
    "steps = train_step(batch_size, gradient_accumulation_steps)\n"
)


class CudaOOM(RuntimeError):
    """Stands for torch.OutOfMemoryError: what is read is the message, in the format torch writes."""


class FakeRunner:
    """Runs cells with exec in a dict; an OOM comes back as a Failure, as the IPython runner hands it on."""

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {"CudaOOM": CudaOOM}
        self.shown: list[Report] = []
        self.inserted: list[str] = []
        self.runs: list[str] = []
        exec(SETUP, self.namespace)

    def is_hidden(self, name: str) -> bool:
        return name == "CudaOOM"

    def transform(self, cell: str) -> str:
        return cell

    def current_run(self) -> Any:
        return None

    def show(self, report: Report, rerun: Callable[[int], object]) -> None:
        self.shown.append(report)

    def insert_cell(self, text: str) -> None:
        self.inserted.append(text)

    def kept_errors(self) -> list[BaseException]:
        return []

    def drop_kept_errors(self) -> bool:
        return False

    def drop_outputs(self, holds_memory: Callable[[object], bool]) -> list[tuple[str, object]]:
        return []

    def run(self, source: str, first_line: str) -> Ran:
        self.runs.append(source)
        started = time.perf_counter()
        try:
            exec(source, self.namespace)
        except CudaOOM as error:
            oom = oom_from_exception(error)
            assert oom is not None
            failure = Failure(error, oom, source, source, exception_text(error), "", failed_line=None)
            return Ran(failure=failure, seconds=time.perf_counter() - started)
        return Ran(seconds=time.perf_counter() - started)


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


def test_an_oom_is_explained_shown_and_ends_the_cell(runner: FakeRunner) -> None:
    said: list[str] = []
    session = Session(runner, said.append)
    with pytest.raises(OutOfMemoryHandled, match="CUDA out of memory in a training step"):
        session.oomsafe(CELL, "", auto=False, force=False, max_attempts=4)
    (report,) = runner.shown
    assert session.last_report is report
    assert [fix.key for fix in report.fixes][:1] == ["half-batch"]
    assert report.fixes[0].title.startswith("Halve the batch (16 → 8)")


def test_auto_halves_the_batch_until_it_fits(runner: FakeRunner) -> None:
    said: list[str] = []
    session = Session(runner, said.append)
    session.oomsafe(CELL, "--auto", auto=True, force=False, max_attempts=4)
    assert runner.namespace["batch_size"] == 4 and runner.namespace["gradient_accumulation_steps"] == 4
    assert runner.namespace["steps"] == 16  # the same effective batch
    assert len(runner.runs) == 3 and not runner.shown  # 16, 8, 4: no report to show
    assert "--auto: fix 1 worked: Halve the batch (8 → 4)" in said[-1]


def test_a_fix_runs_once_and_a_done_report_refuses(runner: FakeRunner) -> None:
    said: list[str] = []
    session = Session(runner, said.append)
    with pytest.raises(OutOfMemoryHandled):
        session.oomsafe(CELL.replace("16", "8"), "", auto=False, force=False, max_attempts=4)
    session.fix(1, diff_only=True, insert=False)
    assert "+batch_size = 4" in said[-1] and runner.namespace["batch_size"] == 8  # --diff runs nothing
    session.fix(1, diff_only=False, insert=True)
    assert runner.inserted == [f"%%oomsafe\n{runner.shown[0].fixes[0].rewritten_cell}"]
    session.fix(1, diff_only=False, insert=False)
    assert runner.namespace["batch_size"] == 4 and said[-1].startswith("Fix 1 worked")
    with pytest.raises(Refused, match="done with \\(fix 1 worked\\)"):
        session.fix(1, diff_only=False, insert=False)
    with pytest.raises(Refused, match="with N from 1 to"):
        session.fix(99, diff_only=True, insert=False)


def test_a_new_report_at_a_freed_reports_address_is_not_done_with(runner: FakeRunner) -> None:
    """Python reuses a freed object's id: a new report must not inherit an old one's "fix 1 worked" (found
    running many OOMs in one kernel: `%vram fix 1` refused a fresh report)."""
    said: list[str] = []
    session = Session(runner, said.append)
    with pytest.raises(OutOfMemoryHandled):
        session.oomsafe(CELL.replace("16", "8"), "", auto=False, force=False, max_attempts=4)
    old = session.last_report
    assert old is not None
    session.fix(1, diff_only=False, insert=False)
    runner.namespace["batch_size"] = 8
    with pytest.raises(OutOfMemoryHandled):
        session.oomsafe(CELL.replace("16", "8"), "", auto=False, force=False, max_attempts=4)
    new = session.last_report
    assert new is not None and new is not old
    session._over[id(new)] = session._over.pop(id(old))  # as if `new` had been allocated where `old` was
    session.fix(1, diff_only=False, insert=False)
    assert said[-1].startswith("Fix 1 worked")


def test_free_refuses_what_is_not_data(runner: FakeRunner) -> None:
    session = Session(runner, print)
    runner.namespace["sys"] = sys
    with pytest.raises(Refused, match="`sys` is a module"):
        session.free(["sys"], "cpu")
    with pytest.raises(Refused, match="`CudaOOM` is a class"):
        session.free(["CudaOOM"], "cpu")
    with pytest.raises(Refused, match="No variable named 'nope'"):
        session.free(["nope"], "cpu")
    runner.namespace["data"] = [1, 2, 3]
    cleanup = session.free(["data"], "cpu")
    assert "data" not in runner.namespace and "variable data" in cleanup.released


def test_the_session_imports_no_ipython() -> None:
    code = "import sys, vram_magic._session; print(sorted(m for m in sys.modules if m.startswith('IPython')))"
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert printed.strip() == "[]"


def test_auto_does_not_halve_an_evaluation_batch_again() -> None:
    from vram_magic import Fix
    from vram_magic._session import halve_again
    from vram_magic._types import facts

    cell = 'args = TrainingArguments("o", per_device_train_batch_size=1, per_device_eval_batch_size=4)\n'
    eval_only = Fix("half-batch", "", rewritten_cell=cell, change=facts(role="eval", old=8, new=4))
    assert halve_again(eval_only, cell) is None
    train = Fix(
        "half-batch", "", rewritten_cell=cell.replace("=1,", "=4,"), change=facts(role="train", old=8, new=4)
    )
    again = halve_again(train, cell)
    assert again is not None and again.fact("new") == 2
