"""How much GPU memory a model load needs, from its config alone: no weight is read or downloaded.

The model is built on the meta device (shapes, no storage) from its ``config.json``; its tensors are counted
once each (tied weights once) and priced at the dtype and quantization asked for, the way transformers and
bitsandbytes place them. Loading, a KV cache for a context, and a training step (LoRA or full) add what they
add. Every approximation is said in plain words in ``Estimate.notes``.

Pure: no IPython. torch, transformers, accelerate and huggingface_hub are imported inside the functions that
use them, so ``import vram_magic._estimate`` is cheap. A model built from one config is cached, so a second
estimate of the same model (another dtype or quantization, the plan rows) takes milliseconds.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vram_magic._types import Estimate, LoadPlan
from vram_magic._units import format_bytes

if TYPE_CHECKING:
    from transformers import PretrainedConfig

CONFIGS_DIR = Path(__file__).parent / "configs"
MiB = 2**20
GiB = 2**30

_DTYPES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}
DTYPE_NAMES = frozenset(_DTYPES)  # the dtype spellings estimate() takes (torch.<name> too)
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_QUANTIZATIONS = {
    "8bit": "8bit",
    "int8": "8bit",
    "llm_int8": "8bit",
    "4bit": "4bit",
    "nf4": "4bit",
    "fp4": "4bit",
}
_TRAININGS = ("lora", "qlora", "full")
_GPU_MAPS = ("cuda", "gpu")
_AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

# bitsandbytes' layouts (0.45 to 0.50), checked byte for byte against real loads in tests/test_estimate.py.
_BLOCK_4BIT = 64  # weights per absmax scale in 4-bit
_NESTED_BLOCK = 256  # absmax values per second-level scale under double quantization
_CODE_4BIT_BYTES = 16 * 4  # the 16-entry NF4/FP4 table (float32), one per weight
_NESTED_STATE_BYTES = 256 * 4 + 4  # the 8-bit map (float32) and the offset of the absmax values, per weight
# Loading quantizes one weight at a time on the GPU: its 16-bit copy plus conversion buffers. As a multiple
# of the largest quantized weight in 16-bit, calibrated on an H100 (0.85 B Llama under a 1.5 GiB cap,
# transformers 5.17, bitsandbytes 0.50.2: peaks of 0.955 GiB in 8-bit and 0.654 GiB in NF4 with double
# quantization, where the weights alone are 0.917 GiB and 0.591 GiB: 1.8x and 2.9x its 22 MiB largest weight).
_CONVERT_FACTOR = {"8bit": 2, "4bit": 3}
_QUANT_WARMUP_BYTES = {"8bit": 1.0, "4bit": 0.5}  # what transformers' warm-up counts per quantized weight

# Activations autograd keeps for the backward pass, bytes per token per layer with 16-bit weights, as
# (per hidden unit, per MLP unit): measured on CPU from the saved tensors of transformers 5's own Llama
# (gated MLP), GPT-2 and BERT (plain MLP) with SDPA attention; LoRA on the attention projections keeps more
# per hidden unit (peft casts the adapters' inputs to float32) and less per MLP unit (frozen weights keep no
# inputs). Korthikanti et al. (2022) count 34 per hidden unit for a whole GPT layer (4x MLP) plus attention
# scores, which SDPA/flash kernels do not keep; transformers' layers keep more (float32 norms, RoPE copies).
_ACTIVATIONS = {
    ("gated", "full"): (22, 8),
    ("gated", "lora"): (30, 6),
    ("plain", "full"): (20, 10),
    ("plain", "lora"): (28, 12),
}
_CHECKPOINTED_PER_HIDDEN = 2  # gradient checkpointing keeps each layer's 16-bit input
_LOGITS_PER_VOCAB = 12  # bytes per token and vocabulary entry at the loss: 16-bit logits, float32 copy, grads
_PREFILL = (9, 6)  # inference: one layer's working memory per token on the whole prompt, as above
_LORA_R = 16
_LORA_BYTES = 16  # per trainable LoRA parameter: float32 weight and gradient, AdamW's two float32 states
_FULL_BYTES = {2: 14, 4: 12}  # per parameter beyond the weights: gradients, 2 Adam states, float32 master
_TRAIN_SEQ = 512
# The offload plan leaves what vram_magic._checks leaves for activations and the CUDA context.
_GPU_HEADROOM = 0.1
_MIN_HEADROOM_BYTES = 512 * MiB
_CACHE_SIZE = 8
_HUB_TIMEOUT_S = 5

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_GATED_MLP = frozenset({"gate_proj", "gate_up_proj", "wi_0", "w3"})
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


@dataclass(frozen=True)
class _Census:
    """Counts from one meta-device build at one dtype; everything else is arithmetic on them."""

    model_class: str
    params: int
    param_bytes: int  # tied weights once; modules transformers keeps in float32 at 4 bytes
    buffer_bytes: int
    quantized: tuple[tuple[int, int], ...]  # (elements, rows) of each Linear weight bitsandbytes converts
    quantized_bytes: int  # those weights at the build dtype
    lora_params: int  # r=16 on the attention projections
    lora_targets: int
    largest_layer_bytes: int  # the biggest block accelerate never splits (a decoder layer)
    can_generate: bool
    has_lm_head: bool
    gated_mlp: bool


_cache: OrderedDict[tuple[str, str], tuple[_Census, Any]] = OrderedDict()
_cache_lock = threading.Lock()


def estimate(
    model: str | PretrainedConfig,
    *,
    dtype: str | None = None,
    quantization: str | None = None,
    double_quant: bool = True,
    device_map: str | int | None = None,
    gpu_bytes: int | None = None,
    context: int | None = None,
    training: str | None = None,
    batch_size: int = 1,
    gradient_checkpointing: bool = False,
    lora_r: int = _LORA_R,
) -> Estimate:
    """Estimate what ``from_pretrained(model, ...)`` needs on the GPU, from the model's config alone.

    ``model``: a folder with a ``config.json``, a Hub id (looked up in the Hugging Face cache, then among the
    bundled configs, then on the Hub unless ``HF_HUB_OFFLINE`` is set) or a transformers config.
    ``dtype``: ``bfloat16``/``float16``/``float32`` (default: the config's, else bfloat16). ``quantization``:
    ``8bit`` or ``4bit`` (bitsandbytes; 4-bit is NF4, with ``double_quant`` as in QLoRA). ``device_map``:
    None or ``"cuda"`` (all on the GPU), ``"auto"`` (with ``gpu_bytes``: what fits there, the rest in CPU RAM)
    or ``"cpu"``. ``context``: tokens per sequence, for the KV cache and activations (the sequence length
    when training). ``training``: ``"lora"`` (r=``lora_r`` on the attention projections; ``"qlora"`` is LoRA
    on a 4-bit model) or ``"full"`` (AdamW, mixed precision).
    """
    options = _check_options(
        dtype, quantization, device_map, gpu_bytes, context, training, batch_size, lora_r
    )
    config, name, source, folder = _resolve(model)
    return _estimate(config, name, source, folder, double_quant, gradient_checkpointing, **options)


def plans(
    model: str | PretrainedConfig,
    *,
    free_bytes: int | None,
    cap_bytes: int | None = None,
    dtype: str | None = None,
    context: int | None = None,
    training: str | None = None,
    batch_size: int = 1,
    gradient_checkpointing: bool = False,
) -> tuple[LoadPlan, ...]:
    """One row per way to load ``model``: the dtype asked (or the config's), 8-bit, 4-bit NF4 and CPU offload.

    The room is ``free_bytes`` (free on the GPU now), no more than ``cap_bytes`` (what this process may
    still allocate under a cap) when given; ``fits`` is None when both are None. Quantized rows are left
    out for full training, the offload row for any training (offloaded layers cannot train).
    """
    for label, value in (("free_bytes", free_bytes), ("cap_bytes", cap_bytes)):
        _check_bytes(label, value)
    known = [value for value in (free_bytes, cap_bytes) if value is not None]
    room = min(known) if known else None
    base = _check_options(dtype, None, None, None, context, training, batch_size, _LORA_R)
    base["quantization"] = None  # each row chooses its own ("qlora" has only the 4-bit one)
    config, name, source, folder = _resolve(model)
    dtype_name, _ = _pick_dtype(base["dtype"], config, folder)
    rows: list[tuple[str, str, str, dict[str, Any]]] = [
        (_short(dtype_name), dtype_name, f"dtype=torch.{dtype_name}", {}),
    ]
    if base["training"] != "full" and prequantized(config) is None:
        rows.append(("8bit", "8-bit", "quantization_config=BitsAndBytesConfig(load_in_8bit=True)", {}))
        rows.append(
            (
                "4bit",
                "4-bit NF4",
                'quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", '
                f"bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.{dtype_name})",
                {},
            )
        )
    if base["training"] is None:
        limit = None if room is None else max(room - max(int(room * _GPU_HEADROOM), _MIN_HEADROOM_BYTES), 0)
        how = 'device_map="auto"'
        if limit is not None:
            how += f', max_memory={{0: "{limit / GiB:.1f}GiB", "cpu": ...}}'
        rows.append(("offload", "offload", how, {"device_map": "auto", "gpu_bytes": limit}))
    if training == "qlora":
        rows = [row for row in rows if row[0] == "4bit"]
    result = []
    for key, label, how, extra in rows:
        options = {**base, **extra}
        if key in ("8bit", "4bit"):
            options["quantization"] = key
        found = _estimate(config, name, source, folder, True, gradient_checkpointing, **options)
        need = found.peak_bytes
        fits = None if room is None else need <= room
        result.append(LoadPlan(key, label, how, found, need, room, fits))
    return tuple(result)


def load_config(model: str | PretrainedConfig) -> PretrainedConfig:
    """The transformers config of ``model``: a local folder (or its ``config.json``), the Hugging Face cache,
    the bundled configs of popular models, then the Hub (never when ``HF_HUB_OFFLINE`` is set)."""
    return _resolve(model)[0]


def bundled_models() -> tuple[str, ...]:
    """The Hub ids whose config ships with vram_magic (they work offline, with no download)."""
    return tuple(sorted(path.stem.replace("--", "/") for path in CONFIGS_DIR.glob("*--*.json")))


# --- checking what was asked -------------------------------------------------------------------------------


def _check_options(
    dtype: str | None,
    quantization: str | None,
    device_map: str | int | None,
    gpu_bytes: int | None,
    context: int | None,
    training: str | None,
    batch_size: int,
    lora_r: int,
) -> dict[str, Any]:
    dtype_name = None
    if dtype is not None:
        text = str(dtype).removeprefix("torch.").lower()  # a torch.dtype is fine too
        if text not in _DTYPES:
            raise ValueError(
                f"dtype {dtype!r} is not one of bfloat16, float16, float32 (or bf16, fp16, fp32)."
            )
        dtype_name = _DTYPES[text]
    quant = None
    if quantization is not None:
        quant = _QUANTIZATIONS.get(str(quantization).lower().replace("-", ""))
        if quant is None:
            raise ValueError(
                f"quantization {quantization!r} is not one of '8bit' or '4bit' (bitsandbytes; also 'int8', "
                "'nf4', 'fp4'). For no quantization pass None."
            )
    if training is not None and training not in _TRAININGS:
        raise ValueError(f"training {training!r} is not one of 'lora', 'qlora' (LoRA on 4-bit) or 'full'.")
    if training == "qlora":
        if quant not in (None, "4bit"):
            raise ValueError(
                "training='qlora' is LoRA on a 4-bit model: for LoRA on an 8-bit model pass training='lora' "
                "with quantization='8bit'."
            )
        training, quant = "lora", "4bit"
    if training == "full" and quant is not None:
        raise ValueError(
            "Full fine-tuning needs unquantized weights (bitsandbytes weights cannot train): "
            "use training='lora' with quantization='4bit' (QLoRA), or drop quantization."
        )
    if training is not None and str(device_map).lower() == "cpu":
        raise ValueError("training= estimates GPU memory, and device_map='cpu' puts nothing on the GPU.")
    _check_int("batch_size", batch_size, 1)
    _check_int("lora_r", lora_r, 1)
    if context is not None:
        _check_int("context", context, 1)
    _check_bytes("gpu_bytes", gpu_bytes)
    if gpu_bytes is not None and str(device_map).lower() not in _AUTO_MAPS:
        raise ValueError(
            "gpu_bytes= is the GPU's share of the weights under device_map='auto': pass both, or neither."
        )
    return {
        "dtype": dtype_name,
        "quantization": quant,
        "device_map": _check_device_map(device_map),
        "gpu_bytes": gpu_bytes,
        "context": context,
        "training": training,
        "batch_size": batch_size,
        "lora_r": lora_r,
    }


def _check_device_map(device_map: str | int | None) -> str | None:
    """None, ``cuda`` (or ``cuda:N`` / a GPU index), an auto map, or ``cpu``."""
    if device_map is None:
        return None
    if isinstance(device_map, int) and not isinstance(device_map, bool) and device_map >= 0:
        return "cuda"
    text = str(device_map).lower()
    if text in _GPU_MAPS or re.fullmatch(r"cuda:\d+", text):
        return "cuda"
    if text in _AUTO_MAPS or text == "cpu":
        return text
    raise ValueError(
        f"device_map {device_map!r} is not one of 'cuda' (or 'cuda:N', a GPU index), 'auto', 'balanced', "
        "'sequential' or 'cpu'; for a dict device_map, estimate with device_map='auto' and gpu_bytes=."
    )


def _check_int(label: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{label} must be a whole number of at least {minimum}, not {value!r}.")


def _check_bytes(label: str, value: object) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ValueError(f"{label} must be a number of bytes (an int, 0 or more) or None, not {value!r}.")


# --- finding the config ------------------------------------------------------------------------------------


def _resolve(model: str | PretrainedConfig) -> tuple[PretrainedConfig, str, str, Path | None]:
    """(config, the model's name, where the config came from in words, the folder its weights may be in)."""
    if not isinstance(model, (str, os.PathLike)):
        from transformers import PretrainedConfig

        if isinstance(model, PretrainedConfig):
            name = str(getattr(model, "name_or_path", "") or model.model_type or type(model).__name__)
            folder = _existing_path(name) if name else None
            return model, name, "Config: the config object given.", folder
        raise ValueError(
            f"model must be a Hub id, a folder with a config.json or a transformers config, not "
            f"{type(model).__name__}."
        )
    text = os.fspath(model).strip()
    if not text:
        raise ValueError("model is empty: pass a Hub id such as 'Qwen/Qwen2.5-7B' or a local folder.")
    path = _existing_path(text)
    if path is not None:
        try:
            return _from_path(path), text, f"Config: {path}.", path if path.is_dir() else path.parent
        except OSError as error:  # a folder this user may not read
            raise ValueError(f"Cannot read {path}: {error.strerror or error}.") from None
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1:
        raise ValueError(f"No such folder: {text}. Pass a folder with a config.json, or a Hub id.")
    if not _REPO_ID.match(text):
        raise ValueError(f"{text!r} is neither a folder nor a Hub model id (like 'meta-llama/Llama-3.1-8B').")
    cached = _from_hub_cache(text)
    if cached is not None:
        return _from_path(cached), text, "Config: the Hugging Face cache (nothing downloaded).", cached.parent
    bundled = _bundled(text)
    if bundled is not None:
        repo_id, same_as = bundled
        source = f"Config: vram_magic's bundled copy of {repo_id}'s config.json (nothing downloaded)."
        if same_as:
            source = (
                f"Config: vram_magic's bundled copy of {repo_id}'s config.json, the same architecture as "
                f"{text} (nothing downloaded)."
            )
        return _from_json(CONFIGS_DIR / (repo_id.replace("/", "--") + ".json")), text, source, None
    return _from_path(_download(text)), text, "Config: downloaded from the Hugging Face Hub.", None


def _existing_path(text: str) -> Path | None:
    """``text`` as a path that exists here, else None (also for a name no path can have: too long, an
    unknown user's ``~``, one below a folder this user may not list)."""
    try:
        path = Path(text).expanduser()
        return path if path.exists() else None
    except (OSError, RuntimeError):
        return None


def _from_path(path: Path) -> PretrainedConfig:
    if path.is_file():
        if path.suffix != ".json":
            raise ValueError(f"{path} is not a config.json: pass the folder a model was saved to.")
        return _from_json(path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{path} has no config.json: pass the folder a model was saved to (save_pretrained), or a Hub id."
        )
    from transformers import AutoConfig

    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(path)
    except Exception as error:  # custom code (trust_remote_code), unknown model_type, bad JSON
        raise ValueError(f"transformers cannot read {path / 'config.json'}: {error}") from error
    return config


def _from_json(path: Path) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        values = json.loads(path.read_text())
        config: PretrainedConfig = AutoConfig.for_model(**values)
    except Exception as error:
        raise ValueError(f"transformers cannot read {path}: {error}") from error
    return config


def _from_hub_cache(repo_id: str) -> Path | None:
    """The cached ``config.json`` of ``repo_id`` (main revision) when there is one; never goes online."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id huggingface_hub rejects: let the other sources answer
        return None
    return Path(found) if isinstance(found, str) else None


def _bundled(name: str) -> tuple[str, bool] | None:
    """(the bundled repo id, whether it stands in for another name) for a Hub id or its short name."""
    known = {repo_id.lower(): repo_id for repo_id in bundled_models()}
    wanted = name.lower()
    if wanted in known:
        return known[wanted], False
    try:
        aliases = json.loads((CONFIGS_DIR / "aliases.json").read_text())
    except OSError:  # an install without the data files: no bundled configs at all
        return None
    aliases = {key.lower(): value for key, value in aliases.items()}
    if wanted in aliases:
        return aliases[wanted], True
    if "/" not in wanted:  # "bert-base-uncased", "gpt2", "Llama-3.2-1B": the short name, when it is unique
        short = [repo_id for key, repo_id in known.items() if key.split("/", 1)[1] == wanted]
        if len(short) == 1:
            return short[0], False
    return None


def _offline() -> bool:
    """huggingface_hub's offline mode, from its constants or (when set after import) the environment."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    values = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return any((value or "").upper() in {"1", "ON", "YES", "TRUE"} for value in values)


def _download(repo_id: str) -> Path:
    hint = "Pass a local path, or run once online so the config is cached."
    if _offline():
        raise ValueError(
            f"No config for {repo_id!r}: it is not in the Hugging Face cache nor among vram_magic's bundled "
            f"configs, and HF_HUB_OFFLINE is set. {hint}"
        )
    from huggingface_hub import get_session, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:  # one quick try first (any answer will do): hf_hub_download retries a dead network for ~25 s
        get_session().head(hf_hub_url(repo_id, "config.json"), timeout=_HUB_TIMEOUT_S)
    except Exception as error:
        raise ValueError(
            f"Could not reach the Hugging Face Hub for {repo_id}'s config ({type(error).__name__}: {error}). "
            f"{hint}"
        ) from error
    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except GatedRepoError as error:
        raise ValueError(
            f"{repo_id} is gated on the Hub: accept its licence there and log in (hf auth login). {hint}"
        ) from error
    except RepositoryNotFoundError as error:
        raise ValueError(
            f"No model {repo_id!r} on the Hub (or it is private: log in with hf auth login). {hint}"
        ) from error
    except Exception as error:  # no network, a proxy, a timeout, no config.json in the repo
        raise ValueError(
            f"Could not fetch the config of {repo_id} from the Hub ({type(error).__name__}: {error}). {hint}"
        ) from error


def _pick_dtype(asked: str | None, config: PretrainedConfig, folder: Path | None = None) -> tuple[str, str]:
    """(dtype name, a note saying where it came from): what ``from_pretrained`` loads when not told. From
    transformers 5 on that is the config's dtype, else the checkpoint's own (read from its safetensors
    header when the weights are here), else float32 (the checkpoints of models that name no dtype were saved
    before 16-bit was usual); before transformers 5 it is always float32."""
    if asked is not None:
        return asked, f"dtype {asked}, as asked."
    if _transformers_major() < 5:
        return "float32", "dtype float32: from_pretrained without dtype= loads float32 before transformers 5."
    found = getattr(config, "dtype", None) or getattr(config.get_text_config(), "dtype", None)
    name = str(found).removeprefix("torch.") if found is not None else None
    if name in _DTYPE_BYTES:
        return name, f"dtype {name}, from the config (what from_pretrained loads when given no dtype)."
    weights = _weights_dtype(folder) if folder is not None else None
    if weights is not None:
        return weights, f"dtype {weights}, from the checkpoint's weights (the config names none)."
    return "float32", (
        "dtype float32 assumed: the config names none, so from_pretrained loads the checkpoint's own dtype, "
        "float32 for the models saved without one (pass dtype=torch.bfloat16 to halve it)."
    )


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def _weights_dtype(folder: Path) -> str | None:
    """The floating dtype of a checkpoint's first tensor, from its safetensors header (a few KiB read)."""
    try:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            first = next(iter(json.loads(index.read_text())["weight_map"].values()))
            path = folder / first
        else:
            path = folder / "model.safetensors"
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size < 100 * MiB:
                return None
            header = json.loads(handle.read(size))
    except (OSError, ValueError, KeyError, StopIteration):
        return None
    for key, entry in header.items():
        if key != "__metadata__" and isinstance(entry, dict) and entry.get("dtype") in _SAFETENSORS_DTYPES:
            return _SAFETENSORS_DTYPES[entry["dtype"]]
    return None


def prequantized(config: PretrainedConfig) -> tuple[str, str] | None:
    """(method, "4bit"/"8bit") for a checkpoint saved already quantized (a ``quantization_config`` in its
    config.json: bitsandbytes, GPTQ, AWQ...), else None."""
    found = getattr(config, "quantization_config", None)
    if found is None:
        return None
    values = found if isinstance(found, dict) else getattr(found, "__dict__", {})
    method = str(getattr(values.get("quant_method"), "value", values.get("quant_method")) or "unknown")
    if method == "bitsandbytes":
        if values.get("load_in_4bit"):
            return method, "4bit"
        if values.get("load_in_8bit"):
            return method, "8bit"
        return None
    bits = values.get("bits") or values.get("w_bit") or (8 if "8" in method else 4)
    return method, "8bit" if int(bits) >= 8 else "4bit"


def _transformers_major() -> int:
    import importlib.metadata

    try:
        return int(importlib.metadata.version("transformers").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 5


# --- building on the meta device and counting --------------------------------------------------------------


def _census(config: PretrainedConfig, dtype_name: str) -> tuple[_Census, Any]:
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


def _count_model(model: Any, config: PretrainedConfig) -> _Census:
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
    quantized_bytes = lora_params = lora_targets = 0
    gated = False
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        gated = gated or leaf in _GATED_MLP
        conv1d = type(module).__name__ == "Conv1D"
        if not (type(module) is torch.nn.Linear or conv1d):
            continue
        weight = module.weight
        rows, columns = (weight.shape[1], weight.shape[0]) if conv1d else (weight.shape[0], weight.shape[1])
        if _ATTENTION.search(name):
            lora_params += _LORA_R * (rows + columns)
            lora_targets += 1
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
        can_generate = bool(model.can_generate())
    has_lm_head = False
    with contextlib.suppress(Exception):
        has_lm_head = model.get_output_embeddings() is not None
    return _Census(
        model_class=type(model).__name__,
        params=params,
        param_bytes=param_bytes,
        buffer_bytes=buffer_bytes,
        quantized=tuple(quantized),
        quantized_bytes=quantized_bytes,
        lora_params=lora_params,
        lora_targets=lora_targets,
        largest_layer_bytes=largest_layer,
        can_generate=can_generate,
        has_lm_head=has_lm_head,
        gated_mlp=gated,
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


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' and accelerate's warnings about a model built only to be measured are noise here."""
    loggers = [logging.getLogger(name) for name in ("transformers", "accelerate")]
    levels = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for each, level in zip(loggers, levels, strict=True):
            each.setLevel(level)


# --- the arithmetic ----------------------------------------------------------------------------------------


def _estimate(
    config: PretrainedConfig,
    name: str,
    source: str,
    folder: Path | None,
    double_quant: bool,
    gradient_checkpointing: bool,
    *,
    dtype: str | None,
    quantization: str | None,
    device_map: str | None,
    gpu_bytes: int | None,
    context: int | None,
    training: str | None,
    batch_size: int,
    lora_r: int,
) -> Estimate:
    dtype_name, dtype_note = _pick_dtype(dtype, config, folder)
    census, meta_model = _census(config, dtype_name)
    width = _DTYPE_BYTES[dtype_name]
    notes = [source, dtype_note]
    saved_as = prequantized(config)
    if saved_as is not None:
        method, bits = saved_as
        if quantization not in (None, bits):
            notes.append(
                f"The checkpoint is saved quantized ({method}): its own quantization loads, "
                f"not {quantization}."
            )
        quantization = bits
        if method != "bitsandbytes":
            notes.append(
                f"Saved quantized with {method} ({bits}): its weights are sized as bitsandbytes' {bits} "
                "layout (within a few percent: a scale per group of weights)."
            )

    total = census.param_bytes + census.buffer_bytes
    warmup = total
    largest_quantized = max((numel for numel, _ in census.quantized), default=0)
    if quantization is not None:
        numel = sum(n for n, _ in census.quantized)
        quantized = _quantized_bytes(census.quantized, quantization, double_quant)
        total += quantized - census.quantized_bytes
        warmup += int(numel * _QUANT_WARMUP_BYTES[quantization]) - census.quantized_bytes
        notes.append(_quantization_note(census, quantization, double_quant, dtype_name))

    on_gpu, offloaded = _place(census, meta_model, total, quantization, device_map, gpu_bytes, notes)
    load_peak = _load_peak(on_gpu, warmup, largest_quantized * width, quantization, notes)

    kv = activations = training_bytes = trainable = None
    text = config.get_text_config()
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    intermediate = int(getattr(text, "intermediate_size", 0) or getattr(text, "n_inner", 0) or 4 * hidden)
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    vocab = int(getattr(text, "vocab_size", 0) or 0) if census.has_lm_head else 0
    run = None
    if training is not None:
        seq = context if context is not None else _TRAIN_SEQ
        if context is None:
            notes.append(f"Training on sequences of {_TRAIN_SEQ} tokens (pass context= for another length).")
        if training == "full":
            trainable = census.params
            training_bytes = census.params * _FULL_BYTES[width]
            notes.append(_full_note(width))
        else:
            trainable = census.lora_params * lora_r // _LORA_R
            training_bytes = trainable * _LORA_BYTES
            notes.append(
                f"LoRA r={lora_r} on the {census.lora_targets} attention projections ({_count(trainable)} "
                f"parameters; peft's defaults often target fewer), each with a float32 weight, gradient and "
                f"two AdamW states (16 bytes)."
            )
        shape = (hidden, intermediate, layers, vocab, width)
        activations = _training_activations(census, training, gradient_checkpointing, shape, seq, batch_size)
        notes.append(_activations_note(census, training, gradient_checkpointing, seq, batch_size))
        if offloaded:
            notes.append("Training with layers offloaded to the CPU is not modelled: they are not counted.")
        run = on_gpu + training_bytes + activations
    elif context is not None and on_gpu:
        kv = _kv_cache_bytes(text, census, context, batch_size, width)
        per_token = (_PREFILL[0] * hidden + _PREFILL[1] * intermediate) * width // 2
        activations = per_token * context * batch_size
        if census.can_generate:
            activations += vocab * batch_size * (width + 4)  # the last token's logits, and a float32 copy
        elif vocab:
            activations += vocab * context * batch_size * width  # an encoder's head scores every token
        notes.append(_kv_note(text, census, kv, context, batch_size, width))
        notes.append(
            f"Running the prompt needs about {(_PREFILL[0] * width) // 2}*hidden + "
            f"{(_PREFILL[1] * width) // 2}*intermediate bytes per token for one layer at a time "
            "(measured on CPU with SDPA attention; the CUDA context and cuBLAS workspaces are not counted)."
        )
        run = on_gpu + kv + activations
        if offloaded:
            run += census.largest_layer_bytes
            notes.append(
                f"Running adds room for one offloaded layer ({format_bytes(census.largest_layer_bytes)}) "
                "brought to the GPU."
            )
    peak = load_peak if run is None else max(load_peak, run)
    return Estimate(
        model=name,
        model_class=census.model_class,
        params=census.params,
        dtype=dtype_name,
        quantization=quantization,
        device_map=device_map,
        weights_bytes=on_gpu,
        offloaded_bytes=offloaded,
        load_peak_bytes=load_peak,
        peak_bytes=peak,
        kv_cache_bytes=kv,
        activations_bytes=activations,
        training_bytes=training_bytes,
        trainable_params=trainable,
        context=context,
        batch_size=batch_size,
        training=training,
        notes=tuple(notes),
    )


def _place(
    census: _Census,
    meta_model: Any,
    total: int,
    quantization: str | None,
    device_map: str | None,
    gpu_bytes: int | None,
    notes: list[str],
) -> tuple[int, int]:
    """(bytes of weights on the GPU, bytes in CPU RAM) for ``device_map``."""
    if device_map == "cpu":
        notes.append("device_map='cpu': nothing goes to the GPU.")
        return 0, total
    if device_map not in _AUTO_MAPS:
        return total, 0
    if gpu_bytes is None:
        notes.append(
            "device_map='auto' puts on the GPU what fits in 90% of its free memory and the rest in CPU RAM: "
            "this counts it all on the GPU; pass gpu_bytes= (or use plans()) for the split."
        )
        return total, 0
    if quantization is not None:
        if total > gpu_bytes * 0.9:  # transformers gives bitsandbytes 90% of max_memory
            notes.append(
                f"With {format_bytes(gpu_bytes)} for weights, device_map='auto' would put layers on the CPU, "
                "which bitsandbytes refuses ('Some modules are dispatched on the CPU or the disk') unless "
                "llm_int8_enable_fp32_cpu_offload=True: counted all on the GPU."
            )
        return total, 0
    if total <= gpu_bytes:
        return total, 0
    on_gpu = _offload_split(meta_model, gpu_bytes)
    notes.append(
        f"device_map='auto' with {format_bytes(gpu_bytes)} for weights (accelerate's own placement): "
        f"{format_bytes(on_gpu)} on the GPU, {format_bytes(total - on_gpu)} in CPU RAM; each forward pass "
        "brings the CPU layers through the GPU one at a time (slow)."
    )
    return on_gpu, total - on_gpu


def _load_peak(
    on_gpu: int, warmup: int, largest_bytes: int, quantization: str | None, notes: list[str]
) -> int:
    """The most the GPU holds while loading; ``largest_bytes`` is the largest quantized weight in 16-bit."""
    if on_gpu == 0:
        return 0
    if quantization is None:
        notes.append(
            "Loading reserves the GPU's share in one allocation before copying (transformers' "
            "caching_allocator_warmup): all of it must be free at once."
        )
        return on_gpu
    converting = _CONVERT_FACTOR[quantization] * largest_bytes
    notes.append(
        f"Loading quantizes one weight at a time on the GPU: peak = weights + {format_bytes(converting)} "
        f"({_CONVERT_FACTOR[quantization]}x the largest weight in 16-bit, calibrated on one H100 load)."
    )
    return max(warmup, on_gpu + converting)


def _quantized_bytes(weights: tuple[tuple[int, int], ...], quantization: str, double_quant: bool) -> int:
    """What bitsandbytes keeps for these Linear weights (elements, rows)."""
    if quantization == "8bit":  # int8 weights and one float32 scale per output row (SCB)
        return sum(numel + 4 * rows for numel, rows in weights)
    total = 0
    for numel, _ in weights:
        blocks = math.ceil(numel / _BLOCK_4BIT)
        total += (numel + 1) // 2 + _CODE_4BIT_BYTES  # two weights per byte, and the NF4 table
        if double_quant:  # 8-bit absmax, plus a float32 scale per 256 of them, their map and offset
            total += blocks + 4 * math.ceil(blocks / _NESTED_BLOCK) + _NESTED_STATE_BYTES
        else:
            total += 4 * blocks  # a float32 absmax per 64 weights
    return total


def _offload_split(model: Any, gpu_bytes: int) -> int:
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


def _kv_cache_bytes(text: Any, census: _Census, context: int, batch_size: int, width: int) -> int:
    """2 (keys, values) x layers x KV heads x head size x tokens x batch x bytes; sliding-window layers keep
    at most their window."""
    if not census.can_generate:
        return 0
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(text, "num_key_value_heads", 0) or heads)
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    head_dim = int(getattr(text, "head_dim", 0) or (hidden // heads if heads else 0))
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    window = getattr(text, "sliding_window", None)
    kinds = list(getattr(text, "layer_types", None) or ["full_attention"] * layers)
    tokens = sum(
        min(context, int(window)) if kind == "sliding_attention" and window else context for kind in kinds
    )
    return 2 * kv_heads * head_dim * tokens * batch_size * width


def _training_activations(
    census: _Census,
    training: str,
    checkpointing: bool,
    shape: tuple[int, int, int, int, int],
    seq: int,
    batch_size: int,
) -> int:
    """Bytes of activations at the peak of a training step; ``shape`` is (hidden, intermediate, layers,
    vocab, bytes per element)."""
    hidden, intermediate, layers, vocab, width = shape
    per_hidden, per_mlp = _ACTIVATIONS[("gated" if census.gated_mlp else "plain", training)]
    tokens = seq * batch_size
    layer = (per_hidden * hidden + per_mlp * intermediate) * width // 2 * tokens
    logits = _LOGITS_PER_VOCAB * vocab * tokens
    if checkpointing:  # each layer's input, then one layer recomputed at a time (after the logits' peak)
        return layers * _CHECKPOINTED_PER_HIDDEN * hidden * width // 2 * tokens + max(logits, layer)
    return layers * layer + logits


def _quantization_note(census: _Census, quantization: str, double_quant: bool, dtype_name: str) -> str:
    if quantization == "8bit":
        what, how = "8-bit", "1 byte per weight plus a float32 scale per row"
    elif double_quant:
        what, how = "4-bit NF4 with double quantization", "half a byte per weight plus an 8-bit scale per 64"
    else:
        what, how = "4-bit NF4", "half a byte per weight plus a float32 scale per 64"
    return (
        f"bitsandbytes {what}: the {len(census.quantized)} Linear weights take {how}; embeddings, the output "
        f"layer, norms and biases stay in {dtype_name} (as transformers leaves them)."
    )


def _full_note(width: int) -> str:
    if width == 4:
        return (
            "Full fine-tuning with AdamW in float32: a gradient and two Adam states per parameter (12 bytes)."
        )
    return (
        "Full fine-tuning with AdamW in mixed precision: a 16-bit gradient, two float32 Adam states and a "
        "float32 master copy per parameter (14 bytes; pure bf16 training keeps bf16 states and needs less)."
    )


def _activations_note(census: _Census, training: str, checkpointing: bool, seq: int, batch_size: int) -> str:
    per_hidden, per_mlp = _ACTIVATIONS[("gated" if census.gated_mlp else "plain", training)]
    kept = (
        f"{_CHECKPOINTED_PER_HIDDEN}*hidden per layer (gradient checkpointing) plus one layer recomputed"
        if checkpointing
        else f"{per_hidden}*hidden + {per_mlp}*intermediate per layer"
    )
    return (
        f"Activations for {batch_size} x {seq} tokens: {kept}, in 16-bit bytes per token, plus "
        f"{_LOGITS_PER_VOCAB}*vocab for the logits and loss (measured on CPU from transformers' models with "
        "SDPA attention, after Korthikanti et al. 2022). A lower bound: the CUDA context, cuBLAS workspaces, "
        "allocator fragmentation and the Trainer's own buffers are not counted (a QLoRA Trainer step of a "
        "0.85 B Llama, batch 2 x 512, peaked at 3.59 GiB on an H100 where this estimate says 2.46 GiB)."
    )


def _kv_note(text: Any, census: _Census, kv: int, context: int, batch_size: int, width: int) -> str:
    if not census.can_generate:
        return "No KV cache: this model does not generate."
    sliding = "sliding_attention" in (getattr(text, "layer_types", None) or ())
    window = " (sliding-window layers keep at most their window)" if sliding else ""
    return (
        f"KV cache for {batch_size} x {context} tokens: 2 x layers x KV heads x head size x tokens x "
        f"{width} bytes = {format_bytes(kv)}{window}."
    )


# --- small helpers -----------------------------------------------------------------------------------------


def _short(dtype_name: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype_name]


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)
