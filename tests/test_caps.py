"""%vram cap: presets and sizes, and the target kept when there is no GPU to cap."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from tests.stack import TRANSFORMERS_MAJOR
from vram_magic import _caps
from vram_magic._caps import PRESETS, parse_cap, parse_gpus

# The bundled config's dtype (bfloat16), typed where from_pretrained would not load it untold (transformers 4
# loads float32): the plans below are about the card, not the dtype.
AS_CONFIGURED = "" if TRANSFORMERS_MAJOR >= 5 else " --dtype bfloat16"

GiB = 2**30


@pytest.fixture(autouse=True)
def no_target() -> Iterator[None]:
    _caps.set_target_bytes(None)
    _caps._set_card(None)
    yield
    _caps.set_target_bytes(None)
    _caps._set_card(None)


@pytest.mark.parametrize(
    ("text", "expected_bytes"),
    [
        (
            "t4",
            round(14.75 * GiB),
        ),  # what torch reports on a T4 (see oom-messages/torch2_1_other_process.txt)
        ("T4", round(14.75 * GiB)),
        ("h100", round(79.18 * GiB)),  # what torch reports on an H100 (torch2_11_h100_plain.txt)
        ("v100", PRESETS["v100-16"]),
        ("4090", PRESETS["rtx4090"]),
        ("12GiB", 12 * GiB),
        ("12 GB", 12 * GiB),
        ("1.5g", round(1.5 * GiB)),
        ("512MiB", 512 * 2**20),
    ],
)
def test_presets_and_sizes(text: str, expected_bytes: int) -> None:
    assert parse_cap(text)[0] == expected_bytes


@pytest.mark.parametrize("text", ["t5", "-1GiB", "12 parsecs", "GiB"])  # sizes out of range: below
def test_anything_else_says_what_to_type(text: str) -> None:
    with pytest.raises(
        ValueError, match=r"type `%vram cap t4`, `%vram cap 12GiB` or `%vram cap off` \(presets: t4"
    ):
        parse_cap(text)


def test_without_a_gpu_the_cap_becomes_the_target_to_plan_for(ip: Any) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: tests/gpu covers the real cap")
    with capture_output() as captured:
        ip.run_line_magic("vram", "cap t4")
        ip.run_line_magic("vram", "cap")
    assert captured.stdout.splitlines() == [
        "No GPU here: estimates and preflight will plan for 14.75 GiB (T4). As on a T4, fixes use float16, "
        "not bfloat16 (the card has none), and training fixes set fp16=True.",
        "No GPU here; estimates and preflight plan for 14.75 GiB.",
    ]
    assert _caps.target_bytes() == round(14.75 * GiB)
    with capture_output() as captured:
        ip.run_line_magic("vram", "cap off")
        ip.run_line_magic("vram", "cap")
    assert _caps.target_bytes() is None
    assert captured.stdout.splitlines() == [
        "No cap now.",
        "No cap is set. Type `%vram cap t4` to rehearse a T4.",
    ]


@pytest.mark.parametrize(
    "line", ["cap t5", "cap t4 l4", "cap 0GiB", "cap 0.5KiB", "cap 0.0001MiB", "cap 2048GiB"]
)
def test_bad_caps_are_one_line_usage_errors(ip: Any, line: str) -> None:
    with pytest.raises(UsageError, match="`%vram cap t4`"):
        ip.run_line_magic("vram", line)


def _estimate_table(ip: Any, line: str) -> tuple[str, list[str]]:
    """What ``%vram LINE`` printed, and the rows of its table (header first)."""
    with capture_output() as captured:
        ip.run_line_magic("vram", line)
    table = captured.stdout.split("How this was estimated:")[0]
    return captured.stdout, [row for row in table.splitlines() if row.startswith("  ")]


def test_vram_estimate_of_one_quantized_load_says_whether_it_fits_a_named_card(
    ip: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, lines = _estimate_table(ip, "estimate meta-llama/Llama-3.1-8B --quant 4bit --gpu t4")
    rows = [line.split() for line in lines]
    assert rows[0][-2:] == ["room", "fits"] and len(rows) == 2
    assert rows[1][:2] == ["4-bit", "NF4"] and rows[1][-3:] == ["14.75", "GiB", "yes"]


def test_vram_estimate_plans_a_load_for_a_named_card_offline(
    ip: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    printed, lines = _estimate_table(ip, f"estimate meta-llama/Llama-3.1-8B --gpu t4{AS_CONFIGURED}")
    rows = {line.split()[0]: line for line in lines}
    assert "8.03 B parameters" in printed
    assert rows["bfloat16"].rstrip().endswith("no")  # 15 GiB of bf16 weights cannot fit a T4
    assert rows["4-bit"].rstrip().endswith("yes")


def test_vram_estimate_mistakes_are_one_line_usage_errors(ip: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="Type `%vram estimate MODEL`"):
        ip.run_line_magic("vram", "estimate")
    with pytest.raises(UsageError, match="Pass a local path, or run once online") as raised:
        ip.run_line_magic("vram", "estimate no-such-org/no-such-model")
    assert "\n" not in str(raised.value)


def test_a_cap_on_a_machine_without_a_gpu_imports_no_torch() -> None:
    script = textwrap.dedent(
        """
        import sys
        from IPython.testing.globalipapp import start_ipython
        from vram_magic._probe import surely_no_gpu
        if not surely_no_gpu():
            print("a GPU is here")
            raise SystemExit(0)
        ip = start_ipython()
        ip.run_line_magic("load_ext", "vram_magic")
        ip.run_line_magic("vram", "cap t4")
        assert "torch" not in sys.modules, "cap imported torch"
        from vram_magic._caps import target_bytes
        print(target_bytes())
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    if done.stdout.strip() == "a GPU is here":
        pytest.skip("a GPU is visible: a cap there is PyTorch's and needs torch")
    assert done.stdout.strip().splitlines()[-1] == str(PRESETS["t4"])


