"""``%vram`` and ``%%oomsafe``: the only module that imports IPython.

``%%oomsafe`` runs a cell the way the shell does (``transform_cell`` -> ``ast_parse`` ->
``transform_ast``, then one statement at a time, displayed as ``ast_node_interactivity`` says). A cell that
does not run out of memory behaves as without the magic, its errors shown as IPython would show them. On an
OOM it frees what the cell pinned, shows a report, and ends the cell as failed with one short line.
"""

from __future__ import annotations

import ast
import contextlib
import re
import sys
import time
import traceback
import types
from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import CodeType, TracebackType
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from vram_magic._caps import apply_cap, parse_cap, target_bytes
from vram_magic._cleanup import free_memory
from vram_magic._errors import CellSyntaxError, OutOfMemoryHandled
from vram_magic._oom import exception_text, oom_from_exception
from vram_magic._probe import take_snapshot
from vram_magic._quiet import show_int8_cast_warning_once
from vram_magic._types import Attempt, Fix, OOMInfo, Report, Snapshot
from vram_magic._who import bytes_only_in, find_holders
from vram_magic.render._text import (
    render_auto_result,
    render_cleanup,
    render_fix_worked,
    render_holders,
    summary_line,
)
from vram_magic.render._widget import mimebundle

_SHORT_TRACEBACK_FRAMES = 4
_DEFAULT_MAX_ATTEMPTS = 4


@dataclass(frozen=True)
class _Steps:
    """How a cell's statements run: ``executed`` with ``exec``; ``shown`` in "single" mode (the display hook
    shows each value); then ``value``, an expression whose value the magic returns for the cell to show."""

    executed: list[ast.stmt]
    shown: list[ast.stmt]
    value: ast.expr | None
    assigned: tuple[str, ...]


@dataclass
class _Outcome:
    """How one run of a cell ended: its value, or the report of its OOM."""

    value: Any = None
    report: Report | None = None
    seconds: float = 0.0


