"""Show bitsandbytes' int8 cast warning once, not on every matmul.

An 8-bit model whose other layers are in bfloat16 (what the 8-bit fix keeps, as most checkpoints are) makes
bitsandbytes log "MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16 during quantization" on
every 8-bit matmul: thousands of lines for one ``generate()``. The cast is how LLM.int8 works (its matmul
computes in float16 whatever the model's dtype). Older bitsandbytes raised it with ``warnings.warn``, which
Python shows once per place; since it moved to ``logging`` it repeats. This filter restores "once".
"""

from __future__ import annotations

import logging

_LOGGER = "bitsandbytes.autograd._functions"
_CAST_WARNING = "MatMul8bitLt: inputs will be cast from"


class _CastWarningOnce(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(_CAST_WARNING):
            return True
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def show_int8_cast_warning_once() -> None:
    """Let each distinct "inputs will be cast" warning of bitsandbytes through once (idempotent)."""
    logger = logging.getLogger(_LOGGER)
    if not any(isinstance(existing, _CastWarningOnce) for existing in logger.filters):
        logger.addFilter(_CastWarningOnce())
