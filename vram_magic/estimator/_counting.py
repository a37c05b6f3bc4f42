"""Build a model on the meta device and count it: parameters, buffers, the Linear weights bitsandbytes
converts, the LoRA targets, the largest block accelerate never splits, and accelerate's offload split.

The only module of the estimator that reaches into transformers' and accelerate's internals (private
attributes, version checks); everything else reads the ``Census`` and ``Described`` it returns. Builds are
cached in memory; censuses and descriptions also on disk (``_disk``), so a model counted once is estimated in
a new kernel without importing its transformers code.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import logging
import re
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from vram_magic.estimator import _disk

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from vram_magic.estimator._configs import Located

# The internals below (``_from_config``, ``_model_mapping``, ``_no_split_modules``, ``all_tied_weights_keys``,
# ``_keep_in_fp32_modules(_strict)``, ``get_keys_to_not_convert``, ``infer_auto_device_map``) were checked
# against these versions. transformers 4.x (from 4.45, the floor in pyproject.toml) is handled where it
# differs: ``torch_dtype=``, ``get_keys_to_not_convert`` in the bitsandbytes integration, accelerate's own
# ``infer_auto_device_map``, and float32 loads when no dtype is given.
CHECKED_WITH = {"transformers": "5.25.0", "accelerate": "1.16.0"}

LORA_R = 16  # LoRA's rank when none is given (peft's default is 8; QLoRA notebooks use 16 and more)
_GATED_MLP = frozenset({"gate_proj", "gate_up_proj", "wi_0", "w3"})
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_CACHE_SIZE = 8


@dataclass(frozen=True)
class Census:
    """Counts from one meta-device build at one dtype; everything else is arithmetic on them."""

    model_class: str
    params: int
    param_bytes: int  # tied weights once; modules transformers keeps in float32 at 4 bytes
    buffer_bytes: int
    quantized: tuple[tuple[int, int], ...]  # (elements, rows) of each Linear weight bitsandbytes converts
    quantized_bytes: int  # those weights at the build dtype
    # Each Linear leaf name LoRA can target, the output layer left out (as peft's "all-linear" does):
    # (leaf, inside attention, the sum of their rows + columns: LoRA adds r times that).
    linear_leaves: tuple[tuple[str, bool, int], ...]
    largest_layer_bytes: int  # the biggest block accelerate never splits (a decoder layer)
    can_generate: bool
    has_lm_head: bool
    gated_mlp: bool


# The text model's sizes pricing reads (the KV cache, activations).
_TEXT_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "n_inner",
    "num_hidden_layers",
    "vocab_size",
    "layer_types",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "sliding_window",
    "model_type",  # transformers 4's Gemma 2 config names no layer_types
)
_QUANTIZATION_FIELDS = ("quant_method", "load_in_4bit", "load_in_8bit", "bits", "w_bit")


@dataclass(frozen=True)
class Described:
    """What pricing reads of a config besides the census: the dtype it names, how its checkpoint was saved
    quantized, and its text model's sizes. Plain data (kept on disk); reads like a config where pricing
    reads one (``dtype``, ``quantization_config``, ``get_text_config()``)."""

    dtype: str | None
    quantization_config: dict[str, Any] | None
    text: dict[str, Any]

    def get_text_config(self) -> SimpleNamespace:
        return SimpleNamespace(**self.text)


def describe(config: PretrainedConfig) -> Described:
    text = config.get_text_config()
    found = getattr(config, "dtype", None) or getattr(text, "dtype", None)
    dtype = str(found).removeprefix("torch.") if found is not None else None
    saved = getattr(config, "quantization_config", None)
    quantization = None
    if saved is not None:
        values = saved if isinstance(saved, dict) else getattr(saved, "__dict__", {})
        quantization = {
            key: getattr(values[key], "value", values[key]) for key in _QUANTIZATION_FIELDS if key in values
        }
    sizes = {key: getattr(text, key, None) for key in _TEXT_FIELDS}
    if sizes["layer_types"] is not None:
        sizes["layer_types"] = [str(kind) for kind in sizes["layer_types"]]
    return Described(dtype, quantization, sizes)


def described(located: Located) -> PretrainedConfig | Described:
    """What pricing reads of ``located``'s config: the config itself once it is built in this process (a
    fresh count), else its description from the cache (memory, then disk), which is built and saved when
    missing. A cached estimate equals a fresh one (tested)."""
    key, entry = _entry(located)
    if "described" not in entry:
        located.counting()
        entry["described"] = asdict(describe(located.config()))
        _disk.write(key, entry)
    if located.built:
        return located.config()
    return Described(**entry["described"])


def counted(located: Located, dtype_name: str) -> Census:
    """The census of ``located`` at ``dtype_name``: from the cache (memory, then disk), else counted from a
    meta-device build."""
    key, entry = _entry(located)
    saved = entry.setdefault("census", {}).get(dtype_name)
    if saved is not None:
        tuples = {key: tuple(tuple(item) for item in saved[key]) for key in ("quantized", "linear_leaves")}
        return Census(**{**saved, **tuples})
    located.counting()
    found, _ = built(located.config(), dtype_name)
    entry["census"][dtype_name] = asdict(found)
    _disk.write(key, entry)
    return found


_entries: dict[str, dict[str, Any]] = {}  # disk entries read in this process, by key


def _entry(located: Located) -> tuple[str, dict[str, Any]]:
    key = located.key
    if key not in _entries:
        _entries[key] = _disk.read(key)
    return key, _entries[key]


_cache: OrderedDict[tuple[str, str], tuple[Census, Any]] = OrderedDict()
_cache_lock = threading.Lock()


@functools.cache
def transformers_major() -> int:
    """The major version of the installed transformers (5 when it cannot be read)."""
    import importlib.metadata

    try:
        return int(importlib.metadata.version("transformers").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 5


def built(config: PretrainedConfig, dtype_name: str) -> tuple[Census, Any]:
    """Counts (and the meta model, for offload placement) of ``config`` built at ``dtype_name``, cached."""
    try:
        key: tuple[str, str] | None = (
            type(config).__name__ + config.to_json_string(use_diff=False),
            dtype_name,
        )
    except Exception:  # a config that cannot serialise is counted every time
        key = None
    if key is not None:
        with _cache_lock:
            if key in _cache:
                _cache.move_to_end(key)
                return _cache[key]
    model = _build(config, dtype_name)
    entry = (_count_model(model, config), model)
    if key is not None:
        with _cache_lock:
            _cache[key] = entry
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    return entry


def _build(config: PretrainedConfig, dtype_name: str) -> Any:
    """The model of ``config`` on the meta device, its floating weights in ``dtype_name``."""
    import torch

    model_class = _model_class(config)
    config = copy.deepcopy(config)  # building may set attributes (dtype, attention) on the config
    dtype = getattr(torch, dtype_name)

    def build() -> Any:
        try:
            return model_class._from_config(config, dtype=dtype)
        except TypeError:  # transformers 4.x names it torch_dtype
            return model_class._from_config(config, torch_dtype=dtype)

    with _quiet():
        try:
            with torch.device("meta"):  # what transformers 5 itself builds under; ~4x faster than below
                return build()
        except Exception:  # a model that computes on tensors while it builds: buffers on CPU, weights on meta
            from accelerate import init_empty_weights  # type: ignore[import-untyped]

            try:
                with init_empty_weights():
                    return build()
            except Exception as error:
                raise ValueError(
                    f"transformers cannot build {model_class.__name__} from this config: {error}"
                ) from error


def _model_class(config: PretrainedConfig) -> Any:
    """The class named by ``config.architectures`` when transformers has it, else the causal-LM auto class
    for the config (else the bare model)."""
    import transformers

    for name in getattr(config, "architectures", None) or ():
        found = getattr(transformers, str(name), None)
        if isinstance(found, type) and hasattr(found, "_from_config"):
            return found
    for auto_name in ("AutoModelForCausalLM", "AutoModel"):
        auto = getattr(transformers, auto_name)
        with contextlib.suppress(Exception):
            return auto._model_mapping[type(config)]
    extra = (
        " (it uses custom code: vram_magic never runs trust_remote_code)"
        if getattr(config, "auto_map", None)
        else ""
    )
    raise ValueError(
        f"transformers has no model class for this config (model_type {config.model_type!r}){extra}. "
        "Pass the config of a model transformers ships."
    )


def _count_model(model: Any, config: PretrainedConfig) -> Census:
    import torch

    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # the copies, counted under their source
    fp32_patterns = _keep_in_fp32_patterns(model)
    params = param_bytes = 0
    for name, param in model.named_parameters():
        if name in tied:
            continue
        params += param.numel()
        size = 4 if fp32_patterns and any(p.search(name) for p in fp32_patterns) else param.element_size()
        param_bytes += param.numel() * size
    buffer_bytes = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if name not in tied)

    skip = _not_converted(model)
    quantized: list[tuple[int, int]] = []
    quantized_bytes = 0
    leaves: dict[tuple[str, bool], int] = {}
    gated = False
    output = None
    with contextlib.suppress(Exception):
        output = model.get_output_embeddings()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        gated = gated or leaf in _GATED_MLP
        conv1d = type(module).__name__ == "Conv1D"
        if not (type(module) is torch.nn.Linear or conv1d):
            continue
        weight = module.weight
        rows, columns = (weight.shape[1], weight.shape[0]) if conv1d else (weight.shape[0], weight.shape[1])
        if module is not output:
            key = (leaf, bool(_ATTENTION.search(name)))
            leaves[key] = leaves.get(key, 0) + rows + columns
        if f"{name}.weight" not in tied and _should_convert(name, skip):
            quantized.append((weight.numel(), rows))
            quantized_bytes += weight.numel() * weight.element_size()

    no_split = set(getattr(model, "_no_split_modules", None) or ())
    largest_layer = 0
    for _, module in model.named_modules():
        if type(module).__name__ in no_split:
            size = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
            largest_layer = max(largest_layer, size)
    can_generate = False
    with contextlib.suppress(Exception):
        can_generate = bool(model.can_generate()) and (
            transformers_major() >= 5 or _inherits_generation_mixin(type(model))
        )
    has_lm_head = False
    with contextlib.suppress(Exception):
        has_lm_head = model.get_output_embeddings() is not None
    return Census(
        model_class=type(model).__name__,
        params=params,
        param_bytes=param_bytes,
        buffer_bytes=buffer_bytes,
        quantized=tuple(quantized),
        quantized_bytes=quantized_bytes,
        linear_leaves=tuple((leaf, attention, size) for (leaf, attention), size in leaves.items()),
        largest_layer_bytes=largest_layer,
        can_generate=can_generate,
        has_lm_head=has_lm_head,
        gated_mlp=gated,
    )


def _inherits_generation_mixin(model_class: type) -> bool:
    """Whether a class inherits GenerationMixin itself (not through PreTrainedModel, as every model does
    before transformers 4.50): what makes a model generate from 4.50 on. Before, transformers also says so,
    with a warning, of an encoder that overrides prepare_inputs_for_generation (BertForMaskedLM)."""
    return any(
        "GenerationMixin" in str(cls.__bases__)
        for cls in model_class.__mro__
        if cls.__name__ != "PreTrainedModel"
    )


def _keep_in_fp32_patterns(model: Any) -> list[re.Pattern[str]]:
    """Modules transformers keeps in float32 whatever the dtype (``_keep_in_fp32_modules_strict``); the
    non-strict list applies to float16 loads only and is left out (rare, small)."""
    import torch

    dtype = getattr(model, "dtype", None)
    strict = getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    if dtype not in (torch.float16, torch.bfloat16):
        return []
    return [re.compile(str(pattern).replace("*", ".*")) for pattern in strict]


def _not_converted(model: Any) -> list[str]:
    """The modules transformers' bitsandbytes quantizer leaves alone: tied weights, the last weight and the
    output embedding (``get_keys_to_not_convert``), and the modules kept in float32."""
    keys: list[str] = []
    # transformers 5 keeps it with the quantizers; 4.x with the bitsandbytes integration
    for where in ("transformers.quantizers.base", "transformers.integrations.bitsandbytes"):
        with contextlib.suppress(Exception):
            keys = list(importlib.import_module(where).get_keys_to_not_convert(model))
            break
    if not keys:  # the gist of it: the output embedding (lm_head) stays in 16-bit
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        keys = [name for name, module in model.named_modules() if output is not None and module is output]
    keys.extend(str(key) for key in getattr(model, "_keep_in_fp32_modules", None) or ())
    return keys


def _should_convert(name: str, skip: list[str]) -> bool:
    """transformers 5's ``should_convert_module``: a pattern matches from the start up to a module boundary,
    as a regex with that boundary, or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for key in skip:
        try:
            if re.match(rf"(?:{key}){boundary}", name):
                return False
        except re.error:
            pass
        if name.endswith(key):
            return False
    return True