@magics_class
class VramMagics(Magics):
    """Holds the last OOM report so later commands can act on it."""

    last_report: Report | None = None

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell, **kwargs)
        self._over: dict[int, str] = {}  # id(report) -> why its fixes are not to run again
        self._cell_run: Any = None  # the %%oomsafe cell's run (IPython's ExecutionResult) now running
        self._report_run: Any = None  # the run of the cell the last report is about

    @property
    def _ip(self) -> Any:
        """The shell; IPython sets it when the magics are registered."""
        return self.shell

    @magic_arguments()
    @argument(
        "command",
        nargs="?",
        help="nothing: a VRAM snapshot; 'who': names holding VRAM; 'free': release memory; "
        "'fix': apply fix N of the last report",
    )
    @argument("names", nargs="*", help="with 'free': variables to delete first; with 'fix': the fix number")
    @argument(
        "--device",
        default=None,
        help="the device to count with 'who'/'free' (default: cuda when a GPU is visible, else cpu)",
    )
    @argument(
        "--dtype", default=None, help="with 'estimate': bfloat16, float16 or float32 (default: the config's)"
    )
    @argument("--quant", choices=("4bit", "8bit"), default=None, help="with 'estimate': one quantized load")
    @argument(
        "--gpu",
        default=None,
        help="with 'estimate': plan for a preset or size (t4, 12GiB) instead of this GPU",
    )
    @argument(
        "--context", type=int, default=None, help="with 'estimate': add a KV cache for this many tokens"
    )
    @argument(
        "--train", choices=("lora", "qlora", "full"), default=None, help="with 'estimate': add training"
    )
    @argument("--diff", action="store_true", help="with 'fix': show what the fix changes, run nothing")
    @argument("--insert", action="store_true", help="with 'fix': put the fixed cell in a new cell below")
    @line_magic
    def vram(self, line: str) -> Any:
        """Where VRAM goes.

        %vram               a snapshot of every visible GPU and of CPU RAM (s = %vram keeps it)
        %vram who           which names in the notebook hold VRAM, biggest first
        %vram free [NAME …] delete NAMEs, release what the last error keeps alive, empty the cache
        %vram fix N         run fix N of the last %%oomsafe report (--diff: show it; --insert: new cell)
        %vram cap T4|12GiB  behave like a smaller GPU (real OOMs past the cap); %vram cap off lifts it
        %vram estimate MODEL  what loading MODEL needs in bf16, 8-bit, 4-bit and offloaded, vs the room here
        """
        __tracebackhide__ = True  # IPython's debugger and tracebacks skip this frame
        args = _parse(self.vram, line, "%vram?")
        if args.command not in _COMMANDS:
            raise UsageError(
                f"Unknown %vram command {args.command!r}; type `%vram`, `%vram who`, `%vram free NAME`, "
                "`%vram fix N`, `%vram estimate MODEL` or `%vram cap t4`."
            )
        _check_options_belong(args)
        device = _device(args.device) if args.device else counted_device()
        if args.command is None:
            return take_snapshot()
        if args.command == "who":
            if args.names:
                raise UsageError("%vram who takes no names; type `%vram who` alone.")
            print(render_holders(self._holders(device), device))
            return None
        if args.command == "free":
            names = [_unquoted(name) for name in args.names]
            missing = [name for name in names if name not in self._ip.user_ns]
            if missing:
                raise UsageError(
                    f"No variable named {missing[0]!r}; type `%vram who` to see what holds VRAM."
                )
            for name in names:
                kind = _not_data(name, self._ip.user_ns[name], self._ip.user_ns_hidden)
                if kind is not None:
                    raise UsageError(
                        f"`{name}` is {kind}, not data that holds memory: type `%vram who` to see what does."
                    )
            args.names = names
            print(render_cleanup(free_memory(self._ip, names=args.names, device=device)))
            return None
        if args.command == "fix":
            return self._fix_command(args.names, diff_only=args.diff, insert=args.insert)
        if args.command == "estimate":
            if len(args.names) != 1:
                raise UsageError(
                    "Type `%vram estimate MODEL`, e.g. `%vram estimate meta-llama/Llama-3.1-8B --gpu t4`."
                )
            try:
                print(estimate_table(_unquoted(args.names[0]), args, take_snapshot()))
            except ValueError as error:
                raise UsageError(str(error).splitlines()[0]) from None
            return None
        # cap, the last of _COMMANDS
        if len(args.names) > 1:
            raise UsageError("Type one size or preset: `%vram cap t4`, `%vram cap 12GiB` or `%vram cap off`.")
        try:
            print(apply_cap(args.names[0] if args.names else None))
        except ValueError as error:
            raise UsageError(str(error)) from None
        return None

    @magic_arguments()
    @argument("--auto", action="store_true", help="on an OOM, try the fixes in order until one works")
    @argument("--force", action="store_true", help="run a model load even when it is estimated not to fit")
    @argument(
        "--max-attempts",
        type=int,
        default=_DEFAULT_MAX_ATTEMPTS,
        help=f"with --auto: how many runs at most, the first included (default {_DEFAULT_MAX_ATTEMPTS})",
    )
    @cell_magic
    def oomsafe(self, line: str, cell: str) -> Any:
        """Run the cell; on a CUDA out-of-memory error free what it pinned, explain why, offer fixes."""
        __tracebackhide__ = True  # IPython's debugger and tracebacks skip this frame
        args = _parse(self.oomsafe, line, "%%oomsafe?")
        self._cell_run = getattr(self._ip.displayhook, "exec_result", None)
        if args.max_attempts < 1:
            raise UsageError("--max-attempts needs 1 or more runs, e.g. `%%oomsafe --auto --max-attempts 3`.")
        if "load_in_8bit" in cell:
            show_int8_cast_warning_once()
        if not args.force and "from_pretrained" in cell:
            report = self._preflight(cell)
            if report is not None:
                return self._run_first_plan(report) if args.auto else self._fail(report)
        # Line 1 stands for the %%oomsafe line as a comment, so the cached cell is Python that IPython's
        # tracebacks can parse (variable values, qualified names, whole multi-line statements).
        outcome = self._run(cell, f"# %%oomsafe {line}".rstrip())
        if outcome.report is None:
            return outcome.value
        if args.auto:
            return self._walk_ladder(outcome, args.max_attempts)
        self._fail(outcome.report)

    def _preflight(self, cell: str) -> Report | None:
        """A report when the cell's model loads are estimated not to fit the room (the GPU's, or the cap
        planned for without one); None when they fit or cannot be estimated."""
        from vram_magic._checks import room_after_cleanup
        from vram_magic._preflight import check
        from vram_magic._report import preflight_report, read

        snapshot = take_snapshot()
        room = room_after_cleanup(snapshot, None, 0)
        room_bytes = room.gpu_bytes if snapshot.gpus else target_bytes()
        if room_bytes is None:
            return None
        namespace = self._ip.user_ns
        body = self._ip.transform_cell(cell)  # Python, also when the cell has %magic or !shell lines
        reading = read(body, body, namespace)
        verdict = check(reading, room_bytes) if reading is not None else None
        if reading is None or verdict is None or verdict.fits:
            return None
        fixable = reading if cell == body else read(cell, body, namespace) or reading
        return preflight_report(fixable, verdict, snapshot, room, namespace)

    def _run_first_plan(self, report: Report) -> Any:
        """``--auto`` after preflight: run the first fix estimated to fit, so the load never runs out."""
        __tracebackhide__ = True  # IPython's debugger and tracebacks skip this frame
        number, fix = next(
            ((n, f) for n, f in enumerate(report.fixes, 1) if f.runnable and f.fits), (0, None)
        )
        if fix is None:
            self._fail(report)
        print(f"{report.headline} Running fix {number} instead: {fix.title}.")
        self.last_report = report
        return self.apply_fix(report, number)

    def apply_fix(self, report: Report, number: int) -> Any:
        """Run fix ``number`` of ``report``: delete what it frees, run its cell, report how it went. A report
        whose cell has been dealt with since (a fix of it worked, or the cell ran again) runs nothing."""
        __tracebackhide__ = True  # IPython's debugger and tracebacks skip this frame
        if id(report) in self._over:
            raise UsageError(
                f"That report is done with ({self._over[id(report)]}): nothing runs. If the cell still runs "
                "out of memory, run it again for a new report."
            )
        fix = report.fixes[number - 1]
        outcome = self._attempt(fix, number)
        if outcome.report is not None:
            self._fail(outcome.report)
        self._over[id(report)] = f"fix {number} worked"
        print(render_fix_worked(number, fix, outcome.seconds, take_snapshot()))
        return outcome.value

    def cell_ran(self, result: Any) -> None:
        """IPython's ``post_run_cell``: the last report is done with once its cell runs again."""
        owner, report = self._report_run, self.last_report
        if report is None or owner is None or result is owner or id(report) in self._over:
            return
        if _same_cell(getattr(result, "info", None), getattr(owner, "info", None)):
            self._over[id(report)] = "its cell ran again"

    def _fix_command(self, words: list[str], *, diff_only: bool, insert: bool) -> Any:
        __tracebackhide__ = True  # IPython's debugger and tracebacks skip this frame
        report = self.last_report
        if report is None:
            raise UsageError("No %%oomsafe cell has run out of memory yet, so there is no fix to apply.")
        if id(report) in self._over and not diff_only and not insert:
            raise UsageError(
                f"The last report is done with ({self._over[id(report)]}): `%vram fix` runs nothing. If "
                "the cell still runs out of memory, run it again for a new report."
            )
        if len(words) != 1 or not words[0].isdecimal() or not 1 <= int(words[0]) <= len(report.fixes):
            raise UsageError(
                f"Type `%vram fix N` with N from 1 to {len(report.fixes)} (the fixes of the last report)."
            )
        number = int(words[0])
        fix = report.fixes[number - 1]
        if fix.rewritten_cell is None:
            raise UsageError(
                f"Fix {number} ({fix.title}) is advice to follow by hand; its code is in the report."
            )
        if diff_only and insert:
            raise UsageError(f"Type `%vram fix {number} --diff` or `%vram fix {number} --insert`, not both.")
        if diff_only:
            print(fix.code)
            return None
        if insert:
            self._ip.set_next_input(f"%%oomsafe\n{fix.rewritten_cell}", replace=False)
            print(f"Fix {number} is in a new cell below, ready to run; your cell is unchanged.")
            return None
        return self.apply_fix(report, number)

    def _walk_ladder(self, first: _Outcome, max_attempts: int) -> Any:
        """``--auto``: try the runnable fixes expected to fit, in order, until one works."""
        __tracebackhide__ = True  # IPython's debugger and tracebacks skip this frame
        assert first.report is not None
        report = first.report
        attempts = [Attempt("the cell as written", first.seconds, succeeded=False)]
        for number, fix in enumerate(first.report.fixes, start=1):
            if not _worth_trying_unattended(fix):
                continue
            label = fix.title
            while len(attempts) < max_attempts:
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
                    self._over[id(self.last_report)] = f"fix {number} worked"
                    print(render_auto_result(self.last_report, number, fix, take_snapshot()))
                    return outcome.value
                report = outcome.report
                smaller = _halve_again(fix, first.report.cell)  # only a smaller batch is worth repeating
                if smaller is None:
                    break
                fix, label = smaller, smaller.title
        self._fail(replace(report, attempts=tuple(attempts)))

    def _attempt(self, fix: Fix, number: int) -> _Outcome:
        """Free what ``fix`` names, then run its cell."""
        __tracebackhide__ = True  # IPython's debugger and tracebacks skip this frame
        assert fix.rewritten_cell is not None
        if fix.key == "8bit":
            show_int8_cast_warning_once()
        if fix.free_names:
            present = [name for name in fix.free_names if name in self._ip.user_ns]
            cleanup = free_memory(self._ip, names=present, device=counted_device())
            print(render_cleanup(cleanup))
        return self._run(fix.rewritten_cell, f"# %vram fix {number}: {fix.title}")

    def _run(self, source: str, first_line: str) -> _Outcome:
        """Run cell text as the shell would; on an OOM free what it pinned and explain it."""
        __tracebackhide__ = True  # IPython's debugger and tracebacks skip this frame
        body = self._ip.transform_cell(source)
        filename = self._ip.compile.cache(f"{first_line}\n{body}", _running_cell_number(self._ip))
        steps = self._steps(body, filename)
        namespace = self._ip.user_ns
        ids_before = {name: id(namespace[name]) for name in steps.assigned if name in namespace}
        started = time.perf_counter()
        try:
            value = self._execute(steps, filename)
            return _Outcome(value=value, seconds=time.perf_counter() - started)
        except (Exception, KeyboardInterrupt) as error:
            oom = oom_from_exception(error, caught_by_user=self._caught_in_a_cell)
            if oom is None and isinstance(error, SyntaxError):  # from eval, or importing a broken module
                frames = traceback.extract_tb(_user_frames(error.__traceback__))
                raise self._syntax_error(error, frames) from error
            if oom is None:
                self._show_as_without_us(error)
                raise
            seconds = time.perf_counter() - started
            rebound = tuple(name for name, before in ids_before.items() if id(namespace.get(name)) != before)
            report = self._rescue(error, oom, source, body, filename)
        return _Outcome(report=replace(report, rebound_names=rebound), seconds=seconds)

    def _fail(self, report: Report) -> NoReturn:
        """Show the report and end the cell as failed, with one line that holds no frame of the user's."""
        self.last_report = report
        self._report_run = self._cell_run  # the %%oomsafe cell it is about (a fix's report: the same one)
        display(mimebundle(report, rerun=lambda number: self.apply_fix(report, number)), raw=True)
        raise OutOfMemoryHandled(f"{summary_line(report)} See the report above.")

    def _steps(self, body: str, filename: str) -> _Steps:
        """Parse the cell body and split its statements as IPython's ``run_ast_nodes`` does for the shell's
        ``ast_node_interactivity``; a cell that does not parse is shown as a plain cell's SyntaxError."""
        try:
            # Line 1 of the cell is the %%oomsafe line: from line 2, errors point at the user's lines.
            tree = self._ip.compile.ast_parse("\n" + body, filename=filename)
        except SyntaxError as error:
            raise self._syntax_error(error) from error
        if ("await" in body or "async" in body) and _awaits_at_top_level(tree):  # the walk only if it may
            raise UsageError(
                "%%oomsafe runs a cell synchronously, so it cannot run top-level `await`: run this cell "
                "without %%oomsafe."
            )
        tree = self._ip.transform_ast(tree)
        nodes, interactivity = list(tree.body), self._ip.ast_node_interactivity
        if _running_silently(self._ip):
            interactivity = "none"  # as IPython runs a silent cell
        if interactivity == "last_expr_or_assign":
            target = _single_target(nodes[-1]) if nodes else None
            if target is not None:  # the value assigned is shown, as if the name were the last line
                nodes.append(ast.fix_missing_locations(ast.copy_location(_name_expr(target), nodes[-1])))
            interactivity = "last_expr"
        if interactivity == "last_expr":
            interactivity = "last" if nodes and isinstance(nodes[-1], ast.Expr) else "none"
        shown = {"none": [], "last": nodes[-1:], "all": nodes}[interactivity]
        executed = nodes[: len(nodes) - len(shown)]
        if shown and _ends_with_semicolon(body):  # a trailing ";" hides every value the cell would show
            executed, shown = nodes, []
        value = None
        if shown and isinstance(shown[-1], ast.Expr):  # its value is the magic's result: the cell shows it
            value = shown[-1].value
            shown = shown[:-1]
        return _Steps(executed, shown, value, _assigned_names(tree))

    def _execute(self, steps: _Steps, filename: str) -> Any:
        """Run the statements one at a time, compiling each just before it runs (as IPython does: an error
        only the compiler finds, like ``break`` outside a loop, comes after the statements before it ran)."""
        __tracebackhide__ = True  # IPython's debugger and tracebacks skip this frame
        user_globals, namespace = self._ip.user_global_ns, self._ip.user_ns
        for node in steps.executed:
            exec(self._compiled(ast.Module([node], []), filename, "exec"), user_globals, namespace)
        for node in steps.shown:  # "single" mode: IPython's display hook shows each expression's value
            exec(self._compiled(ast.Interactive([node]), filename, "single"), user_globals, namespace)
        if steps.value is None:
            return None
        return eval(self._compiled(ast.Expression(steps.value), filename, "eval"), user_globals, namespace)

    def _compiled(self, tree: ast.mod, filename: str, mode: str) -> CodeType:
        try:
            code: CodeType = self._ip.compile(tree, filename, mode)
        except SyntaxError as error:
            raise self._syntax_error(error) from error
        return code

    def _syntax_error(self, error: SyntaxError, frames: Any = ()) -> CellSyntaxError:
        """The SyntaxError as IPython shows a plain cell's (with the user's frames, for one raised while the
        cell ran)."""
        return CellSyntaxError(
            error, self._ip.SyntaxTB.structured_traceback(type(error), error, list(frames))
        )

    def _show_as_without_us(self, error: BaseException) -> None:
        """Make IPython show the error from the user's first frame, exactly as for a plain cell."""
        user_frames = _user_frames(error.__traceback__)
        own = getattr(error, "_render_traceback_", None)
        if user_frames is None or (own is not None and not isinstance(own, _FromUserFrames)):
            return  # the exception renders itself
        with contextlib.suppress(AttributeError):  # no __dict__: IPython's default display stays
            error._render_traceback_ = _FromUserFrames(self._ip, error, user_frames)  # type: ignore[attr-defined]

    def _rescue(self, error: BaseException, oom: OOMInfo, source: str, body: str, filename: str) -> Report:
        """Free what the failed cell pinned, then explain the failure from a fresh snapshot."""
        from vram_magic._report import explain

        user_frames = _user_frames(error.__traceback__)
        error_text = exception_text(error)
        failed_line = _last_line_in(user_frames, filename)
        short_traceback = _short_traceback(self._ip, error, user_frames)
        device = counted_device()
        cleanup = free_memory(self._ip, failure=error, device=device)
        del error, user_frames
        return explain(
            oom=oom,
            error_text=error_text,
            traceback_text=short_traceback,
            source=source,
            body=body,
            failed_line=failed_line,
            snapshot=take_snapshot(),
            holders=self._holders(device),
            cleanup=cleanup,
            namespace=self._ip.user_ns,
            bytes_freed_by=lambda names: self._bytes_freed_by(names, device),
        )

    def _caught_in_a_cell(self, error: BaseException) -> bool:
        """True when code written in a notebook cell caught ``error`` (not a library): the first frame of an
        exception's traceback is the one that caught it."""
        tb = error.__traceback__
        cells = getattr(self._ip.compile, "_filename_map", {})  # IPython's map of cell file names
        return tb is not None and tb.tb_frame.f_code.co_filename in cells

    def _holders(self, device: str) -> Any:
        hidden = self._ip.user_ns_hidden
        return find_holders(self._ip.user_ns, device, skip=lambda name: name in hidden)

    def _bytes_freed_by(self, names: Sequence[str], device: str) -> int:
        hidden = self._ip.user_ns_hidden
        return bytes_only_in(self._ip.user_ns, names, device, skip=lambda name: name in hidden)


