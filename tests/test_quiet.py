"""bitsandbytes' int8 cast warning: shown once after the 8-bit fix, not on every matmul."""

from __future__ import annotations

import logging

import pytest

from vram_magic._quiet import show_int8_cast_warning_once

CAST = "MatMul8bitLt: inputs will be cast from %s to float16 during quantization"


@pytest.fixture
def bnb_logger(monkeypatch: pytest.MonkeyPatch) -> logging.Logger:
    """bitsandbytes' logger, as before vram_magic touched it (its filters restored afterwards)."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    monkeypatch.setattr(logger, "filters", [])
    return logger


def test_each_distinct_cast_warning_is_shown_once_and_other_messages_all_pass(
    bnb_logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    show_int8_cast_warning_once()
    show_int8_cast_warning_once()  # a second 8-bit fix adds no second filter
    assert len(bnb_logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=bnb_logger.name):
        for _ in range(3):
            bnb_logger.warning(CAST, "torch.bfloat16")
            bnb_logger.warning("something else")
        bnb_logger.warning(CAST, "torch.float32")
    assert caplog.messages == [
        CAST % "torch.bfloat16",
        "something else",
        "something else",
        "something else",
        CAST % "torch.float32",
    ]


def test_without_the_8bit_fix_bitsandbytes_logs_as_it_does(
    bnb_logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=bnb_logger.name):
        for _ in range(3):
            bnb_logger.warning(CAST, "torch.bfloat16")
    assert len(caplog.messages) == 3
