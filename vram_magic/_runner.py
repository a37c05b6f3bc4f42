"""Run a cell the way IPython's shell runs it: the only code that touches IPython's internals.

``transform_cell`` -> ``ast_parse`` -> ``transform_ast``, then one statement at a time, displayed as
``ast_node_interactivity`` says. A cell that does not run out of memory behaves as without the magic, its
errors shown as IPython would show them; an OOM comes back as a ``Failure`` for the session to rescue.

The shell is typed by ``Shell``, which lists every attribute used here. The private ones (the compiler's
``_filename_map``, the traceback formatters, the display hook's ``exec_result``...) are checked when the
extension loads (``check_shell``): a renamed one stops the load with a message naming the IPython version,
instead of a silent wrong default.
"""

from __future__ import annotations

import ast
import contextlib
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import CodeType, TracebackType
from typing import Any, Protocol

from IPython.core.error import UsageError

from vram_magic._errors import CellSyntaxError
from vram_magic._oom import exception_text, oom_from_exception
from vram_magic._postmortem import describe
from vram_magic._session import Failure, Ran
from vram_magic._types import PostMortem, Report

_SHORT_TRACEBACK_FRAMES = 4
_TESTED_WITH = "IPython 8.12 to 9.18"


class Shell(Protocol):
    """The attributes of IPython's ``InteractiveShell`` used here (for the private ones, see the module)."""

    user_ns: dict[str, Any]
    user_ns_hidden: dict[str, Any]
    user_global_ns: dict[str, Any]
    ast_node_interactivity: str
    execution_count: int
    compile: Any  # CachingCompiler: cache, ast_parse, format_code_name, __call__, _filename_map
    displayhook: Any  # DisplayHook: exec_result, semicolon_at_end_of_expression, _, __, ___
    InteractiveTB: Any  # structured_traceback, tb
    SyntaxTB: Any  # structured_traceback
    last_execution_result: Any  # error_in_exec

    def transform_cell(self, raw_cell: str) -> str: ...
    def transform_ast(self, node: ast.Module) -> ast.Module: ...
    def set_next_input(self, s: str, replace: bool = False) -> None: ...


# What check_shell looks for: (where, attribute).
_NEEDED = (
    ("compile", "_filename_map"),
    ("compile", "format_code_name"),
    ("compile", "ast_parse"),
    ("compile", "cache"),
    ("displayhook", "exec_result"),
    ("displayhook", "semicolon_at_end_of_expression"),
    ("InteractiveTB", "structured_traceback"),
    ("SyntaxTB", "structured_traceback"),
    ("", "last_execution_result"),
    ("", "user_ns_hidden"),
    ("", "transform_cell"),
    ("", "transform_ast"),
)


def check_shell(shell: Any) -> None:
    """Raise ImportError, naming the IPython version, when the shell lacks an attribute this module uses."""
    for where, name in _NEEDED:
        owner = getattr(shell, where, None) if where else shell
        if owner is None or not hasattr(owner, name):
            import IPython

            path = f"{where}.{name}" if where else name
            raise ImportError(
                f"vram_magic needs IPython's shell.{path}, which IPython {IPython.__version__} does not "
                f"have; vram_magic was tested with {_TESTED_WITH}."
            )


@dataclass(frozen=True)
class _Steps:
    """How a cell's statements run: ``executed`` with ``exec``; ``shown`` in "single" mode (the display hook
    shows each value); then ``value``, an expression whose value the magic returns for the cell to show."""

    executed: list[ast.stmt]
    shown: list[ast.stmt]
    value: ast.expr | None
    assigned: tuple[str, ...]


