"""The three seed scenarios on a real GPU, capped the way shared/gpu/README.md says: shared by
``tests/gpu/test_scenarios_gpu.py`` and ``benchmarks/attempts.py``.

The model is a 0.85 B Llama built from a config (hidden 2048, 16 layers, 16 heads, 4 KV heads, intermediate
5632, vocab 32000; 1.59 GiB in bfloat16) and saved once. Each scenario is set-up code run in the notebook
namespace without a cap, a cap computed from what the set-up left on the GPU, and the cell that then runs out
of memory (measured on an H100; README, "Measured"):

- ``merge``: ``merged = model.merge_and_unload()`` on a LoRA model (adapters on every linear layer) while
  ``reference``, a second copy of the base, holds 1.59 GiB; capped at what the process holds plus 16 MiB. peft
  computes each layer's update ``B @ A`` in float32, 44 MiB for an MLP projection, which cannot fit.
- ``qlora``: a ``Trainer`` cell at ``per_device_train_batch_size=4`` (sequences of 512) on the model in 4-bit
  with LoRA adapters; capped at what the process holds plus 3 sequences' activations, measured at batch 1.
- ``load``: ``from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")`` under a 1.5 GiB cap.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MiB = 2**20
GiB = 2**30
LLAMA_085B = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
BF16_BYTES = 1_705_119_744  # the weights in bfloat16 (1.59 GiB): 852_559_872 parameters x 2 bytes
SEQ_LEN = 512
MERGE_MARGIN_BYTES = 16 * MiB
LOAD_CAP_BYTES = round(1.5 * GiB)


def save_llama(folder: Path) -> Path:
    """Build the 0.85 B Llama from its config (on the GPU: seconds) and save it in bfloat16 to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_085B)).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    release()
    return folder


def release() -> None:
    """Collect garbage and give cached blocks back, so ``memory_reserved`` is what is really held."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def set_cap(cap_bytes: int) -> None:
    """Cap this process at ``cap_bytes`` of GPU 0 (its OOM messages then say "<cap> allowed;")."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total))


def lift_cap() -> None:
    torch.cuda.set_per_process_memory_fraction(1.0)


def allocated() -> int:
    torch.cuda.synchronize()
    return int(torch.cuda.memory_allocated())


def per_sequence_bytes(model: Any, seq_len: int = SEQ_LEN, vocab_size: int = 32000) -> int:
    """Peak memory one sequence adds in a forward and backward pass (the second of two: the first also
    sets up cuBLAS's workspace)."""
    tokens = torch.randint(0, vocab_size, (1, seq_len), device="cuda")
    for _ in range(2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model(input_ids=tokens, labels=tokens).loss.backward()
        model.zero_grad(set_to_none=True)
    return int(torch.cuda.max_memory_allocated() - before)


MERGE_SETUP = """
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

adapters = LoraConfig(
    r=16,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    init_lora_weights=False,  # random adapters, as after training: merging changes the weights
    task_type="CAUSAL_LM",
)
base = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
model = get_peft_model(base, adapters)
del base  # it lives on inside `model`
reference = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
tokens = torch.randint(0, 32000, (1, 16), device="cuda")
with torch.no_grad():  # what the LoRA model answers, and the base without its adapters (on the CPU)
    expected = model(tokens).logits.float().cpu()
    with model.disable_adapter():
        unadapted = model(tokens).logits.float().cpu()
"""
MERGE_CELL = "merged = model.merge_and_unload()\n"

QLORA_SETUP = f"""
import torch
from peft import LoraConfig, get_peft_model
from transformers import BitsAndBytesConfig, LlamaForCausalLM

nf4 = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16,
)
base = LlamaForCausalLM.from_pretrained(path, quantization_config=nf4, device_map="cuda")
lora = LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
model = get_peft_model(base, lora)
del base
train_data = [{{"input_ids": ids, "labels": ids}} for ids in torch.randint(0, 32000, (16, {SEQ_LEN}))]
"""
QLORA_CELL = """from transformers import Trainer, TrainingArguments

args = TrainingArguments(
    output_dir=output_dir,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=1,
    max_steps=2,
    learning_rate=2e-4,
    logging_steps=1,
    report_to="none",
    disable_tqdm=True,
)
trainer = Trainer(model=model, args=args, train_dataset=train_data)
result = trainer.train()
"""

LOAD_SETUP = """
import torch
from transformers import LlamaForCausalLM
"""
LOAD_CELL = 'model = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")\n'


def _merge_cap(namespace: dict[str, Any]) -> int:
    return int(torch.cuda.memory_reserved()) + MERGE_MARGIN_BYTES


def _qlora_cap(namespace: dict[str, Any]) -> int:
    per_sequence = per_sequence_bytes(namespace["model"])
    release()
    return int(torch.cuda.memory_reserved()) + 3 * per_sequence


def _load_cap(namespace: dict[str, Any]) -> int:
    return int(torch.cuda.memory_reserved()) + LOAD_CAP_BYTES


@dataclass(frozen=True)
class Scenario:
    name: str
    setup: str
    cell: str
    cap_bytes: Callable[[dict[str, Any]], int]  # called after the set-up (and a release), before the cell


SCENARIOS = {
    "merge": Scenario("S1 merge", MERGE_SETUP, MERGE_CELL, _merge_cap),
    "qlora": Scenario("S2 QLoRA", QLORA_SETUP, QLORA_CELL, _qlora_cap),
    "load": Scenario("S3 load", LOAD_SETUP, LOAD_CELL, _load_cap),
}


def prepare(shell: Any, scenario: Scenario, path: Path, output_dir: Path) -> int:
    """Run the scenario's set-up in ``shell`` without a cap, then cap the process; returns the cap."""
    shell.user_ns.update(path=str(path), output_dir=str(output_dir))
    result = shell.run_cell(scenario.setup)
    result.raise_error()
    release()
    cap = scenario.cap_bytes(shell.user_ns)
    set_cap(cap)
    return cap


def magics(shell: Any) -> Any:
    """The session of the magics the loaded extension registered (its ``last_report``, ``apply_fix``)."""
    return shell.magics_manager.registry["VramMagics"].session


@contextlib.contextmanager
def recording_reports(shell: Any) -> Iterator[list[Any]]:
    """Every report ``%%oomsafe`` builds while inside, failed runs under ``--auto`` included (``--auto``
    keeps no report once a fix works: ``last_report`` is only set when the cell finally fails)."""
    instance = magics(shell)
    reports: list[Any] = []
    rescue = instance._rescue

    def recording(*args: Any, **kwargs: Any) -> Any:
        report = rescue(*args, **kwargs)
        reports.append(report)
        return report

    instance._rescue = recording
    try:
        yield reports
    finally:
        del instance._rescue  # the method again


def fix_number(report: Any, key: str) -> int:
    """The number ``%vram fix N`` and the Re-run button use for the fix ``key`` of ``report``."""
    keys = [fix.key for fix in report.fixes]
    assert key in keys, f"no {key!r} fix among {keys}"
    return keys.index(key) + 1


def relative_distance(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())