def gpu_split(
    config: PretrainedConfig, dtype_name: str, quantization: str | None, gpu_bytes: tuple[int, ...]
) -> tuple[tuple[int, ...], int]:
    """How ``device_map="auto"`` spreads the model over GPUs with ``gpu_bytes`` each, as transformers
    plans it (balanced, whole layers, bitsandbytes' share of ``max_memory``): the bytes on each GPU, as
    transformers sizes them, and the bytes that would not fit on any (CPU or disk)."""
    model = _build(config, dtype_name)  # a fresh one: quantizing replaces its Linear layers
    quantizer = None
    if quantization is not None:
        transformers = importlib.import_module("transformers")
        quantizers = importlib.import_module("transformers.quantizers")
        bits = transformers.BitsAndBytesConfig(
            load_in_4bit=quantization == "4bit", load_in_8bit=quantization == "8bit"
        )
        quantizer = quantizers.AutoHfQuantizer.from_config(bits, pre_quantized=False)
        with _quiet():
            _import_bitsandbytes_offline()
            quantizer.preprocess_model(
                model, device_map="auto", keep_in_fp32_modules=[], config=config, checkpoint_files=None
            )
    max_memory: dict[int | str, int] = {i: size for i, size in enumerate(gpu_bytes)} | {"cpu": 1}
    with _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Device 0 is not available": these GPUs are planned, not here
        if transformers_major() >= 5:
            transformers_accelerate = importlib.import_module("transformers.integrations.accelerate")
            device_map = transformers_accelerate._get_device_map(model, "auto", max_memory, quantizer)
            sizes = transformers_accelerate.compute_module_sizes(model, quantizer)
        else:
            device_map, sizes = _auto_device_map_before_5(model, dtype_name, max_memory, quantizer)
    sizes = sizes[0] if isinstance(sizes, tuple) else sizes  # transformers 5.x returns (sizes, leaves)
    on_gpus = [0] * len(gpu_bytes)
    elsewhere = 0
    for name, device in device_map.items():
        if isinstance(device, int) and 0 <= device < len(on_gpus):
            on_gpus[device] += sizes.get(name, 0)
        else:
            elsewhere += sizes.get(name, 0)
    return tuple(on_gpus), elsewhere


