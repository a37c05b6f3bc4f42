"""The three seed scenarios for real on a capped GPU, with a 0.85 B Llama (tests/gpu/scenarios.py).

Each is rescued once by ``Session.apply_fix(report, n)`` (what the report widget's Re-run button calls)
and once by ``%%oomsafe --auto``. Each test checks that the out-of-memory error was real (the message parsed,
its "allowed" the cap set), that what the failed run pinned was given back, and that the rescued cell did what
the fix says: the merge merged, the batch was halved with the effective batch kept, the model was quantized
or offloaded, and the result works.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from IPython.utils.capture import capture_output

from tests.gpu import scenarios as sc
from vram_magic import OutOfMemoryHandled, Report

pytestmark = pytest.mark.gpu

MiB, GiB = sc.MiB, sc.GiB
PINNED_SLACK_BYTES = 64 * MiB  # what a failed run may leave on the GPU (small tensors, CUDA's own bits)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sc.save_llama(tmp_path_factory.mktemp("llama-0.85b"))


@pytest.fixture
def gpu(ip: Any) -> Iterator[Any]:
    """The shell on a released GPU; afterwards the cap is lifted and what the test left is freed."""
    names = set(ip.user_ns)
    sc.release()
    try:
        yield ip
    finally:
        sc.lift_cap()
        for name in set(ip.user_ns) - names:
            del ip.user_ns[name]
        with capture_output():
            ip.run_line_magic("vram", "free")  # what IPython still keeps of the last error
        sc.release()


def _run(ip: Any, cell: str) -> tuple[Any, str]:
    """Run a cell; return its result and everything it printed or displayed, as text."""
    with capture_output() as captured:
        result = ip.run_cell(cell)
    shown = "".join(str(o.data.get("text/plain", "")) for o in captured.outputs)
    return result, captured.stdout + shown


def _assert_real_oom(report: Report, cap: int) -> None:
    """A CUDA OOM parsed from torch's own message, under the cap this test set."""
    assert report.oom is not None and report.oom.kind == "cuda", report.error_text
    assert report.oom.allowed_bytes == pytest.approx(cap, abs=6 * MiB), report.error_text  # "3.19 GiB"
    assert report.snapshot.gpus[0].cap_bytes == pytest.approx(cap, abs=MiB)
    assert "cap" in [cause.key for cause in report.causes]


def _fails(ip: Any, cell: str, cap: int) -> Report:
    """Run ``cell`` under ``%%oomsafe``: it must end in a real OOM, with what it pinned given back."""
    before = sc.allocated()
    result, shown = _run(ip, "%%oomsafe --force\n" + cell)  # --force: past preflight, to the real OOM
    assert isinstance(result.error_in_exec, OutOfMemoryHandled), shown
    report = sc.magics(ip).last_report
    assert isinstance(report, Report)
    _assert_real_oom(report, cap)
    assert sc.allocated() - before < PINNED_SLACK_BYTES
    return report


def _auto(ip: Any, cell: str, cap: int) -> str:
    """Run ``cell`` under ``%%oomsafe --auto``: its first run must be a real OOM and the second must work."""
    with sc.recording_reports(ip) as reports:
        result, shown = _run(ip, "%%oomsafe --auto --force\n" + cell)
    assert result.success, shown
    assert reports, "the cell as written did not run out of memory"
    _assert_real_oom(reports[0], cap)
    assert "Attempts by --auto (2 runs, " in shown, shown
    assert len(reports) == 1  # one failed run, then the fix worked
    return shown


# S1: a LoRA merge while a second copy of the base holds memory ------------------------------------------


def _assert_merged(ip: Any) -> None:
    """``merged`` has no LoRA layer left and answers as the LoRA model did (not as the bare base)."""
    merged = ip.user_ns["merged"]
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not [name for name, _ in merged.named_modules() if "lora_" in name]
    with torch.no_grad():
        got = merged(ip.user_ns["tokens"].to(merged.device)).logits.float().cpu()
    expected, unadapted = ip.user_ns["expected"], ip.user_ns["unadapted"]
    assert sc.relative_distance(got, expected) < sc.relative_distance(unadapted, expected) / 3


