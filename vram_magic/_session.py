"""What ``%%oomsafe`` does, step by step: preflight -> run -> rescue -> ``--auto``; and the fixes run later.

IPython-free: cells run through a ``Runner`` (``vram_magic._runner.CellRunner`` in a notebook, a fake in
tests). The path of an OOM: ``Session.oomsafe`` -> ``_preflight`` (a load estimated not to fit never runs)
-> ``_run`` (the runner runs the cell; an OOM comes back as a ``Failure``) -> ``_rescue`` (free what the
cell pinned, take a snapshot, find the holders, ``_report.explain``) -> ``_walk_ladder`` with ``--auto``,
else ``_fail`` (show the report, end the cell with ``OutOfMemoryHandled``).
"""

from __future__ import annotations

import os
import pickle
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NoReturn, Protocol

from vram_magic._caps import parse_gpus, target_bytes
from vram_magic._errors import OutOfMemoryHandled, Refused
from vram_magic._oom import exception_text
from vram_magic._probe import take_snapshot
from vram_magic._quiet import show_int8_cast_warning_once
from vram_magic._timeline import TRACKER, Tracker
from vram_magic._types import (
    Attempt,
    CellRecord,
    Cleanup,
    Fix,
    Holder,
    OOMInfo,
    PostMortem,
    Recording,
    Report,
    Snapshot,
)


@dataclass
class Failure:
    """A run that ran out of memory, as the runner saw it: the error (whose frames the rescue frees), its
    figures, the cell as typed and as Python, and where it failed (``failed_line`` counts the ``%%oomsafe``
    line as line 1); ``rebound``: names the run had already re-bound."""

    error: BaseException | None
    oom: OOMInfo
    source: str
    body: str
    error_text: str
    traceback_text: str
    failed_line: int | None
    rebound: tuple[str, ...] = ()
    filename: str = ""  # the name the cell's code ran under (its frames and allocations carry it)
    cell_number: int | None = None
    post_mortem: PostMortem | None = None  # what the failed call's frames held, kept before they are freed


@dataclass
class Ran:
    """How one run of a cell ended: its value, or its failure."""

    value: Any = None
    failure: Failure | None = None
    seconds: float = 0.0


@dataclass
class _Outcome:
    """A run with its failure explained: its value, or the report of its OOM."""

    value: Any = None
    report: Report | None = None
    seconds: float = 0.0


class Runner(Protocol):
    """What the session needs of the notebook: run cells, and keep references (a ``_cleanup.Keeper``)."""

    @property
    def namespace(self) -> dict[str, Any]: ...

    def is_hidden(self, name: str) -> bool: ...
    def transform(self, cell: str) -> str: ...
    def run(self, source: str, first_line: str) -> Ran: ...
    def current_run(self) -> Any: ...
    def show(self, report: Report, rerun: Callable[[int], object]) -> None: ...
    def insert_cell(self, text: str) -> None: ...
    def kept_errors(self) -> list[BaseException]: ...
    def drop_kept_errors(self) -> bool: ...
    def drop_outputs(self, holds_memory: Callable[[object], bool]) -> list[tuple[str, object]]: ...


