"""Preflight for training: a %%oomsafe cell that builds a Trainer and trains is judged before it runs; one
whose first steps surely do not fit is not run, and --auto runs the smallest batch split that fits, with 0
OOMs.

No GPU here: the room is a cap planned for with ``%vram cap`` (``_caps.set_target_bytes``), and the model, a
tiny Llama with LoRA adapters on the CPU, counts as the weights the Trainer would move to that GPU. The cells
that run, run for real (a real Trainer, real steps on the CPU)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from IPython.utils.capture import capture_output

from tests.tiny_models import save_tiny_llama
from vram_magic import OutOfMemoryHandled, _caps
from vram_magic._train_preflight import _SURE_SHARE, TrainingVerdict, check_training, training_step
from vram_magic.cell import read_cell
from vram_magic.estimator import estimate

MiB = 2**20
SEQUENCE = 128
ROWS = 16
TWO_IMPORTS = "from transformers import TrainingArguments\nfrom lightning import Trainer"


def train_cell(batch: object = 8, *, accumulation: object = 1, extra: str = "") -> str:
    return (
        "from transformers import Trainer, TrainingArguments\n\n"
        "args = TrainingArguments(\n"
        "    output_dir=out,\n"
        f"    per_device_train_batch_size={batch},\n"
        f"    gradient_accumulation_steps={accumulation},\n"
        "    max_steps=2,\n"
        "    learning_rate=2e-4,\n"
        '    report_to="none",\n'
        '    save_strategy="no",\n'
        "    disable_tqdm=True,\n"
        f"{extra}"
        ")\n"
        "trainer = Trainer(model=model, args=args, train_dataset=train_data)\n"
        "result = trainer.train()\n"
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def lora_model(checkpoint: Path) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(checkpoint)
    return get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def rows(lengths: list[int]) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    made = [torch.randint(1, 256, (n,), generator=generator) for n in lengths]
    return [{"input_ids": ids, "labels": ids} for ids in made]


@pytest.fixture
def namespace(checkpoint: Path, tmp_path: Path) -> dict[str, Any]:
    return {"model": lora_model(checkpoint), "train_data": rows([SEQUENCE] * ROWS), "out": str(tmp_path)}


@pytest.fixture
def rehearsal(ip: Any, namespace: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """No GPU here: 4 MiB planned for, which a batch of 8 sequences of 128 tokens cannot fit, nor 4; 2 can."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; tests/gpu covers preflight for real")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ip.user_ns.update(namespace)
    _caps.set_target_bytes(4 * MiB)
    yield ip
    _caps.set_target_bytes(None)


def verdict(cell: str, namespace: dict[str, Any], room_bytes: int = 4 * MiB) -> TrainingVerdict | None:
    return check_training(read_cell(cell, namespace), room_bytes, gpu_here=False)


def test_a_training_step_is_read_from_the_cell_and_the_notebook(namespace: dict[str, Any]) -> None:
    step = training_step(read_cell(train_cell(), namespace), gpu_here=False)
    assert step is not None
    assert (step.model_name, step.lora, step.quantization) == ("model", True, None)
    assert (step.batch_size, step.sequence, step.accumulation, step.optimizer_steps) == (8, SEQUENCE, 1, 2)
    assert (step.checkpointing, step.mixed_precision, step.on_gpu) == (False, False, False)
    from transformers import TrainingArguments

    assert step.optimizer == str(getattr(TrainingArguments.optim, "value", TrainingArguments.optim))


def test_the_floor_is_what_surely_runs(namespace: dict[str, Any]) -> None:
    """Weights (to be moved to the GPU), the optimizer's states (a second step runs), a share of the estimated
    activations and logits; not the gradients, which a step frees as it goes (nothing accumulates)."""
    found = verdict(train_cell(), namespace)
    assert found is not None
    model = namespace["model"]
    parts = dict(found.parts)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert parts["weights"] == model.get_memory_footprint()
    # torch's AdamW keeps two states in each LoRA parameter's own dtype (float32)
    assert parts["optimizer"] == sum(2 * p.numel() * p.element_size() for p in trainable)
    assert parts["gradients"] == sum(p.numel() * p.element_size() for p in trainable)
    expected = dict(
        estimate(model.config, training="lora", batch_size=8, context=SEQUENCE, prepare_kbit=False).parts
    )
    assert (parts["activations"], parts["logits"]) == (expected["activations"], expected["logits"])
    assert found.estimate_bytes == sum(parts.values())
    sure_share = int(_SURE_SHARE * parts["activations"]) + int(_SURE_SHARE * parts["logits"])
    floor = parts["weights"] + parts["optimizer"] + sure_share
    assert found.need_bytes == floor and not found.fits
    # Accumulating keeps the gradients between micro-batches; a single optimizer step never holds states
    accumulated = verdict(train_cell(accumulation=2), namespace)
    assert accumulated is not None and accumulated.need_bytes == floor + parts["gradients"]
    one_step = verdict(train_cell().replace("max_steps=2", "max_steps=1"), namespace)
    assert one_step is not None and one_step.need_bytes == floor - parts["optimizer"]