def test_s1_merge_rescued_by_merging_on_the_cpu(gpu: Any, llama: Path, tmp_path: Path) -> None:
    ip = gpu
    cap = sc.prepare(ip, sc.SCENARIOS["merge"], llama, tmp_path)
    before = sc.allocated()
    report = _fails(ip, sc.MERGE_CELL, cap)
    assert report.analysis.kind == "merge"
    first = report.fixes[0]
    assert (first.key, first.free_names, first.fits) == ("free", ("reference",), True)
    number = sc.fix_number(report, "merge-cpu")
    with capture_output() as captured:
        sc.magics(ip).apply_fix(report, number)
    assert f"Fix {number} worked: Merge on the CPU" in captured.stdout
    if ip.user_ns["merged"].device.type == "cpu":
        assert "Kept on CPU" in captured.stdout
        assert sc.allocated() <= before - 1.5 * GiB  # the LoRA model left the GPU
    else:
        assert "Moved to cuda" in captured.stdout
    sc.lift_cap()
    _assert_merged(ip)


def test_s1_merge_rescued_by_auto_freeing_the_copy(gpu: Any, llama: Path, tmp_path: Path) -> None:
    ip = gpu
    cap = sc.prepare(ip, sc.SCENARIOS["merge"], llama, tmp_path)
    before = sc.allocated()
    shown = _auto(ip, sc.MERGE_CELL, cap)
    assert "--auto: fix 1 worked: Free `reference`, then run the cell again." in shown
    assert "reference" not in ip.user_ns
    assert sc.allocated() <= before - 1.5 * GiB  # the copy's 1.59 GiB came back
    assert ip.user_ns["merged"].device.type == "cuda"
    sc.lift_cap()
    _assert_merged(ip)


# S2: a QLoRA Trainer cell at batch 4 -------------------------------------------------------------------


def _assert_trained_at_half_batch(ip: Any) -> None:
    args = ip.user_ns["args"]
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 2)  # still 4 a step
    result = ip.user_ns["result"]
    assert result.global_step == 2 and math.isfinite(result.training_loss)


def test_s2_qlora_rescued_by_the_rerun_button(gpu: Any, llama: Path, tmp_path: Path) -> None:
    ip = gpu
    cap = sc.prepare(ip, sc.SCENARIOS["qlora"], llama, tmp_path)
    report = _fails(ip, sc.QLORA_CELL, cap)
    assert report.analysis.kind == "training"
    assert ip.user_ns["args"].per_device_train_batch_size == 4  # the failed run's own arguments
    number = sc.fix_number(report, "half-batch")
    with capture_output() as captured:
        sc.magics(ip).apply_fix(report, number)
    assert (
        f"Fix {number} worked: Halve the batch (4 → 2) and double gradient accumulation (1 → 2)"
        in captured.stdout
    )
    _assert_trained_at_half_batch(ip)


def test_s2_qlora_rescued_by_auto(gpu: Any, llama: Path, tmp_path: Path) -> None:
    ip = gpu
    cap = sc.prepare(ip, sc.SCENARIOS["qlora"], llama, tmp_path)
    shown = _auto(ip, sc.QLORA_CELL, cap)
    assert "--auto: fix 1 worked: Halve the batch (4 → 2) and double gradient accumulation (1 → 2)" in shown
    assert "per_device_train_batch_size=2," in shown and "gradient_accumulation_steps=2," in shown
    _assert_trained_at_half_batch(ip)


@pytest.mark.xfail(
    strict=True,
    reason="issue 12, open: seed 2 asks for 4 sequences where 3 fit (33 % over its room); preflight stops on "
    "a floor of 50 % of the estimated activations and logits, which reaches the room only for a step about "
    "twice too big, and the estimate is itself 31 % under the H100 row. Needs the GPU calibration (a GPU-"
    "measured share and estimate) before this can pass",
)
def test_s2_preflight_does_not_run_the_doomed_training_and_auto_trains_with_no_oom(
    gpu: Any, llama: Path, tmp_path: Path
) -> None:
    """Issue 12: seed 2 as written (batch 4 where 3 sequences fit) is judged before it runs; --auto trains
    with the batch split the estimate says fits, with zero OOMs."""
    ip = gpu
    sc.prepare(ip, sc.SCENARIOS["qlora"], llama, tmp_path)
    before = sc.allocated()
    result, shown = _run(ip, "%%oomsafe\n" + sc.QLORA_CELL)
    assert isinstance(result.error_in_exec, OutOfMemoryHandled), shown
    report = sc.magics(ip).last_report
    assert report.oom is None and report.preflight is not None and report.preflight.kind == "training"
    assert "result" not in ip.user_ns and sc.allocated() - before < PINNED_SLACK_BYTES
    # Not a false stop: run anyway, the same cell does run out of memory (and is rescued as usual)
    result, shown = _run(ip, "%%oomsafe --force\n" + sc.QLORA_CELL)
    assert isinstance(result.error_in_exec, OutOfMemoryHandled), shown
    assert sc.magics(ip).last_report.oom is not None, shown
    assert "result" not in ip.user_ns and sc.allocated() - before < PINNED_SLACK_BYTES
    with sc.recording_reports(ip) as reports:
        result, shown = _run(ip, "%%oomsafe --auto\n" + sc.QLORA_CELL)
    assert result.success, shown
    assert reports == []  # zero OOMs: the split that fits ran straight away
    assert "Running fix 1 instead: " in shown
    args = ip.user_ns["args"]
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 4  # the same 4 a step
    assert ip.user_ns["result"].global_step == 2 and math.isfinite(ip.user_ns["result"].training_loss)


