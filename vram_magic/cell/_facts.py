"""What a reading of a cell finds: small records, each pointing at the libcst node it was read from.

Every record carries where it is: ``lines`` (1-based, the first and last line of the node), ``step`` (the
top-level statement it belongs to, ``with`` blocks opened; 0 is the first) and ``surely`` (it runs whenever
the cell runs: not in a function, branch, loop, ``try``, lambda, comprehension, conditional expression or a
later operand of ``and``/``or``). Records compare by identity: two loads with the same text are two loads.

Places are words: ``"cuda"`` (one GPU), ``"auto"`` (accelerate spreads it), ``"cpu"``; ``"unknown"`` when the
text does not say (a variable of an earlier cell that the namespace does not hold); None when not given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import libcst as cst

LoadKind = Literal["model", "peft", "adapter", "pipeline", "foreign"]
Role = Literal["train", "eval", "inference", "unknown"]
GradState = Literal["on", "off"]


@dataclass(frozen=True, eq=False)
class Site:
    lines: tuple[int, int]
    step: int
    surely: bool


@dataclass(frozen=True, eq=False)
class Load(Site):
    """One model load: ``X.from_pretrained(...)`` of a model class, a ``pipeline(...)`` that loads its model,
    an adapter load (``PeftModel.from_pretrained(base, path)``) or a load by another library ("foreign").

    ``dtype`` is the dtype asked for (``"bfloat16"``, ``"float16"``, ``"float32"``, ``"auto"``,
    ``"unknown"``) by keyword, else by a cast chained on the load (``.half()``); None when neither.
    ``quantization`` is ``"4bit"``/``"8bit"`` (bitsandbytes), ``"other"`` (another method), ``"unknown"`` or
    None. ``moved`` is where a move chained on the load, or a later move of the name it is bound to, sends it.
    """

    call: cst.Call = field(repr=False)
    kind: LoadKind = "model"
    model: str | None = None
    model_is_object: bool = False  # pipeline(model=<a loaded model>), PeftModel.from_pretrained(base, ...)
    base: cst.BaseExpression | None = field(default=None, repr=False)  # an adapter load's base model
    dtype: str | None = None
    dtype_by_cast: bool = False
    quantization: str | None = None
    legacy_flag: bool = False  # load_in_4bit= / load_in_8bit= keywords given (transformers 5 rejects them)
    offload_allowed: bool = False  # llm_int8_enable_fp32_cpu_offload
    device_map: str | None = None
    moved: str | None = None
    under_gpu_device: bool = False  # inside ``with torch.device("cuda")``
    bound_to: str | None = None
    released_at: int | None = None  # the top-level statement that binds or deletes ``bound_to`` again
    spread_known: bool = True  # every ``**kwargs`` of the call has keys the reading knows
    sized_by_run: bool = False  # config=, config fields, positional extras: only running it tells its size
    chain: tuple[cst.Call, ...] = field(default=(), repr=False)  # casts and moves chained on it, inner first

    @property
    def quantized(self) -> bool:
        return self.quantization in ("4bit", "8bit")

    @property
    def where(self) -> str:
        """``"gpu"``, ``"auto"``, ``"cpu"`` (asked for on purpose), ``"ram"`` (transformers' default: CPU
        RAM), or ``"unknown"``."""
        if self.moved == "cuda" or self.under_gpu_device:
            return "gpu"
        if self.moved == "cpu" or self.device_map == "cpu":
            return "cpu"
        if self.device_map in ("cuda", "auto"):
            return "gpu" if self.device_map == "cuda" else "auto"
        if self.device_map == "unknown" or self.moved == "unknown":
            return "unknown"
        if self.device_map is None and not self.spread_known:
            return "unknown"  # its **kwargs may name a device_map
        if self.kind == "pipeline" or self.quantized:
            return "gpu"  # a pipeline takes GPU 0 when there is one; bitsandbytes loads go to the GPU
        return "ram"

    @property
    def on_purpose_on_cpu(self) -> bool:
        return self.where == "cpu"

    def alive_at(self, step: int) -> bool:
        """Whether what this load made is still held when top-level statement ``step`` runs."""
        return self.released_at is None or self.released_at >= step


@dataclass(frozen=True, eq=False)
class Move(Site):
    """``x.to(...)``, ``x.cuda()``, ``x.cpu()`` and the casts ``x.half()``, ``x.to(torch.float16)``."""

    call: cst.Call = field(repr=False)
    receiver: cst.BaseExpression = field(repr=False)
    receiver_name: str | None = None  # ``model`` / ``trainer.model`` when the receiver is a plain reference
    target: str | None = None  # a place word; None for a pure cast
    cast: str | None = None  # the dtype of a cast (``.half()`` -> "float16")
    of_model: bool = False  # the receiver is a model (a load of this cell, or a model the notebook holds)
    load: Load | None = None  # the load of this cell whose model it moves, when it is one


@dataclass(frozen=True, eq=False)
class BatchSize(Site):
    """A batch size the cell sets: a keyword (``per_device_train_batch_size=8``), a dict entry, or a
    top-level ``batch_size = 8``. ``values`` are its integer values (two for ``8 if big else 4``), empty when
    only running the cell tells; ``from_namespace`` when it names a variable of an earlier cell."""

    node: cst.CSTNode = field(repr=False)  # the Arg, DictElement or Assign
    name: str = ""
    role: Role = "train"
    values: tuple[int, ...] = ()
    variable: str | None = None  # the name it is given through: ``batch_size=bs``
    from_namespace: bool = False


@dataclass(frozen=True, eq=False)
class Accumulation(Site):
    """Gradient accumulation the cell sets or uses: a keyword, a dict entry, or a variable."""

    node: cst.CSTNode = field(repr=False)
    name: str = ""
    value: int | None = None
    variable: str | None = None
    from_namespace: bool = False


@dataclass(frozen=True, eq=False)
class TrainingConfig(Site):
    """``TrainingArguments(...)``, ``SFTConfig(...)`` and the like (batch sizes are BatchSize records)."""

    call: cst.Call = field(repr=False)
    class_name: str = ""
    spread_known: bool = True


@dataclass(frozen=True, eq=False)
class TrainerRun(Site):
    """``trainer.train()``: of a trainer the cell builds (``trainer`` is that construction:
    ``Trainer(model=..., args=..., ...)``, an ``SFTTrainer``...), or of a trainer an earlier cell built
    (``trainer`` None; ``held`` is the notebook's name for it). ``class_name`` is the trainer's class."""

    call: cst.Call = field(repr=False)
    trainer: cst.Call | None = field(default=None, repr=False)
    held: str | None = None
    class_name: str = ""
    library: str | None = None  # where the class comes from ("transformers"), None when unknown
    # A collator the cell builds for that trainer (``data_collator=DataCollatorWithPadding(...)``, directly
    # or by a name bound before): the call, and its class and library as for the trainer.
    collator: cst.Call | None = field(default=None, repr=False)
    collator_class: tuple[str, str | None] | None = None


@dataclass(frozen=True, eq=False)
class Merge(Site):
    """``X.merge_and_unload()``: ``target`` is what the result is bound to (None for a bare call), ``load``
    the adapter load it is chained on (``PeftModel.from_pretrained(base, path).merge_and_unload()``)."""

    call: cst.Call = field(repr=False)
    statement: cst.SimpleStatementLine = field(repr=False)
    receiver: cst.BaseExpression = field(repr=False)
    receiver_name: str | None = None
    target: str | None = None
    load: Load | None = None
    moved_after: bool = False  # ``.to("cuda")`` chained on the merge's result
    used_after: bool = False  # the merged model is used after the merge for more than saving it
    saved_after: bool = False  # the merged model is saved after the merge (save_pretrained, push_to_hub)


@dataclass(frozen=True, eq=False)
class Generate(Site):
    """``X.generate(...)``: ``batched`` when its inputs hold several sequences as far as the text and the
    namespace tell (True, False, or None: unknown)."""

    call: cst.Call = field(repr=False)
    statement: cst.CSTNode = field(repr=False)
    receiver_name: str | None = None
    batched: bool | None = None
    max_new_tokens: int | None = None
    cache_implementation: str | None = None
    of_model: bool | None = None  # a transformers model (False: something else, such as a vLLM engine)
    on_cpu: bool = False  # the model is a load of this cell that stays in CPU RAM


@dataclass(frozen=True, eq=False)
class Forward(Site):
    """A model called on inputs (``model(**inputs)``), and whether gradients are on there."""

    call: cst.Call = field(repr=False)
    statement: cst.CSTNode = field(repr=False)
    receiver_name: str | None = None
    grad: GradState = "on"
    batched: bool | None = None
    in_training: bool = False  # a loss is computed from it or the cell trains around it


@dataclass(frozen=True, eq=False)
class PipelineCall(Site):
    """A pipeline object called on inputs: ``pipe(prompts, batch_size=8)``."""

    call: cst.Call = field(repr=False)
    receiver_name: str | None = None
