"""Every exception vram_magic raises on purpose, all importable from ``vram_magic``.

ValueError
└── NotApplicable        a fix does not apply to a cell; ``reason`` says why
Exception
├── OutOfMemoryHandled   ends a %%oomsafe cell that ran out of memory, after its report
├── CellSyntaxError      a %%oomsafe cell that does not compile, shown as a plain cell's SyntaxError
└── Refused              a command that cannot do what was asked; the magics show it as one line
"""

from __future__ import annotations


class NotApplicable(ValueError):
    """The fix does not apply to this cell; ``reason`` says why in plain words.

    ``already``: the cell already does what the fix would do (so it is no way out). ``elsewhere``: what the
    fix would change is not in this cell (the model was loaded, or the batch size set, in an earlier cell), so
    it may still be applied there by hand. Neither: the fix is wrong for this cell (a model on the CPU on
    purpose, a full fine-tune that cannot be quantized)."""

    def __init__(self, reason: str, *, already: bool = False, elsewhere: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.already = already
        self.elsewhere = elsewhere


class OutOfMemoryHandled(Exception):
    """Ends a ``%%oomsafe`` cell that ran out of memory, after the memory was freed and the report shown.

    It keeps no frame of the user's code alive, and IPython shows it as one line.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class CellSyntaxError(Exception):
    """A ``%%oomsafe`` cell that does not compile. IPython shows it exactly as a plain cell's SyntaxError,
    with no frame of the magic's; the SyntaxError itself is the ``__cause__``."""

    def __init__(self, error: SyntaxError, rendered: list[str]) -> None:
        super().__init__(str(error))
        self.rendered = rendered

    def _render_traceback_(self) -> list[str]:
        return self.rendered


class Refused(Exception):
    """A command that cannot do what was asked (``%vram fix 9`` of a report with 3 fixes); the message says
    what to type instead, and the magics show it as IPython shows a UsageError: one line."""


for _public in (NotApplicable, OutOfMemoryHandled, CellSyntaxError, Refused):
    _public.__module__ = "vram_magic"
