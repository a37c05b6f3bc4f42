"""Realistic failing cells, run for real on the simulated small GPU (tests/oom_budget.py): does fix 1 work,
and does ``%%oomsafe --auto`` end in a working state?

Each scenario is a cell written the way the notebooks of tests/fixtures/real_cells write it (``**kwargs``,
``.half().cuda()``, a bf16 checkpoint, a float32 one with no dtype in its config, ``device_map={"": 0}``, seed
1's bare ``model.merge_and_unload()``, a merge chained on ``PeftModel.from_pretrained``, a Trainer, a training
loop fed by an earlier cell's ``batch_size``, a batched ``generate``, a loop of prompt batches, a forward pass
outside ``torch.no_grad()``), the cells before it (``setup``), the cap that makes it fail (``budget``, an
expression over the namespace and ``gpu``) and what a working notebook looks like afterwards (``works``,
code that asserts it). ``measure`` runs one scenario one way; tests/test_advice_scenarios.py pins the
outcomes and benchmarks/advice.py prints them as a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from IPython.utils.capture import capture_output

from tests.oom_budget import KiB, activation_bytes, inference_bytes, simulated_gpu
from tests.stack import DTYPE
from tests.tiny_models import save_adapter, save_float32_without_dtype, save_tiny_llama, save_tokenizer

SEQ = 16
IMPORTS = "import torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
ON_GPU = (
    IMPORTS
    + f'model = AutoModelForCausalLM.from_pretrained(path, {DTYPE}=torch.bfloat16, device_map="cuda")\n'
)
GENERATES = (  # min_new_tokens: a random tiny model may draw its end-of-sequence token early
    "assert model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2, min_new_tokens=2).shape"
    " == (1, 5)\n"
)
PEFT = (
    ON_GPU
    + "from peft import LoraConfig, PeftModel, get_peft_model\n"
    + 'lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,\n'
    + '                  task_type="CAUSAL_LM")\n'
    + "model = get_peft_model(model, lora)\n"
)
MERGED = "assert not any('lora' in name for name, _ in {name}.named_modules())\n"
TRAIN_DATA = (
    "torch.manual_seed(0)\n"
    "train_data = [{'input_ids': row, 'labels': row} for row in torch.randint(1, 256, (16, SEQ))]\n"
)
PROMPTS = "prompts = [' '.join(f'w{j}' for j in range(i, i + SEQ)) for i in range(1, 33)]\n"


@dataclass(frozen=True)
class Scenario:
    name: str
    setup: str  # the earlier cells
    cell: str  # the cell that runs out of memory, as people write it
    budget: str  # the cap, in bytes: evaluated after the setup, with `gpu` and the helpers below
    works: str  # asserts that the notebook is in a working state
    quantizes: bool = False  # fix 1 (and --auto) rescue it with a real bitsandbytes load


SCENARIOS = (
    Scenario(
        "load with **model_kwargs",
        IMPORTS,
        "model_kwargs = dict(\n"
        '    attn_implementation="eager",\n'
        "    torch_dtype=torch.bfloat16,\n"
        '    device_map="cuda",\n'
        ")\n"
        "model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)\n",
        "200 * KiB",
        GENERATES,
        quantizes=True,
    ),
    Scenario(
        "load with .half().cuda()",
        IMPORTS,
        "model = AutoModelForCausalLM.from_pretrained(path).half().cuda()\n",
        "200 * KiB",
        GENERATES,
        quantizes=True,
    ),
    Scenario(
        "load of a bf16 checkpoint, no dtype",
        IMPORTS,
        'model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda")\n',
        "200 * KiB",
        GENERATES,
        quantizes=True,
    ),
    Scenario(
        "load of a float32 checkpoint, no dtype",
        IMPORTS,
        'model = AutoModelForCausalLM.from_pretrained(fp32_path, device_map="cuda")\n',
        "300 * KiB",
        GENERATES,
    ),
    Scenario(
        'load with device_map={"": 0}',
        IMPORTS + "model_id = path\n",
        "model = AutoModelForCausalLM.from_pretrained(\n"
        '    model_id, device_map={"": 0}, torch_dtype=torch.bfloat16\n'
        ")\n",
        "200 * KiB",
        GENERATES,
        quantizes=True,
    ),
    Scenario(
        "seed 1: a bare merge, a second copy held",
        PEFT + 'reference = AutoModelForCausalLM.from_pretrained(path, device_map="cuda")\n',
        "model.merge_and_unload()\n",
        "gpu.in_use_bytes() + 8 * KiB",
        MERGED.format(name="model"),
    ),
    Scenario(
        "a merge with nothing to free",
        PEFT,
        "merged = model.merge_and_unload()\nmerged.save_pretrained(out_dir)\n",
        "gpu.in_use_bytes() + 8 * KiB",
        MERGED.format(name="merged") + "assert (Path(out_dir) / 'config.json').exists()\n",
    ),
    Scenario(
        "a merge chained on PeftModel.from_pretrained",
        ON_GPU + "from peft import PeftModel\nbase = model\n",
        "merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()\n",
        "gpu.in_use_bytes() + 8 * KiB",
        MERGED.format(name="merged"),
    ),
    Scenario(
        'reload on {"": 0} and merge (QLoRA guides)',
        IMPORTS + "from peft import PeftModel\n",
        'base = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16, device_map={"": 0})\n'
        "model = PeftModel.from_pretrained(base, adapter)\n"
        "model = model.merge_and_unload()\n"
        "model.save_pretrained(out_dir)\n",
        "235 * KiB",
        MERGED.format(name="model") + "assert (Path(out_dir) / 'config.json').exists()\n",
    ),
    Scenario(
        "a Trainer at batch 8",
        PEFT + "from transformers import Trainer, TrainingArguments\n" + TRAIN_DATA,
        "args = TrainingArguments(\n"
        "    output_dir=out_dir,\n"
        "    per_device_train_batch_size=8,\n"
        "    max_steps=1,\n"
        '    report_to="none",\n'
        '    save_strategy="no",\n'
        "    disable_tqdm=True,\n"
        ")\n"
        "trainer = Trainer(model=model, args=args, train_dataset=train_data)\n"
        "trainer.train()\n",
        "gpu.in_use_bytes() + 5 * activation_bytes(model.config, 1, SEQ)",
        "assert trainer.state.global_step == 1\n"
        "assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 8\n",
    ),
    Scenario(
        "TrainingArguments(**{...})",
        PEFT + "from transformers import Trainer, TrainingArguments\n" + TRAIN_DATA,
        "args = TrainingArguments(**{\n"
        '    "output_dir": out_dir,\n'
        '    "per_device_train_batch_size": 8,\n'
        '    "gradient_accumulation_steps": 1,\n'
        '    "max_steps": 1,\n'
        '    "report_to": "none",\n'
        '    "save_strategy": "no",\n'
        "})\n"
        "trainer = Trainer(model=model, args=args, train_dataset=train_data)\n"
        "trainer.train()\n",
        "gpu.in_use_bytes() + 5 * activation_bytes(model.config, 1, SEQ)",
        "assert trainer.state.global_step == 1\n"
        "assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 8\n",
    ),
    Scenario(
        "a training loop, batch_size from an earlier cell",
        PEFT + TRAIN_DATA + "batch_size = 8\n",
        "from torch.utils.data import DataLoader\n"
        "loader = DataLoader([row['input_ids'] for row in train_data], batch_size=batch_size, shuffle=True)\n"
        "optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)\n"
        "model.train()\n"
        "for batch in loader:\n"
        "    loss = model(input_ids=batch, labels=batch).loss\n"
        "    loss.backward()\n"
        "    optimizer.step()\n"
        "    optimizer.zero_grad()\n"
        "    break\n",
        "gpu.in_use_bytes() + 5 * activation_bytes(model.config, 1, SEQ)",
        "assert loss.item() > 0\n",
    ),
    Scenario(
        "generate on a batch of prompts",
        ON_GPU + "tokenizer = AutoTokenizer.from_pretrained(path)\n" + PROMPTS,
        "inputs = tokenizer(prompts[:8], return_tensors='pt', padding=True)\n"
        "outputs = model.generate(**inputs, max_new_tokens=4, do_sample=False)\n",
        "gpu.in_use_bytes() + inference_bytes(model.config, 4, SEQ) + 16 * KiB",
        "assert outputs.shape == (8, SEQ + 4)\n",
    ),
    Scenario(
        "a loop of prompt batches (batch_size = 16)",
        ON_GPU + "tokenizer = AutoTokenizer.from_pretrained(path)\n" + PROMPTS,
        "batch_size = 16\n"
        "answers = []\n"
        "for i in range(0, len(prompts), batch_size):\n"
        "    batch = tokenizer(prompts[i : i + batch_size], return_tensors='pt', padding=True)\n"
        "    answers += tokenizer.batch_decode(model.generate(**batch, max_new_tokens=2, do_sample=False))\n",
        "gpu.in_use_bytes() + inference_bytes(model.config, 4, SEQ) + 16 * KiB",
        "assert len(answers) == 32\n",
    ),
    Scenario(
        "a forward pass outside torch.no_grad()",
        ON_GPU + "tokenizer = AutoTokenizer.from_pretrained(path)\n" + PROMPTS,
        "inputs = tokenizer(prompts[:4], return_tensors='pt', padding=True)\n"
        "outputs = model(**inputs)\n"
        "scores = outputs.logits[:, -1].softmax(-1)\n",
        "gpu.in_use_bytes() + inference_bytes(model.config, 4, SEQ) + 16 * KiB",
        "assert scores.shape == (4, 256)\n",
    ),
)


def build_checkpoints(folder: Path) -> dict[str, str]:
    """The models the scenarios load, saved under ``folder``: names the setups use."""
    path = save_tiny_llama(folder / "llama")
    save_tokenizer(path)
    return {
        "path": str(path),
        "fp32_path": str(save_float32_without_dtype(folder / "llama-fp32")),
        "adapter": str(save_adapter(path, folder / "adapter")),
        "out_dir": str(folder / "out"),
    }


@dataclass(frozen=True)
class Measured:
    worked: bool
    runs: int  # runs of the cell, the failed one included
    fix: str  # the fix that ran (fix 1), or the one --auto ended with
    detail: str  # why it did not work, when it did not


def measure(ip: Any, scenario: Scenario, names: dict[str, str], how: Literal["fix 1", "auto"]) -> Measured:
    """Run ``scenario`` on a fresh notebook namespace: its setup, its cell (failing), then fix 1 or --auto."""
    for name in list(ip.user_ns):
        if not name.startswith("_") and name not in ip.user_ns_hidden:
            del ip.user_ns[name]
    ip.user_ns.update(names, SEQ=SEQ, Path=Path)
    magics = ip.magics_manager.registry["VramMagics"]
    magics.session.last_report = None
    with simulated_gpu(budget_bytes=2**30) as gpu, capture_output() as captured:
        setup = ip.run_cell(scenario.setup)
        if not setup.success:
            return Measured(False, 0, "", f"setup failed: {setup.error_in_exec!r}")
        helpers = {
            "gpu": gpu,
            "KiB": KiB,
            "activation_bytes": activation_bytes,
            "inference_bytes": inference_bytes,
        }
        gpu.budget_bytes = int(eval(scenario.budget, {**ip.user_ns, **helpers}))
        flag = " --auto" if how == "auto" else ""
        result = ip.run_cell(f"%%oomsafe{flag}\n{scenario.cell}")
        fix = ""
        if how == "fix 1":
            report = magics.last_report
            if result.success or report is None:
                return Measured(False, 1, "", "the cell as written did not run out of memory")
            if not report.fixes or not report.fixes[0].runnable:
                return Measured(False, 1, "", "fix 1 is advice to follow by hand")
            fix = report.fixes[0].title
            result = ip.run_cell("%vram fix 1")
        elif magics.last_report is not None and magics.last_report.attempts:
            fix = magics.last_report.attempts[-1].label
        runs = len(gpu.failures) + (1 if result.success else 0)
        if not result.success:
            error = result.error_in_exec or result.error_before_exec
            return Measured(False, runs, fix, f"{type(error).__name__}: {str(error)[:160]}")
        check = ip.run_cell(scenario.works)
    if not check.success:
        return Measured(False, runs, fix, f"not working afterwards: {check.error_in_exec!r}"[:200])
    del captured
    return Measured(True, runs, fix, "")
