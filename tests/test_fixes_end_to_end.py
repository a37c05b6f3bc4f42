"""A cell runs out of memory on a (simulated) small GPU; one fix, or ``--auto``, makes it work for real.

Real tiny models (hidden 64, 2 layers, vocab 256), real loads (bitsandbytes 8-bit and 4-bit on the CPU), a
real peft merge and a real ``Trainer``; only the GPU's memory accounting is simulated (tests/oom_budget.py),
raising CUDA's own OOM message where CUDA would. Fixes run through ``%vram fix N`` (``VramMagics.apply_fix``,
the widget's Re-run button) and ``%%oomsafe --auto``, as a user types them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from IPython.utils.capture import capture_output

from tests.oom_budget import KiB, MiB, SimulatedGpu, activation_bytes, simulated_gpu
from tests.stack import (
    BITSANDBYTES_QUANTIZES_HERE,
    DTYPE,
    LOADS_THE_CHECKPOINTS_DTYPE,
    NO_BITSANDBYTES_HERE,
    loaded_dtype,
)
from vram_magic import Fix, OutOfMemoryHandled, Report, parse_oom_message

SEQ = 32
needs_bitsandbytes = pytest.mark.skipif(not BITSANDBYTES_QUANTIZES_HERE, reason=NO_BITSANDBYTES_HERE)
MESSAGES = Path(__file__).parent / "fixtures" / "oom_messages"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved in bfloat16 (as hub checkpoints are) with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    _save_tiny_llama(path, vocab_size=256)
    words = Tokenizer(
        models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, 256)}}, unk_token="[UNK]")
    )
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")  # type: ignore[no-untyped-call]
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def gpu() -> Iterator[SimulatedGpu]:
    with simulated_gpu(budget_bytes=256 * MiB) as lent:
        yield lent


def _run(ip: Any, cell: str) -> tuple[Any, str]:
    """Run a cell as the user does; return its result and everything it printed or displayed."""
    with capture_output() as captured:
        result = ip.run_cell(cell)
    shown = "".join(str(output.data.get("text/plain", "")) for output in captured.outputs)
    return result, captured.stdout + shown


def _report(ip: Any) -> Report:
    report = ip.magics_manager.registry["VramMagics"].last_report
    assert isinstance(report, Report)
    return report


def _number(report: Report, key: str) -> int:
    """The number the user types after ``%vram fix`` for the fix ``key``."""
    return [fix.key for fix in report.fixes].index(key) + 1


def _fix(report: Report, key: str) -> Fix:
    return report.fixes[_number(report, key) - 1]


def _assert_handled(result: Any) -> None:
    assert isinstance(result.error_in_exec, OutOfMemoryHandled), result.error_in_exec


# --------------------------------------------------------------------------------------------------
# The simulation itself: what it raises is what CUDA raises


def test_the_simulated_gpu_raises_cudas_own_message_with_true_figures(checkpoint: Path) -> None:
    from transformers import AutoModelForCausalLM

    with simulated_gpu(budget_bytes=200 * KiB) as small, pytest.raises(torch.OutOfMemoryError) as raised:
        AutoModelForCausalLM.from_pretrained(checkpoint, device_map="cuda")
    oom = parse_oom_message(f"torch.OutOfMemoryError: {raised.value}")
    assert oom is not None and oom.kind == "cuda"
    # every parameter of the tiny model, in the dtype a load without one gives a bfloat16 checkpoint
    weights = 115008 * loaded_dtype(torch.bfloat16).itemsize
    assert oom.requested_bytes == pytest.approx(weights, rel=0.01)
    assert oom.allowed_bytes == 200 * KiB and oom.allocated_bytes == 0
    assert small.failures == [str(raised.value)]
    fixture = (MESSAGES / "torch2_11_h100_from_pretrained_capped.txt").read_text().strip()
    sizes = re.compile(r"\d+(?:\.\d+)? (?:bytes|KiB|MiB|GiB)")
    assert sizes.sub("N", f"torch.OutOfMemoryError: {raised.value}") == sizes.sub("N", fixture)


# --------------------------------------------------------------------------------------------------
# S3: a load that does not fit; 8-bit and 4-bit fix it

LOAD_CELL = f"""\
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, {DTYPE}=torch.bfloat16, device_map="cuda")
"""
# 200 KiB: the bfloat16 weights (225 KiB) do not fit; 8-bit (145 KiB) and 4-bit (105 KiB) do.
LOAD_BUDGET = 200 * KiB


def _ready_to_load(ip: Any, gpu: SimulatedGpu, checkpoint: Path) -> None:
    """The notebook's imports and ``path``, and a GPU too small for the bfloat16 load."""
    ip.run_cell("import torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n")
    ip.user_ns["path"] = str(checkpoint)
    gpu.budget_bytes = LOAD_BUDGET