def estimate_table(model: str, args: Any, snapshot: Snapshot) -> str:
    """``%vram estimate``: the load plans for ``model`` against the room on the first GPU, the ``--gpu`` card,
    or the cap planned for without a GPU."""
    from vram_magic.estimator import estimate, load_plans
    from vram_magic.render import render_estimate_table

    free = snapshot.gpus[0].free_bytes if snapshot.gpus else None
    cap = parse_cap(args.gpu)[0] if args.gpu else target_bytes()
    if args.gpu:
        free = None  # a rehearsal plans for the named card, whatever this GPU has free
    if args.quant is not None:
        # Checks the options together (qlora is 4-bit only), then the one row against the room, if any.
        one = estimate(
            model, dtype=args.dtype, quantization=args.quant, context=args.context, training=args.train
        )
        if free is None and cap is None:
            return render_estimate_table([one])
    rows = load_plans(
        model, free_bytes=free, cap_bytes=cap, dtype=args.dtype, context=args.context, training=args.train
    )
    return render_estimate_table([row for row in rows if args.quant in (None, row.key)])


class _FromUserFrames:
    """An error's ``_render_traceback_``: IPython's traceback from the user's first frame, for the raise that
    went through ``%%oomsafe`` (its display, a later ``%tb``). Raised again later (a stored exception, a
    Future's result), the error has a new traceback and renders as IPython renders it without us."""

    def __init__(self, shell: Any, error: BaseException, user_frames: TracebackType) -> None:
        self.shell, self.error, self.user_frames = shell, error, user_frames
        self.shown_traceback: TracebackType | None = None  # the whole traceback, when first shown

    def __call__(self) -> list[str]:
        error = self.error
        if self.shown_traceback is None:
            self.shown_traceback = error.__traceback__
        if error.__traceback__ is not self.shown_traceback:  # raised again since
            again: list[str] = self.shell.InteractiveTB.structured_traceback(
                type(error), error, error.__traceback__
            )
            return again
        result: list[str] = self.shell.InteractiveTB.structured_traceback(
            type(error), error, self.user_frames, tb_offset=0
        )
        return result


