"""How much GPU memory a model load needs, from its config alone: no weight is read or downloaded.

The model is built on the meta device (shapes, no storage) from its ``config.json``; its tensors are counted
once each (tied weights once) and priced at the dtype and quantization asked for, the way transformers and
bitsandbytes place them. Loading, a KV cache for a context, and a training step (LoRA or full) add what they
add. Every approximation is a ``Note`` in ``Estimate.notes``, worded by ``vram_magic.render``.

Pure: no IPython. torch, transformers, accelerate and huggingface_hub are imported inside the functions that
use them, so ``import vram_magic.estimator`` is cheap. What is counted of a model is cached in memory and on
disk (``_disk``): a second estimate of the same model (another dtype or quantization, the plan rows, a new
kernel) takes milliseconds and imports none of transformers' model code.

``_configs`` finds the config and the dtype, ``_counting`` builds and counts (the only module that touches
transformers' and accelerate's internals), ``_options`` checks what was asked, ``_arithmetic`` prices it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from vram_magic._hf import bitsandbytes_config
from vram_magic._types import Estimate, LoadPlan
from vram_magic.estimator._arithmetic import price
from vram_magic.estimator._configs import (
    CONFIGS_DIR,
    DTYPE_NAMES,
    Progress,
    bundled_models,
    load_config,
    pick_dtype,
    prequantized,
    resolve,
)
from vram_magic.estimator._counting import LORA_R, Described, described
from vram_magic.estimator._options import Options, check_bytes, options

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "CONFIGS_DIR",
    "DTYPE_NAMES",
    "Estimate",
    "LoadPlan",
    "bundled_models",
    "estimate",
    "load_config",
    "load_plans",
    "prequantized",
]

GiB = 2**30
# The offload plan leaves what vram_magic._checks leaves for activations and the CUDA context.
_GPU_HEADROOM = 0.1
_MIN_HEADROOM_BYTES = 512 * 2**20


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
    gradient_checkpointing: bool | None = None,
    lora_r: int = LORA_R,
    lora_targets: str | list[str] | tuple[str, ...] = "attention",
    optimizer: str = "adamw_torch",
    prepare_kbit: bool | None = None,
    room_bytes: int | None = None,
    gpus: int = 1,
    progress: Progress | None = None,
) -> Estimate:
    """Estimate what ``from_pretrained(model, ...)`` needs on the GPU, from the model's config alone.

    ``model``: a folder with a ``config.json``, a Hub id (looked up in the Hugging Face cache, then among the
    bundled configs, then on the Hub unless ``HF_HUB_OFFLINE`` is set) or a transformers config.
    ``dtype``: ``bfloat16``/``float16``/``float32`` (default: what ``from_pretrained`` loads: the config's,
    else the checkpoint's, else float32). ``quantization``: ``8bit`` or ``4bit`` (bitsandbytes; 4-bit is NF4,
    with ``double_quant`` as in QLoRA). ``device_map``: None or ``"cuda"`` (all on the GPU), ``"auto"`` (with
    ``gpu_bytes``: what fits there, the rest in CPU RAM) or ``"cpu"``. ``context``: tokens per sequence, for
    the KV cache and activations (the sequence length when training). ``training``: ``"lora"``
    (r=``lora_r`` on the attention projections; ``"qlora"`` is LoRA on a 4-bit model) or ``"full"`` (AdamW,
    mixed precision). For training: ``lora_targets`` (``"attention"``, ``"all-linear"`` or module names),
    ``optimizer`` (TrainingArguments' ``optim`` names: ``adamw_torch``, ``paged_adamw_8bit``, ...),
    ``gradient_checkpointing`` and ``prepare_kbit`` (peft's ``prepare_model_for_kbit_training``, assumed for
    LoRA on a quantized model: float32 casts, checkpointing on); the step's parts are in ``parts``, and with
    ``room_bytes`` (the GPU memory to fit in) ``max_batch_size`` and ``max_context`` say the largest that
    fit. ``progress`` is told, in a line, before a step that can take seconds (a download from the Hub,
    counting a model for the first time). ``gpus``: with ``device_map="auto"`` and ``gpu_bytes``, spread over
    that many GPUs of ``gpu_bytes`` each, as transformers places it; ``peak_bytes`` is then the busiest GPU's.
    """
    asked = options(
        dtype=dtype,
        quantization=quantization,
        double_quant=double_quant,
        device_map=device_map,
        gpu_bytes=gpu_bytes,
        context=context,
        training=training,
        batch_size=batch_size,
        gradient_checkpointing=gradient_checkpointing,
        lora_r=lora_r,
        lora_targets=lora_targets,
        optimizer=optimizer,
        prepare_kbit=prepare_kbit,
        gpus=gpus,
    )
    check_bytes("room_bytes", room_bytes)
    located = resolve(model, progress)
    _check_training_of(described(located), located.name, training)
    found = price(located, asked)
    if room_bytes is None or asked.training is None:
        return found
    return replace(
        found,
        max_batch_size=_largest(lambda n: price(located, replace(asked, batch_size=n)), room_bytes),
        max_context=_largest(lambda n: price(located, replace(asked, context=n)), room_bytes),
    )


_LARGEST = 1 << 20  # the most a search for the largest batch or context tries


def _largest(priced: Callable[[int], Estimate], room_bytes: int) -> int:
    """The largest n (0 if none) whose step fits ``room_bytes``: the peak grows with n, so bisect."""
    if priced(1).peak_bytes > room_bytes:
        return 0
    low, high = 1, 2
    while high < _LARGEST and priced(high).peak_bytes <= room_bytes:
        low, high = high, high * 2
    while high - low > 1:  # priced(low) fits, priced(high) does not (or high is the limit)
        middle = (low + high) // 2
        low, high = (middle, high) if priced(middle).peak_bytes <= room_bytes else (low, middle)
    return low


def _check_training_of(config: PretrainedConfig | Described, name: str, training: str | None) -> None:
    """A checkpoint saved quantized trains only through adapters, and QLoRA means bitsandbytes 4-bit."""
    saved_as = prequantized(config)
    if saved_as is None or training not in ("full", "qlora"):
        return
    method, bits = saved_as
    if training == "full":
        raise ValueError(
            f"{name} is saved quantized ({method}, {bits}): its weights cannot be fully fine-tuned; "
            "estimate training='lora' (adapters on the quantized model) instead."
        )
    if (method, bits) != ("bitsandbytes", "4bit"):
        raise ValueError(
            f"{name} is saved quantized ({method}, {bits}), not in bitsandbytes 4-bit: estimate "
            "training='lora' (adapters on it as saved) instead of qlora."
        )


def load_plans(
    model: str | PretrainedConfig,
    *,
    free_bytes: int | None,
    cap_bytes: int | None = None,
    dtype: str | None = None,
    context: int | None = None,
    training: str | None = None,
    batch_size: int = 1,
    gradient_checkpointing: bool | None = None,
    lora_r: int = LORA_R,
    lora_targets: str | list[str] | tuple[str, ...] = "attention",
    optimizer: str = "adamw_torch",
    gpus: int = 1,
    progress: Progress | None = None,
) -> tuple[LoadPlan, ...]:
    """One row per way to load ``model``: the dtype asked (or the config's), 8-bit, 4-bit NF4 and CPU offload.

    The room is ``free_bytes`` (free on the GPU now), no more than ``cap_bytes`` (what this process may
    still allocate under a cap) when given; ``fits`` is None when both are None. Quantized rows are left
    out for full training, the offload row for any training (offloaded layers cannot train). ``gpus`` > 1:
    every row is ``device_map="auto"`` over that many GPUs with the room on each (``free_bytes`` and
    ``cap_bytes`` are per GPU), and fits only if nothing is left over for CPU RAM.
    """
    for label, value in (("free_bytes", free_bytes), ("cap_bytes", cap_bytes)):
        check_bytes(label, value)
    known = [value for value in (free_bytes, cap_bytes) if value is not None]
    room = min(known) if known else None

    limit = None if room is None else max(room - max(int(room * _GPU_HEADROOM), _MIN_HEADROOM_BYTES), 0)
    spread = gpus > 1 and limit is not None

    def row(quantization: str | None = None) -> Options:  # each row its own quantization, and what follows
        return options(
            dtype=dtype,
            quantization=quantization,
            context=context,
            training="lora" if training == "qlora" else training,
            batch_size=batch_size,
            gradient_checkpointing=gradient_checkpointing,
            lora_r=lora_r,
            lora_targets=lora_targets,
            optimizer=optimizer,
            device_map="auto" if spread else None,
            gpu_bytes=limit if spread else None,
            gpus=gpus if spread else 1,
        )

    options(dtype=dtype, context=context, training=training, batch_size=batch_size)  # what cannot be asked
    base = row()
    located = resolve(model, progress)
    config = described(located)
    _check_training_of(config, located.name, training)
    dtype_name, _ = pick_dtype(base.dtype, config, located.folder)
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype_name]
    rows: list[tuple[str, str, Options]] = [(short, f"dtype=torch.{dtype_name}", base)]
    if base.training != "full" and prequantized(config) is None:
        how = f"quantization_config={bitsandbytes_config(8)}"
        rows.append(("8bit", how, row("8bit")))
        how = f"quantization_config={bitsandbytes_config(4, f'torch.{dtype_name}')}"
        rows.append(("4bit", how, row("4bit")))
    if base.training is None and not spread:
        how = 'device_map="auto"'
        if limit is not None:
            how += f', max_memory={{0: "{limit / GiB:.1f}GiB", "cpu": ...}}'
        rows.append(("offload", how, replace(base, device_map="auto", gpu_bytes=limit)))
    if spread:
        rows = [(key, f'{how}, device_map="auto"', asked) for key, how, asked in rows]
    if training == "qlora":  # a checkpoint saved in 4-bit loads as saved: its own row is the QLoRA one
        rows = [row for row in rows if row[0] == "4bit"] or rows[:1]
    result = []
    for key, how, asked in rows:
        found = price(located, asked)
        if key == "offload" and found.weights_bytes == 0 and found.offloaded_bytes:
            continue  # too little room for even one layer: that is running on the CPU, not offloading
        fits = None if room is None else found.peak_bytes <= room and not (spread and found.offloaded_bytes)
        result.append(LoadPlan(key, how, found, found.peak_bytes, room, fits))
    return tuple(result)
