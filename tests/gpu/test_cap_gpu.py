"""%vram cap on a real GPU: the process behaves like the smaller card."""

from __future__ import annotations

from typing import Any

import pytest
from IPython.utils.capture import capture_output

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu

GiB = 2**30


def test_a_t4_cap_makes_a_16_gib_allocation_fail_for_real_and_off_lifts_it(ip: Any) -> None:
    try:
        with capture_output() as captured:
            ip.run_line_magic("vram", "cap t4")
        assert "GPU 0 capped at 14.75 GiB (T4)" in captured.stdout
        snapshot = ip.run_line_magic("vram", "")
        assert abs(snapshot.gpus[0].cap_bytes - 14.75 * GiB) < 0.01 * GiB
        with pytest.raises(torch.OutOfMemoryError, match="allowed"):
            torch.empty(16 * GiB, dtype=torch.uint8, device="cuda")
        with capture_output():
            ip.run_line_magic("vram", "cap off")
        block = torch.empty(16 * GiB, dtype=torch.uint8, device="cuda")
        del block
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def test_rehearsing_a_t4_on_a_bigger_gpu_follows_its_rules_and_says_the_cap_is_memory_only(ip: Any) -> None:
    from vram_magic._checks import _compute_dtype

    try:
        with capture_output() as captured:
            ip.run_line_magic("vram", "cap t4 --device cuda:0")
        assert "GPU 0 capped at 14.75 GiB (T4)" in captured.stdout
        assert "The cap is of memory only: speed and kernels stay this GPU's." in captured.stdout
        assert _compute_dtype() == "float16"  # a T4 has no bfloat16, whatever this GPU has
    finally:
        with capture_output():
            ip.run_line_magic("vram", "cap off")
        torch.cuda.set_per_process_memory_fraction(1.0)