def _auto_device_map_before_5(
    model: Any, dtype_name: str, max_memory: dict[int | str, int], quantizer: Any
) -> tuple[dict[str, Any], dict[str, int]]:
    """The steps transformers 4's ``from_pretrained`` takes for ``device_map="auto"`` (it has no
    ``_get_device_map``), with accelerate's functions: the device map, and each module's bytes as sized."""
    import torch

    accelerate_utils = importlib.import_module("accelerate.utils")
    dtype = getattr(torch, dtype_name)
    special: dict[str, Any] = {}
    if quantizer is not None:
        special |= quantizer.get_special_dtypes_update(model, dtype)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    if keep and (dtype == torch.float16 or (quantizer is not None and quantizer.use_keep_in_fp32_modules)):
        kept = [name for name, _ in model.named_parameters() if any(part in name for part in keep)]
        special |= dict.fromkeys(kept, torch.float32)
    target = dtype if quantizer is None else quantizer.adjust_target_dtype(dtype)
    kwargs = {"no_split_module_classes": model._get_no_split_modules("auto"), "special_dtypes": special}
    try:
        memory = accelerate_utils.get_balanced_memory(model, dtype=target, max_memory=max_memory, **kwargs)
    except RuntimeError:  # torch 2.5 on names no GPU where there is none, and accelerate 1.14 asks it
        memory = _balanced_memory(model, target, max_memory, **kwargs)
    if quantizer is not None:
        memory = quantizer.adjust_max_memory(memory)
    model.tie_weights()
    device_map = accelerate_utils.infer_auto_device_map(model, dtype=target, max_memory=memory, **kwargs)
    sizes = accelerate_utils.compute_module_sizes(model, dtype=target, special_dtypes=special)
    return dict(device_map), dict(sizes)