def test_the_first_batch_is_as_short_as_the_data_allows(namespace: dict[str, Any]) -> None:
    """Rows of different lengths: the first batch of 4 is padded to at least the 4th shortest row."""
    namespace["train_data"] = rows([16, 100, 24, 8, 120, 64, 32, 128])
    step = training_step(read_cell(train_cell(4), namespace), gpu_here=False)
    assert step is not None and (step.batch_size, step.sequence) == (4, 32)
    namespace["train_data"] = rows([16, 100, 24])  # fewer rows than a batch: one batch of all of them
    step = training_step(read_cell(train_cell(4), namespace), gpu_here=False)
    assert step is not None and (step.batch_size, step.sequence) == (3, 100)


def test_a_datasets_dataset_is_measured_from_its_table(namespace: dict[str, Any]) -> None:
    datasets = pytest.importorskip("datasets")
    lengths = [16, 100, 24, 8, 120, 64, 32, 128]
    data = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in lengths]})
    namespace["train_data"] = data
    step = training_step(read_cell(train_cell(4), namespace), gpu_here=False)
    assert step is not None and (step.batch_size, step.sequence) == (4, 32)
    namespace["train_data"] = data.shuffle(seed=0)  # an indices mapping over the table: not measured
    assert training_step(read_cell(train_cell(4), namespace), gpu_here=False) is None


def test_training_arguments_of_an_earlier_cell_are_read(namespace: dict[str, Any]) -> None:
    from transformers import TrainingArguments

    namespace["args"] = TrainingArguments(
        output_dir=namespace["out"], per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3
    )
    cell = "trainer = Trainer(model, args, train_dataset=train_data)\ntrainer.train()\n"
    namespace["Trainer"] = __import__("transformers").Trainer
    step = training_step(read_cell(cell, namespace), gpu_here=False)
    assert step is not None and (step.batch_size, step.accumulation, step.optimizer_steps) == (4, 2, 3)
    # changed by the cell before it trains: what the step reads is no longer what the notebook holds
    assert training_step(read_cell("args.max_steps = 1\n" + cell, namespace), gpu_here=False) is None
    namespace["same_args"] = namespace["args"]  # or under another of its names
    assert training_step(read_cell("same_args.max_steps = 1\n" + cell, namespace), gpu_here=False) is None


