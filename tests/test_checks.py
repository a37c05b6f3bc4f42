"""Checked fixes: after an OOM each fix is made on the user's cell and checked before it is offered.

Fed with real OOM messages (tests/fixtures/oom_messages) through ``_report.explain`` (diagnose, then plan),
and, for the estimator's figures, the config of the 0.85 B Llama measured on an H100 (README, "Measured"):
1.59 GiB in bfloat16, about 0.96 GiB in 8-bit and 0.65 GiB in 4-bit at their loading peaks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.gpu.scenarios import LLAMA_085B
from tests.stack import LOADS_THE_CHECKPOINTS_DTYPE
from vram_magic._checks import room_after_cleanup
from vram_magic._oom import parse_oom_message
from vram_magic._report import explain
from vram_magic._types import Cleanup, CpuMemory, Fix, GpuSnapshot, Holder, OOMInfo, Snapshot
from vram_magic.fixes import NotApplicable, rewrite

MESSAGES = Path(__file__).parent / "fixtures" / "oom_messages"
MiB = 2**20
GiB = 2**30
RAM = CpuMemory(total_bytes=128 * GiB, available_bytes=100 * GiB, process_rss_bytes=GiB)
NO_GPU = Snapshot(gpus=(), cpu=RAM)

LOAD = """\
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda")  # the base model
"""
LOAD_FP32 = LOAD.replace('device_map="cuda"', 'dtype=torch.float32, device_map="cuda"')
MERGE = "merged = model.merge_and_unload()\n"
MERGE_AND_SAVE = 'model.merge_and_unload().save_pretrained("merged")\n'
TRAIN = "trainer.train()\n"


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder with the 0.85 B Llama's config.json (bfloat16): the estimator needs nothing more."""
    folder = tmp_path_factory.mktemp("llama-config")
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "dtype": "bfloat16", **LLAMA_085B}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def _oom(name: str) -> OOMInfo:
    info = parse_oom_message((MESSAGES / name).read_text())
    assert info is not None
    return info


def _plan(
    message: str,
    cell: str,
    *,
    namespace: dict[str, object] | None = None,
    snapshot: Snapshot = NO_GPU,
    holders: tuple[Holder, ...] = (),
    freed_bytes: int = 0,
    failing: str = "",
) -> dict[str, Fix]:
    """What the magic does after an OOM: diagnose, measure the room, make the fixes runnable and checked.
    The failed line is the first with ``failing`` in it, else a load, a training step or a merge."""
    oom = _oom(message)
    line = next(
        i
        for i, text in enumerate(cell.splitlines(), 2)
        if (failing and failing in text)
        or (not failing and ("from_pretrained(" in text or "train" in text or "merge" in text))
    )
    report = explain(
        oom=oom,
        error_text=oom.message,
        traceback_text="",
        source=cell,
        body=cell,
        failed_line=line,
        snapshot=snapshot,
        holders=holders,
        cleanup=Cleanup(released=(), reclaimed_bytes=None, freed_tensor_bytes=freed_bytes),
        namespace=namespace or {},
        bytes_freed_by=lambda names: sum(h.total_bytes for h in holders if h.name in names),
    )
    assert len({fix.key for fix in report.fixes}) == len(report.fixes)
    return {fix.key: fix for fix in report.fixes}


# --------------------------------------------------------------------------------------------------
# Rewritten cells and diffs


def test_each_cell_fix_carries_the_rewritten_cell_and_a_diff_of_the_users_code(llama: str) -> None:
    # 1.59 GiB asked under a 1.50 GiB cap; the failed cell's 3.00 GiB were freed.
    fixes = _plan(
        "torch2_11_h100_from_pretrained_capped.txt", LOAD, namespace={"path": llama}, freed_bytes=3 * GiB
    )
    # bfloat16 is left out: the checkpoint already loads in bfloat16. The rest fit, 4-bit before offload.
    # (transformers 4 loads float32 untold: there bfloat16 is a change, offered last, as it does not fit.)
    bf16 = [] if LOADS_THE_CHECKPOINTS_DTYPE else ["bf16"]
    assert list(fixes) == ["8bit", "4bit", "offload", "cpu", "lift-cap", *bf16]
    eight = fixes["8bit"]
    assert eight.rewritten_cell == (
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from transformers import BitsAndBytesConfig\n\n"
        'model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", '
        "quantization_config=BitsAndBytesConfig(load_in_8bit=True))  # the base model\n"
    )
    assert eight.title == "Load the model in 8-bit"  # what the code does (a folder's path says little)
    assert eight.code.startswith("--- cell\n+++ fixed cell\n")
    assert "+from transformers import BitsAndBytesConfig\n" in eight.code
    assert (
        '-model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda")  # the base model'
        in eight.code
    )
    assert fixes["cpu"].rewritten_cell == LOAD.replace('device_map="cuda"', 'device_map="cpu"')
    assert all(fix.runnable for fix in fixes.values())