# S3: from_pretrained in bfloat16 under a 1.5 GiB cap ---------------------------------------------------


def _assert_generates(ip: Any) -> None:
    result, shown = _run(
        ip,
        "tokens = torch.randint(0, 32000, (1, 8), device='cuda')\n"
        "with torch.no_grad():\n"
        "    answer = model.generate(tokens, max_new_tokens=4, do_sample=False, pad_token_id=0)\n",
    )
    assert result.success, shown
    assert tuple(ip.user_ns["answer"].shape) == (1, 12)


def _first_linear(ip: Any) -> Any:
    return ip.user_ns["model"].model.layers[0].self_attn.q_proj


@pytest.mark.parametrize(("key", "title"), [("4bit", "Load the model in 4-bit"), ("offload", "Offload")])
def test_s3_load_rescued_by_the_rerun_button(
    gpu: Any, llama: Path, tmp_path: Path, key: str, title: str
) -> None:
    import bitsandbytes as bnb

    ip = gpu
    cap = sc.prepare(ip, sc.SCENARIOS["load"], llama, tmp_path)
    report = _fails(ip, sc.LOAD_CELL, cap)
    assert report.analysis.kind == "load"
    assert report.oom is not None
    # The whole model at once, less what PyTorch had reserved but not allocated: transformers'
    # caching_allocator_warmup subtracts that (measured on an H100: 1.56 GiB asked for the 1.59 GiB model).
    requested = report.oom.requested_bytes
    assert requested is not None and sc.BF16_BYTES - 128 * sc.MiB <= requested <= sc.BF16_BYTES * 1.01
    # So the one allocation is over the cap, or under it but over what is left: the report says which.
    allowed = report.oom.allowed_bytes
    assert allowed == pytest.approx(cap, rel=0.01)
    causes = [cause.key for cause in report.causes]
    assert "cap" in causes and ("too-big" if requested > allowed else "need") in causes, causes
    number = sc.fix_number(report, key)
    with capture_output() as captured:
        sc.magics(ip).apply_fix(report, number)
    assert f"Fix {number} worked: {title}" in captured.stdout
    if key == "4bit":
        assert isinstance(_first_linear(ip), bnb.nn.Linear4bit)
    else:
        placed = set(ip.user_ns["model"].hf_device_map.values())
        assert "cpu" in placed and placed - {"cpu", "disk"}, placed  # some layers on the GPU, some in RAM
    assert sc.allocated() < cap
    _assert_generates(ip)


def test_s3_load_rescued_by_auto_in_8bit(gpu: Any, llama: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    ip = gpu
    cap = sc.prepare(ip, sc.SCENARIOS["load"], llama, tmp_path)
    shown = _auto(ip, sc.LOAD_CELL, cap)
    assert "--auto: fix 1 worked: Load the model in 8-bit." in shown
    assert isinstance(_first_linear(ip), bnb.nn.Linear8bitLt)
    assert sc.allocated() < cap
    _assert_generates(ip)


def test_s3_preflight_does_not_run_the_doomed_load_and_auto_loads_8bit_with_no_oom(
    gpu: Any, llama: Path, tmp_path: Path
) -> None:
    import bitsandbytes as bnb

    ip = gpu
    cap = sc.prepare(ip, sc.SCENARIOS["load"], llama, tmp_path)
    before = sc.allocated()
    result, shown = _run(ip, "%%oomsafe\n" + sc.LOAD_CELL)
    assert isinstance(result.error_in_exec, OutOfMemoryHandled), shown
    report = sc.magics(ip).last_report
    assert report.oom is None and report.preflight is not None and str(report).startswith("Not run:")
    assert sc.allocated() == before  # nothing was loaded
    with sc.recording_reports(ip) as reports:
        result, shown = _run(ip, "%%oomsafe --auto\n" + sc.LOAD_CELL)
    assert result.success, shown
    assert reports == []  # zero OOMs: the 8-bit plan ran straight away
    assert "Running fix 1 instead: Load the model in 8-bit." in shown
    assert isinstance(_first_linear(ip), bnb.nn.Linear8bitLt)
    assert sc.allocated() < cap