def _worth_trying_unattended(fix: Fix) -> bool:
    """``--auto`` runs fixes that have a cell, are not expected to fail, and undo nothing the user chose:
    a cap may be set on purpose to rehearse a smaller GPU, and bf16 helps only where it was not already."""
    if not fix.runnable or fix.fits is False or fix.key == "lift-cap":
        return False
    return fix.key != "bf16" or fix.fits is True


def _halve_again(fix: Fix, cell: str) -> Fix | None:
    """A smaller batch or more chunks, made once more on the fix's own cell (its title says the new step,
    its diff is against ``cell``); None for other fixes (they are not repeated) or when it cannot shrink."""
    from vram_magic.cell import read_cell
    from vram_magic.fixes import NotApplicable, apply_fix, diff

    if fix.key not in ("half-batch", "chunk") or fix.rewritten_cell is None:
        return None
    try:
        smaller = apply_fix(read_cell(fix.rewritten_cell), fix.key)
    except (NotApplicable, ValueError):
        return None
    return replace(fix, rewritten_cell=smaller.code, title=smaller.title, code=diff(cell, smaller.code))


_COMMANDS = (None, "who", "free", "fix", "estimate", "cap")
# The %vram options and the commands they go with.
_OPTIONS_OF: dict[str, tuple[str, ...]] = {
    "device": ("who", "free"),
    "dtype": ("estimate",),
    "quant": ("estimate",),
    "gpu": ("estimate",),
    "context": ("estimate",),
    "train": ("estimate",),
    "diff": ("fix",),
    "insert": ("fix",),
}
_DEVICE = re.compile(r"^(cuda(:\d+)?|cpu(:0)?)$")