def test_the_estimator_sizes_each_load_fix_and_those_that_fit_come_first(llama: str) -> None:
    from vram_magic import estimate

    fixes = _plan(
        "torch2_11_h100_from_pretrained_capped.txt", LOAD_FP32, namespace={"path": llama}, freed_bytes=2 * GiB
    )
    # 1.00 GiB stays reserved under the 1.50 GiB cap: 0.5 GiB of room. Only 4-bit's 0.65 GiB comes close.
    for key, dtype, bits in (
        ("bf16", "bfloat16", None),
        ("8bit", "float32", "8bit"),
        ("4bit", "float32", "4bit"),
    ):
        assert fixes[key].needed_bytes == estimate(llama, dtype=dtype, quantization=bits).peak_bytes, key
        assert fixes[key].fits is False and "Estimated not to fit" in fixes[key].why
    assert list(fixes)[:2] == ["offload", "cpu"]  # fit (CPU RAM holds them) before those that do not
    assert list(fixes)[-3:] == ["bf16", "8bit", "4bit"]


def test_4bit_computes_in_bfloat16_where_there_is_no_gpu_to_ask(llama: str) -> None:
    fixes = _plan(
        "torch2_11_h100_from_pretrained_capped.txt", LOAD, namespace={"path": llama}, freed_bytes=3 * GiB
    )
    assert "bnb_4bit_compute_dtype=torch.bfloat16" in (fixes["4bit"].rewritten_cell or "")


def test_lifting_the_cap_runs_the_cell_after_setting_the_fraction_back_to_one() -> None:
    fixes = _plan("torch2_11_h100_from_pretrained_capped.txt", LOAD)
    assert fixes["lift-cap"].rewritten_cell == (
        "import torch\ntorch.cuda.set_per_process_memory_fraction(1.0)\n" + LOAD
    )


def test_freeing_reruns_the_cell_as_written_after_deleting_the_names() -> None:
    holders = (Holder("old_model", "LlamaForCausalLM", 3 * GiB),)
    fixes = _plan("seed_from_pretrained_torch1.txt", LOAD, holders=holders)
    free = fixes["free"]
    assert free.rewritten_cell == LOAD and free.free_names == ("old_model",)
    assert free.fits is True and free.needed_bytes is None  # the diagnosis's verdict, kept
    assert next(iter(fixes)) == "free"


def test_a_fix_whose_code_is_in_an_earlier_cell_stays_as_advice_with_the_reason() -> None:
    fixes = _plan("torch2_11_h100_plain.txt", TRAIN)
    half = fixes["half-batch"]
    assert not half.runnable and half.rewritten_cell is None
    assert half.why.endswith("(Apply it by hand: this cell sets no batch size.)")


def test_a_fix_that_changes_nothing_the_load_needs_is_not_offered(llama: str) -> None:
    # The checkpoint's config says bfloat16: dtype=torch.bfloat16 would change nothing (from transformers 5
    # on; transformers 4 loads float32 untold, and there it halves the load).
    fixes = _plan("torch2_11_h100_from_pretrained_capped.txt", LOAD, namespace={"path": llama})
    assert ("bf16" in fixes) is not LOADS_THE_CHECKPOINTS_DTYPE
    assert {"8bit", "4bit", "offload", "cpu"} <= set(fixes)


@pytest.mark.parametrize(
    ("cell", "fix", "already"),
    [
        ('model = AutoModel.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")\n', "bf16", True),
        ('model = AutoModel.from_pretrained(path, device_map="cpu")\n', "cpu", True),
        ("x = 1\n", "merge-cpu", False),
    ],
)
def test_the_rewriter_says_whether_a_fix_is_already_there_or_has_nothing_to_change(
    cell: str, fix: str, already: bool
) -> None:
    with pytest.raises(NotApplicable) as raised:
        rewrite(cell, fix)
    assert raised.value.already is already


def test_merging_on_the_cpu_is_runnable_for_every_form_of_merge() -> None:
    merge = _plan("torch2_11_h100_plain.txt", MERGE)["merge-cpu"]
    assert merge.rewritten_cell == (
        'import vram_magic\nmodel = model.to("cpu")\nmerged = model.merge_and_unload()\n'
        "merged = vram_magic.to_gpu_if_it_fits(merged)\n"
    )
    assert merge.title == "Merge on the CPU, then move the merged model back to the GPU if it fits"
    chained = _plan("torch2_11_h100_plain.txt", MERGE_AND_SAVE)["merge-cpu"]  # saved from the CPU
    assert chained.rewritten_cell == 'model = model.to("cpu")\n' + MERGE_AND_SAVE
    assert chained.title == "Merge on the CPU (the merged model stays there: this cell saves it from there)"