def _fail_to_load(ip: Any, gpu: SimulatedGpu, checkpoint: Path) -> Report:
    _ready_to_load(ip, gpu, checkpoint)
    result, _ = _run(ip, f"%%oomsafe\n{LOAD_CELL}")
    _assert_handled(result)
    assert "model" not in ip.user_ns
    return _report(ip)


def _generates(ip: Any) -> None:
    before = ip.user_ns["tokenizer"]("w5 w6 w7", return_tensors="pt")["input_ids"]
    out = ip.user_ns["model"].generate(input_ids=before, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7) and torch.equal(out[:, :3], before)


def test_a_load_that_does_not_fit_is_offered_8bit_and_4bit_with_their_code(
    ip: Any, gpu: SimulatedGpu, checkpoint: Path
) -> None:
    report = _fail_to_load(ip, gpu, checkpoint)
    assert report.analysis.kind == "load"
    keys = [fix.key for fix in report.fixes]
    assert keys.index("8bit") < keys.index("4bit")
    for key in ("8bit", "4bit"):
        fix = _fix(report, key)
        assert fix.runnable and fix.fits is True
        assert "+from transformers import BitsAndBytesConfig" in fix.code
        assert 'device_map="auto"' in (fix.rewritten_cell or "")
    bf16 = [fix for fix in report.fixes if fix.key == "bf16"]
    assert not bf16, "the cell already loads in bfloat16: offering bfloat16 would change nothing"