@pytest.mark.parametrize(
    "cell",
    [
        # the model changes in the cell before it trains
        "model = get_peft_model(model, config)\n" + train_cell(),
        "model.gradient_checkpointing_enable()\n" + train_cell(),
        # training that may not run
        "if go:\n" + "".join("    " + line + "\n" for line in train_cell().splitlines()),
        # a batch size only running the cell tells
        train_cell("pick_batch()"),
        # a collator of the user's (it may crop), a trainer subclass (its loss may be anything)
        train_cell().replace("train_dataset=train_data", "train_dataset=train_data, data_collator=crop"),
        train_cell().replace("trainer = Trainer(", "trainer = MyTrainer("),
        # data the cell makes, arguments hidden in **kwargs, text that is tokenized later
        "train_data = load()\n" + train_cell(),
        train_cell().replace("disable_tqdm=True,\n", "disable_tqdm=True,\n    **settings(),\n"),
        # the model changed under another of its names
        "prepare_model_for_kbit_training(base)\n" + train_cell(),
        # memory freed before training: the room before the cell says too little
        "del reference\n" + train_cell(),
        "torch.cuda.empty_cache()\n" + train_cell(),
        "reference = None\n" + train_cell(),
        # settings that change what a step holds in ways the estimate does not follow
        train_cell(extra="    auto_find_batch_size=True,\n"),
        train_cell(extra="    use_cpu=True,\n"),
        train_cell(extra="    torch_compile=True,\n"),
        train_cell(extra='    deepspeed="ds_config.json",\n'),
        # an optimizer of the user's, a resumed run (its states come from the checkpoint)
        train_cell().replace("train_dataset=train_data", "train_dataset=train_data, optimizers=(opt, None)"),
        train_cell().replace("trainer.train()", 'trainer.train(resume_from_checkpoint="last")'),
        # the arguments or the data changed in the cell before the trainer is built
        train_cell().replace(
            "trainer = Trainer(", "args.per_device_train_batch_size = 64\ntrainer = Trainer("
        ),
        "train_data.append(long_row)\n" + train_cell(),
        # a Trainer of another library
        train_cell().replace("from transformers import Trainer, TrainingArguments", TWO_IMPORTS),
    ],
    ids=[
        "rebuilt",
        "checkpointing-enabled",
        "maybe",
        "batch-unknown",
        "own-collator",
        "subclass",
        "data-made-here",
        "kwargs",
        "alias-changed",
        "del",
        "empty-cache",
        "rebound",
        "auto-find-batch-size",
        "use-cpu",
        "torch-compile",
        "deepspeed",
        "own-optimizer",
        "resumed",
        "args-changed",
        "data-changed",
        "other-library",
    ],
)
def test_training_not_known_before_it_runs_is_not_judged(cell: str, namespace: dict[str, Any]) -> None:
    namespace.update(crop=lambda rows: rows, base=namespace["model"], reference=torch.nn.Linear(4, 4))
    assert verdict(train_cell(), namespace, room_bytes=1) is not None  # the same cell alone is judged
    assert verdict(cell, namespace, room_bytes=1) is None


def test_a_training_cell_run_again_is_not_judged(namespace: dict[str, Any]) -> None:
    """Binding `trainer` again lets the first Trainer go, with the optimizer states it holds once it trained:
    the room before the cell says too little."""
    namespace["trainer"] = built_trainer(namespace)
    assert verdict(train_cell(), namespace, room_bytes=1) is None


def test_harmless_uses_of_the_model_before_training_are_allowed(namespace: dict[str, Any]) -> None:
    cell = "model.config.use_cache = False\nmodel.print_trainable_parameters()\n" + train_cell()
    assert verdict(cell, namespace) is not None
    # what comes after the training changes nothing before it
    assert verdict(train_cell() + "model = model.merge_and_unload()\ndel trainer\n", namespace) is not None


@pytest.mark.parametrize("library", ["unsloth", "liger_kernel"])
def test_no_verdict_once_a_library_that_patches_the_models_is_imported(
    library: str, namespace: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unsloth and Liger replace transformers' forward passes in place (a chunked or fused loss that never
    holds the logits): the floor would count memory the step does not hold, a false stop."""
    import types

    assert verdict(train_cell(), namespace) is not None
    monkeypatch.setitem(sys.modules, library, types.ModuleType(library))
    assert verdict(train_cell(), namespace) is None


def test_only_collators_that_pad_are_judged(namespace: dict[str, Any]) -> None:
    """A collator that pads each batch to its longest row keeps the first batch's length; one that packs rows
    together (``DataCollatorWithFlattening``) makes other shapes: no verdict."""
    from transformers import DataCollatorWithFlattening, default_data_collator

    namespace.update(collate=default_data_collator, flatten=DataCollatorWithFlattening())
    padded = train_cell().replace(
        "train_dataset=train_data", "train_dataset=train_data, data_collator=collate"
    )
    assert verdict(padded, namespace) is not None
    assert verdict(padded.replace("data_collator=collate", "data_collator=flatten"), namespace) is None


def test_only_causal_language_models_are_judged(checkpoint: Path, namespace: dict[str, Any]) -> None:
    """The estimate prices logits over the vocabulary at every position: a classifier's are not."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForSequenceClassification

    base = LlamaForSequenceClassification.from_pretrained(checkpoint, num_labels=2)
    namespace["model"] = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj"], task_type="SEQ_CLS"))
    assert verdict(train_cell(), namespace, room_bytes=1) is None


