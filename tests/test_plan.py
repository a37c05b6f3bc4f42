"""The fix ladder: diagnosed fixes get the user's cell rewritten, a diff to show, and a fit estimate.

Fed with real OOM messages (tests/fixtures/oom_messages) and the fixes ``diagnose`` ranks for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from vram_magic._cells import analyse_cell
from vram_magic._diagnose import diagnose
from vram_magic._oom import parse_oom_message
from vram_magic._plan import Room, make_runnable, room_after_cleanup
from vram_magic._rewrite import NotApplicable, rewrite
from vram_magic._types import Cleanup, CpuMemory, Fix, GpuSnapshot, Holder, MemorySnapshot, OOMInfo

MESSAGES = Path(__file__).parent / "fixtures" / "oom_messages"
MiB = 2**20
GiB = 2**30
NO_GPU = MemorySnapshot(
    gpus=(), cpu=CpuMemory(total_bytes=None, available_bytes=None, process_rss_bytes=None)
)

LOAD = """\
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda")  # the base model
"""
LOAD_BF16 = 'model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")\n'
MERGE = "merged = model.merge_and_unload()\n"
MERGE_AND_SAVE = 'model.merge_and_unload().save_pretrained("merged")\n'


def _oom(name: str) -> OOMInfo:
    info = parse_oom_message((MESSAGES / name).read_text())
    assert info is not None
    return info


def _plan(
    message: str,
    cell: str,
    *,
    snapshot: MemorySnapshot = NO_GPU,
    holders: tuple[Holder, ...] = (),
    freed_bytes: int = 0,
    needs: dict[str, int] | None = None,
) -> tuple[Room, dict[str, Fix]]:
    """What the magic does after an OOM: diagnose, measure the room, make the fixes runnable."""
    oom = _oom(message)
    cleanup = Cleanup(released=(), reclaimed_bytes=None, freed_tensor_bytes=freed_bytes)
    line = next(
        i for i, text in enumerate(cell.splitlines(), 1) if "from_pretrained(" in text or "merge" in text
    )

    def freed_by(names: Sequence[str]) -> int:  # holders that share no storage
        return sum(h.total_bytes for h in holders if h.name in names)

    _, fixes = diagnose(oom, snapshot, holders, analyse_cell(cell, line), cleanup, freed_by)
    room = room_after_cleanup(snapshot, oom, freed_bytes)
    planned = make_runnable(fixes, cell, oom, room, needs)
    assert len({fix.key for fix in planned}) == len(planned)
    return room, {fix.key: fix for fix in planned}


# --------------------------------------------------------------------------------------------------
# Rewritten cells and diffs


def test_each_cell_fix_carries_the_rewritten_cell_and_shows_it_as_a_diff_of_the_users_code() -> None:
    _, fixes = _plan("torch2_11_h100_from_pretrained_capped.txt", LOAD)
    assert list(fixes) == ["bf16", "8bit", "offload", "4bit", "cpu", "lift-cap"]
    eight = fixes["8bit"]
    assert eight.rewritten_cell == (
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from transformers import BitsAndBytesConfig\n\n"
        'model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", '
        "quantization_config=BitsAndBytesConfig(load_in_8bit=True))  # the base model\n"
    )
    assert eight.code.startswith("--- cell\n+++ fixed cell\n")
    assert "+from transformers import BitsAndBytesConfig\n" in eight.code
    assert (
        '-model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda")  # the base model'
        in eight.code
    )
    assert fixes["cpu"].rewritten_cell == LOAD.replace('device_map="cuda"', 'device_map="cpu"')
    assert fixes["bf16"].rewritten_cell is not None and "dtype=torch.bfloat16" in fixes["bf16"].rewritten_cell
    assert all(fix.runnable for fix in fixes.values())


def test_4bit_computes_in_bfloat16_where_there_is_no_gpu_to_ask() -> None:
    _, fixes = _plan("torch2_11_h100_from_pretrained_capped.txt", LOAD)
    assert fixes["4bit"].rewritten_cell is not None
    assert "bnb_4bit_compute_dtype=torch.bfloat16" in fixes["4bit"].rewritten_cell


def test_lifting_the_cap_runs_the_cell_after_setting_the_fraction_back_to_one() -> None:
    _, fixes = _plan("torch2_11_h100_from_pretrained_capped.txt", LOAD)
    lift = fixes["lift-cap"]
    assert lift.rewritten_cell == "import torch\ntorch.cuda.set_per_process_memory_fraction(1.0)\n" + LOAD


def test_freeing_reruns_the_cell_as_written_after_deleting_the_names() -> None:
    holders = (Holder("old_model", "LlamaForCausalLM", 3 * GiB),)
    _, fixes = _plan("seed_from_pretrained_torch1.txt", LOAD, holders=holders)
    free = fixes["free"]
    assert free.rewritten_cell == LOAD and free.free_names == ("old_model",)
    assert free.fits is True and free.needed_bytes is None  # the diagnosis's verdict, kept


def test_a_fix_the_cell_gives_nothing_to_change_stays_as_advice_with_the_reason() -> None:
    _, fixes = _plan("torch2_11_h100_plain.txt", MERGE_AND_SAVE)
    merge = fixes["merge-cpu"]
    assert not merge.runnable and merge.rewritten_cell is None
    assert merge.code == 'model = model.to("cpu")\nmerged = model.merge_and_unload()'  # the advice, unchanged
    assert merge.why.endswith(
        "(Apply it by hand: this cell has no `merged = model.merge_and_unload()` assignment to run on the "
        "CPU.)"
    )


def test_a_fix_the_cell_already_has_is_not_offered() -> None:
    _, fixes = _plan("torch2_11_h100_from_pretrained_capped.txt", LOAD_BF16)
    assert "bf16" not in fixes
    assert {"8bit", "4bit", "offload", "cpu"} <= set(fixes)


@pytest.mark.parametrize(
    ("cell", "fix", "already"),
    [
        (LOAD_BF16, "bf16", True),
        (LOAD_BF16.replace("cuda", "cpu"), "cpu", True),
        (MERGE_AND_SAVE, "merge-cpu", False),
    ],
)
def test_the_rewriter_says_whether_a_fix_is_already_there_or_has_nothing_to_change(
    cell: str, fix: str, already: bool
) -> None:
    with pytest.raises(NotApplicable) as raised:
        rewrite(cell, fix)
    assert raised.value.already is already


def test_merging_on_the_cpu_is_runnable_for_a_merge_assignment() -> None:
    _, fixes = _plan("torch2_11_h100_plain.txt", MERGE)
    merge = fixes["merge-cpu"]
    assert merge.rewritten_cell == (
        "import vram_magic\n"
        'model = model.to("cpu")\n'
        "merged = model.merge_and_unload()\n"
        "merged = vram_magic.to_gpu_if_it_fits(merged)\n"
    )
    assert merge.fits is True


# --------------------------------------------------------------------------------------------------
# Room and estimates


def test_8bit_and_4bit_fit_when_their_share_of_the_request_fits_the_room() -> None:
    # 1.59 GiB asked under a 1.50 GiB cap; the failed cell's 3.00 GiB were freed.
    room, fixes = _plan("torch2_11_h100_from_pretrained_capped.txt", LOAD, freed_bytes=3 * GiB)
    requested = round(1.59 * GiB)
    assert room.gpu_bytes == round(1.5 * GiB)
    assert fixes["8bit"].needed_bytes == int(0.6 * requested) and fixes["8bit"].fits is True
    assert fixes["4bit"].needed_bytes == int(0.35 * requested) and fixes["4bit"].fits is True
    assert "Estimated not to fit" not in fixes["8bit"].why


def test_8bit_is_estimated_not_to_fit_when_its_share_is_more_than_the_room() -> None:
    # 200 GiB asked with 78.66 GiB free: 8-bit needs ~120 GiB, 4-bit ~70 GiB.
    room, fixes = _plan("torch2_11_h100_plain.txt", LOAD)
    assert room.gpu_bytes == round(78.66 * GiB)
    assert fixes["8bit"].fits is False
    assert fixes["8bit"].why.endswith("Estimated not to fit: needs about 120.00 GiB.")
    assert fixes["4bit"].fits is True and fixes["4bit"].needed_bytes == int(0.35 * 200 * GiB)
    assert fixes["offload"].fits is True and fixes["cpu"].fits is True  # spill to / run on the CPU


def test_the_estimators_figures_for_the_model_decide_over_the_share_of_the_request() -> None:
    # The same 1.59 GiB load under a 1.50 GiB cap; the model's config says 8-bit needs 1.55 GiB at its peak
    # (big embeddings stay 16-bit), 4-bit 1.2 GiB.
    needs = {"8bit": round(1.55 * GiB), "4bit": round(1.2 * GiB)}
    _, fixes = _plan("torch2_11_h100_from_pretrained_capped.txt", LOAD, freed_bytes=3 * GiB, needs=needs)
    assert fixes["8bit"].fits is False and fixes["8bit"].needed_bytes == needs["8bit"]
    assert fixes["8bit"].why.endswith("Estimated not to fit: needs about 1.55 GiB.")
    assert fixes["4bit"].fits is True and fixes["4bit"].needed_bytes == needs["4bit"]


def test_lifting_the_cap_fits_when_the_request_fits_the_gpu_without_it() -> None:
    room, fixes = _plan("torch2_11_h100_capped.txt", LOAD)  # 5 GiB asked under a 4 GiB cap, 78.66 GiB free
    assert room.gpu_bytes == 4 * GiB and room.gpu_free_without_cap_bytes == round(78.66 * GiB)
    assert fixes["lift-cap"].needed_bytes == 5 * GiB and fixes["lift-cap"].fits is True


@pytest.mark.parametrize(
    ("freed", "room"),
    [
        (0, 0),  # 3.00 GiB reserved under a 1.50 GiB cap: nothing left
        (2 * GiB, round(0.5 * GiB)),  # 1.00 GiB stays reserved
        (3 * GiB, round(1.5 * GiB)),  # all of it freed: the whole cap, and not more
        (8 * GiB, round(1.5 * GiB)),
    ],
)
def test_room_under_a_cap_is_the_cap_less_what_stays_reserved(freed: int, room: int) -> None:
    oom = _oom("torch2_11_h100_from_pretrained_capped.txt")
    assert room_after_cleanup(NO_GPU, oom, freed).gpu_bytes == room


def test_room_without_a_cap_is_the_free_memory_plus_what_was_freed() -> None:
    oom = _oom("seed_from_pretrained_torch1.txt")  # 1.50 GiB free
    assert room_after_cleanup(NO_GPU, oom, 512 * MiB).gpu_bytes == 2 * GiB


def test_a_message_without_figures_gives_no_estimate_for_quantized_loads() -> None:
    room, fixes = _plan("cuda_error_out_of_memory.txt", LOAD)
    assert room.gpu_bytes is None
    assert fixes["8bit"].fits is None and fixes["8bit"].needed_bytes is None
    assert fixes["offload"].fits is True


# --------------------------------------------------------------------------------------------------
# A live snapshot with GPUs


def _gpu(index: int, free: int, *, cap: int | None = None, reserved: int | None = None) -> GpuSnapshot:
    return GpuSnapshot(
        index=index,
        name="NVIDIA H100",
        total_bytes=80 * GiB,
        free_bytes=free,
        cap_bytes=cap,
        reserved_bytes=reserved,
    )


def test_the_live_gpu_gives_the_room_not_the_message() -> None:
    snapshot = MemorySnapshot(
        gpus=(_gpu(0, free=60 * GiB, cap=16 * GiB, reserved=10 * GiB),),
        cpu=CpuMemory(total_bytes=128 * GiB, available_bytes=100 * GiB, process_rss_bytes=GiB),
    )
    room = room_after_cleanup(snapshot, _oom("torch2_11_h100_capped.txt"), freed_bytes=GiB)
    assert room.gpu_bytes == 6 * GiB  # the cap less what is reserved now
    assert room.gpu_free_without_cap_bytes == 60 * GiB


def test_offload_spreads_the_model_over_each_gpus_room_and_cpu_ram_with_headroom() -> None:
    snapshot = MemorySnapshot(
        gpus=(_gpu(0, free=10 * GiB), _gpu(1, free=40 * GiB, cap=24 * GiB, reserved=4 * GiB)),
        cpu=CpuMemory(total_bytes=128 * GiB, available_bytes=64 * GiB, process_rss_bytes=GiB),
    )
    room, fixes = _plan("torch2_11_h100_plain.txt", LOAD, snapshot=snapshot)
    # GPU 0: 10 GiB less 1 GiB (10 %); GPU 1: the cap less what is reserved (20 GiB) less 2 GiB; CPU: 64 - 2.
    assert room.max_memory == {0: 9 * GiB, 1: 18 * GiB, "cpu": 62 * GiB}
    offload = fixes["offload"].rewritten_cell
    assert offload is not None
    assert 'device_map="auto", max_memory={0: "9.0GiB", 1: "18.0GiB", "cpu": "62.0GiB"}' in offload


def test_a_small_gpu_keeps_at_least_512_mib_of_headroom() -> None:
    snapshot = MemorySnapshot(
        gpus=(_gpu(0, free=3 * GiB),),
        cpu=CpuMemory(total_bytes=None, available_bytes=None, process_rss_bytes=None),
    )
    room = room_after_cleanup(snapshot, _oom("torch2_11_h100_plain.txt"), 0)
    assert room.max_memory == {0: 3 * GiB - 512 * MiB}


def test_without_gpu_figures_offload_lets_accelerate_measure_the_gpus() -> None:
    snapshot = MemorySnapshot(
        gpus=(), cpu=CpuMemory(total_bytes=128 * GiB, available_bytes=64 * GiB, process_rss_bytes=GiB)
    )
    room, fixes = _plan("torch2_11_h100_plain.txt", LOAD, snapshot=snapshot)
    assert room.max_memory == {"cpu": 62 * GiB}
    offload = fixes["offload"].rewritten_cell
    assert offload is not None
    assert 'from_pretrained(path, device_map="auto")  # the base model' in offload  # no CPU-only limits
