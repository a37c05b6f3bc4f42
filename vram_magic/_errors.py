"""Every exception vram_magic raises on purpose.

ValueError
└── NotApplicable        a fix does not apply to a cell; ``reason`` says why
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


NotApplicable.__module__ = "vram_magic"