@needs_bitsandbytes
@pytest.mark.parametrize(("key", "layer"), [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_vram_fix_loads_the_quantized_model_for_real_and_it_generates(
    ip: Any,
    gpu: SimulatedGpu,
    checkpoint: Path,
    key: str,
    layer: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # bitsandbytes' logger as in a fresh kernel: no filter yet, whatever earlier tests installed
    monkeypatch.setattr(logging.getLogger("bitsandbytes.autograd._functions"), "filters", [])
    report = _fail_to_load(ip, gpu, checkpoint)
    number = _number(report, key)
    result, printed = _run(ip, f"%vram fix {number}")
    assert result.success, result.error_in_exec
    assert f"Fix {number} worked: {_fix(report, key).title}" in printed
    assert f"Note: the model now runs with {key[0]}-bit weights" in printed
    layers = {type(module).__name__ for module in ip.user_ns["model"].modules()}
    assert layer in layers
    assert 0 < gpu.in_use_bytes() <= LOAD_BUDGET  # on the (simulated) GPU, under its cap
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        _generates(ip)
    casts = [text for text in caplog.messages if text.startswith("MatMul8bitLt: inputs will be cast")]
    assert len(casts) == (1 if key == "8bit" else 0), "shown once, not on every 8-bit matmul"


@needs_bitsandbytes
def test_auto_reaches_a_working_8bit_model_in_two_runs(ip: Any, gpu: SimulatedGpu, checkpoint: Path) -> None:
    _ready_to_load(ip, gpu, checkpoint)
    result, printed = _run(ip, f"%%oomsafe --auto\n{LOAD_CELL}")
    print(printed)
    assert result.success, result.error_in_exec
    assert len(gpu.failures) == 1  # one OOM: the cell as written
    assert re.search(r"--auto: fix \d+ worked: Load the model in 8-bit\.", printed)
    assert "Note: the model now runs with 8-bit weights" in printed
    assert "Attempts by --auto (2 runs" in printed
    assert re.search(
        r"1\. the cell as written: out of memory .*\n  2\. Load the model in 8-bit: worked", printed
    )
    assert "quantization_config=BitsAndBytesConfig(load_in_8bit=True)" in printed  # the code that ran
    assert "Linear8bitLt" in {type(module).__name__ for module in ip.user_ns["model"].modules()}
    _generates(ip)


@pytest.fixture(scope="module")
def wide_vocab_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose untied embeddings are most of its weights (1.16 MiB in bfloat16), as in small
    models with big vocabularies: bitsandbytes leaves embeddings and ``lm_head`` in 16-bit."""
    path = tmp_path_factory.mktemp("wide-vocab-llama")
    _save_tiny_llama(path, vocab_size=4096)
    return path


def _save_tiny_llama(path: Path, vocab_size: int) -> None:
    """Hidden 64, 2 layers, untied embeddings, saved in bfloat16 (as hub checkpoints are)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)  # type: ignore[arg-type]


def test_after_a_load_oom_the_models_own_figures_say_which_quantized_loads_fit(
    ip: Any, gpu: SimulatedGpu, wide_vocab_checkpoint: Path
) -> None:
    """A share of the failed request would say 8-bit (60%) and 4-bit (35%) fit in 1000 KiB; this model's
    embeddings alone take 1 MiB, so neither does, and the report says so with the estimator's figures."""
    from vram_magic import estimate
    from vram_magic._units import format_bytes

    ip.run_cell("import torch\nfrom transformers import AutoModelForCausalLM\n")
    ip.user_ns["path"] = str(wide_vocab_checkpoint)
    gpu.budget_bytes = 1000 * KiB
    cell = f'model = AutoModelForCausalLM.from_pretrained(path, {DTYPE}=torch.bfloat16, device_map="cuda")\n'
    result, _ = _run(ip, f"%%oomsafe\n{cell}")
    _assert_handled(result)
    report = _report(ip)
    for key in ("8bit", "4bit"):
        fix = _fix(report, key)
        expected = estimate(str(wide_vocab_checkpoint), dtype="bfloat16", quantization=key).peak_bytes
        assert fix.fits is False and fix.needed_bytes == expected
        assert f"Estimated not to fit: needs about {format_bytes(expected)}." in fix.why
    assert _fix(report, "cpu").fits is True
    if not BITSANDBYTES_QUANTIZES_HERE:
        return  # the rest is a real 8-bit load (NO_BITSANDBYTES_HERE)
    # The simulated GPU agrees: the 8-bit load really does not fit (bitsandbytes refuses to spill to the CPU).
    result, _ = _run(ip, f"%vram fix {_number(report, '8bit')}")
    _assert_handled(result)
    again = _report(ip).oom
    assert again is not None and again.kind == "dispatch" and "model" not in ip.user_ns


def test_after_an_oom_the_fixes_are_judged_for_the_load_that_failed(
    ip: Any, gpu: SimulatedGpu, checkpoint: Path, wide_vocab_checkpoint: Path
) -> None:
    """A small model loads first, then a wider one fails: the fixed cell loads both in 8-bit, so it needs the
    wider one's peak on top of the small one's weights, which stay held."""
    from vram_magic import estimate

    ip.run_cell("import torch\nfrom transformers import AutoModelForCausalLM\n")
    ip.user_ns.update(small=str(checkpoint), wide=str(wide_vocab_checkpoint))
    gpu.budget_bytes = 1000 * KiB
    cell = (
        f'draft = AutoModelForCausalLM.from_pretrained(small, {DTYPE}=torch.bfloat16, device_map="cuda")\n'
        f'model = AutoModelForCausalLM.from_pretrained(wide, {DTYPE}=torch.bfloat16, device_map="cuda")\n'
    )
    result, _ = _run(ip, f"%%oomsafe\n{cell}")
    _assert_handled(result)
    report = _report(ip)
    assert report.analysis.failed_line == 3
    wide = estimate(str(wide_vocab_checkpoint), dtype="bfloat16", quantization="8bit")
    small = estimate(str(checkpoint), dtype="bfloat16", quantization="8bit")
    expected = max(small.peak_bytes, wide.peak_bytes + small.weights_bytes)
    assert _fix(report, "8bit").needed_bytes == expected and _fix(report, "8bit").fits is False


# --------------------------------------------------------------------------------------------------
# What the failed run had already changed


def test_the_report_names_what_the_failed_run_had_already_rebound(
    ip: Any, gpu: SimulatedGpu, checkpoint: Path
) -> None:
    ip.run_cell("import torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n")
    ip.user_ns["path"] = str(checkpoint)
    ip.user_ns["tokenizer"] = old = object()  # from an earlier run of this cell
    gpu.budget_bytes = LOAD_BUDGET
    result, printed = _run(ip, f"%%oomsafe\n{LOAD_CELL}")
    _assert_handled(result)
    report = _report(ip)
    assert report.rebound_names == ("tokenizer",)
    assert ip.user_ns["tokenizer"] is not old
    assert "Already re-bound by the failed run before it failed: tokenizer" in printed


# --------------------------------------------------------------------------------------------------
# S1: a LoRA merge that does not fit because an earlier cell's tensor holds the GPU

MERGE_SETUP = """\
import torch
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model

base = AutoModelForCausalLM.from_pretrained(path, device_map="cuda")
model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
model.eval()
ids = torch.tensor([[5, 6, 7, 8]])
with torch.no_grad():
    expected = model(ids).logits
"""
MERGE_CELL = "merged = model.merge_and_unload()\n"


def _fail_to_merge(ip: Any, gpu: SimulatedGpu, checkpoint: Path) -> Report:
    ip.user_ns["path"] = str(checkpoint)
    assert ip.run_cell(MERGE_SETUP).success
    # An earlier cell's 64 MiB of logits, still on the GPU and no longer needed.
    ip.user_ns["eval_logits"] = gpu.hold(torch.zeros(64 * MiB // 4))
    # A merge step needs one 16 KiB delta: 64 x 64 in float32 (peft keeps the adapters in float32).
    gpu.budget_bytes = gpu.in_use_bytes() + 8 * KiB
    result, _ = _run(ip, f"%%oomsafe\n{MERGE_CELL}")
    _assert_handled(result)
    assert "Tried to allocate 16.00 KiB" in gpu.failures[-1]
    return _report(ip)


def _merged_works(ip: Any) -> None:
    merged = ip.user_ns["merged"]
    assert not any("lora" in name for name, _ in merged.named_modules())
    with torch.no_grad():
        logits = merged(ip.user_ns["ids"]).logits
    torch.testing.assert_close(logits, ip.user_ns["expected"], atol=0.05, rtol=0.05)


def test_freeing_the_earlier_tensor_lets_the_merge_run(ip: Any, gpu: SimulatedGpu, checkpoint: Path) -> None:
    report = _fail_to_merge(ip, gpu, checkpoint)
    assert report.analysis.kind == "merge"
    first = report.fixes[0]
    assert first.key == "free" and first.free_names == ("eval_logits",) and first.fits is True
    result, printed = _run(ip, "%vram fix 1")
    assert result.success, result.error_in_exec
    assert "Freed 64.00 MiB" in printed and "variable eval_logits" in printed
    assert "Fix 1 worked: Free `eval_logits`, then run the cell again" in printed
    assert "eval_logits" not in ip.user_ns
    _merged_works(ip)


def test_merging_on_the_cpu_works_and_says_why_the_model_stays_there(
    ip: Any, gpu: SimulatedGpu, checkpoint: Path
) -> None:
    report = _fail_to_merge(ip, gpu, checkpoint)
    number = _number(report, "merge-cpu")
    assert 'model = model.to("cpu")' in report.fixes[number - 1].code
    result, printed = _run(ip, f"%vram fix {number}")
    assert result.success, result.error_in_exec
    assert "Kept on CPU: no GPU is visible." in printed
    assert f"Fix {number} worked: Merge on the CPU" in printed
    assert not gpu.is_on_gpu(ip.user_ns["merged"])
    assert "eval_logits" in ip.user_ns  # nothing was deleted
    _merged_works(ip)


def test_auto_frees_the_earlier_tensor_and_merges_in_two_runs(
    ip: Any, gpu: SimulatedGpu, checkpoint: Path
) -> None:
    ip.user_ns["path"] = str(checkpoint)
    assert ip.run_cell(MERGE_SETUP).success
    ip.user_ns["eval_logits"] = gpu.hold(torch.zeros(64 * MiB // 4))
    gpu.budget_bytes = gpu.in_use_bytes() + 8 * KiB
    result, printed = _run(ip, f"%%oomsafe --auto\n{MERGE_CELL}")
    assert result.success, result.error_in_exec
    assert "Freed 64.00 MiB" in printed and "variable eval_logits" in printed
    assert "--auto: fix 1 worked: Free `eval_logits`, then run the cell again." in printed
    assert "Attempts by --auto (2 runs" in printed
    _merged_works(ip)


def test_a_merged_model_too_big_for_the_gpu_stays_on_the_cpu_with_both_sizes_given(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """vram_magic.to_gpu_if_it_fits on a GPU capped at 20 GiB with 19.9 GiB allocated (torch.cuda answers
    as on an 80 GiB card with 10 GiB free; there is no GPU here to ask)."""
    from transformers import AutoModelForCausalLM

    import vram_magic

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 80 * 2**30))
    # raising=False: torch 2.5 has no such getter (vram_magic then takes no cap)
    monkeypatch.setattr(
        torch.cuda, "get_per_process_memory_fraction", lambda device=None: 0.25, raising=False
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: round(19.9 * 2**30))
    assert vram_magic.to_gpu_if_it_fits(model) is model
    needs = "224.69 KiB" if LOADS_THE_CHECKPOINTS_DTYPE else "449.34 KiB"  # bfloat16, or float32 (stack.py)
    assert (
        capsys.readouterr().out == f"Kept on CPU: the model needs {needs} and the GPU has 102.40 MiB free.\n"
    )
    assert next(model.parameters()).device.type == "cpu"


# --------------------------------------------------------------------------------------------------
# S2: a QLoRA training step whose batch does not fit; halving it (and doubling accumulation) does

# A QLoRA base; where bitsandbytes cannot quantize (NO_BITSANDBYTES_HERE) a bfloat16 one: what the batch fixes
# do is the same.
QLORA_BASE = """\
nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
base = AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4, device_map="cuda")
"""
LORA_BASE = f"""\
base = AutoModelForCausalLM.from_pretrained(path, {DTYPE}=torch.bfloat16, device_map="cuda")
"""
TRAIN_SETUP = f"""\
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments
from peft import LoraConfig, get_peft_model

{QLORA_BASE if BITSANDBYTES_QUANTIZES_HERE else LORA_BASE}\
model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
torch.manual_seed(0)
train_data = [{{"input_ids": row, "labels": row}} for row in torch.randint(1, 256, (16, SEQ))]
"""
TRAIN_CELL = """\
args = TrainingArguments(
    output_dir=out_dir,
    per_device_train_batch_size=8,
    gradient_accumulation_steps=1,
    max_steps=1,
    report_to="none",
    save_strategy="no",
    disable_tqdm=True,
)
trainer = Trainer(model=model, args=args, train_dataset=train_data)
trainer.train()
"""


def _set_up_training(ip: Any, gpu: SimulatedGpu, checkpoint: Path, tmp_path: Path) -> None:
    ip.user_ns.update(path=str(checkpoint), out_dir=str(tmp_path / "out"), SEQ=SEQ)
    assert ip.run_cell(TRAIN_SETUP).success
    per_sample = activation_bytes(ip.user_ns["base"].config, 1, SEQ)
    gpu.budget_bytes = gpu.in_use_bytes() + 5 * per_sample // 2  # a batch of 2 fits, 4 does not


def _trained_with(ip: Any, batch: int, accumulation: int) -> None:
    args, trainer = ip.user_ns["args"], ip.user_ns["trainer"]
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (batch, accumulation)
    assert trainer.state.global_step == 1


def test_vram_fix_halves_the_batch_until_the_step_fits(
    ip: Any, gpu: SimulatedGpu, checkpoint: Path, tmp_path: Path
) -> None:
    _set_up_training(ip, gpu, checkpoint, tmp_path)
    result, _ = _run(ip, f"%%oomsafe\n{TRAIN_CELL}")
    _assert_handled(result)
    report = _report(ip)
    assert report.analysis.kind == "training"
    number = _number(report, "half-batch")
    assert "per_device_train_batch_size=4" in report.fixes[number - 1].code
    result, _ = _run(ip, f"%vram fix {number}")  # batch 4: still too big, a new report
    _assert_handled(result)
    again = _report(ip)
    assert again is not report
    number = _number(again, "half-batch")
    assert "gradient_accumulation_steps=4" in again.fixes[number - 1].code
    result, printed = _run(ip, f"%vram fix {number}")
    assert result.success, result.error_in_exec
    assert f"Fix {number} worked: Halve the batch" in printed
    _trained_with(ip, batch=2, accumulation=4)
    assert len(gpu.failures) == 2


def test_auto_halves_the_batch_twice_and_keeps_the_effective_batch(
    ip: Any, gpu: SimulatedGpu, checkpoint: Path, tmp_path: Path
) -> None:
    _set_up_training(ip, gpu, checkpoint, tmp_path)
    result, printed = _run(ip, f"%%oomsafe --auto --max-attempts 3\n{TRAIN_CELL}")
    print(printed)
    assert result.success, result.error_in_exec
    assert "Attempts by --auto (3 runs" in printed
    code = printed.split("The code that ran", 1)[1]
    assert "per_device_train_batch_size=2," in code and "gradient_accumulation_steps=4," in code
    _trained_with(ip, batch=2, accumulation=4)
    requested = [parse_oom_message(message).requested_bytes for message in gpu.failures]  # type: ignore[union-attr]
    per_sample = activation_bytes(ip.user_ns["base"].config, 1, SEQ)
    assert requested == [pytest.approx(8 * per_sample, rel=0.01), pytest.approx(4 * per_sample, rel=0.01)]


def test_auto_stops_at_max_attempts_and_reports_them(
    ip: Any, gpu: SimulatedGpu, checkpoint: Path, tmp_path: Path
) -> None:
    _set_up_training(ip, gpu, checkpoint, tmp_path)
    result, printed = _run(ip, f"%%oomsafe --auto --max-attempts 2\n{TRAIN_CELL}")
    _assert_handled(result)
    assert [attempt.succeeded for attempt in _report(ip).attempts] == [False, False]
    assert "Attempts by --auto (2 runs" in printed


def test_the_code_auto_ran_can_be_inserted_as_its_hint_says(
    ip: Any, gpu: SimulatedGpu, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _set_up_training(ip, gpu, checkpoint, tmp_path)
    result, printed = _run(ip, f"%%oomsafe --auto\n{TRAIN_CELL}")
    assert result.success, result.error_in_exec
    hint = re.search(r"`(%vram fix \d+ --insert)` keeps it", printed)
    assert hint is not None
    inserted: list[str] = []
    monkeypatch.setattr(ip, "set_next_input", lambda text, replace=False: inserted.append(text))
    result, _ = _run(ip, hint.group(1))
    assert result.success, result.error_in_exec
    assert len(inserted) == 1 and "per_device_train_batch_size=2," in inserted[0]


@needs_bitsandbytes
def test_auto_goes_on_to_the_next_fix_when_one_fails_another_way(
    ip: Any, gpu: SimulatedGpu, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vram_magic._session import Session

    real = Session._attempt

    def eight_bit_breaks(self: Any, fix: Fix, number: int) -> Any:
        if fix.key == "8bit":
            raise TypeError("from_pretrained() got multiple values for keyword argument 'device_map'")
        return real(self, fix, number)

    monkeypatch.setattr(Session, "_attempt", eight_bit_breaks)
    _ready_to_load(ip, gpu, checkpoint)
    result, printed = _run(ip, f"%%oomsafe --auto --force\n{LOAD_CELL}")
    assert result.success, result.error_in_exec
    assert "2. Load the model in 8-bit: failed: TypeError: from_pretrained() got multiple values" in printed
    assert re.search(r"--auto: fix \d+ worked: Load the model in 4-bit", printed)
    assert "Linear4bit" in {type(module).__name__ for module in ip.user_ns["model"].modules()}