def _check_options_belong(args: Any) -> None:
    """An option given to a command it does not go with is a mistake, not something to ignore."""
    for option, commands in _OPTIONS_OF.items():
        value = getattr(args, option)
        if value is None or value is False or args.command in commands:
            continue
        flag = f"--{option}"
        used = f"`%vram {args.command} {flag}`" if args.command else f"`%vram {flag}`"
        raise UsageError(f"{used}: {flag} goes with {' or '.join(f'`%vram {c}`' for c in commands)}.")


def _not_data(name: str, value: object, hidden: Any) -> str | None:
    """What a name is when it is not data that can hold memory (``%vram free torch``), else None."""
    if isinstance(value, types.ModuleType):
        return "a module"
    if isinstance(value, type):
        return "a class"
    return "one of IPython's own names" if name in hidden else None


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


def _unquoted(word: str) -> str:
    """``"gpt2"`` or ``'gpt2'`` as typed (IPython's argument splitting keeps the quotes): ``gpt2``."""
    if len(word) >= 2 and word[0] == word[-1] and word[0] in "'\"":
        return word[1:-1]
    return word


def _device(text: str) -> str:
    """``--device``: cuda, cuda:N or cpu (``cpu:0`` is cpu)."""
    device = text.strip().lower()
    if not _DEVICE.match(device):
        raise UsageError(f"--device {text!r}: type cuda, cuda:N or cpu, e.g. `%vram who --device cpu`.")
    return device.removesuffix(":0") if device.startswith("cpu") else device