def _balanced_memory(
    model: Any,
    dtype: Any,
    max_memory: dict[int | str, int],
    no_split_module_classes: list[str],
    special_dtypes: dict[str, Any],
) -> dict[int | str, int]:
    """accelerate's ``get_balanced_memory`` for GPUs that are not here (its arithmetic, without asking torch
    for each GPU): each GPU but the last holds at most an equal share of the model, plus 1.25 times its
    largest unsplittable block (or its mean leaf module) as a buffer."""
    modeling = importlib.import_module("accelerate.utils.modeling")
    memory = dict(max_memory)
    gpus = sorted(key for key, size in memory.items() if isinstance(key, int) and size > 0)
    if len(gpus) < 2:
        return memory
    sizes = modeling.compute_module_sizes(model, dtype=dtype, special_dtypes=special_dtypes)
    blocks: dict[str, int] = {}
    for name, module in model.named_modules():
        if name and type(module).__name__ in no_split_module_classes:
            blocks.setdefault(type(module).__name__, sizes.get(name, 0))
    inner = {name: size for name, size in sizes.items() if name not in modeling.get_module_leaves(sizes)}
    leaves = modeling.get_module_leaves(inner)
    mean_leaf = int(sum(inner[name] for name in leaves) / max(len(leaves), 1))
    per_gpu = sizes[""] // len(gpus) + int(1.25 * max(max(blocks.values(), default=0), mean_leaf))
    for gpu in gpus[:-1]:
        memory[gpu] = min(per_gpu, memory[gpu])
    return memory