class Session:
    """The notebook's OOM reports: the last one, and which are done with (a fix of it worked, or its cell ran
    again), so that an old fix never runs over newer work."""

    def __init__(
        self, runner: Runner, say: Callable[[str], None] = print, tracker: Tracker = TRACKER
    ) -> None:
        self.runner, self.say, self.tracker = runner, say, tracker
        self.last_report: Report | None = None
        self.last_post_mortem: PostMortem | None = None  # for %vram debug
        self._recording = False  # %%oomsafe --record is recording this cell's allocations
        # id(report) -> (the report, why its fixes are not to run again). The report itself is kept: an id is
        # reused once its object is gone, and a new report must not inherit an old one's verdict.
        self._over: dict[int, tuple[Report, str]] = {}
        self._cell_run: Any = None  # the %%oomsafe cell's run (IPython's ExecutionResult) now running
        self._report_run: Any = None  # the run of the cell the last report is about

    def oomsafe(
        self, cell: str, line: str, *, auto: bool, force: bool, max_attempts: int, record: bool = False
    ) -> Any:
        """Run the cell; on an OOM free what it pinned, explain why, offer fixes (``auto``: try them;
        ``record``: keep PyTorch's allocation history of the cell and say on an OOM which lines made what)."""
        __tracebackhide__ = True  # IPython's debugger and tracebacks skip this frame
        if not record:
            return self._oomsafe(cell, line, auto=auto, force=force, max_attempts=max_attempts)
        from vram_magic import _history

        why_not = _history.start()
        if why_not is not None:
            self.say(why_not)
            return self._oomsafe(cell, line, auto=auto, force=force, max_attempts=max_attempts)
        self._recording = True
        try:
            return self._oomsafe(cell, line, auto=auto, force=force, max_attempts=max_attempts)
        finally:
            self._recording = False
            _history.stop()

    def _oomsafe(self, cell: str, line: str, *, auto: bool, force: bool, max_attempts: int) -> Any:
        __tracebackhide__ = True  # IPython's debugger and tracebacks skip this frame
        self._cell_run = self.runner.current_run()
        if "load_in_8bit" in cell:
            show_int8_cast_warning_once()
        if not force and ("from_pretrained" in cell or ".train(" in cell):  # a cheap test before reading
            report = self._preflight(cell)
            if report is not None:
                return self._run_first_plan(report) if auto else self._fail(report)
        # Line 1 stands for the %%oomsafe line as a comment, so the cached cell is Python that IPython's
        # tracebacks can parse (variable values, qualified names, whole multi-line statements).
        outcome = self._run(cell, f"# %%oomsafe {line}".rstrip())
        if outcome.report is None:
            return outcome.value
        if auto:
            return self._walk_ladder(outcome, max_attempts)
        self._fail(outcome.report)

    def apply_fix(self, report: Report, number: int) -> Any:
        """Run fix ``number`` of ``report``: delete what it frees, run its cell, report how it went. A report
        whose cell has been dealt with since (a fix of it worked, or the cell ran again) runs nothing."""
        __tracebackhide__ = True  # IPython's debugger and tracebacks skip this frame
        from vram_magic.render import render_fix_worked

        done = self._done_with(report)
        if done is not None:
            raise Refused(
                f"That report is done with ({done}): nothing runs. If the cell still runs "
                "out of memory, run it again for a new report."
            )
        fix = report.fixes[number - 1]
        outcome = self._attempt(fix, number)
        if outcome.report is not None:
            self._fail(outcome.report)
        self._over[id(report)] = (report, f"fix {number} worked")
        self.say(render_fix_worked(number, fix, outcome.seconds, take_snapshot()))
        return outcome.value

    def fix(self, number: int, *, diff_only: bool, insert: bool) -> Any:
        """``%vram fix N``: run fix N of the last report, show its diff, or put its cell below."""
        __tracebackhide__ = True  # IPython's debugger and tracebacks skip this frame
        report = self.last_report
        if report is None:
            raise Refused("No %%oomsafe cell has run out of memory yet, so there is no fix to apply.")
        done = self._done_with(report)
        if done is not None and not diff_only and not insert:
            raise Refused(
                f"The last report is done with ({done}): `%vram fix` runs nothing. If "
                "the cell still runs out of memory, run it again for a new report."
            )
        if not 1 <= number <= len(report.fixes):
            raise Refused(
                f"Type `%vram fix N` with N from 1 to {len(report.fixes)} (the fixes of the last report)."
            )
        fix = report.fixes[number - 1]
        if fix.rewritten_cell is None:
            raise Refused(
                f"Fix {number} ({fix.title}) is advice to follow by hand; its code is in the report."
            )
        if diff_only and insert:
            raise Refused(f"Type `%vram fix {number} --diff` or `%vram fix {number} --insert`, not both.")
        if diff_only:
            self.say(fix.code)
            return None
        if insert:
            self.runner.insert_cell(f"%%oomsafe\n{fix.rewritten_cell}")
            self.say(f"Fix {number} is in a new cell below, ready to run; your cell is unchanged.")
            return None
        return self.apply_fix(report, number)

    def cell_ran(self, result: Any) -> None:
        """After every cell (IPython's ``post_run_cell``): the last report is done with once its cell runs
        again."""
        owner, report = self._report_run, self.last_report
        if report is None or owner is None or result is owner or self._done_with(report) is not None:
            return
        if _same_cell(getattr(result, "info", None), getattr(owner, "info", None)):
            self._over[id(report)] = (report, "its cell ran again")

    def _done_with(self, report: Report) -> str | None:
        """Why ``report``'s fixes are not to run again (a fix of it worked, its cell ran again), or None."""
        kept, why = self._over.get(id(report), (None, None))
        return why if kept is report else None

    def free(self, names: Sequence[str], device: str) -> Cleanup:
        """``%vram free``: delete ``names``, release what the last error keeps, empty the cache. A name that
        is not the notebook's data (a module, a class, IPython's own) is refused."""
        from vram_magic._cleanup import free_memory

        namespace = self.runner.namespace
        for name in names:
            if name not in namespace:
                raise Refused(f"No variable named {name!r}; type `%vram who` to see what holds VRAM.")
            kind = _not_data(namespace[name], self.runner.is_hidden(name))
            if kind is not None:
                raise Refused(
                    f"`{name}` is {kind}, not data that holds memory: type `%vram who` to see what does."
                )
        return free_memory(self.runner, names=names, device=device)

    def holders(self, device: str) -> tuple[Holder, ...]:
        from vram_magic._who import walk_namespace

        return walk_namespace(self.runner.namespace, device, skip=self.runner.is_hidden).holders()

    # --- the path of an OOM ---------------------------------------------------------------------------------

    def _preflight(self, cell: str) -> Report | None:
        """A report when the cell's model loads, or the first steps of its training, are estimated not to fit
        the room (the GPU's, or the cap planned for without one); None when they fit or cannot be estimated.
        Preflight never stops a cell with an error of its own."""
        try:
            return self._preflight_report(cell)
        except Exception:
            return None

    def _preflight_report(self, cell: str) -> Report | None:
        from vram_magic._checks import room_after_cleanup
        from vram_magic._preflight import check
        from vram_magic._report import PREFLIGHT_READ_NODES, preflight_report, read, training_preflight_report
        from vram_magic._train_preflight import check_training

        snapshot = take_snapshot()
        room = room_after_cleanup(snapshot, None, 0)
        room_bytes = room.gpu_bytes if snapshot.gpus else target_bytes()
        if room_bytes is None:
            return None
        namespace = self.runner.namespace
        body = self.runner.transform(cell)  # Python, also when the cell has %magic or !shell lines
        reading = read(body, body, namespace, PREFLIGHT_READ_NODES)
        if reading is None:
            return None
        fixable = reading if cell == body else read(cell, body, namespace) or reading
        verdict = check(reading, room_bytes)
        if verdict is not None and not verdict.fits:
            return preflight_report(fixable, verdict, snapshot, room, namespace)
        if reading.trainer_runs:
            training = check_training(reading, room_bytes, gpu_here=bool(snapshot.gpus))
            if training is not None and not training.fits:
                return training_preflight_report(fixable, training, snapshot, room, namespace)
        return None

    def _run_first_plan(self, report: Report) -> Any:
        """``--auto`` after preflight: run the first fix estimated to fit, so the load never runs out."""
        __tracebackhide__ = True  # IPython's debugger and tracebacks skip this frame
        from vram_magic.render import summary_line

        number, fix = next(
            ((n, f) for n, f in enumerate(report.fixes, 1) if f.runnable and f.fits), (0, None)
        )
        if fix is None:
            self._fail(report)
        self.say(f"{summary_line(report)} Running fix {number} instead: {fix.title}.")
        self.last_report = report
        return self.apply_fix(report, number)

    def _run(self, source: str, first_line: str) -> _Outcome:
        """Run cell text as the shell would; on an OOM free what it pinned and explain it."""
        __tracebackhide__ = True  # IPython's debugger and tracebacks skip this frame
        ran = self.runner.run(source, first_line)
        if ran.failure is None:
            return _Outcome(value=ran.value, seconds=ran.seconds)
        report = self._rescue(ran.failure)
        return _Outcome(report=report, seconds=ran.seconds)

    def _rescue(self, failure: Failure) -> Report:
        """Free what the failed cell pinned, then explain the failure from a fresh snapshot."""
        from vram_magic._cleanup import free_memory
        from vram_magic._report import explain
        from vram_magic._who import walk_namespace

        device = counted_device()
        recording = self._recorded(failure) if self._recording else None  # before the memory is freed
        cleanup = free_memory(self.runner, failure=failure.error, device=device)
        failure.error = None  # its frames are cleared; nothing of the failed run is kept
        self.last_post_mortem = failure.post_mortem
        walked = walk_namespace(self.runner.namespace, device, skip=self.runner.is_hidden)
        report = explain(
            oom=failure.oom,
            error_text=failure.error_text,
            traceback_text=failure.traceback_text,
            source=failure.source,
            body=failure.body,
            failed_line=failure.failed_line,
            snapshot=take_snapshot(),
            holders=walked.holders(),
            cleanup=cleanup,
            namespace=self.runner.namespace,
            bytes_freed_by=walked.bytes_only_in,
        )
        return replace(
            report,
            rebound_names=failure.rebound,
            growers=self._growers(device, failure.oom),
            post_mortem=failure.post_mortem,
            recording=recording,
        )

    def _growers(self, device: str, oom: OOMInfo) -> tuple[CellRecord, ...]:
        """With ``%vram track on``: the cells that grew the failing device's memory most."""
        if not self.tracker.on:
            return ()
        return tuple(self.tracker.growers(_timeline_device(device, oom)))

    def _recorded(self, failure: Failure) -> Recording:
        """The allocations live when the cell failed, by the line that made them; the snapshot saved next
        to the notebook (the kernel's working folder)."""
        from vram_magic import _history

        snapshot = _history.take()
        if snapshot is None:
            return Recording((), problem="PyTorch could not take a snapshot of its allocations")
        try:
            device = failure.oom.device_index
            groups = _history.group_by_line(snapshot, failure.filename, failure.source, device)
        except Exception as error:  # a snapshot in a format this version does not know: the rescue goes on
            return Recording((), problem=f"its allocations could not be read ({error})")
        try:
            pickle_path, html_path = _history.save(snapshot, os.getcwd(), failure.cell_number)
        except (OSError, pickle.PicklingError) as error:
            return Recording(groups, problem=f"the snapshot could not be saved ({error})")
        return Recording(groups, pickle_path, html_path)

    def _walk_ladder(self, first: _Outcome, max_attempts: int) -> Any:
        """``--auto``: try the runnable fixes expected to fit, in order, until one works."""
        __tracebackhide__ = True  # IPython's debugger and tracebacks skip this frame
        from vram_magic.render import render_auto_result

        assert first.report is not None
        report = first.report
        attempts = [Attempt("the cell as written", first.seconds, succeeded=False)]
        for number, fix in enumerate(first.report.fixes, start=1):
            if not worth_trying_unattended(fix):
                continue
            label = fix.title
            while len(attempts) < max_attempts:
                self.say(f"--auto: trying fix {number}: {label}…")  # an attempt can take minutes
                started = time.perf_counter()
                try:
                    outcome = self._attempt(fix, number)
                except Exception as error:  # the fixed cell broke another way: not this fix, try the next
                    failed = f"failed: {exception_text(error).splitlines()[0][:200]}"
                    attempts.append(Attempt(label, time.perf_counter() - started, False, failed))
                    break
                attempts.append(Attempt(label, outcome.seconds, succeeded=outcome.report is None))
                if outcome.report is None:
                    # Keep what ran as fix `number`, so `%vram fix N --insert` gives exactly this code.
                    fixes = list(first.report.fixes)
                    fixes[number - 1] = fix
                    self.last_report = replace(first.report, fixes=tuple(fixes), attempts=tuple(attempts))
                    self._report_run = self._cell_run
                    self._over[id(self.last_report)] = (self.last_report, f"fix {number} worked")
                    self.say(render_auto_result(self.last_report, number, fix, take_snapshot()))
                    return outcome.value
                report = outcome.report
                smaller = halve_again(fix, first.report.cell)  # only a smaller batch is worth repeating
                if smaller is None:
                    break
                fix, label = smaller, smaller.title
        self._fail(replace(report, attempts=tuple(attempts)))

    def _attempt(self, fix: Fix, number: int) -> _Outcome:
        """Free what ``fix`` names, then run its cell."""
        __tracebackhide__ = True  # IPython's debugger and tracebacks skip this frame
        from vram_magic.render import render_cleanup

        assert fix.rewritten_cell is not None
        if fix.key == "8bit":
            show_int8_cast_warning_once()
        if fix.free_names:
            present = [name for name in fix.free_names if name in self.runner.namespace]
            self.say(render_cleanup(self.free(present, counted_device())))
        return self._run(fix.rewritten_cell, f"# %vram fix {number}: {fix.title}")

    def _fail(self, report: Report) -> NoReturn:
        """Show the report and end the cell as failed, with one line that holds no frame of the user's."""
        from vram_magic.render import summary_line

        self.last_report = report
        self._report_run = self._cell_run  # the %%oomsafe cell it is about (a fix's report: the same one)
        self.runner.show(report, lambda number: self.apply_fix(report, number))
        raise OutOfMemoryHandled(f"{summary_line(report)} See the report above.")


