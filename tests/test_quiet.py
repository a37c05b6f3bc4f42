"""bitsandbytes' int8 cast warning: shown once after the 8-bit fix, not on every matmul."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vram_magic._quiet import show_int8_cast_warning_once

REPO = Path(__file__).resolve().parents[1]
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


def test_loading_the_extension_leaves_bitsandbytes_logging_alone(tmp_path: Path) -> None:
    """Only an 8-bit fix, or a %%oomsafe cell that loads in 8-bit, adds the filter (a fresh process)."""
    code = (
        "import logging\n"
        "from IPython.testing.globalipapp import get_ipython\n"
        "ip = get_ipython()\n"
        "ip.run_line_magic('load_ext', 'vram_magic')\n"
        "logger = logging.getLogger('bitsandbytes.autograd._functions')\n"
        "ip.run_cell('%%oomsafe\\nx = 1\\n')\n"
        "print(len(logger.filters))\n"
        "ip.run_cell('%%oomsafe\\nsettings = dict(load_in_8bit=True)\\n')\n"
        "print(len(logger.filters))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "1"]