class CellRunner:
    """Runs cells in the notebook's namespace, shows its errors as IPython does, and hands the session the
    references IPython keeps that a failed cell pins."""

    def __init__(self, shell: Shell) -> None:
        self.shell = shell

    @property
    def namespace(self) -> dict[str, Any]:
        return self.shell.user_ns

    def is_hidden(self, name: str) -> bool:
        """IPython's own names (``In``, ``Out``, ``exit``...): never the user's data."""
        return name in self.shell.user_ns_hidden

    def transform(self, cell: str) -> str:
        """Python, also for a cell with %magic or !shell lines."""
        return self.shell.transform_cell(cell)

    def current_run(self) -> Any:
        """IPython's ExecutionResult of the cell now running (None outside a cell)."""
        return self.shell.displayhook.exec_result

    def insert_cell(self, text: str) -> None:
        self.shell.set_next_input(text, replace=False)

    def show(self, report: Report, rerun: Callable[[int], object]) -> None:
        from IPython.display import display

        from vram_magic.render import mimebundle

        display(mimebundle(report, rerun=rerun), raw=True)  # type: ignore[no-untyped-call]

    def run(self, source: str, first_line: str) -> Ran:
        """Run cell text as the shell would: its value, or the failure when it ran out of memory. Any other
        error is raised, shown as for a plain cell."""
        __tracebackhide__ = True  # IPython's debugger and tracebacks skip this frame
        shell = self.shell
        body = shell.transform_cell(source)
        number = self._running_cell_number()
        filename = shell.compile.cache(f"{first_line}\n{body}", number)
        steps = self._steps(body, filename)
        namespace = shell.user_ns
        ids_before = {name: id(namespace[name]) for name in steps.assigned if name in namespace}
        started = time.perf_counter()
        try:
            return Ran(value=self._execute(steps, filename), seconds=time.perf_counter() - started)
        except (Exception, KeyboardInterrupt) as error:
            oom = oom_from_exception(error, caught_by_user=self._caught_in_a_cell)
            if oom is None and isinstance(error, SyntaxError):  # from eval, or importing a broken module
                frames = traceback.extract_tb(_user_frames(error.__traceback__))
                raise self._syntax_error(error, frames) from error
            if oom is None:
                self._show_as_without_us(error)
                raise
            seconds = time.perf_counter() - started
            user_frames = _user_frames(error.__traceback__)
            failure = Failure(
                error=error,
                oom=oom,
                source=source,
                body=body,
                error_text=exception_text(error),
                traceback_text=self._short_traceback(error, user_frames),
                failed_line=_last_line_in(user_frames, filename),
                rebound=tuple(name for name, old in ids_before.items() if id(namespace.get(name)) != old),
                filename=filename,
                cell_number=number,
                post_mortem=self._post_mortem(error, filename, number, source),
            )
        return Ran(failure=failure, seconds=seconds)

    # --- what IPython keeps that a failure pins (see vram_magic._cleanup.Keeper) ----------------------

    def kept_errors(self) -> list[BaseException]:
        error = self.shell.last_execution_result
        error = getattr(error, "error_in_exec", None)
        return [error] if isinstance(error, BaseException) else []

    def drop_kept_errors(self) -> bool:
        dropped = False
        # IPython's traceback formatter keeps the last traceback it formatted as ``tb``, set only once it has
        # formatted one (tests/test_runner.py checks that it still does).
        if getattr(self.shell.InteractiveTB, "tb", None) is not None:
            self.shell.InteractiveTB.tb = None
            dropped = True
        result = self.shell.last_execution_result
        if getattr(result, "error_in_exec", None) is not None:
            result.error_in_exec = None
            dropped = True
        return dropped

    def drop_outputs(self, holds_memory: Callable[[object], bool]) -> list[tuple[str, object]]:
        """Remove ``Out[N]``/``_N`` and ``_``, ``__``, ``___`` entries that hold memory; returns what went."""
        shell, dropped = self.shell, []
        user_ns, hidden = shell.user_ns, shell.user_ns_hidden
        output_cache: dict[int, Any] = user_ns.get("_oh", {})
        for number, value in list(output_cache.items()):
            if holds_memory(value):
                dropped.append((f"Out[{number}]", value))
                del output_cache[number]
                user_ns.pop(f"_{number}", None)
                hidden.pop(f"_{number}", None)
        for underscores in ("_", "__", "___"):
            value = getattr(shell.displayhook, underscores, None)
            if value is None or not holds_memory(value):
                continue
            dropped.append((underscores, value))
            setattr(shell.displayhook, underscores, "")
            for names in (user_ns, hidden):
                if names.get(underscores) is value:
                    names[underscores] = ""
        return dropped

    # --- running --------------------------------------------------------------------------------------

    def _steps(self, body: str, filename: str) -> _Steps:
        """Parse the cell body and split its statements as IPython's ``run_ast_nodes`` does for the shell's
        ``ast_node_interactivity``; a cell that does not parse is shown as a plain cell's SyntaxError."""
        shell = self.shell
        try:
            # Line 1 of the cell is the %%oomsafe line: from line 2, errors point at the user's lines.
            tree = shell.compile.ast_parse("\n" + body, filename=filename)
        except SyntaxError as error:
            raise self._syntax_error(error) from error
        if ("await" in body or "async" in body) and _awaits_at_top_level(tree):  # the walk only if it may
            raise UsageError(
                "%%oomsafe runs a cell synchronously, so it cannot run top-level `await`: run this cell "
                "without %%oomsafe."
            )
        tree = shell.transform_ast(tree)
        nodes, interactivity = list(tree.body), shell.ast_node_interactivity
        if getattr(getattr(self.current_run(), "info", None), "silent", False):
            interactivity = "none"  # as IPython runs a silent cell
        if interactivity == "last_expr_or_assign":
            target = _single_target(nodes[-1]) if nodes else None
            if target is not None:  # the value assigned is shown, as if the name were the last line
                shown_name = ast.Expr(ast.Name(target, ast.Load()))
                nodes.append(ast.fix_missing_locations(ast.copy_location(shown_name, nodes[-1])))
            interactivity = "last_expr"
        if interactivity == "last_expr":
            interactivity = "last" if nodes and isinstance(nodes[-1], ast.Expr) else "none"
        shown = {"none": [], "last": nodes[-1:], "all": nodes}[interactivity]
        executed = nodes[: len(nodes) - len(shown)]
        if shown and shell.displayhook.semicolon_at_end_of_expression(body):  # ";" hides every value
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
        user_globals, namespace = self.shell.user_global_ns, self.shell.user_ns
        for node in steps.executed:
            exec(self._compiled(ast.Module([node], []), filename, "exec"), user_globals, namespace)
        for node in steps.shown:  # "single" mode: IPython's display hook shows each expression's value
            exec(self._compiled(ast.Interactive([node]), filename, "single"), user_globals, namespace)
        if steps.value is None:
            return None
        return eval(self._compiled(ast.Expression(steps.value), filename, "eval"), user_globals, namespace)

    def _compiled(self, tree: ast.mod, filename: str, mode: str) -> CodeType:
        try:
            code: CodeType = self.shell.compile(tree, filename, mode)
        except SyntaxError as error:
            raise self._syntax_error(error) from error
        return code

    def _running_cell_number(self) -> int:
        """The number IPython gave the cell now running, so tracebacks say "Cell In[n]" as for a plain cell.

        ``execution_count`` is already the next number while a stored cell runs; the running cell's own code
        is found among our callers, and IPython's compiler maps its file name to its number.
        """
        numbers: dict[str, int] = self.shell.compile._filename_map
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_filename in numbers:
                return numbers[frame.f_code.co_filename]
            frame = frame.f_back  # type: ignore[assignment]
        return int(self.shell.execution_count)

    def _caught_in_a_cell(self, error: BaseException) -> bool:
        """True when code written in a notebook cell caught ``error`` (not a library): the first frame of an
        exception's traceback is the one that caught it."""
        tb = error.__traceback__
        return tb is not None and tb.tb_frame.f_code.co_filename in self.shell.compile._filename_map

    # --- errors as IPython shows them -----------------------------------------------------------------

    def _syntax_error(self, error: SyntaxError, frames: Any = ()) -> CellSyntaxError:
        """The SyntaxError as IPython shows a plain cell's (with the user's frames, for one raised while the
        cell ran)."""
        rendered = self.shell.SyntaxTB.structured_traceback(type(error), error, list(frames))
        return CellSyntaxError(error, rendered)

    def _show_as_without_us(self, error: BaseException) -> None:
        """Make IPython show the error from the user's first frame, exactly as for a plain cell."""
        user_frames = _user_frames(error.__traceback__)
        own = getattr(error, "_render_traceback_", None)
        if user_frames is None or (own is not None and not isinstance(own, _FromUserFrames)):
            return  # the exception renders itself
        with contextlib.suppress(AttributeError):  # no __dict__: IPython's default display stays
            error._render_traceback_ = _FromUserFrames(self.shell, error, user_frames)  # type: ignore[attr-defined]

    def _post_mortem(
        self, error: BaseException, filename: str, number: int, source: str
    ) -> PostMortem | None:
        """What the failed call's frames held, with cells named as IPython names them ("Cell In[3]") and
        IPython's own frames left out. Never an error of ours: a post-mortem is a bonus."""
        try:
            skip, namespace = (*_OURS, "IPython."), self.shell.user_ns
            found = describe(error, filename, number, skip=skip, namespace=namespace, cell_source=source)
        except Exception:
            return None
        if found is None:
            return None
        name = self.shell.compile.format_code_name
        frames = tuple(replace(f, filename=" ".join(name(f.filename) or (f.filename,))) for f in found.frames)
        return replace(found, frames=frames)

    def _short_traceback(self, error: BaseException, tb: TracebackType | None) -> str:
        """The last frames, with cells named as IPython names them ("Cell In[3]")."""
        frames = traceback.extract_tb(tb)[-_SHORT_TRACEBACK_FRAMES:] if tb else []
        for frame in frames:
            frame.filename = " ".join(
                self.shell.compile.format_code_name(frame.filename) or (frame.filename,)
            )
        lines = traceback.format_list(frames)
        return "".join(lines) + "".join(traceback.format_exception_only(type(error), error))


class _FromUserFrames:
    """An error's ``_render_traceback_``: IPython's traceback from the user's first frame, for the raise that
    went through ``%%oomsafe`` (its display, a later ``%tb``). Raised again later (a stored exception, a
    Future's result), the error has a new traceback and renders as IPython renders it without us."""

    def __init__(self, shell: Shell, error: BaseException, user_frames: TracebackType) -> None:
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


_OURS = frozenset({__name__, "vram_magic._session"})


def _user_frames(tb: TracebackType | None) -> TracebackType | None:
    """The traceback from the first frame that is not ours (the cell's code, as it ran)."""
    while tb is not None and tb.tb_frame.f_globals.get("__name__") in _OURS:
        tb = tb.tb_next
    return tb


def _last_line_in(tb: TracebackType | None, filename: str) -> int | None:
    """The line of the cell that was running when the error came."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


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