def test_a_cpu_fix_that_cpu_ram_cannot_hold_is_not_offered_to_run(llama: str) -> None:
    small_ram = Snapshot(gpus=(), cpu=CpuMemory(8 * GiB, 2 * GiB + 512 * MiB, GiB))  # 0.5 GiB usable
    fixes = _plan(
        "torch2_11_h100_from_pretrained_capped.txt", LOAD, namespace={"path": llama}, snapshot=small_ram
    )
    cpu = fixes["cpu"]
    assert not cpu.runnable and cpu.fits is False
    assert "kill the kernel" in cpu.why and "of CPU RAM" in cpu.why
    assert list(fixes)[-1] == "cpu" or not fixes[list(fixes)[-1]].runnable


# --------------------------------------------------------------------------------------------------
# Room


def test_lifting_the_cap_fits_when_the_request_fits_the_gpu_without_it() -> None:
    room = room_after_cleanup(NO_GPU, _oom("torch2_11_h100_capped.txt"), 0)  # 5 GiB asked under a 4 GiB cap
    assert room.gpu_bytes == 4 * GiB and room.gpu_free_without_cap_bytes == round(78.66 * GiB)
    fixes = _plan("torch2_11_h100_capped.txt", LOAD)
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


def test_a_message_without_figures_gives_no_verdict(llama: str) -> None:
    fixes = _plan("cuda_error_out_of_memory.txt", LOAD, namespace={"path": llama})
    assert fixes["8bit"].fits is None and fixes["8bit"].needed_bytes is not None


# --------------------------------------------------------------------------------------------------
# A live snapshot with GPUs


def _gpu(
    index: int,
    free: int,
    *,
    cap: int | None = None,
    reserved: int | None = None,
    allocated: int | None = None,
) -> GpuSnapshot:
    return GpuSnapshot(
        index=index,
        name="NVIDIA H100",
        total_bytes=80 * GiB,
        free_bytes=free,
        cap_bytes=cap,
        reserved_bytes=reserved,
        allocated_bytes=allocated,
    )


def test_the_live_gpu_gives_the_room_not_the_message() -> None:
    snapshot = Snapshot(gpus=(_gpu(0, free=60 * GiB, cap=16 * GiB, reserved=10 * GiB),), cpu=RAM)
    room = room_after_cleanup(snapshot, _oom("torch2_11_h100_capped.txt"), freed_bytes=GiB)
    assert room.gpu_bytes == 6 * GiB  # the cap less what is reserved now
    assert room.gpu_free_without_cap_bytes == 60 * GiB


def test_what_pytorch_caches_unallocated_is_room() -> None:
    """PyTorch reuses its cached blocks before it asks the driver for more (and empties its cache before it
    gives up): 3 GiB cached but unallocated is room the driver's free figure does not show."""
    cached = _gpu(0, free=4 * GiB, reserved=10 * GiB, allocated=7 * GiB)
    assert room_after_cleanup(Snapshot(gpus=(cached,), cpu=RAM), None, 0).gpu_bytes == 7 * GiB
    capped = _gpu(0, free=60 * GiB, cap=16 * GiB, reserved=10 * GiB, allocated=7 * GiB)
    assert room_after_cleanup(Snapshot(gpus=(capped,), cpu=RAM), None, 0).gpu_bytes == 9 * GiB  # 16 - 7


def test_offload_spreads_the_model_over_each_gpus_room_and_cpu_ram_with_headroom() -> None:
    snapshot = Snapshot(
        gpus=(_gpu(0, free=10 * GiB), _gpu(1, free=40 * GiB, cap=24 * GiB, reserved=4 * GiB)),
        cpu=CpuMemory(total_bytes=128 * GiB, available_bytes=64 * GiB, process_rss_bytes=GiB),
    )
    room = room_after_cleanup(snapshot, _oom("torch2_11_h100_plain.txt"), 0)
    # GPU 0: 10 GiB less 1 GiB (10 %); GPU 1: the cap less what is reserved (20 GiB) less 2 GiB; CPU: 64 - 2.
    assert room.max_memory == {0: 9 * GiB, 1: 18 * GiB, "cpu": 62 * GiB}
    offload = _plan("torch2_11_h100_plain.txt", LOAD, snapshot=snapshot)["offload"].rewritten_cell
    assert offload is not None
    assert 'device_map="auto", max_memory={0: "9.0GiB", 1: "18.0GiB", "cpu": "62.0GiB"}' in offload