def worth_trying_unattended(fix: Fix) -> bool:
    """``--auto`` runs fixes that have a cell, are not expected to fail, and undo nothing the user chose:
    a cap may be set on purpose to rehearse a smaller GPU, and bf16 helps only where it was not already."""
    if not fix.runnable or fix.fits is False or fix.key == "lift-cap":
        return False
    return fix.key != "bf16" or fix.fits is True


def halve_again(fix: Fix, cell: str) -> Fix | None:
    """A smaller batch or more chunks, made once more on the fix's own cell (its change is the new step,
    its diff is against ``cell``); None for other fixes (they are not repeated) or when it cannot shrink."""
    from vram_magic._checks import only_the_evaluation_batch
    from vram_magic.cell import read_cell
    from vram_magic.fixes import NotApplicable, apply_fix, diff

    if fix.key not in ("half-batch", "chunk") or fix.rewritten_cell is None or only_the_evaluation_batch(fix):
        return None
    try:
        smaller = apply_fix(read_cell(fix.rewritten_cell), fix.key)
    except (NotApplicable, ValueError):
        return None
    return replace(fix, rewritten_cell=smaller.code, change=smaller.change, code=diff(cell, smaller.code))


def estimate_text(
    model: str,
    snapshot: Snapshot,
    *,
    gpu: str | None = None,
    dtype: str | None = None,
    quantization: str | None = None,
    context: int | None = None,
    training: str | None = None,
    progress: Callable[[str], None] | None = None,
    fit: str | None = None,
    **train: Any,
) -> str:
    """``%vram estimate``: the load plans for ``model`` against the room on the first GPU, the ``gpu`` card,
    or the cap planned for without a GPU; with ``training``, the parts of a step of the first plan that fits
    (or the one asked) and the largest batch and context that fit. ``train``: ``estimate``'s training
    options (batch_size, gradient_checkpointing, optimizer, lora_targets, lora_r). ``fit`` ("batch" or
    "context"): only that answer. Raises ValueError for a model or option it cannot read."""
    from vram_magic.estimator import estimate, load_plans
    from vram_magic.render import render_estimate_table, render_training

    free = snapshot.gpus[0].free_bytes if snapshot.gpus else None
    gpus, cap, card = parse_gpus(gpu) if gpu else (1, target_bytes(), "")
    if gpu:
        free = None  # a rehearsal plans for the named card, whatever this GPU has free
    if quantization is not None:
        # Checks the options together (qlora is 4-bit only), then the one row against the room, if any.
        one = estimate(
            model,
            dtype=dtype,
            quantization=quantization,
            context=context,
            training=training,
            progress=progress,
            **train,
        )
        if free is None and cap is None and training is None:
            return render_estimate_table([one])
    if fit is not None and training is None:
        raise ValueError("--fit goes with --train, e.g. `%vram estimate MODEL --train qlora --fit batch`.")
    rows = load_plans(
        model,
        free_bytes=free,
        cap_bytes=cap,
        dtype=dtype,
        context=context,
        training=training,
        progress=progress,
        gpus=gpus,
        **train,
    )
    shown = [row for row in rows if quantization in (None, row.key)]
    table = render_estimate_table(shown)
    if gpus > 1:
        table = f"Planned for {card}: room and peak are each GPU's.\n{table}"
    if training is None or not shown:
        return table
    chosen = next((row for row in shown if row.fits), shown[0])
    room = chosen.room_bytes
    step = estimate(
        model,
        dtype=dtype,
        quantization=None if chosen.key in ("bf16", "fp16", "fp32") else chosen.key,
        context=context,
        training="lora" if training == "qlora" else training,
        room_bytes=room,
        **train,
    )
    text = render_training(step, chosen.label, fit)
    return text if fit is not None else f"{table}\n\n{text}"


