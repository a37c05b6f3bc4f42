"""Reading loads and moves: what a ``from_pretrained``/``pipeline`` call loads, how, and where it goes."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace

import libcst as cst

from vram_magic.cell._base import _CHAIN_METHODS, ReaderBase, _device_argument, bindings, cast_of_expr
from vram_magic.cell._facts import (
    Load,
    LoadKind,
    Move,
)
from vram_magic.cell._values import (
    Held,
    Names,
    Value,
    cast_of,
    dotted,
    keyword_values,
)
from vram_magic.cell._walk import CallSite

_NOT_MODELS = ("Tokenizer", "Processor", "Config", "FeatureExtractor", "Scheduler")

_OWN_LIBRARIES = ("transformers", "peft", "trl")

# Loaders of other libraries whose from_pretrained takes no BitsAndBytesConfig: AutoGPTQ, AutoAWQ, unsloth...
_FOREIGN = re.compile(r"GPTQ|AWQ|Awq|Exllama|^Fast[A-Z]|Sentence|UNet|Unet|Diffusion|VLLM")

# A model class by its name; also a variable holding one (``model_class``, ``model_cls``).
_MODEL_CLASS = re.compile(r"^Auto\w*Model|Model$|For[A-Z]|(?i:^model_?(?:class|cls)$)")

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

_CAST_METHODS = ("half", "float", "bfloat16")


class LoadReading(ReaderBase):
    """Loads (``from_pretrained`` of a model class, ``pipeline``, adapters) and moves and casts."""

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
        written_dtype = keywords.get("dtype", keywords.get("torch_dtype"))
        dtype = None if written_dtype is None else self.names.dtype(written_dtype)
        dtype_by_cast = False
        casts = _casts_before_the_gpu(chain, self.names)  # the dtype the GPU receives
        if casts:
            dtype, dtype_by_cast = casts[-1], True
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

    def _bound_name(self, site: CallSite, outermost: cst.Call) -> str | None:
        statement = site.statement
        if not isinstance(statement, cst.SimpleStatementLine) or len(statement.body) != 1:
            return None
        return next((name for name, value in bindings(statement.body[0]) if value is outermost), None)

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
            if name in self.step_binds[step] and not self._still_the_model(name, step, load):
                released = step
                break
        return replace(load, moved=moved, released_at=released)

    def _still_the_model(self, name: str, step: int, load: Load) -> bool:
        """Whether step ``step`` binds ``name`` again to the same model (``model = model.half()``,
        ``model = get_peft_model(model, config)``)."""
        start, end = self.walk.steps[step].lines
        values = [
            value
            for last, target, value, first in self.assignments
            if target == name and start <= first <= end
        ]
        return len(values) == 1 and self._source_load(values[0], start) is load

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
            positional = [arg.value for arg in pipe.call.args if arg.keyword is None and not arg.star]
            given = keywords.get("model", positional[1] if len(positional) > 1 else None)
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


def _casts_before_the_gpu(chain: list[cst.Call], names: Names) -> list[str]:
    """The casts chained on a load before it goes to the GPU (``.half().cuda()``; all of them when the chain
    does not move it): the dtype it arrives there in. A cast after the move (``.cuda().half()``) comes after
    the GPU held the model in its loaded dtype."""
    casts = []
    for link in chain:
        if _moved_by([link], names) == "cuda":
            break
        cast = cast_of(link)
        if cast is not None:
            casts.append(cast)
    return casts


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


def _expr(value: Value) -> cst.BaseExpression | None:
    return value if isinstance(value, cst.BaseExpression) else None


def _is_expression(value: Value) -> bool:
    return isinstance(value, (cst.Name, cst.Attribute, cst.Call, Held))