def _parse(magic: Any, line: str, help_command: str) -> Any:
    """Parse magic arguments; a mistake is one line that says where the help is."""
    try:
        return parse_argstring(magic, line)
    except UsageError as error:
        raise UsageError(f"{error}; type `{help_command}` for the usage.") from None
    except ValueError as error:  # the shell-like splitting: "No closing quotation"
        raise UsageError(f"{error} in `{line.strip()}`; type `{help_command}` for the usage.") from None


def counted_device() -> str:
    """The device whose memory a failed cell can pin: CUDA when a GPU is visible, else CPU RAM."""
    torch = sys.modules.get("torch")
    return "cuda" if torch is not None and torch.cuda.is_available() else "cpu"


def _running_cell_number(shell: Any) -> int:
    """The number IPython gave the cell now running, so tracebacks say "Cell In[n]" as for a plain cell.

    ``execution_count`` is already the next number while a stored cell runs; the running cell's own code
    is found among our callers, and IPython's compiler maps its file name to its number.
    """
    numbers: dict[str, int] = getattr(shell.compile, "_filename_map", {})
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename in numbers:
            return numbers[frame.f_code.co_filename]
        frame = frame.f_back  # type: ignore[assignment]
    return int(shell.execution_count)


def _user_frames(tb: TracebackType | None) -> TracebackType | None:
    """The traceback from the first frame that is not this module's (the cell's code, as it ran)."""
    while tb is not None and tb.tb_frame.f_globals.get("__name__") == __name__:
        tb = tb.tb_next
    return tb


