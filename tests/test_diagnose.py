"""The rules that turn evidence into ranked causes and fixes, fed with real OOM messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from vram_magic._diagnose import diagnose
from vram_magic._oom import parse_oom_message
from vram_magic._types import (
    Cause,
    CellAnalysis,
    Cleanup,
    CpuMemory,
    Fix,
    GpuSnapshot,
    Holder,
    OOMInfo,
    Snapshot,
)
from vram_magic.cell import analyse_source as analyse_cell

MESSAGES = Path(__file__).parent / "fixtures" / "oom_messages"
GiB = 2**30
NO_CLEANUP = Cleanup(released=(), reclaimed_bytes=None, freed_tensor_bytes=0)
NO_GPU = Snapshot(gpus=(), cpu=CpuMemory(None, None, None))


def _oom(name: str) -> OOMInfo:
    info = parse_oom_message((MESSAGES / name).read_text())
    assert info is not None
    return info


def _diagnose(
    oom: OOMInfo,
    snapshot: Snapshot,
    holders: tuple[Holder, ...],
    analysis: CellAnalysis,
    cleanup: Cleanup,
) -> tuple[tuple[Cause, ...], tuple[Fix, ...]]:
    """``diagnose`` with holders that share no storage: deleting names frees their bytes."""
    return diagnose(
        oom,
        snapshot,
        holders,
        analysis,
        cleanup,
        lambda names: sum(h.total_bytes for h in holders if h.name in names),
    )


def _keys(items: tuple[object, ...]) -> list[str]:
    return [item.key for item in items]  # type: ignore[attr-defined]


def test_another_process_and_fragmentation_are_named_with_their_figures() -> None:
    analysis = analyse_cell("\nloss = model(**batch).loss\nloss.backward()\n", 3)
    causes, fixes = _diagnose(_oom("torch2_1_other_process.txt"), NO_GPU, (), analysis, NO_CLEANUP)
    texts = " ".join(cause.text for cause in causes)
    assert "Process 20417 holds 1.10 GiB" in texts
    assert "455.37 MiB was reserved by PyTorch but unallocated" in texts
    assert "expandable_segments:True" in texts
    assert _keys(fixes) == ["other-process", "half-batch", "checkpointing", "expandable-segments"]


def test_a_request_above_the_cap_offers_no_freeing_even_with_holders() -> None:
    holders = (Holder("old_model", "LlamaForCausalLM", 3 * GiB),)
    analysis = analyse_cell("\nmodel = AutoModelForCausalLM.from_pretrained(path)\n", 2)
    causes, fixes = _diagnose(
        _oom("torch2_11_h100_from_pretrained_capped.txt"), NO_GPU, holders, analysis, NO_CLEANUP
    )
    assert _keys(causes)[:2] == ["too-big", "cap"]
    assert "1.50 GiB" in causes[1].text
    assert "free" not in _keys(fixes)
    assert _keys(fixes) == ["bf16", "8bit", "4bit", "offload", "cpu", "lift-cap"]


def test_an_old_copy_being_rebound_is_the_first_thing_to_free() -> None:
    oom = _oom("seed_from_pretrained_torch1.txt")  # 2 GiB asked, 1.5 GiB free on an 11 GiB GPU
    holders = (Holder("model", "LlamaForCausalLM", 8 * GiB), Holder("tokenizer_cache", "dict", 10 * 2**20))
    analysis = analyse_cell('\nmodel = AutoModelForCausalLM.from_pretrained("x", device_map="cuda")\n', 2)
    causes, fixes = _diagnose(oom, NO_GPU, holders, analysis, NO_CLEANUP)
    rebind = next(cause for cause in causes if cause.key == "holder")
    assert "`model` (LlamaForCausalLM) from an earlier run still holds 8.00 GiB" in rebind.text
    assert "re-binds `model`" in rebind.text
    assert fixes[0].code == "%vram free model"  # the small dict is not worth naming
    assert _keys(fixes)[1:] == ["bf16", "8bit", "4bit", "offload", "cpu"]


def test_a_holder_sharing_memory_with_a_name_that_stays_says_so() -> None:
    oom = _oom("seed_qlora_torch1.txt")
    # The trainer holds the model the merge uses (5 GiB, shared) and its optimizer state (4 GiB, its own).
    holders = (
        Holder("trainer", "SFTTrainer", 9 * GiB, 5 * GiB, ("model",)),
        Holder("model", "PeftModelForCausalLM", 5 * GiB, 5 * GiB, ("trainer",)),
    )
    analysis = analyse_cell("\nmerged = model.merge_and_unload()\n", 2)
    causes, fixes = diagnose(
        oom, NO_GPU, holders, analysis, NO_CLEANUP, lambda names: 4 * GiB if "trainer" in names else 0
    )
    assert [c.text for c in causes if c.key == "holder"] == [
        "`trainer` (SFTTrainer) from an earlier cell still holds 9.00 GiB, and this cell does not use it. "
        "Some of it is shared with `model`, which stays."
    ]
    assert fixes[0].why.startswith("It holds about 4.00 GiB that this cell does not need.")


def test_a_merge_keeps_the_model_it_merges_and_frees_the_trainer() -> None:
    oom = _oom("seed_qlora_torch1.txt")
    holders = (Holder("trainer", "SFTTrainer", 9 * GiB), Holder("model", "PeftModelForCausalLM", 5 * GiB))
    analysis = analyse_cell("\nmerged = model.merge_and_unload()\n", 2)
    causes, fixes = _diagnose(oom, NO_GPU, holders, analysis, NO_CLEANUP)
    assert analysis.kind == "merge"
    assert any("`trainer` (SFTTrainer) from an earlier cell still holds 9.00 GiB" in c.text for c in causes)
    assert not any("`model`" in c.text for c in causes)
    assert [fix.code for fix in fixes][:1] == ["%vram free trainer"]
    assert _keys(fixes)[1:] == ["merge-cpu"]


def test_other_processes_seen_only_as_a_remainder_are_labelled() -> None:
    gpu = GpuSnapshot(
        index=0,
        name="T4",
        total_bytes=15 * GiB,
        free_bytes=GiB,
        others_bytes=6 * GiB,
        others_are_remainder=True,
    )
    snapshot = Snapshot(gpus=(gpu,), cpu=CpuMemory(None, None, None))
    oom = _oom("seed_from_pretrained_torch1.txt")
    causes, _ = _diagnose(oom, snapshot, (), analyse_cell("\nx = f()\n", 2), NO_CLEANUP)
    assert any("about 6.00 GiB (total - free - this process" in c.text for c in causes)


def test_a_message_without_figures_still_gets_a_cause() -> None:
    oom = _oom("cuda_error_out_of_memory.txt")
    causes, fixes = _diagnose(oom, NO_GPU, (), analyse_cell("\ny = torch.mm(x, x)\n", 2), NO_CLEANUP)
    assert _keys(causes) == ["unknown"]
    assert causes[0].text.startswith("RuntimeError: CUDA error: out of memory")
    assert fixes == ()


@pytest.mark.parametrize(
    ("cell", "line", "kind"),
    [
        ('\nmodel = AutoModelForCausalLM.from_pretrained("m")\n', 2, "load"),
        ('\npipe = pipeline("text-generation", model="m")\n', 2, "load"),
        ("\ntrainer = Trainer(model=model, args=args)\ntrainer.train()\n", 3, "training"),
        ("\nout = model.generate(**inputs, max_new_tokens=50)\n", 2, "generation"),
        ("\nwith torch.no_grad():\n    logits = model(**inputs).logits\n", 3, "forward"),
        ("\nmerged = model.merge_and_unload()\n", 2, "merge"),
        ("\ny = x @ x\n", 2, "other"),
    ],
)
def test_each_kind_of_cell_gets_its_own_fixes(cell: str, line: int, kind: str) -> None:
    analysis = analyse_cell(cell, line)
    assert analysis.kind == ("generation" if kind == "forward" else kind)
    _, fixes = _diagnose(_oom("seed_qlora_torch1.txt"), NO_GPU, (), analysis, NO_CLEANUP)
    expected = {
        # A forward pass makes no new tokens: "generate fewer tokens" is not advice for it.
        "forward": ["inference-mode", "chunk", "half-batch", "offload-cache"],
        "load": ["bf16", "8bit", "4bit", "offload", "cpu"],
        "training": ["half-batch", "checkpointing"],
        "generation": ["inference-mode", "chunk", "half-batch", "offload-cache", "smaller-generation"],
        "merge": ["merge-cpu"],
        "other": [],
    }[kind]
    assert _keys(fixes) == expected


def test_a_dispatch_refusal_offers_4bit_offloading_with_float32_cpu_layers_and_cpu() -> None:
    oom = _oom("bnb_dispatched_cpu_or_disk.txt")
    analysis = analyse_cell("\nmodel = M.from_pretrained(p, quantization_config=q)\n", 2)
    causes, fixes = _diagnose(oom, NO_GPU, (), analysis, NO_CLEANUP)
    assert _keys(causes) == ["dispatch"]
    # The offload fix sets llm_int8_enable_fp32_cpu_offload=True, which is what bitsandbytes asked for.
    assert _keys(fixes) == ["4bit", "offload", "cpu"]


def test_freeing_too_little_to_cover_the_shortfall_is_ranked_after_the_cell_fixes() -> None:
    oom = _oom("seed_from_pretrained_torch1.txt")  # 0.5 GiB short
    holders = (Holder("scratch", "Tensor", 100 * 2**20),)
    analysis = analyse_cell("\nmodel = AutoModelForCausalLM.from_pretrained(path)\n", 2)
    _, fixes = _diagnose(oom, NO_GPU, holders, analysis, NO_CLEANUP)
    assert _keys(fixes) == ["bf16", "8bit", "4bit", "offload", "cpu", "free"]
    assert fixes[-1].why == (
        "It holds about 100.00 MiB that this cell does not need. "
        "Not enough alone: the cell was 512.00 MiB short."
    )


def test_a_second_gpu_left_idle_is_named() -> None:
    """Kaggle's two T4s: the load filled GPU 0 while GPU 1 sat idle."""
    full = GpuSnapshot(index=0, name="T4", total_bytes=15 * GiB, free_bytes=GiB // 4, process_bytes=14 * GiB)
    idle = GpuSnapshot(index=1, name="T4", total_bytes=15 * GiB, free_bytes=14 * GiB, process_bytes=0)
    oom = _oom("seed_from_pretrained_torch1.txt")
    analysis = analyse_cell('\nmodel = AutoModelForCausalLM.from_pretrained("m", device_map="cuda")\n', 2)
    two = Snapshot(gpus=(full, idle), cpu=CpuMemory(None, None, None))
    causes, _ = _diagnose(oom, two, (), analysis, NO_CLEANUP)
    (cause,) = [c for c in causes if c.key == "idle-gpu"]
    assert cause.text == (
        'GPU 1 is idle (14.00 GiB free) while GPU 0 ran out: a load with device_map="auto" (or max_memory '
        "per GPU) spreads the model over both."
    )
    busy = GpuSnapshot(index=1, name="T4", total_bytes=15 * GiB, free_bytes=14 * GiB, process_bytes=8 * GiB)
    in_use = Snapshot(gpus=(full, busy), cpu=CpuMemory(None, None, None))
    assert "idle-gpu" not in _keys(_diagnose(oom, in_use, (), analysis, NO_CLEANUP)[0])
    one = Snapshot(gpus=(full,), cpu=CpuMemory(None, None, None))
    assert "idle-gpu" not in _keys(_diagnose(oom, one, (), analysis, NO_CLEANUP)[0])
