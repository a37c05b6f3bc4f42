"""The second pass: what each call of the cell is (a load, a move, a merge, a generation...).

``read_cell`` parses once with libcst, walks once (``_walk``), then decides here, in source order, what every
call is, using the cell's own bindings and the notebook's namespace (``_values.Names``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import libcst as cst
from libcst.metadata import MetadataWrapper

from vram_magic.cell._facts import (
    Accumulation,
    BatchSize,
    Forward,
    Generate,
    Load,
    LoadKind,
    Merge,
    Move,
    PipelineCall,
    Role,
    TrainingConfig,
)
from vram_magic.cell._values import (
    Held,
    Names,
    Value,
    bound_names,
    cast_of,
    dotted,
    keyword_values,
    target_names,
)
from vram_magic.cell._walk import CallSite, Step, Walk, Walker

_NOT_MODELS = ("Tokenizer", "Processor", "Config", "FeatureExtractor", "Scheduler")
_OWN_LIBRARIES = ("transformers", "peft", "trl")
# Loaders of other libraries whose from_pretrained takes no BitsAndBytesConfig: AutoGPTQ, AutoAWQ, unsloth...
_FOREIGN = re.compile(r"GPTQ|AWQ|Awq|Exllama|^Fast[A-Z]|Sentence|UNet|Unet|Diffusion|VLLM")
# A model class by its name; also a variable holding one (``model_class``, ``model_cls``).
_MODEL_CLASS = re.compile(r"^Auto\w*Model|Model$|For[A-Z]|(?i:^model_?(?:class|cls)$)")
# A name the notebook does not hold, read as a model by its name: moved (``base_model.to(...)``), or called on
# inputs (``model(**inputs)``; not ``get_peft_model(model)``, a function).
_MODEL_NAME = re.compile(r"(?:^|_)model$", re.IGNORECASE)
_CALLED_MODEL = re.compile(
    r"^(?:base_|peft_|merged_|lora_|ref_|reward_|policy_|draft_)?model$", re.IGNORECASE
)
_CHAIN_METHODS = frozenset(
    {"to", "cuda", "cpu", "half", "float", "bfloat16", "eval", "train", "requires_grad_"}
)
_WRAPPERS = frozenset(
    {"get_peft_model", "prepare_model_for_kbit_training", "prepare_model_for_int8_training"}
)
_ADAPTER_WORDS = frozenset(
    {"get_peft_model", "prepare_model_for_kbit_training", "LoraConfig", "add_adapter", "load_adapter"}
)
_TRAINER_CONFIGS = frozenset(
    {
        "SFTConfig",
        "DPOConfig",
        "ORPOConfig",
        "KTOConfig",
        "CPOConfig",
        "GRPOConfig",
        "RewardConfig",
        "PPOConfig",
    }
)
ACCUMULATION_NAMES = frozenset(
    {
        "gradient_accumulation_steps",
        "grad_accum",
        "grad_accum_steps",
        "grad_accumulation_steps",
        "accumulation_steps",
        "accum_steps",
        "accum_iter",
    }
)
# from_pretrained keywords that change neither the model's size nor where it goes (beyond those read here).
_HARMLESS_KEYWORDS = frozenset(
    {
        "pretrained_model_name_or_path",
        "revision",
        "cache_dir",
        "token",
        "use_auth_token",
        "trust_remote_code",
        "code_revision",
        "local_files_only",
        "force_download",
        "proxies",
        "subfolder",
        "variant",
        "use_safetensors",
        "weights_only",
        "low_cpu_mem_usage",
        "attn_implementation",
        "max_memory",
        "offload_folder",
        "offload_state_dict",
        "offload_buffers",
        "output_loading_info",
        "ignore_mismatched_sizes",
        "num_labels",
        "id2label",
        "label2id",
        "problem_type",
        "use_cache",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "pad_token_id",
        "is_trainable",
        "adapter_name",
    }
)
_READ_KEYWORDS = frozenset(
    {"dtype", "torch_dtype", "device_map", "quantization_config", "load_in_4bit", "load_in_8bit"}
)
_NOT_GPU_BATCHES = frozenset({"map", "filter", "batch", "iter", "to_tf_dataset", "range"})


def is_batch_name(name: str) -> bool:
    lowered = name.lower()
    return lowered in ("batch_size", "bsz") or lowered.endswith("_batch_size")


@dataclass(frozen=True, eq=False)
class Cell:
    """One reading of a cell: its text, its syntax tree, and what it does (see ``_facts``)."""

    source: str
    module: cst.Module
    names: Names
    steps: tuple[Step, ...]
    loads: tuple[Load, ...]
    moves: tuple[Move, ...]
    batch_sizes: tuple[BatchSize, ...]
    accumulations: tuple[Accumulation, ...]
    training_configs: tuple[TrainingConfig, ...]
    merges: tuple[Merge, ...]
    generates: tuple[Generate, ...]
    forwards: tuple[Forward, ...]
    pipeline_calls: tuple[PipelineCall, ...]
    trains: bool  # trainer.train(), loss.backward()
    uses_adapters: bool  # LoRA: peft in the cell, or the model it trains is a PeftModel
    training_lines: tuple[tuple[int, int], ...]
    chunked_lines: tuple[tuple[int, int], ...]  # vram_magic.chunked(...)(...): generation or inference
    assigned_names: tuple[str, ...]
    used_names: tuple[str, ...]
    statements: tuple[tuple[cst.CSTNode, tuple[int, int]], ...]

    def loads_to_gpu(self) -> tuple[Load, ...]:
        """Loads that put weights on a GPU (or may: an unknown place), not those meant for the CPU."""
        return tuple(load for load in self.loads if load.kind != "foreign" and load.where != "cpu")


def read_cell(source: str, namespace: Mapping[str, object] | None = None) -> Cell:
    """Read ``source`` (Python: IPython's transforms already applied). Raises ``libcst.ParserSyntaxError``."""
    module = cst.parse_module(source)
    wrapper = MetadataWrapper(module, unsafe_skip_copy=True)
    walker = Walker()
    wrapper.visit(walker)
    return _Reader(source, module, Names(module, namespace), walker.walk).cell()


class _Reader:
    def __init__(self, source: str, module: cst.Module, names: Names, walk: Walk) -> None:
        self.source, self.module, self.names, self.walk = source, module, names, walk
        self.step_binds = [_binds(step.node) for step in walk.steps]
        self.assignments = _assignments(walk)

    # --- the whole cell ---------------------------------------------------------------------------

    def cell(self) -> Cell:
        loads = [load for site in self.walk.calls if (load := self._load(site)) is not None]
        self.loads_by_call = {id(load.call): load for load in loads}
        moves = [move for site in self.walk.calls if (move := self._move(site)) is not None]
        loads = self._given_to_pipelines([self._placed(load, moves) for load in loads])
        self.loads_by_call = {id(load.call): load for load in loads}
        moves = [replace(move, load=self._source_load(move.receiver, move.lines[0])) for move in moves]
        trains, training_lines = self._training()
        chunked = tuple(
            site.lines
            for site in self.walk.calls
            if isinstance(site.call.func, cst.Call) and dotted(site.call.func.func) == "vram_magic.chunked"
        )
        uses_adapters = self._uses_adapters()
        configs = [config for site in self.walk.calls if (config := self._training_config(site))]
        merges = [merge for site in self.walk.calls if (merge := self._merge(site)) is not None]
        generates = [g for site in self.walk.calls if (g := self._generate(site)) is not None]
        forwards = [f for site in self.walk.calls if (f := self._forward(site, trains)) is not None]
        pipeline_calls = [p for site in self.walk.calls if (p := self._pipeline_call(site)) is not None]
        batches = self._batch_sizes(trains, {id(c.call) for c in configs})
        return Cell(
            source=self.source,
            module=self.module,
            names=self.names,
            steps=tuple(self.walk.steps),
            loads=tuple(loads),
            moves=tuple(moves),
            batch_sizes=tuple(batches),
            accumulations=tuple(self._accumulations()),
            training_configs=tuple(configs),
            merges=tuple(merges),
            generates=tuple(generates),
            forwards=tuple(forwards),
            pipeline_calls=tuple(pipeline_calls),
            trains=trains,
            uses_adapters=uses_adapters,
            training_lines=training_lines,
            chunked_lines=chunked,
            assigned_names=self._assigned_names(),
            used_names=tuple(dict.fromkeys(use.name for use in self.walk.uses)),
            statements=tuple(self.walk.statements),
        )

    def _assigned_names(self) -> tuple[str, ...]:
        """The names the cell binds in its own scope, in order: assignments, imports, defs, loop and with
        targets, also inside branches and loops (not inside functions, lambdas or comprehensions)."""
        names: list[str] = []
        for step in self.walk.steps:
            pending: list[cst.CSTNode] = [step.node]
            while pending:
                node = pending.pop(0)
                if isinstance(node, (cst.FunctionDef, cst.ClassDef)):
                    names.append(node.name.value)
                    continue
                if isinstance(node, (cst.Lambda, cst.ListComp, cst.SetComp, cst.DictComp, cst.GeneratorExp)):
                    continue
                if isinstance(node, cst.For):
                    names.extend(sorted(target_names(node.target), key=self.source.find))
                elif isinstance(
                    node, (cst.Assign, cst.AnnAssign, cst.AugAssign, cst.WithItem, cst.Import, cst.ImportFrom)
                ):
                    names.extend(sorted(bound_names(node), key=self.source.find))
                if isinstance(node, cst.With) and step.node is node:
                    for item in node.items:
                        names.extend(sorted(bound_names(item)))
                    continue  # its body is steps of its own
                pending.extend(node.children)
        return tuple(dict.fromkeys(names))

    # --- names and qualified names ------------------------------------------------------------------

    def qualified(self, node: cst.BaseExpression) -> str | None:
        """The dotted name a class or function comes from: the cell's imports, else the notebook's object."""
        if id(node) in self.walk.qualified:
            return self.walk.qualified[id(node)]
        if id(node) in self.walk.local:
            return None
        text = dotted(node)
        if text is None:
            return None
        head, *rest = text.split(".")
        if head not in self.names.namespace:
            return None
        found: object = self.names.namespace[head]
        for part in rest:
            attributes = getattr(found, "__dict__", None)
            if not isinstance(attributes, Mapping) or part not in attributes:
                return None
            found = attributes[part]
        if isinstance(found, type(re)):
            return found.__name__
        module, qualname = getattr(found, "__module__", None), getattr(found, "__qualname__", None)
        return f"{module}.{qualname}" if isinstance(module, str) and isinstance(qualname, str) else None

    def _class_name(self, node: cst.BaseExpression) -> tuple[str, str | None]:
        """(the class's own name, the library it comes from or None when unknown)."""
        qualified = self.qualified(node)
        written = (dotted(node) or "").rsplit(".", 1)[-1]
        if qualified is None or qualified.startswith("__main__."):  # unknown, or the notebook's own wrapper
            return written, None
        return qualified.rsplit(".", 1)[-1], qualified.split(".")[0]

    def _source_load(self, expr: cst.BaseExpression, line: int, depth: int = 0) -> Load | None:
        """The load of this cell whose model ``expr`` is, before ``line``: the load itself, a cast, move or
        mode chained on it, a wrapper around it (``get_peft_model(model, ...)``), or a name bound to one."""
        if depth > 8:
            return None
        if isinstance(expr, cst.Call):
            if id(expr) in self.loads_by_call:
                load = self.loads_by_call[id(expr)]
                if load.kind == "adapter" and load.base is not None:
                    return self._source_load(load.base, line, depth + 1) or load
                return load
            func = expr.func
            if isinstance(func, cst.Attribute) and func.attr.value in _CHAIN_METHODS | {"merge_and_unload"}:
                return self._source_load(func.value, line, depth + 1)
            if dotted(func) in _WRAPPERS and expr.args:
                return self._source_load(expr.args[0].value, line, depth + 1)
            return None
        if isinstance(expr, cst.Name):
            value = self._value_before(expr.value, line)
            return None if value is None else self._source_load(value, line, depth + 1)
        return None

    def _own_load(self, expr: cst.BaseExpression, line: int) -> Load | None:
        """The load of this cell ``expr`` is, or is bound to (not following an adapter to its base)."""
        if isinstance(expr, cst.Name):
            value = self._value_before(expr.value, line)
            expr = value if value is not None else expr
        return self.loads_by_call.get(id(expr)) if isinstance(expr, cst.Call) else None

    def _value_before(self, name: str, line: int) -> cst.BaseExpression | None:
        """What ``name`` was last assigned (``name = value``) by a statement that ended before ``line``."""
        found = None
        for end, target, value, start in self.assignments:
            if target == name and end < line:
                found = value
            elif start >= line:
                break
        return found

    def is_model(
        self, expr: cst.BaseExpression, line: int, *, by_name: re.Pattern[str] | None = None
    ) -> bool:
        """A loaded model: a load of this cell (through chains, wrappers and names), or a model the notebook
        holds (a torch module); a name the notebook does not hold (the cell read alone) when ``by_name``
        matches it."""
        by_name = by_name or _MODEL_NAME
        load = self._source_load(expr, line)
        if load is not None:
            return load.kind != "pipeline"
        if isinstance(expr, cst.Name) and self._value_before(expr.value, line) is None:
            value = self.names.resolve(expr.value)
            if value is None:  # a name the notebook does not hold (the cell read alone): by its name
                return by_name.search(expr.value) is not None
            return isinstance(value, Held) and _is_torch_module(value.value)
        if isinstance(expr, cst.Attribute) and isinstance(expr.value, cst.Name):
            owner = self.names.resolve(expr.value.value)
            if isinstance(owner, Held):
                attributes = getattr(owner.value, "__dict__", {})
                return (
                    _is_torch_module(attributes.get(expr.attr.value))
                    if isinstance(attributes, dict)
                    else False
                )
        return False

    # --- loads ------------------------------------------------------------------------------------

    def _load_kind(self, call: cst.Call) -> LoadKind | None:
        func = call.func
        if isinstance(func, cst.Attribute) and func.attr.value == "from_pretrained":
            name, origin = self._class_name(func.value)
            if any(part in name for part in _NOT_MODELS) or not name:
                return None
            if name.startswith("PeftModel"):
                return "adapter"
            if name.startswith("AutoPeftModel"):
                return "peft"
            if origin is not None and origin not in _OWN_LIBRARIES:
                return "foreign" if _MODEL_CLASS.search(name) or _FOREIGN.search(name) else None
            if origin is None and _FOREIGN.search(name):
                return "foreign"
            return "model" if _MODEL_CLASS.search(name) else None
        qualified = self.qualified(func)
        if qualified is not None:
            return (
                "pipeline"
                if qualified.split(".")[0] == "transformers" and qualified.endswith(".pipeline")
                else None
            )
        if isinstance(func, cst.Name) and func.value == "pipeline" and id(func) not in self.walk.local:
            return "pipeline"
        return None

    def _load(self, site: CallSite) -> Load | None:
        call = site.call
        kind = self._load_kind(call)
        if kind is None:
            return None
        keywords, spread_known = keyword_values(call, self.names)
        positional = [arg.value for arg in call.args if arg.keyword is None and not arg.star]
        base: cst.BaseExpression | None = None
        if kind == "adapter":
            base = positional[0] if positional else _expr(keywords.get("model"))
            model_expr = positional[1] if len(positional) > 1 else keywords.get("model_id")
        elif kind == "pipeline":
            model_expr = keywords.get("model", positional[1] if len(positional) > 1 else None)
            if "model_kwargs" in keywords:
                inner = self.names.spread(keywords["model_kwargs"])
                if inner is None:
                    spread_known = False
                else:
                    keywords = {**inner, **keywords}
        else:
            model_expr = positional[0] if positional else keywords.get("pretrained_model_name_or_path")
        model = self.names.text(model_expr)
        model_is_object = kind == "adapter" or (model is None and _is_expression(model_expr))
        chain = self._chain(call)
        dtype = self.names.dtype(keywords.get("dtype", keywords.get("torch_dtype")))
        dtype_by_cast = False
        if "dtype" not in keywords and "torch_dtype" not in keywords:
            casts = [cast for link in chain if (cast := cast_of(link)) is not None]
            dtype, dtype_by_cast = (casts[-1], True) if casts else (None, False)
        quantization, legacy, offload = self._quantization(keywords)
        placement = keywords.get("device_map")
        if isinstance(placement, cst.Name) and placement.value == "None":
            placement = None  # device_map=None: not given
        if placement is None and kind == "pipeline":
            placement = keywords.get("device")
        device_map = None if placement is None else self.names.place(placement)
        unknown_keywords = set(keywords) - _HARMLESS_KEYWORDS - _READ_KEYWORDS
        sized_by_run = not spread_known or (
            kind != "pipeline"
            and (bool(unknown_keywords) or len(positional) > (2 if kind == "adapter" else 1))
        )
        return Load(
            lines=site.lines,
            step=site.step,
            surely=site.surely,
            call=call,
            kind=kind,
            model=model,
            model_is_object=model_is_object,
            base=base,
            dtype=dtype,
            dtype_by_cast=dtype_by_cast,
            quantization=quantization,
            legacy_flag=legacy,
            offload_allowed=offload,
            device_map="unknown" if device_map == "model" else device_map,
            moved=_moved_by(chain, self.names),
            under_gpu_device=site.gpu_device,
            bound_to=self._bound_name(site, chain[-1] if chain else call),
            spread_known=spread_known,
            sized_by_run=sized_by_run,
            chain=tuple(chain),
        )

    def _chain(self, call: cst.Call) -> list[cst.Call]:
        """Casts, moves and modes chained on ``call``, innermost first: ``load(...).half().cuda()``."""
        chain: list[cst.Call] = []
        current = call
        while id(current) in self.walk.chained_on:
            outer = self.walk.chained_on[id(current)]
            func = outer.func
            if not (isinstance(func, cst.Attribute) and func.attr.value in _CHAIN_METHODS):
                break
            chain.append(outer)
            current = outer
        return chain

    def _bound_name(self, site: CallSite, outermost: cst.Call) -> str | None:
        statement = site.statement
        if not isinstance(statement, cst.SimpleStatementLine) or len(statement.body) != 1:
            return None
        small = statement.body[0]
        if isinstance(small, cst.Assign) and len(small.targets) == 1:
            target, value = small.targets[0].target, small.value
        elif isinstance(small, cst.AnnAssign) and small.value is not None:
            target, value = small.target, small.value
        else:
            return None
        return target.value if isinstance(target, cst.Name) and value is outermost else None

    def _quantization(self, keywords: Mapping[str, Value]) -> tuple[str | None, bool, bool]:
        """(``"4bit"``/``"8bit"``/``"other"``/``"unknown"``/None, given by legacy flags, offload allowed)."""
        names = self.names
        legacy = any(flag in keywords for flag in ("load_in_4bit", "load_in_8bit"))
        if "quantization_config" not in keywords:  # a config given as well wins (transformers 4 refuses both)
            for flag, bits in (("load_in_4bit", "4bit"), ("load_in_8bit", "8bit")):
                if flag in keywords:
                    value = names.boolean(keywords[flag])
                    if value is None:
                        return "unknown", True, False
                    if value:
                        offload = names.boolean(keywords.get("llm_int8_enable_fp32_cpu_offload")) is True
                        return bits, True, offload
            return None, legacy, False
        config = names.value(keywords["quantization_config"])
        if isinstance(config, Held):
            bits, offload = _held_quantization(config.value)
            return bits, legacy, offload
        settings: Mapping[str, Value] | None = None
        if isinstance(config, cst.Call):
            name, _ = self._class_name(config.func)
            if not name.endswith("BitsAndBytesConfig"):
                return ("other" if name.endswith("Config") else "unknown"), legacy, False
            settings, known = keyword_values(config, names)
            if not known:
                return "unknown", legacy, False
        elif isinstance(config, cst.Dict):
            settings = names.spread(config)
            method = names.text(settings.get("quant_method")) if settings else None
            if method not in (None, "bitsandbytes"):
                return "other", legacy, False
        if settings is None:
            return "unknown", legacy, False
        flags = [names.boolean(settings.get(flag)) or False for flag in ("load_in_4bit", "load_in_8bit")]
        offload = names.boolean(settings.get("llm_int8_enable_fp32_cpu_offload")) is True
        if flags == [True, False]:
            return "4bit", legacy, offload
        if flags == [False, True]:
            return "8bit", legacy, offload
        return "unknown", legacy, False

    def _placed(self, load: Load, moves: list[Move]) -> Load:
        """The load with a later move of its name (before the name is bound again) and when its name is let
        go."""
        if load.bound_to is None:
            return replace(load, released_at=load.step)
        name = load.bound_to
        moved = load.moved
        released = None
        for step in range(load.step + 1, len(self.walk.steps)):
            if moved is None and self.walk.steps[step].surely:
                for move in moves:
                    if move.step == step and move.surely and move.target and self._moves(move, load):
                        moved = move.target if move.target in ("cuda", "cpu") else "unknown"
            if name in self.step_binds[step]:
                released = step
                break
        return replace(load, moved=moved, released_at=released)

    def _moves(self, move: Move, load: Load) -> bool:
        """Whether ``move`` moves the model ``load`` made: by its name (through casts chained on it), or
        through a wrapper bound to another name (``model = PeftModel.from_pretrained(base, ...)``)."""
        if _root_name(move.receiver) == load.bound_to:
            return True
        return self._source_load(move.receiver, move.lines[0]) is load

    def _given_to_pipelines(self, loads: list[Load]) -> list[Load]:
        """A load handed to ``pipeline(model=...)`` goes where the pipeline puts it (GPU 0 by default)."""
        placed = list(loads)
        for pipe in loads:
            if pipe.kind != "pipeline" or not pipe.model_is_object or pipe.where != "gpu":
                continue
            keywords, _ = keyword_values(pipe.call, self.names)
            given = keywords.get("model")
            source = (
                self._source_load(given, pipe.lines[0]) if isinstance(given, cst.BaseExpression) else None
            )
            for index, load in enumerate(placed):
                if (
                    source is not None
                    and self.loads_by_call.get(id(load.call)) is source
                    and load.moved is None
                ):
                    placed[index] = replace(load, moved="cuda")
        return placed

    # --- moves ------------------------------------------------------------------------------------

    def _move(self, site: CallSite) -> Move | None:
        call = site.call
        func = call.func
        if not isinstance(func, cst.Attribute) or func.attr.value not in (
            "to",
            "cuda",
            "cpu",
            *_CAST_METHODS,
        ):
            return None
        method = func.attr.value
        cast = cast_of(call)
        target: str | None
        if method == "cuda":
            target = "cuda"
        elif method == "cpu":
            target = "cpu"
        elif method == "to":
            device = _device_argument(call)
            target = None if device is None or cast_of_expr(device) else self.names.place(device)
            if device is None and cast is None:
                return None
        else:
            if cast is None:
                return None
            target = None
        receiver = func.value
        return Move(
            lines=site.lines,
            step=site.step,
            surely=site.surely,
            call=call,
            receiver=receiver,
            receiver_name=dotted(receiver),
            target=target,
            cast=cast,
            of_model=self.is_model(receiver, site.lines[0]),
        )

    # --- training -----------------------------------------------------------------------------------

    def _training(self) -> tuple[bool, tuple[tuple[int, int], ...]]:
        """Whether the cell trains (a trainer's ``train()``, ``backward()``), and the lines that do."""
        lines = []
        for site in self.walk.calls:
            func = site.call.func
            if not isinstance(func, cst.Attribute):
                continue
            method = func.attr.value
            if method == "backward" or (method == "train" and self._is_trainer(func.value, site.lines[0])):
                lines.append(site.lines)
        return bool(lines), tuple(lines)

    def _is_trainer(self, expr: cst.BaseExpression, line: int) -> bool:
        if isinstance(expr, cst.Call):
            return self._class_name(expr.func)[0].endswith("Trainer")
        if isinstance(expr, cst.Name):
            value = self._value_before(expr.value, line)
            if value is not None:
                return isinstance(value, cst.Call) and self._class_name(value.func)[0].endswith("Trainer")
            held = self.names.resolve(expr.value)
            if isinstance(held, Held):
                return type(held.value).__name__.endswith("Trainer")
            return "trainer" in expr.value.lower()
        return "trainer" in (dotted(expr) or "").lower()

    def _uses_adapters(self) -> bool:
        for site in self.walk.calls:
            name = (dotted(site.call.func) or "").rsplit(".", 1)[-1]
            if name in _ADAPTER_WORDS or name.startswith(("PeftModel", "AutoPeftModel")):
                return True
            if any(arg.keyword is not None and arg.keyword.value == "peft_config" for arg in site.call.args):
                return True
        for use in self.walk.uses:
            held = self.names.resolve(use.name)
            if isinstance(held, Held) and _is_peft(held.value):
                return True
        return False

    def _training_config(self, site: CallSite) -> TrainingConfig | None:
        name, _ = self._class_name(site.call.func)
        if not (name.endswith("TrainingArguments") or name in _TRAINER_CONFIGS):
            return None
        _, known = keyword_values(site.call, self.names)
        return TrainingConfig(
            lines=site.lines,
            step=site.step,
            surely=site.surely,
            call=site.call,
            class_name=name,
            spread_known=known,
        )

    # --- merges, generation, inference ----------------------------------------------------------------

    def _merge(self, site: CallSite) -> Merge | None:
        call = site.call
        func = call.func
        if not isinstance(func, cst.Attribute) or func.attr.value != "merge_and_unload":
            return None
        statement = site.statement
        if not isinstance(statement, cst.SimpleStatementLine):
            return None
        chain = self._chain(call)
        outermost = chain[-1] if chain else call
        target = None
        if len(statement.body) == 1 and isinstance(statement.body[0], cst.Assign):
            assign = statement.body[0]
            if len(assign.targets) == 1 and assign.value is outermost and dotted(assign.targets[0].target):
                target = dotted(assign.targets[0].target)
        receiver = func.value
        loaded = self._own_load(receiver, site.lines[0])
        kept = target or dotted(receiver)
        later = [
            use for use in self.walk.uses if kept and use.name == kept.split(".")[0] and use.step > site.step
        ]
        saved_after = any(use.attribute in _SAVING for use in later)
        saving_chained = (
            id(outermost) in self.walk.chained_on and _method(self.walk.chained_on[id(outermost)]) in _SAVING
        )
        return Merge(
            lines=site.lines,
            step=site.step,
            surely=site.surely,
            call=call,
            statement=statement,
            receiver=receiver,
            receiver_name=dotted(receiver),
            target=target,
            load=loaded if loaded is not None and loaded.kind in ("adapter", "peft") else None,
            moved_after=_moved_by(chain, self.names) == "cuda",
            used_after=any(use.attribute not in _SAVING for use in later),
            saved_after=saved_after or saving_chained,
        )

    def _generate(self, site: CallSite) -> Generate | None:
        func = site.call.func
        if not isinstance(func, cst.Attribute) or func.attr.value != "generate":
            return None
        keywords, _ = keyword_values(site.call, self.names)
        line = site.lines[0]
        source = self._source_load(func.value, line)
        return Generate(
            lines=site.lines,
            step=site.step,
            surely=site.surely,
            call=site.call,
            statement=site.statement,
            receiver_name=dotted(func.value),
            batched=self._batched(site.call, line),
            max_new_tokens=self.names.integer(keywords.get("max_new_tokens")),
            cache_implementation=self.names.text(keywords.get("cache_implementation")),
            of_model=self._of_model(func.value, line),
            on_cpu=source is not None and source.where in ("cpu", "ram"),
        )

    def _of_model(self, expr: cst.BaseExpression, line: int) -> bool | None:
        """Whether ``expr`` is a transformers model: True, False (something else the cell or notebook has),
        or None (unknown)."""
        if self.is_model(expr, line):
            return True
        if isinstance(expr, cst.Name):
            if self._value_before(expr.value, line) is not None:
                return False  # bound in this cell to something that is not a model load
            held = self.names.resolve(expr.value)
            if isinstance(held, Held):
                return False
        return None

    def _forward(self, site: CallSite, trains: bool) -> Forward | None:
        call = site.call
        if not call.args or not self.is_model(call.func, site.lines[0], by_name=_CALLED_MODEL):
            return None
        if isinstance(call.func, cst.Call):
            return None
        return Forward(
            lines=site.lines,
            step=site.step,
            surely=site.surely,
            call=call,
            statement=site.statement,
            receiver_name=dotted(call.func),
            grad="off" if site.grad_off else "on",
            batched=self._batched(call, site.lines[0]),
            in_training=trains,
        )

    def _pipeline_call(self, site: CallSite) -> PipelineCall | None:
        func = site.call.func
        if not isinstance(func, cst.Name):
            return None
        value = self._value_before(func.value, site.lines[0])
        if value is not None:
            is_pipe = (
                isinstance(value, cst.Call)
                and self.loads_by_call.get(id(value)) is not None
                and (self.loads_by_call[id(value)].kind == "pipeline")
            )
        else:
            held = self.names.resolve(func.value)
            is_pipe = isinstance(held, Held) and _is_pipeline(held.value)
        if not is_pipe:
            return None
        return PipelineCall(
            lines=site.lines, step=site.step, surely=site.surely, call=site.call, receiver_name=func.value
        )

    def _batched(self, call: cst.Call, line: int) -> bool | None:
        """Whether a generate/forward call gets several sequences at once (None: unknown)."""
        for arg in call.args:
            if arg.keyword is not None and arg.keyword.value not in ("input_ids", "inputs", "inputs_embeds"):
                continue
            size = self._rows(arg.value, line)
            if size is not None:
                return size > 1
        return None

    def _rows(self, expr: cst.BaseExpression, line: int, depth: int = 0) -> int | None:
        """How many sequences ``expr`` holds: a tensor or tokenizer output the notebook holds, a tokenizer
        call on a list, or a list."""
        if depth > 6:
            return None
        if isinstance(expr, cst.Name):
            value = self._value_before(expr.value, line)
            if value is not None:
                return self._rows(value, line, depth + 1)
            held = self.names.resolve(expr.value)
            return _held_rows(held.value) if isinstance(held, Held) else None
        if isinstance(expr, (cst.List, cst.Tuple)):
            return len(expr.elements)
        if isinstance(expr, cst.SimpleString):
            return 1  # one text
        if isinstance(expr, cst.Subscript) and isinstance(expr.value, cst.Name):
            return self._rows(expr.value, line, depth + 1)
        if isinstance(expr, cst.Call):
            func = expr.func
            if isinstance(func, cst.Attribute) and func.attr.value in ("to", "cuda"):
                return self._rows(func.value, line, depth + 1)
            callee = (dotted(func) or "").lower()
            if callee.endswith("apply_chat_template") and expr.args:
                return self._conversations(expr.args[0].value, line)
            if ("tok" in callee or "processor" in callee) and expr.args:
                return self._rows(expr.args[0].value, line, depth + 1)
        return None

    def _conversations(self, expr: cst.BaseExpression, line: int) -> int | None:
        """How many chats ``apply_chat_template`` gets: a list of message dicts is one, of lists many."""
        if isinstance(expr, cst.Name):
            value = self._value_before(expr.value, line)
            if value is None:
                held = self.names.resolve(expr.value)
                if isinstance(held, Held) and isinstance(held.value, list):
                    items = held.value
                    return len(items) if items and all(isinstance(i, list) for i in items) else 1
                return None
            expr = value
        if isinstance(expr, (cst.List, cst.Tuple)):
            inner = [element.value for element in expr.elements]
            return len(inner) if inner and all(isinstance(i, (cst.List, cst.Tuple)) for i in inner) else 1
        return None

    # --- batch sizes and accumulation ---------------------------------------------------------------

    def _batch_sizes(self, trains: bool, config_calls: set[int]) -> list[BatchSize]:
        found: list[BatchSize] = []
        inference = {id(site.call) for site in self.walk.calls if _is_inference_call(site.call)}
        for site in self.walk.calls:
            func = site.call.func
            method = func.attr.value if isinstance(func, cst.Attribute) else dotted(func) or ""
            if method in _NOT_GPU_BATCHES or "tokeniz" in (dotted(func) or "").lower():
                continue
            for arg in site.call.args:
                if arg.keyword is None or not is_batch_name(arg.keyword.value):
                    continue
                role = _role(arg.keyword.value, id(site.call) in config_calls, trains)
                if id(site.call) in inference:
                    role = "inference"
                found.append(
                    self._batch(arg, arg.keyword.value, arg.value, role, site.lines, site.step, site.surely)
                )
        for node, step, surely, lines in self.walk.dicts:
            for element in node.elements:
                key = self.names.text(element.key) if isinstance(element, cst.DictElement) else None
                if key is not None and is_batch_name(key):
                    assert isinstance(element, cst.DictElement)
                    role = _role(key, False, trains)
                    found.append(self._batch(element, key, element.value, role, lines, step, surely))
        for index, statement in enumerate(self.walk.steps):
            line = statement.node
            if not isinstance(line, cst.SimpleStatementLine):
                continue
            for small in line.body:
                if isinstance(small, cst.Assign) and len(small.targets) == 1:
                    target = small.targets[0].target
                    if isinstance(target, cst.Name) and is_batch_name(target.value):
                        role = _role(target.value, False, trains)
                        batch = self._batch(
                            small, target.value, small.value, role, statement.lines, index, True
                        )
                        found.append(replace(batch, variable=target.value, from_namespace=False))
        roles = {
            batch.variable: batch.role
            for batch in found
            if batch.variable and batch.role in ("train", "eval")
        }
        return [
            replace(batch, role=roles[batch.variable])
            if isinstance(batch.node, cst.Assign) and batch.variable in roles
            else batch
            for batch in found
        ]

    def _batch(
        self,
        node: cst.CSTNode,
        name: str,
        value: cst.BaseExpression,
        role: Role,
        lines: tuple[int, int],
        step: int,
        surely: bool,
    ) -> BatchSize:
        variable = value.value if isinstance(value, cst.Name) else None
        return BatchSize(
            lines=lines,
            step=step,
            surely=surely,
            node=node,
            name=name,
            role=role,
            values=self.names.integers(value),
            variable=variable,
            from_namespace=variable is not None and isinstance(self.names.resolve(variable), Held),
        )

    def _accumulations(self) -> list[Accumulation]:
        found: list[Accumulation] = []
        names = self.names
        for site in self.walk.calls:
            for arg in site.call.args:
                if arg.keyword is not None and arg.keyword.value.lower() in ACCUMULATION_NAMES:
                    variable = arg.value.value if isinstance(arg.value, cst.Name) else None
                    found.append(
                        Accumulation(
                            lines=site.lines,
                            step=site.step,
                            surely=site.surely,
                            node=arg,
                            name=arg.keyword.value,
                            value=names.integer(arg.value),
                            variable=variable,
                            from_namespace=variable is not None and isinstance(names.resolve(variable), Held),
                        )
                    )
        for node, step, surely, lines in self.walk.dicts:
            for element in node.elements:
                key = names.text(element.key) if isinstance(element, cst.DictElement) else None
                if key is not None and key.lower() in ACCUMULATION_NAMES:
                    assert isinstance(element, cst.DictElement)
                    found.append(
                        Accumulation(
                            lines=lines,
                            step=step,
                            surely=surely,
                            node=element,
                            name=key,
                            value=names.integer(element.value),
                        )
                    )
        for index, statement in enumerate(self.walk.steps):
            line = statement.node
            if isinstance(line, cst.SimpleStatementLine):
                for small in line.body:
                    if isinstance(small, cst.Assign) and len(small.targets) == 1:
                        target = small.targets[0].target
                        if isinstance(target, cst.Name) and target.value.lower() in ACCUMULATION_NAMES:
                            found.append(
                                Accumulation(
                                    lines=statement.lines,
                                    step=index,
                                    surely=True,
                                    node=small,
                                    name=target.value,
                                    value=names.integer(small.value),
                                    variable=target.value,
                                )
                            )
        bound = {a.variable for a in found if a.variable}
        for use in self.walk.uses:
            if (
                use.name.lower() in ACCUMULATION_NAMES
                and use.name not in bound
                and use.name not in names.bound
            ):
                held = names.resolve(use.name)
                if isinstance(held, Held):
                    bound.add(use.name)
                    found.append(
                        Accumulation(
                            lines=(0, 0),
                            step=use.step,
                            surely=True,
                            node=self.module,
                            name=use.name,
                            value=names.integer(cst.Name(use.name)),
                            variable=use.name,
                            from_namespace=True,
                        )
                    )
        return found


_CAST_METHODS = ("half", "float", "bfloat16")
_SAVING = frozenset({"save_pretrained", "push_to_hub", "config", "generation_config", "save_model"})


def _method(call: cst.Call) -> str | None:
    return call.func.attr.value if isinstance(call.func, cst.Attribute) else None


def _role(name: str, in_config: bool, trains: bool) -> Role:
    lowered = name.lower()
    if "eval" in lowered or "test" in lowered or "valid" in lowered:
        return "eval"
    if in_config or trains or "train" in lowered:
        return "train"
    return "unknown"  # a DataLoader or a variable in a cell that does not say what it feeds


def _is_inference_call(call: cst.Call) -> bool:
    func = call.func
    name = func.attr.value if isinstance(func, cst.Attribute) else dotted(func) or ""
    return name in ("generate", "pipeline") or name.startswith("pipe")


def _device_argument(call: cst.Call) -> cst.BaseExpression | None:
    for arg in call.args:
        if arg.keyword is not None and arg.keyword.value == "device":
            return arg.value
    first = call.args[0] if call.args else None
    return first.value if first is not None and first.keyword is None and not first.star else None


def cast_of_expr(expr: cst.BaseExpression) -> bool:
    """``torch.float16`` and the like: a dtype given to ``.to()``, not a device."""
    return isinstance(expr, cst.Attribute) and dotted(expr.value) == "torch" and expr.attr.value != "device"


def _moved_by(chain: list[cst.Call], names: Names) -> str | None:
    """Where the last move of a chain sends the model."""
    moved = None
    for link in chain:
        func = link.func
        assert isinstance(func, cst.Attribute)
        if func.attr.value == "cuda":
            moved = "cuda"
        elif func.attr.value == "cpu":
            moved = "cpu"
        elif func.attr.value == "to":
            device = _device_argument(link)
            if device is not None and not cast_of_expr(device):
                place = names.place(device)
                moved = place if place in ("cuda", "cpu") else "unknown"
    return moved


def _root_name(expr: cst.BaseExpression) -> str | None:
    """The name under casts and modes chained on it: ``m.to(torch.float16).eval()`` -> ``m``."""
    while isinstance(expr, cst.Call) and isinstance(expr.func, cst.Attribute):
        if expr.func.attr.value not in _CHAIN_METHODS:
            break
        expr = expr.func.value
    return dotted(expr)


def _binds(node: cst.CSTNode) -> set[str]:
    """The names a step binds or deletes; a ``with`` step binds only its ``as`` names (its body is steps)."""
    if isinstance(node, cst.With):
        return set().union(*(bound_names(item) for item in node.items))
    return bound_names(node)


def _assignments(walk: Walk) -> list[tuple[int, str, cst.BaseExpression, int]]:
    """(last line, name, value, first line) of every single-name assignment, in order."""
    found = []
    for node, (start, end) in walk.statements:
        assert isinstance(node, cst.SimpleStatementLine)
        for small in node.body:
            if isinstance(small, cst.Assign) and len(small.targets) == 1:
                target = small.targets[0].target
                if isinstance(target, cst.Name):
                    found.append((end, target.value, small.value, start))
    return found


def _expr(value: Value) -> cst.BaseExpression | None:
    return value if isinstance(value, cst.BaseExpression) else None


def _is_expression(value: Value) -> bool:
    return isinstance(value, (cst.Name, cst.Attribute, cst.Call, Held))


def _class_names(value: object) -> list[str]:
    return [klass.__name__ for klass in type(value).__mro__]


def _is_torch_module(value: object) -> bool:
    return "Module" in _class_names(value) and hasattr(value, "named_parameters")


def _is_peft(value: object) -> bool:
    if any(name.startswith("PeftModel") for name in _class_names(value)):
        return True
    inner = getattr(value, "__dict__", {}).get("model") if hasattr(value, "__dict__") else None
    return inner is not None and any(name.startswith("PeftModel") for name in _class_names(inner))


def _is_pipeline(value: object) -> bool:
    return "Pipeline" in _class_names(value) and type(value).__module__.startswith("transformers")


def _held_quantization(value: object) -> tuple[str, bool]:
    """(bits or "other"/"unknown", offload allowed) of a quantization config object the notebook holds."""
    if isinstance(value, Mapping):
        four, eight = value.get("load_in_4bit"), value.get("load_in_8bit")
        method = value.get("quant_method", "bitsandbytes")
        offload = value.get("llm_int8_enable_fp32_cpu_offload") is True
    else:
        four, eight = getattr(value, "load_in_4bit", None), getattr(value, "load_in_8bit", None)
        method = getattr(value, "quant_method", "bitsandbytes")
        offload = getattr(value, "llm_int8_enable_fp32_cpu_offload", False) is True
    method = str(getattr(method, "value", method))
    if method != "bitsandbytes":
        return "other", False
    if four is True and eight is not True:
        return "4bit", offload
    if eight is True and four is not True:
        return "8bit", offload
    return "unknown", False


def _held_rows(value: object) -> int | None:
    """The batch size of inputs the notebook holds: a tensor, a tokenizer's output, a list of texts."""
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, str):
        return 1
    if isinstance(value, Mapping) or hasattr(value, "keys"):
        try:
            tensor = value["input_ids"]  # type: ignore[index]
        except Exception:
            return None
        return _held_rows(tensor)
    shape = getattr(value, "shape", None)
    if shape is not None and len(shape) >= 1:
        return int(shape[0]) if len(shape) > 1 else 1
    return None