def test_rehearsing_a_card_without_bfloat16_makes_the_fixes_use_float16(ip: Any) -> None:
    from vram_magic._checks import _compute_dtype

    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16 itself")
    assert _compute_dtype() == "bfloat16"
    with capture_output():
        ip.run_line_magic("vram", "cap t4")
    assert _compute_dtype() == "float16"
    with capture_output():
        ip.run_line_magic("vram", "cap 12GiB")  # a size is memory only: this GPU's rules
    assert _compute_dtype() == "bfloat16"
    with capture_output():
        ip.run_line_magic("vram", "cap v100")
    assert _compute_dtype() == "float16"
    with capture_output():
        ip.run_line_magic("vram", "cap off")
    assert _compute_dtype() == "bfloat16"


def test_a_cap_for_one_gpu_names_a_gpu_that_is_here(ip: Any) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: tests/gpu covers the real cap")
    with pytest.raises(UsageError, match=r"No GPU here to cap: type `%vram cap t4` \(no --device\)"):
        ip.run_line_magic("vram", "cap t4 --device cuda:1")
    with pytest.raises(UsageError, match="A cap is for a GPU"):
        ip.run_line_magic("vram", "cap t4 --device cpu")
    assert _caps.target_bytes() is None  # nothing was set


def test_several_gpus_are_typed_as_a_count_and_a_card() -> None:
    assert parse_gpus("2xt4") == (2, PRESETS["t4"], "2 x T4")
    assert parse_gpus("4x24GiB") == (4, 24 * GiB, "4 x 24GiB")
    assert parse_gpus("t4") == (1, PRESETS["t4"], "T4")
    with pytest.raises(ValueError, match="from 1 to 64 GPUs"):
        parse_gpus("0xt4")


def test_vram_estimate_plans_kaggles_two_t4s(ip: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with capture_output() as two:
        ip.run_line_magic("vram", f"estimate meta-llama/Llama-3.1-8B --gpu 2xt4{AS_CONFIGURED}")
    assert "Planned for 2 x T4: room and peak are each GPU's." in two.stdout.splitlines()
    bf16 = next(line for line in two.stdout.splitlines() if line.strip().startswith("bfloat16"))
    assert bf16.split()[-1] == "yes"
    with capture_output() as one:
        ip.run_line_magic("vram", f"estimate meta-llama/Llama-3.1-8B --gpu t4{AS_CONFIGURED}")
    bf16 = next(line for line in one.stdout.splitlines() if line.strip().startswith("bfloat16"))
    assert bf16.split()[-1] == "no"
    with pytest.raises(UsageError, match="Training spread over several GPUs"):
        ip.run_line_magic("vram", "estimate meta-llama/Llama-3.1-8B --gpu 2xt4 --train qlora")