@pytest.mark.parametrize("disk_free", [8 * GiB, 256 * MiB])
def test_what_neither_the_gpu_nor_cpu_ram_holds_goes_to_disk_if_the_disk_holds_it(
    llama: str, disk_free: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Colab's wall: 1.59 GiB of weights, a GPU with room for 0.5 GiB of them and 0.5 GiB of usable RAM.
    The rest goes to disk (offload_folder) when the disk holds it; else the fix is not offered to run."""
    from vram_magic import _checks

    monkeypatch.setattr(_checks, "_disk_free_bytes", lambda: disk_free)
    snapshot = Snapshot(
        gpus=(_gpu(0, free=GiB + 512 * MiB),),  # 1 GiB once 512 MiB of headroom is kept
        cpu=CpuMemory(total_bytes=8 * GiB, available_bytes=2 * GiB + 512 * MiB, process_rss_bytes=GiB),
    )
    offload = _plan("torch2_11_h100_plain.txt", LOAD, namespace={"path": llama}, snapshot=snapshot)["offload"]
    if disk_free == 8 * GiB:
        assert offload.runnable
        assert offload.rewritten_cell is not None and 'offload_folder="offload"' in offload.rewritten_cell
        to_disk = offload.fact("disk_bytes")
        assert 0 < to_disk < 2 * GiB
        assert offload.title.startswith("Offload what does not fit of the model to CPU RAM, and about ")
        assert 'of it to disk (offload_folder="offload")' in offload.title
    else:
        assert not offload.runnable and offload.fits is False
        assert "Nor does the disk hold the rest: 256.00 MiB is free there." in offload.why


def test_a_small_gpu_keeps_at_least_512_mib_of_headroom() -> None:
    snapshot = Snapshot(gpus=(_gpu(0, free=3 * GiB),), cpu=CpuMemory(None, None, None))
    room = room_after_cleanup(snapshot, _oom("torch2_11_h100_plain.txt"), 0)
    assert room.max_memory == {0: 3 * GiB - 512 * MiB}


def test_without_gpu_figures_offload_lets_accelerate_measure_the_gpus() -> None:
    offload = _plan("torch2_11_h100_plain.txt", LOAD)["offload"].rewritten_cell
    assert offload is not None
    assert 'from_pretrained(path, device_map="auto")  # the base model' in offload  # no CPU-only limits


def test_a_merge_on_the_cpu_that_cpu_ram_cannot_hold_is_not_offered_to_run() -> None:
    import torch

    model = torch.nn.Linear(1024, 1024)  # 4 MiB of weights, standing for the PEFT model to merge
    small_ram = Snapshot(gpus=(), cpu=CpuMemory(8 * GiB, 2 * GiB + MiB, GiB))  # 1 MiB usable
    merge = _plan("torch2_11_h100_plain.txt", MERGE, namespace={"model": model}, snapshot=small_ram)[
        "merge-cpu"
    ]
    assert not merge.runnable and merge.fits is False
    assert "needs about 4.00 MiB of CPU RAM and 1.00 MiB is free" in merge.why
    roomy = _plan("torch2_11_h100_plain.txt", MERGE, namespace={"model": model})["merge-cpu"]
    assert roomy.runnable and roomy.fits is True


def test_a_generation_oom_puts_the_fixes_of_its_step_before_moving_the_model(llama: str) -> None:
    """Offloading or the CPU fit the weights, which loaded fine: they say nothing of the KV cache that ran
    out, so they are not ranked as fitting above chunking the batch (found in review)."""
    cell = (
        f'model = AutoModelForCausalLM.from_pretrained("{llama}", device_map="cuda")\n'
        'inputs = tok(["a", "b", "c", "d"], return_tensors="pt", padding=True).to("cuda")\n'
        "out = model.generate(**inputs, max_new_tokens=4000)\n"
    )
    fixes = _plan("torch2_11_h100_plain.txt", cell, failing="generate(")
    order = list(fixes)
    assert fixes["offload"].fits is None and fixes["cpu"].fits is None
    assert order.index("chunk") < order.index("offload") and order.index("chunk") < order.index("cpu")


def test_a_training_oom_tries_checkpointing_before_a_smaller_evaluation_batch() -> None:
    cell = (
        'args = TrainingArguments("out", per_device_train_batch_size=1, per_device_eval_batch_size=8, '
        "gradient_accumulation_steps=16)\n"
        "trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds)\n"
        "trainer.train()\n"
    )
    order = list(_plan("torch2_11_h100_plain.txt", cell, failing="trainer.train()"))
    assert order.index("checkpointing") < order.index("half-batch")
