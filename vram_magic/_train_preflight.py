"""Preflight for training: before a ``%%oomsafe`` cell runs ``trainer.train()`` of a ``Trainer`` it builds,
judge the first training steps against the room on the GPU.

False stops are worse than a late OOM, so this judges a floor, not the estimate, and only what is known
before the cell runs:

- the cell surely runs ``Trainer(...).train()`` (top level, no arguments), with transformers' own
  ``Trainer`` (or ``Seq2SeqTrainer``): a subclass may compute its loss any way it likes;
- the model is a causal language model the notebook holds, on one device, not changed by the cell before it
  trains (its trainable parameters, dtype, quantization, adapters and place are read off the object);
- nothing the estimate does not follow is on: an optimizer of the user's, ``auto_find_batch_size``,
  ``use_cpu``, ``torch_compile``, Liger kernels, DeepSpeed, FSDP, and neither Unsloth nor Liger was imported
  (they patch transformers' models in place);
- the TrainingArguments are a notebook object, or built in the cell with values the reader knows (missing
  keywords take the class's defaults);
- the training data is a list of rows or a ``datasets.Dataset`` with ``input_ids`` (or ``data["train"]`` of
  a dataset dict), and the collator (an object, or built in the cell) is one of transformers' that pads to
  the longest row of a batch and never truncates or packs: the first batch then holds at least ``B`` rows
  padded to at least the ``B``-th shortest length.

The floor is what the step surely holds at once: the estimator's activations and logits for that first
batch (``vram_magic.estimator``, the same arithmetic as ``%vram estimate --train``) at ``_SURE_SHARE`` of
their estimate; the optimizer's states once a second optimizer step surely runs (not a paged optimizer's);
the gradients when they are accumulated over micro-batches; the weights when the Trainer has yet to move
them to the GPU. Pure Python: no IPython.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import libcst as cst
import libcst.matchers as m

from vram_magic.cell import Cell, Held, TrainerRun
from vram_magic.cell._values import bound_names, keyword_values

# What surely exists at the peak of a step is less than the estimate: autograd's saved tensors, the logits and
# the loss's first gradient, which coexist when the backward pass starts, measured on CPU for small Llama and
# GPT-2 models (LoRA and full, bfloat16 and float32, hidden 128 to 512; tests/test_train_preflight.py), came
# to 62-96 % of the estimated activations and logits. Preflight counts less than the least measured.
_SURE_SHARE = 0.5
_TRAINERS = frozenset({"Trainer", "Seq2SeqTrainer"})
_POSITIONAL = ("model", "args", "data_collator", "train_dataset")  # Trainer's first parameters, in order
_MAX_ROWS = 1_000_000  # more rows than this are not measured one by one
# Uses of the model name in the cell before training that change nothing the step needs.
_HARMLESS_METHODS = frozenset({"print_trainable_parameters", "get_memory_footprint", "num_parameters"})
_FREEING_METHODS = frozenset({"empty_cache", "collect", "to", "cpu", "free_memory", "release_memory"})
# Settings that change what a step holds in ways the estimate does not follow: no verdict where they are on.
_UNJUDGED_SETTINGS = (
    "auto_find_batch_size",
    "use_cpu",
    "use_liger_kernel",
    "torch_compile",
    "deepspeed",
    "fsdp",
)
# Collators that pad each batch to its longest row (or stack equal rows) and never drop or join tokens.
_PADDING_COLLATORS = frozenset(
    {
        "default_data_collator",
        "DefaultDataCollator",
        "DataCollatorWithPadding",
        "DataCollatorForLanguageModeling",
        "DataCollatorForSeq2Seq",
        "DataCollatorForTokenClassification",
    }
)
_ARGUMENTS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "optim",
    "max_steps",
    "num_train_epochs",
    "dataloader_drop_last",
    "bf16",
    "fp16",
    *_UNJUDGED_SETTINGS,
)
_REQUIRED = _ARGUMENTS[:6]  # without these known, no verdict
# Libraries that patch transformers' models in place once imported (fused or chunked cross-entropy that never
# holds the logits, offloaded checkpointing): the model's class says nothing of it, so no verdict at all.
_PATCHING_LIBRARIES = ("unsloth", "liger_kernel")
_SWITCHES = frozenset(  # the settings that are True or False
    {"gradient_checkpointing", "dataloader_drop_last", "bf16", "fp16", "auto_find_batch_size", "use_cpu"}
    | {"use_liger_kernel", "torch_compile"}
)


@dataclass(frozen=True)
class TrainingStep:
    """What the first training steps of a cell are, as far as it is known before they run."""

    model: Any = dataclasses.field(repr=False)
    model_name: str
    lora: bool
    quantization: str | None  # "4bit" / "8bit" (bitsandbytes) or None
    batch_size: int  # the first batch's rows
    sequence: int  # the shortest length the first batch is padded to
    accumulation: int
    micro_batches: int  # per epoch
    checkpointing: bool
    optimizer: str
    optimizer_steps: int  # at least this many
    mixed_precision: bool  # bf16=True or fp16=True: activations in 16 bits
    on_gpu: bool  # the weights are on the GPU already (else the Trainer puts them there)
    rows: tuple[int, ...] = dataclasses.field(default=(), repr=False)  # every row's length, sorted
    held_trainer: str | None = None  # the notebook's name for a trainer an earlier cell built


@dataclass(frozen=True)
class TrainingVerdict:
    """What the first training steps hold at once, by part (the estimate), against the room. Preflight stops
    the cell on ``need_bytes``, the part of it that surely runs (see the module's doc); a fix is said to fit
    on the whole estimate, ``estimate_bytes``."""

    step: TrainingStep
    parts: tuple[tuple[str, int], ...]  # (key, bytes): weights, optimizer, gradients, activations, logits
    room_bytes: int

    @property
    def estimate_bytes(self) -> int:
        return sum(size for _, size in self.parts)

    @property
    def need_bytes(self) -> int:
        """The floor: gradients only while they are accumulated over micro-batches (else a step frees its
        activations as its gradients grow), and ``_SURE_SHARE`` of the activations and logits."""
        floor = 0
        for key, size in self.parts:
            if key in ("activations", "logits"):
                floor += int(size * _SURE_SHARE)
            elif key != "gradients" or min(self.step.accumulation, self.step.micro_batches) >= 2:
                floor += size
        return floor

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.room_bytes

    @property
    def surely_fits(self) -> bool:
        return self.estimate_bytes <= self.room_bytes


def check_training(cell: Cell, room_bytes: int, gpu_here: bool) -> TrainingVerdict | None:
    """The verdict on the cell's training, or None when it has none that preflight can judge (see the
    module's doc). ``gpu_here``: a GPU is present (else the room is the cap planned for, and the weights
    count too). Raises nothing of its own on odd objects: None."""
    try:
        step = training_step(cell, gpu_here)
        if step is None:
            return None
        return TrainingVerdict(step, _parts(step), room_bytes)
    except Exception:  # a model or dataset of an unexpected kind: no verdict, never an error
        return None


def training_step(cell: Cell, gpu_here: bool) -> TrainingStep | None:
    """The first ``trainer.train()`` that surely runs, read with the notebook's objects; None if any part
    of it is not known before the cell runs."""
    run = next((run for run in cell.trainer_runs if run.surely), None)
    if run is None or run.class_name not in _TRAINERS or run.library != "transformers":
        return None
    if run.call.args or _frees_before(cell, run):  # train(resume_from_checkpoint=...)
        return None
    if any(library in sys.modules for library in _PATCHING_LIBRARIES):
        return None
    if run.trainer is None:
        return _held_trainer_step(cell, run, gpu_here)
    given = _trainer_arguments(run.trainer, cell)
    if given is None or not isinstance(given.get("model"), cst.Name):
        return None
    if given.get("optimizers") is not None:  # an optimizer of the user's: its states are unknown
        return None
    model_name = given["model"].value
    held = _value_at(cell, run, given["model"])
    if not isinstance(held, Held) or not _untouched(cell, run, model_name, run.trainer):
        return None
    if not _model_untouched(cell, run, held.value, run.trainer):
        return None
    arguments = _training_arguments(cell, run, given.get("args"))
    data = _data_at(cell, run, given["train_dataset"]) if "train_dataset" in given else None
    # The arguments, data and collator: the names the Trainer is given (``data["train"]``: the dict's),
    # and any other name the notebook has for them, only bound by the cell until it trains
    passed = [given.get(key) for key in ("args", "train_dataset", "data_collator")]
    passed = [expr.value if isinstance(expr, cst.Subscript) else expr for expr in passed]
    held_parts = [_value_at(cell, run, given.get(key)) for key in ("args", "data_collator")] + [data]
    names = {expr.value for expr in passed if isinstance(expr, cst.Name)}
    names |= _names_of(cell, [part.value for part in held_parts if isinstance(part, Held)])
    if not all(_only_bound(cell, run, name, run.trainer) for name in names):
        return None
    collator = given.get("data_collator")
    if collator is not None:
        collator = _value_at(cell, run, collator)
        if isinstance(collator, cst.Name) and collator.value == "None":
            collator = None
        elif isinstance(collator, cst.Call) and collator is run.collator:  # built in the cell
            name, library = run.collator_class or ("", None)
            if library != "transformers" or name not in _PADDING_COLLATORS:
                return None
        elif not isinstance(collator, Held) or not _pads_only(collator.value):
            return None
    rows = _row_lengths(data.value) if isinstance(data, Held) else None
    if arguments is None or rows is None:
        return None
    return _step(held.value, model_name, arguments, rows, gpu_here)


def _held_trainer_step(cell: Cell, run: TrainerRun, gpu_here: bool) -> TrainingStep | None:
    """``trainer.train()`` of a trainer an earlier cell built: its model, arguments, data and collator are
    the trainer's own (its batch size the one it fixed when it was built)."""
    assert run.held is not None
    trainer = cell.names.resolve(run.held)
    if not isinstance(trainer, Held) or not _untouched(cell, run, run.held, run.call):
        return None
    trainer_object = trainer.value
    if getattr(trainer_object, "optimizer", None) is not None:  # it trained before: its states are held
        return None
    model = getattr(trainer_object, "model", None)
    if not _model_untouched(cell, run, model, run.call):
        return None
    held_parts = [getattr(trainer_object, key, None) for key in ("args", "train_dataset", "data_collator")]
    if not all(_only_bound(cell, run, name, run.call) for name in _names_of(cell, held_parts)):
        return None  # changed under another of their names (``args.max_steps = 1``)
    arguments = _arguments_of(getattr(trainer_object, "args", None))
    rows = _row_lengths(getattr(trainer_object, "train_dataset", None))
    if arguments is None or rows is None or not _pads_only(getattr(trainer_object, "data_collator", None)):
        return None
    # What the Trainer took from args when built (per device times the GPUs DataParallel spreads it over)
    batch = getattr(trainer_object, "_train_batch_size", None)
    gpus = getattr(getattr(trainer_object, "args", None), "_n_gpu", 1)
    if isinstance(batch, int) and isinstance(gpus, int) and batch >= 1:
        arguments["per_device_train_batch_size"] = max(batch // max(gpus, 1), 1)  # as TrainingArguments
    step = _step(model, f"{run.held}.model", arguments, rows, gpu_here)
    return None if step is None else dataclasses.replace(step, held_trainer=run.held)


def replanned(verdict: TrainingVerdict, **changes: Any) -> TrainingVerdict:
    """The same training with some of its step's settings changed (``checkpointing=True``...), judged
    against the same room."""
    step = dataclasses.replace(verdict.step, **changes)
    return TrainingVerdict(step, _parts(step), verdict.room_bytes)


def split_that_fits(verdict: TrainingVerdict) -> TrainingVerdict | None:
    """The same training with the batch 2, 4, 8... times smaller and the accumulation as many times larger
    (the effective batch kept), at the first split whose whole estimate fits; None when none does."""
    step = verdict.step
    factor = 2
    while step.batch_size // factor >= 1:
        size = step.batch_size // factor
        size = next(d for d in range(size, 0, -1) if step.batch_size % d == 0)  # 6 / 4 -> 1 x 6
        found = replanned(
            verdict,
            batch_size=size,
            sequence=step.rows[size - 1],
            accumulation=step.accumulation * (step.batch_size // size),
        )
        if found.surely_fits:
            return found
        factor *= 2
    return None


def _trainer_arguments(trainer: cst.Call, cell: Cell) -> dict[str, Any] | None:
    """The Trainer's arguments by name (positional ones mapped to Trainer's parameters); None when a
    ``**kwargs`` hides some."""
    given, known = keyword_values(trainer, cell.names)
    if not known:
        return None
    positional = [arg.value for arg in trainer.args if arg.keyword is None]
    if any(arg.star for arg in trainer.args if arg.keyword is None) or len(positional) > len(_POSITIONAL):
        return None
    return dict(zip(_POSITIONAL, positional, strict=False)) | given


def _untouched(cell: Cell, run: TrainerRun, name: str, within: cst.CSTNode) -> bool:
    """Whether the cell leaves ``name``'s object as the notebook holds it until it trains: the name appears
    before the training only ``within`` (the Trainer's construction, or the ``train()`` call), in
    ``name.config.x = ...`` and in harmless calls."""
    allowed = {id(node) for node in m.findall(within, m.Name(name))}
    for step in cell.steps[: run.step + 1]:
        for node in m.findall(step.node, m.Assign() | m.Call()):
            if isinstance(node, cst.Assign) and all(_under_config(t.target, name) for t in node.targets):
                allowed |= {id(n) for t in node.targets for n in m.findall(t, m.Name(name))}
            elif (
                isinstance(node, cst.Call)
                and isinstance(node.func, cst.Attribute)
                and node.func.attr.value in _HARMLESS_METHODS
                and isinstance(node.func.value, cst.Name)
            ):
                allowed.add(id(node.func.value))
        if any(id(node) not in allowed for node in m.findall(step.node, m.Name(name))):
            return False
    return True


def _data_at(cell: Cell, run: TrainerRun, expr: Any) -> Any:
    """What ``expr`` is when the trainer is built, as ``_value_at``, and also ``data["train"]`` of a
    dataset dict (``DatasetDict``, or a plain dict) the notebook holds."""
    if not isinstance(expr, cst.Subscript) or len(expr.slice) != 1:
        return _value_at(cell, run, expr)
    index = expr.slice[0].slice
    key = cell.names.text(index.value) if isinstance(index, cst.Index) else None
    held = _value_at(cell, run, expr.value)
    if key is None or not isinstance(held, Held) or not isinstance(held.value, dict):
        return None
    return Held(held.value[key]) if key in held.value else None


def _only_bound(cell: Cell, run: TrainerRun, name: str, within: cst.CSTNode) -> bool:
    """Whether the cell does nothing with ``name`` until it trains but bind it and use it ``within``: its
    object, held or made in the cell, is the one read (``args.max_steps = 1`` would change it)."""
    allowed = {id(node) for node in m.findall(within, m.Name(name))}
    for step in cell.steps[: run.step + 1]:
        for node in m.findall(step.node, m.Assign()):
            if isinstance(node, cst.Assign):
                allowed |= {id(t.target) for t in node.targets if m.matches(t.target, m.Name(name))}
        if any(id(node) not in allowed for node in m.findall(step.node, m.Name(name))):
            return False
    return True


def _names_of(cell: Cell, objects: Sequence[object]) -> set[str]:
    """The names the cell uses that the notebook has bound to any of ``objects``."""
    return {
        name
        for name in cell.used_names
        if any(cell.names.namespace.get(name) is each for each in objects if each is not None)
    }


def _value_at(cell: Cell, run: TrainerRun, expr: Any) -> Any:
    """What ``expr`` is when the trainer is built: a name the cell binds only after training is still the
    notebook's object there."""
    name = expr.value if isinstance(expr, cst.Name) else None
    if (
        name in cell.names.bound
        and name in cell.names.namespace
        and not any(name in bound_names(step.node) for step in cell.steps[: run.step + 1])
    ):
        return Held(cell.names.namespace[name])
    return cell.names.value(expr)


def _model_untouched(cell: Cell, run: TrainerRun, model: object, within: cst.CSTNode) -> bool:
    """``_untouched`` for every name the notebook has for the model."""
    return all(_untouched(cell, run, name, within) for name in _names_of(cell, [model]))


def _frees_before(cell: Cell, run: TrainerRun) -> bool:
    """Whether the cell may free GPU memory before it trains (then the room before it runs says too little):
    ``del``, ``empty_cache()``, ``gc.collect()``, a move (``.to(...)``, ``.cpu()``), or a name the notebook
    holds a model, tensor, optimizer or trainer under bound again (running a training cell a second time
    lets the first trainer's optimizer states go)."""
    for step in cell.steps[: run.step]:
        if m.findall(step.node, m.Del()):
            return True
        for call in m.findall(step.node, m.Call(func=m.Attribute())):
            assert isinstance(call, cst.Call) and isinstance(call.func, cst.Attribute)
            if call.func.attr.value in _FREEING_METHODS:
                return True
        if any(_holds_gpu_memory(cell.names.namespace.get(name)) for name in bound_names(step.node)):
            return True
    return False


def _holds_gpu_memory(value: object) -> bool:
    """A model, tensor, optimizer or trainer (a trainer that trained holds its optimizer's states)."""
    classes = {klass.__name__ for klass in type(value).__mro__}
    return hasattr(value, "parameters") or bool(classes & {"Tensor", "Optimizer", "Trainer"})


def _under_config(target: cst.BaseExpression, name: str) -> bool:
    """``name.config.<...>`` (or deeper), as an assignment target."""
    chain: list[str] = []
    while isinstance(target, cst.Attribute):
        chain.append(target.attr.value)
        target = target.value
    return isinstance(target, cst.Name) and target.value == name and chain[-1:] == ["config"]


def _training_arguments(cell: Cell, run: TrainerRun, expr: Any) -> dict[str, Any] | None:
    """The TrainingArguments values the step depends on: a notebook object's, or a call of the cell's read
    with the class's defaults for what it leaves out; None when one of them is unknown."""
    value = _value_at(cell, run, expr) if expr is not None else None
    if isinstance(value, Held):
        return _arguments_of(value.value)
    config = next((c for c in cell.training_configs if c.call is value), None) if value is not None else None
    if value is not None and (config is None or not config.spread_known):
        return None
    class_name = config.class_name if config is not None else "TrainingArguments"
    defaults = _defaults(class_name)
    if defaults is None:
        return None
    given = keyword_values(config.call, cell.names)[0] if config is not None else {}
    found = dict(defaults)
    for key in _ARGUMENTS:
        if key not in given:
            continue
        read = _read(cell, key, given[key])
        if read is None:
            return None
        found[key] = read
    return _plain(found)


def _arguments_of(args: object) -> dict[str, Any] | None:
    """The values the step depends on of a TrainingArguments object."""
    found = {key: getattr(args, key, None) for key in _ARGUMENTS}
    return None if any(found[key] is None for key in _REQUIRED) else _plain(found)


def _read(cell: Cell, key: str, expr: Any) -> object:
    names = cell.names
    if key == "num_train_epochs":
        number = names.value(expr)
        if isinstance(number, cst.Float):
            return float(number.value)
        return names.integer(expr)
    if key == "optim":
        return names.text(expr)
    if key in _SWITCHES:
        return names.boolean(expr)
    return names.integer(expr)


def _defaults(class_name: str) -> dict[str, object] | None:
    """The defaults of transformers' TrainingArguments class ``class_name`` (Seq2SeqTrainingArguments...)."""
    transformers = sys.modules.get("transformers") or importlib.import_module("transformers")
    klass = getattr(transformers, class_name, None)
    if klass is None or not dataclasses.is_dataclass(klass):
        return None
    fields = {
        field.name: None if field.default is dataclasses.MISSING else field.default
        for field in dataclasses.fields(klass)
    }
    return {key: fields.get(key) for key in _ARGUMENTS}


def _plain(found: dict[str, Any]) -> dict[str, Any]:
    """Enum values (``OptimizerNames.ADAMW_TORCH``) as their strings."""
    return {key: value.value if isinstance(value, Enum) else value for key, value in found.items()}


def _row_lengths(data: object) -> list[int] | None:
    """The token count of every training row, sorted; None when the data is not a list of rows or a
    ``datasets.Dataset`` with ``input_ids`` (or is too big to measure)."""
    if isinstance(data, (list, tuple)):
        if not data or len(data) > _MAX_ROWS:
            return None
        lengths = [_length(row) for row in data]
        known = [n for n in lengths if n is not None]
        return sorted(known) if len(known) == len(lengths) else None
    return _dataset_lengths(data)


def _length(row: object) -> int | None:
    if not isinstance(row, Mapping) or "input_ids" not in row:
        return None
    ids = row["input_ids"]
    shape = getattr(ids, "shape", None)
    if shape is not None:
        return int(shape[-1]) if len(shape) == 1 and int(shape[-1]) > 0 else None
    return len(ids) if isinstance(ids, (list, tuple)) and ids else None


def _dataset_lengths(data: object) -> list[int] | None:
    """A ``datasets.Dataset``'s ``input_ids`` lengths from its Arrow table (no row is decoded); None for a
    dataset that selects or reorders rows over its table (its indices mapping)."""
    if type(data).__module__.split(".")[0] != "datasets" or getattr(data, "_indices", None) is not None:
        return None
    table = getattr(data, "data", None)
    if table is None or "input_ids" not in getattr(data, "column_names", ()) or len(data) > _MAX_ROWS:  # type: ignore[arg-type]
        return None
    import pyarrow.compute as pc

    lengths = pc.list_value_length(table.column("input_ids")).to_pylist()
    if not lengths or any(not n for n in lengths):
        return None
    return sorted(int(n) for n in lengths)


def _pads_only(collator: object) -> bool:
    """One of transformers' own collators (they pad to the longest row, or stack, and never truncate): an
    object of theirs, or ``default_data_collator``; None is the Trainer's default, one of them."""
    if collator is None:
        return True
    named = collator if isinstance(collator, types.FunctionType) else type(collator)
    module = getattr(named, "__module__", "") or ""
    return module.startswith("transformers.data.data_collator") and named.__name__ in _PADDING_COLLATORS


def _step(
    model: Any, name: str, arguments: dict[str, Any], rows: Sequence[int], gpu_here: bool
) -> TrainingStep | None:
    batch = arguments["per_device_train_batch_size"]
    accumulation = arguments["gradient_accumulation_steps"]
    if not all(isinstance(n, int) and n >= 1 for n in (batch, accumulation)):
        return None
    if any(arguments.get(key) for key in _UNJUDGED_SETTINGS) or not _causal_lm(model):
        return None
    params = list(model.parameters())
    if not params or not any(p.requires_grad for p in params):
        return None
    lora = hasattr(model, "peft_config")
    quantization = _quantization(model)
    if quantization is not None and not lora:
        return None  # transformers refuses to train a purely quantized model
    devices = {p.device for p in params}
    kinds = {device.type for device in devices}
    if kinds == {"cuda"} and len(devices) == 1:
        on_gpu = True
    elif kinds == {"cpu"} and (not gpu_here or (quantization is None and not _placed(model))):
        on_gpu = False  # the Trainer moves it to the GPU (or, without one, the cap planned for holds it)
    else:
        return None  # spread over devices, or trained where it is (a quantized model on the CPU)
    first = min(batch, len(rows))
    micro_batches = len(rows) // batch if arguments["dataloader_drop_last"] else math.ceil(len(rows) / batch)
    if micro_batches < 1:
        return None
    max_steps = arguments["max_steps"] or 0
    if max_steps > 0:
        optimizer_steps = max_steps
    else:
        optimizer_steps = int(float(arguments["num_train_epochs"]) * max(micro_batches // accumulation, 1))
    return TrainingStep(
        model=model,
        model_name=name,
        lora=lora,
        quantization=quantization,
        batch_size=first,
        sequence=rows[first - 1],
        accumulation=accumulation,
        micro_batches=micro_batches,
        checkpointing=bool(arguments["gradient_checkpointing"] or _checkpointed(model)),
        optimizer=str(arguments["optim"]),
        optimizer_steps=optimizer_steps,
        mixed_precision=bool(arguments["bf16"] or arguments["fp16"]),
        on_gpu=on_gpu,
        rows=tuple(rows),
    )


def _causal_lm(model: Any) -> bool:
    """A causal language model (its logits span the vocabulary at every position, as the estimate prices
    them), under its LoRA wrapper if any."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return type(base).__name__.endswith("ForCausalLM")


def _checkpointed(model: Any) -> bool:
    """Gradient checkpointing already on (``is_activation_checkpointing`` since transformers 5, where the
    older name warns)."""
    found = getattr(model, "is_activation_checkpointing", None)
    if found is None:
        found = getattr(model, "is_gradient_checkpointing", False)
    return bool(found)


def _quantization(model: Any) -> str | None:
    if getattr(model, "is_loaded_in_4bit", False):
        return "4bit"
    if getattr(model, "is_loaded_in_8bit", False):
        return "8bit"
    return None


def _placed(model: Any) -> bool:
    """Placed by ``device_map`` (the Trainer leaves such a model where it is)."""
    return bool(getattr(model, "hf_device_map", None))


def _parts(step: TrainingStep) -> tuple[tuple[str, int], ...]:
    from vram_magic.estimator import estimate
    from vram_magic.estimator._options import OPTIMIZERS

    model = step.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    parts: list[tuple[str, int]] = []
    if not step.on_gpu:
        parts.append(("weights", _weights_bytes(model)))
    if step.optimizer_steps >= 2 and step.optimizer in OPTIMIZERS and "paged" not in step.optimizer:
        states, width = OPTIMIZERS[step.optimizer]
        parts.append(("optimizer", sum(p.numel() * states * (width or p.element_size()) for p in trainable)))
    parts.append(("gradients", sum(p.numel() * p.element_size() for p in trainable)))
    found = estimate(
        model.config,
        dtype=_activation_dtype(model, step.mixed_precision),
        quantization=step.quantization,
        training="lora" if step.lora else "full",
        batch_size=step.batch_size,
        context=step.sequence,
        gradient_checkpointing=step.checkpointing,
        prepare_kbit=False,
    )
    estimated = dict(found.parts)
    parts += [(key, estimated[key]) for key in ("activations", "logits")]
    return tuple(parts)


def _activation_dtype(model: Any, mixed_precision: bool) -> str:
    """The dtype activations are kept in: 16 bits under mixed precision, else the model's."""
    dtype = str(getattr(model, "dtype", "float32")).removeprefix("torch.")
    if mixed_precision and dtype == "float32":
        return "bfloat16"
    return dtype if dtype in ("bfloat16", "float16", "float32") else "float32"


def _weights_bytes(model: Any) -> int:
    footprint = getattr(model, "get_memory_footprint", None)
    if callable(footprint):
        return int(footprint())
    return sum(p.numel() * p.element_size() for p in model.parameters())