def counted_device() -> str:
    """The device whose memory a failed cell can pin: CUDA when a GPU is visible, else CPU RAM."""
    torch = sys.modules.get("torch")
    return "cuda" if torch is not None and torch.cuda.is_available() else "cpu"


def _timeline_device(device: str, oom: OOMInfo) -> str:
    """The timeline's name of the device that ran out: ``cuda:N`` or ``cpu``."""
    if device == "cpu" or oom.kind == "cpu":
        return "cpu"
    return f"cuda:{oom.device_index or 0}"


def _not_data(value: object, hidden: bool) -> str | None:
    """What a name is when it is not data that can hold memory (``%vram free torch``), else None."""
    if isinstance(value, types.ModuleType):
        return "a module"
    if isinstance(value, type):
        return "a class"
    return "one of IPython's own names" if hidden else None


def _same_cell(ran: Any, owner: Any) -> bool:
    """Whether two runs are of the same notebook cell: the frontend's cell id when it sends one, else the
    same code (the ``%%oomsafe`` line aside)."""
    if ran is None or owner is None:
        return False
    ran_id, owner_id = getattr(ran, "cell_id", None), getattr(owner, "cell_id", None)
    if ran_id is not None and owner_id is not None:
        return bool(ran_id == owner_id)
    return _body(getattr(ran, "raw_cell", "")) == _body(getattr(owner, "raw_cell", ""))


def _body(cell: str) -> str:
    lines = (cell or "").strip().splitlines()
    if lines and lines[0].lstrip().startswith("%%oomsafe"):
        lines = lines[1:]
    return "\n".join(line.rstrip() for line in lines).strip()