def _awaits_at_top_level(tree: ast.Module) -> bool:
    """``await``, ``async for`` or ``async with`` (or an async list/set/dict comprehension) outside any
    function: what IPython's autoawait runs on its event loop. An async generator expression is lazy: it
    needs no loop to be made."""
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.GeneratorExp)):
            continue
        if isinstance(node, (ast.Await, ast.AsyncFor, ast.AsyncWith)):
            return True
        if isinstance(node, ast.comprehension) and node.is_async:
            return True
        pending.extend(ast.iter_child_nodes(node))
    return False


def _assigned_names(tree: ast.Module) -> tuple[str, ...]:
    """Names the cell binds at top level (assignments, for/with targets, imports, defs): those whose old
    values a failed run may already have replaced."""
    names: list[str] = []
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
            continue  # their bodies are another scope
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.append(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.extend((alias.asname or alias.name).split(".")[0] for alias in node.names)
        pending.extend(ast.iter_child_nodes(node))
    return tuple(dict.fromkeys(names))


def _running_silently(shell: Any) -> bool:
    """Whether the cell runs with ``silent=True`` (IPython then shows no values)."""
    result = getattr(shell.displayhook, "exec_result", None)
    return bool(getattr(getattr(result, "info", None), "silent", False))


def _single_target(node: ast.stmt) -> str | None:
    """The name a last-line assignment binds (``x = ...``, ``x += ...``, ``x: int = ...``), for
    ``ast_node_interactivity = "last_expr_or_assign"``."""
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
        target: ast.expr | None = node.targets[0]
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        target = node.target
    else:
        target = None
    return target.id if isinstance(target, ast.Name) else None


def _name_expr(name: str) -> ast.Expr:
    return ast.Expr(ast.Name(name, ast.Load()))


def _ends_with_semicolon(body: str) -> bool:
    from IPython.core.displayhook import DisplayHook

    return bool(DisplayHook.semicolon_at_end_of_expression(body))


def _last_line_in(tb: TracebackType | None, filename: str) -> int | None:
    """The line of the cell that was running when the error came."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _short_traceback(shell: Any, error: BaseException, tb: TracebackType | None) -> str:
    """The last frames, with cells named as IPython names them ("Cell In[3]")."""
    frames = traceback.extract_tb(tb)[-_SHORT_TRACEBACK_FRAMES:] if tb else []
    for frame in frames:
        frame.filename = " ".join(shell.compile.format_code_name(frame.filename) or (frame.filename,))
    lines = traceback.format_list(frames)
    return "".join(lines) + "".join(traceback.format_exception_only(type(error), error))


def load(shell: Any) -> None:
    """Register the magics (once, however often ``%load_ext`` runs) and the event that ends a report's
    fixes once its cell runs again."""
    if "VramMagics" not in shell.magics_manager.registry:
        shell.register_magics(VramMagics)
        shell.events.register("post_run_cell", shell.magics_manager.registry["VramMagics"].cell_ran)


def unload(shell: Any) -> None:
    """Remove every magic ``load`` added."""
    manager = shell.magics_manager
    magics = manager.registry.pop("VramMagics", None)
    if magics is not None:
        with contextlib.suppress(ValueError):  # not registered
            shell.events.unregister("post_run_cell", magics.cell_ran)
    manager.magics["line"].pop("vram", None)
    manager.magics["cell"].pop("oomsafe", None)
