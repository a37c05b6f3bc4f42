"""``%vram`` and ``%%oomsafe``: the only module that imports IPython.

``%%oomsafe`` runs a cell the way the shell does (``transform_cell`` -> ``ast_parse`` ->
``transform_ast``, the last expression displayed). A cell that does not run out of memory behaves as
without the magic, its errors shown as IPython would show them. On an OOM it frees what the cell pinned,
shows a report, and ends the cell as failed with one short line.
"""

from __future__ import annotations

import ast
import contextlib
import sys
import traceback
from types import CodeType, TracebackType
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from vram_magic._cells import analyse_cell
from vram_magic._cleanup import free_memory
from vram_magic._diagnose import diagnose
from vram_magic._oom import exception_text, is_oom, oom_from_exception
from vram_magic._probe import take_snapshot
from vram_magic._render_text import render_cleanup, render_holders, summary_line
from vram_magic._types import MemorySnapshot, OutOfMemoryHandled, Report
from vram_magic._who import find_holders

_SHORT_TRACEBACK_FRAMES = 4


@magics_class
class VramMagics(Magics):
    """Holds the last OOM report so later commands can act on it."""

    last_report: Report | None = None

    @property
    def _ip(self) -> Any:
        """The shell; IPython sets it when the magics are registered."""
        return self.shell

    @magic_arguments()
    @argument(
        "command",
        nargs="?",
        help="nothing: a VRAM snapshot; 'who': names holding VRAM; 'free': release memory",
    )
    @argument("names", nargs="*", help="with 'free': variables to delete first")
    @argument(
        "--device",
        default=None,
        help="the device to count with 'who'/'free' (default: cuda when a GPU is visible, else cpu)",
    )
    @line_magic
    def vram(self, line: str) -> MemorySnapshot | None:
        """Where VRAM goes.

        %vram               a snapshot of every visible GPU and of CPU RAM (s = %vram keeps it)
        %vram who           which names in the notebook hold VRAM, biggest first
        %vram free [NAME …] delete NAMEs, release what the last error keeps alive, empty the cache
        """
        args = _parse(self.vram, line, "%vram?")
        device = args.device or counted_device()
        if args.command is None:
            return take_snapshot()
        if args.command == "who":
            if args.names:
                raise UsageError("%vram who takes no names; type `%vram who` alone.")
            print(render_holders(self._holders(device), device))
            return None
        if args.command == "free":
            missing = [name for name in args.names if name not in self._ip.user_ns]
            if missing:
                raise UsageError(
                    f"No variable named {missing[0]!r}; type `%vram who` to see what holds VRAM."
                )
            print(render_cleanup(free_memory(self.shell, names=args.names, device=device)))
            return None
        raise UsageError(
            f"Unknown %vram command {args.command!r}; type `%vram`, `%vram who` or `%vram free NAME`."
        )

    @magic_arguments()
    @cell_magic
    def oomsafe(self, line: str, cell: str) -> Any:
        """Run the cell; on a CUDA out-of-memory error free what it pinned, explain why, offer fixes."""
        _parse(self.oomsafe, line, "%%oomsafe?")
        body = self._ip.transform_cell(cell)
        magic_line = f"%%oomsafe {line}".rstrip()
        filename = self._ip.compile.cache(f"{magic_line}\n{body}", _running_cell_number(self._ip))
        statements, last_expression = self._compile(body, filename)
        try:
            exec(statements, self._ip.user_global_ns, self._ip.user_ns)
            if last_expression is not None:
                return eval(last_expression, self._ip.user_global_ns, self._ip.user_ns)
            return None
        except (Exception, KeyboardInterrupt) as error:
            if not is_oom(error):
                self._show_as_without_us(error)
                raise
            report = self._rescue(error, body, filename)
        self.last_report = report
        display(report)
        raise OutOfMemoryHandled(f"{summary_line(report)} See the report above.")

    def _compile(self, body: str, filename: str) -> tuple[CodeType, CodeType | None]:
        """Compile the cell body; the last expression separately so its value is shown, as the shell does."""
        tree = self._ip.compile.ast_parse(body, filename=filename)
        ast.increment_lineno(tree, 1)  # line 1 of the cell is the %%oomsafe line
        tree = self._ip.transform_ast(tree)
        last_expression = None
        if tree.body and isinstance(tree.body[-1], ast.Expr) and not _ends_with_semicolon(body):
            last_expression = ast.Expression(tree.body.pop().value)
        statements = self._ip.compile(tree, filename, "exec")
        if last_expression is None:
            return statements, None
        return statements, self._ip.compile(last_expression, filename, "eval")

    def _show_as_without_us(self, error: BaseException) -> None:
        """Make IPython show the error from the user's first frame, exactly as for a plain cell."""
        user_frames = error.__traceback__.tb_next if error.__traceback__ else None
        if user_frames is None or hasattr(error, "_render_traceback_"):
            return
        shell = self._ip

        def render() -> list[str]:
            result: list[str] = shell.InteractiveTB.structured_traceback(
                type(error), error, user_frames, tb_offset=0
            )
            return result

        with contextlib.suppress(AttributeError):  # no __dict__: IPython's default display stays
            error._render_traceback_ = render  # type: ignore[attr-defined]

    def _rescue(self, error: BaseException, body: str, filename: str) -> Report:
        """Free what the failed cell pinned, then explain the failure from a fresh snapshot."""
        user_frames = error.__traceback__.tb_next if error.__traceback__ else None
        error_text = exception_text(error)
        oom = oom_from_exception(error)
        failed_line = _last_line_in(user_frames, filename)
        short_traceback = _short_traceback(self._ip, error, user_frames)
        device = counted_device()
        cleanup = free_memory(self.shell, failure=error, device=device)
        del error, user_frames
        snapshot = take_snapshot()
        holders = self._holders(device)
        analysis = analyse_cell("\n" + body, failed_line)
        causes, fixes = diagnose(oom, snapshot, holders, analysis, cleanup)
        return Report(
            error_text=error_text,
            oom=oom,
            cell=body,
            analysis=analysis,
            snapshot=snapshot,
            holders=holders,
            cleanup=cleanup,
            causes=causes,
            fixes=fixes,
            traceback_text=short_traceback,
        )

    def _holders(self, device: str) -> Any:
        hidden = self._ip.user_ns_hidden
        return find_holders(self._ip.user_ns, device, skip=lambda name: name in hidden)


def _parse(magic: Any, line: str, help_command: str) -> Any:
    """Parse magic arguments; a mistake is one line that says where the help is."""
    try:
        return parse_argstring(magic, line)
    except UsageError as error:
        raise UsageError(f"{error}; type `{help_command}` for the usage.") from None


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
    """Register the magics (once, however often ``%load_ext`` runs)."""
    if "VramMagics" not in shell.magics_manager.registry:
        shell.register_magics(VramMagics)


def unload(shell: Any) -> None:
    """Remove every magic ``load`` added."""
    manager = shell.magics_manager
    manager.magics["line"].pop("vram", None)
    manager.magics["cell"].pop("oomsafe", None)
    manager.registry.pop("VramMagics", None)