def built_trainer(namespace: dict[str, Any], batch: int = 8) -> Any:
    """A Trainer an earlier cell built."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=namespace["out"],
        per_device_train_batch_size=batch,
        max_steps=2,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    return Trainer(model=namespace["model"], args=args, train_dataset=namespace["train_data"])


def test_a_trainer_of_an_earlier_cell_is_judged_by_what_it_holds(namespace: dict[str, Any]) -> None:
    namespace["trainer"] = trainer = built_trainer(namespace)
    trainer.args.per_device_train_batch_size = 2  # too late: the Trainer fixed its batch when it was built
    found = verdict("trainer.train()\n", namespace)
    assert found is not None and not found.fits
    step = found.step
    assert (step.model_name, step.batch_size, step.sequence, step.optimizer_steps) == (
        "trainer.model",
        8,
        128,
        2,
    )
    fresh = {name: value for name, value in namespace.items() if name != "trainer"}  # a first run
    same = verdict(train_cell(), {**fresh, "model": trainer.model})
    assert same is not None and same.parts == found.parts  # as if the cell had built it
    # The model changed in the cell before it trains, under any of its names: no verdict
    namespace["lora_model"] = trainer.model
    assert verdict("lora_model.gradient_checkpointing_enable()\ntrainer.train()\n", namespace) is None
    assert verdict("trainer.model.enable_input_require_grads()\ntrainer.train()\n", namespace) is None
    assert verdict("lora_model.print_trainable_parameters()\ntrainer.train()\n", namespace) is not None
    # Its arguments or data changed in the cell under another of their names: what it reads at train()
    namespace.update(args=trainer.args, rows=trainer.train_dataset)
    assert verdict("args.gradient_accumulation_steps = 4\ntrainer.train()\n", namespace) is None
    assert verdict("rows.append(rows[0])\ntrainer.train()\n", namespace) is None
    # A Trainer that trained before holds its optimizer's states, which the room before the cell counts
    trainer.create_optimizer()
    assert verdict("trainer.train()\n", namespace) is None


def test_a_trainer_of_an_earlier_cell_that_cannot_fit_is_not_run_and_the_fixes_are_advice(
    rehearsal: Any,
) -> None:
    ip = rehearsal
    ip.user_ns["trainer"] = built_trainer(ip.user_ns)
    with capture_output() as captured:
        result = ip.run_cell("%%oomsafe --auto\ntrainer.train()\n")
    assert isinstance(result.error_in_exec, OutOfMemoryHandled)
    assert captured.outputs[0].data["text/plain"].startswith("Not run: the first training steps")
    report = ip.magics_manager.registry["VramMagics"].last_report
    # The batch size is the earlier cell's: advice to apply there (then build the Trainer again), not a rerun
    assert [(fix.key, fix.runnable, fix.by_hand is not None) for fix in report.fixes] == [
        ("half-batch", False, True),
        ("checkpointing", False, True),
    ]
    split = report.fixes[0]  # sized like the fixes of a cell that builds its Trainer: 4 does not fit, 2 does
    assert split.code.endswith("per_device_train_batch_size=2, gradient_accumulation_steps=4")
    assert split.fits is True and split.needed_bytes is not None and split.needed_bytes <= 4 * MiB
    assert "`trainer` was built in an earlier cell" in split.why
    lighter = report.fixes[1]  # sized too, against the same 4 MiB
    assert lighter.code.endswith('gradient_checkpointing=True, optim="paged_adamw_8bit"')
    assert lighter.needed_bytes is not None and lighter.fits == (lighter.needed_bytes <= 4 * MiB)
    whole = verdict("trainer.train()\n", ip.user_ns)
    assert whole is not None and lighter.needed_bytes < whole.estimate_bytes  # checkpointing shrinks it
    assert "`trainer` was built in an earlier cell" in lighter.why
    assert ip.user_ns["trainer"].state.global_step == 0  # not a step ran


def test_training_that_cannot_fit_is_not_run(rehearsal: Any) -> None:
    ip = rehearsal
    weights_before = {k: v.clone() for k, v in ip.user_ns["model"].state_dict().items() if "lora" in k}
    with capture_output() as captured:
        result = ip.run_cell("%%oomsafe\n" + train_cell())
    assert isinstance(result.error_in_exec, OutOfMemoryHandled)
    assert "result" not in ip.user_ns and "trainer" not in ip.user_ns
    after = ip.user_ns["model"].state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights_before.items())  # not a single step ran
    shown = captured.outputs[0].data["text/plain"]
    assert shown.startswith("Not run: the first training steps would need at least ")
    assert "under the cap planned for (no GPU here)" in shown.splitlines()[0]
    assert "batches of 8 sequences of at least 128 tokens" in shown
    report = ip.magics_manager.registry["VramMagics"].last_report
    split, checkpointing = report.fixes
    # The batch is split as many times as the estimate needs (4 does not fit, 2 does), the effective batch
    # kept: 2 x 4 = 8 sequences per optimizer step.
    assert split.key == "half-batch" and split.fits is True
    assert "per_device_train_batch_size=2" in split.rewritten_cell
    assert "gradient_accumulation_steps=4" in split.rewritten_cell
    assert split.needed_bytes is not None and split.needed_bytes <= 4 * MiB
    assert checkpointing.key == "checkpointing" and checkpointing.needed_bytes is not None


def test_auto_trains_with_the_split_that_fits_and_no_oom(rehearsal: Any) -> None:
    ip = rehearsal
    with capture_output() as captured:
        result = ip.run_cell("%%oomsafe --auto\n" + train_cell())
    assert result.success, captured.stdout
    assert "Running fix 1 instead:" in captured.stdout and "Fix 1 worked" in captured.stdout
    args = ip.user_ns["args"]
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 4)
    assert ip.user_ns["result"].global_step == 2


def test_training_that_fits_or_is_forced_runs(rehearsal: Any) -> None:
    ip = rehearsal
    with capture_output() as captured:
        forced = ip.run_cell("%%oomsafe --force\n" + train_cell())
    assert forced.success and "Not run" not in captured.stdout
    assert ip.user_ns["result"].global_step == 2
    _caps.set_target_bytes(64 * MiB)
    with capture_output() as captured:
        fits = ip.run_cell("%%oomsafe\n" + train_cell())
    assert fits.success and "Not run" not in captured.stdout and captured.outputs == []


def alive_when_the_backward_starts(model: Any, batch: int, sequence: int, vocab: int) -> int:
    """Bytes that surely coexist at the start of a step's backward pass, measured: every tensor autograd saved
    (each storage once, the weights left out), the logits, and the loss's first gradient (float32)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, vocab, (batch, sequence), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(input_ids=ids, labels=ids)
    saved[out.logits.untyped_storage().data_ptr()] = out.logits.untyped_storage().nbytes()
    return sum(saved.values()) + batch * sequence * vocab * 4