def offload_split(model: Any, gpu_bytes: int) -> int:
    """The bytes of weights on GPU 0, placed by the function transformers calls for ``device_map="auto"``,
    given ``gpu_bytes`` there (the rest goes to CPU RAM)."""
    try:
        place = importlib.import_module("transformers.integrations.accelerate").infer_auto_device_map
    except (ImportError, AttributeError):  # transformers 4.x calls accelerate's
        place = importlib.import_module("accelerate").infer_auto_device_map
    with _quiet():
        device_map = place(
            model,
            max_memory={0: gpu_bytes, "cpu": 2**50},
            no_split_module_classes=set(getattr(model, "_no_split_modules", None) or ()),
        )
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    on_gpu = 0
    seen: set[int] = set()
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if name in tied or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if _device_of(name, device_map) in (0, "cuda", "cuda:0"):
            on_gpu += tensor.numel() * tensor.element_size()
    return on_gpu


def _device_of(name: str, device_map: dict[str, Any]) -> Any:
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        prefix = ".".join(parts[:end])
        if prefix in device_map:
            return device_map[prefix]
    return None


def _import_bitsandbytes_offline() -> None:
    """Import bitsandbytes, if not yet, with the Hub offline: on a CPU with AVX512-BF16, bitsandbytes 0.50
    asks the Hub for a CPU kernel as it is imported, and planning a split sends nothing over the network
    (a kernel already in the cache still loads; without it bitsandbytes uses its own CPU code)."""
    if "bitsandbytes" in sys.modules:
        return
    constants: Any = importlib.import_module("huggingface_hub.constants")
    offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        importlib.import_module("bitsandbytes")
    except ImportError:
        pass  # the quantizer says that bitsandbytes is missing
    finally:
        constants.HF_HUB_OFFLINE = offline


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers', accelerate's and bitsandbytes' warnings about a model built only to be measured (and
    bitsandbytes' about its CPU kernels, when it is imported to plan a quantized split) are noise here."""
    loggers = [logging.getLogger(name) for name in ("transformers", "accelerate", "bitsandbytes", "kernels")]
    levels = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for each, level in zip(loggers, levels, strict=True):
            each.setLevel(level)