@pytest.mark.parametrize(
    ("architecture", "training", "dtype", "hidden"),
    [
        ("llama", "lora", "bfloat16", 128),
        ("llama", "full", "bfloat16", 128),
        ("llama", "lora", "float32", 128),
        ("llama", "full", "float32", 128),
        ("llama", "lora", "float32", 512),  # the least share measured: 62 %
        ("gpt2", "lora", "bfloat16", 128),
        ("gpt2", "full", "bfloat16", 128),
    ],
)
def test_the_share_preflight_counts_surely_exists(
    architecture: str, training: str, dtype: str, hidden: int, tmp_path: Path
) -> None:
    """The floor's share of the estimated activations and logits is no more than what a real step holds at
    once (measured on CPU; a GPU allocates at least as much for the same graph), at two batch shapes."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if architecture == "llama":
        config: Any = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=hidden * 43 // 16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            max_position_embeddings=512,
        )
        model_class: Any = LlamaForCausalLM
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    else:
        config = GPT2Config(n_embd=hidden, n_layer=2, n_head=4, vocab_size=512, n_positions=512)
        model_class, targets = GPT2LMHeadModel, ["c_attn"]
    torch.manual_seed(0)
    model = model_class(config).to(getattr(torch, dtype))
    if training == "lora":
        model = get_peft_model(model, LoraConfig(r=16, target_modules=targets, task_type="CAUSAL_LM"))
    for batch, sequence in ((1, 64), (4, 256)):
        parts = dict(
            estimate(config, dtype=dtype, training=training, batch_size=batch, context=sequence).parts
        )
        counted = int(_SURE_SHARE * parts["activations"]) + int(_SURE_SHARE * parts["logits"])
        alive = alive_when_the_backward_starts(model, batch, sequence, config.vocab_size)
        assert counted <= alive, (batch, sequence, alive / (parts["activations"] + parts["logits"]))


# --- other people's training cells, as written ------------------------------------------------------------

# huggingface/notebooks, examples/language_modeling.ipynb at 21bba48e9bfbb91b3074ac2abfb44a72a11f45de
# (Apache-2.0), the causal-LM section: the Trainer is built in one cell (id OEuqwIra3l_N) and trained in the
# next (NyZvu_MF3l_P). Its data is a DatasetDict of rows grouped to block_size tokens; the collator is the
# Trainer's default.
HF_NOTEBOOK_TRAINER = """trainer = Trainer(
    model=model,
    args=training_args,
    train_dataset=lm_datasets["train"],
    eval_dataset=lm_datasets["validation"],
)"""
HF_NOTEBOOK_TRAIN = "trainer.train()"
# huggingface/peft, examples/int8_training/Finetune_opt_bnb_peft.ipynb at
# 044cf7cc31a94623b4a13b471ca5f7fda5d3a908 (Apache-2.0), cell 12 (tests/fixtures/real_cells/cells.json,
# peft-opt8bit-02) from its Trainer on; its first lines load and tokenize the data, which an earlier cell does
# here (data made in the training cell is not judged: its rows are unknown before it runs).
PEFT_NOTEBOOK_TRAIN = """trainer = transformers.Trainer(
    model=model,
    train_dataset=data["train"],
    args=transformers.TrainingArguments(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        warmup_steps=100,
        max_steps=200,
        learning_rate=2e-4,
        fp16=True,
        logging_steps=1,
        output_dir="outputs",
    ),
    data_collator=transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False),
)
model.config.use_cache = False  # silence the warnings. Please re-enable for inference!
trainer.train()"""


def dataset_dict(lengths: list[int]) -> Any:
    datasets = pytest.importorskip("datasets")
    rows = {"input_ids": [[1] * n for n in lengths], "labels": [[1] * n for n in lengths]}
    return datasets.DatasetDict(
        train=datasets.Dataset.from_dict(rows), validation=datasets.Dataset.from_dict(rows)
    )


def hf_notebook(namespace: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """The notebook's objects, small: its model a tiny Llama trained in full, its blocks 128 tokens, its
    TrainingArguments as written but for push_to_hub (no Hub here) and the reporting."""
    import transformers

    namespace["model"] = transformers.LlamaForCausalLM.from_pretrained(checkpoint)
    namespace["training_args"] = transformers.TrainingArguments(
        namespace["out"], eval_strategy="epoch", learning_rate=2e-5, weight_decay=0.01, report_to="none"
    )
    namespace.update(lm_datasets=dataset_dict([SEQUENCE] * ROWS), Trainer=transformers.Trainer)
    return namespace


def test_the_language_modeling_notebook_of_hugging_face_is_judged(
    namespace: dict[str, Any], checkpoint: Path
) -> None:
    """Its two cells run as one, or its train() cell after the Trainer cell ran: the same step either way
    (batch 8 of 128 tokens, the default TrainingArguments, all weights trained)."""
    namespace = hf_notebook(namespace, checkpoint)
    together = verdict(HF_NOTEBOOK_TRAINER + "\n" + HF_NOTEBOOK_TRAIN, namespace)
    assert together is not None and not together.fits
    step = together.step
    assert (step.batch_size, step.sequence, step.accumulation, step.lora) == (8, SEQUENCE, 1, False)
    exec(HF_NOTEBOOK_TRAINER, namespace)  # the notebook's Trainer cell, run as written
    apart = verdict(HF_NOTEBOOK_TRAIN, namespace)
    assert apart is not None and apart.parts == together.parts
    # The split changed in the cell before training: no verdict
    namespace.pop("trainer")
    changed = (
        'lm_datasets["train"] = lm_datasets["validation"]\n' + HF_NOTEBOOK_TRAINER + "\n" + HF_NOTEBOOK_TRAIN
    )
    assert verdict(changed, namespace) is None


def test_the_peft_int8_notebook_is_judged_with_the_collator_it_builds(namespace: dict[str, Any]) -> None:
    import transformers

    namespace.update(transformers=transformers, data=dataset_dict([16, 100, 24, 8, 120, 64, 32, 128]))
    namespace["tokenizer"] = object()  # read, never called: preflight runs nothing of the cell
    found = verdict(PEFT_NOTEBOOK_TRAIN, namespace)
    assert found is not None
    step = found.step
    assert (step.batch_size, step.sequence, step.accumulation, step.optimizer_steps) == (4, 32, 4, 200)
    assert step.mixed_precision
    # A collator of another library, or one that packs rows, built the same way: no verdict
    flattening = PEFT_NOTEBOOK_TRAIN.replace(
        "transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)",
        "transformers.DataCollatorWithFlattening()",
    )
    assert verdict(flattening, namespace) is None
    namespace["trl"] = pytest.importorskip("types").SimpleNamespace(DataCollatorForCompletionOnlyLM=object)
    other = PEFT_NOTEBOOK_TRAIN.replace(
        "transformers.DataCollatorForLanguageModeling", "trl.DataCollatorForCompletionOnlyLM"
    )
    assert verdict(other, namespace) is None
