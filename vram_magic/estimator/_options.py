"""What an estimate is asked for, checked once: ``options(...)`` turns the keywords of ``estimate()`` into an
``Options`` (canonical names: ``bfloat16``, ``4bit``, ``cuda``/``auto``/``cpu``) or raises a ValueError that
says what to type instead."""

from __future__ import annotations

import re
from dataclasses import dataclass

from vram_magic._hf import AUTO_MAPS, DTYPES
from vram_magic.estimator._counting import LORA_R

QUANTIZATIONS = {
    "8bit": "8bit",
    "int8": "8bit",
    "llm_int8": "8bit",
    "4bit": "4bit",
    "nf4": "4bit",
    "fp4": "4bit",
}
TRAININGS = ("lora", "qlora", "full")
GPU_MAPS = ("cuda", "gpu")
LORA_TARGETS = ("attention", "all-linear")
# Optimizer state per trainable parameter, by TrainingArguments' ``optim`` names, as (states, bytes each;
# None: the parameter's own dtype). torch's AdamW keeps two states like the parameter (measured: 4 bytes
# for a bfloat16 parameter under Trainer, tests/test_estimate.py); bitsandbytes keeps two float32 states,
# or two of one byte in its 8-bit optimizers (paged ones can spill to CPU RAM under pressure); Lion one;
# SGD (momentum 0, Trainer's default) none; Adafactor a row and a column per matrix, next to nothing.
OPTIMIZERS: dict[str, tuple[int, int | None]] = {
    "adamw_torch": (2, None),
    "adamw_torch_fused": (2, None),
    "adamw_hf": (2, None),
    "adamw_bnb_8bit": (2, 1),
    "adamw_8bit": (2, 1),
    "paged_adamw_8bit": (2, 1),
    "paged_adamw_32bit": (2, 4),
    "lion_8bit": (1, 1),
    "paged_lion_8bit": (1, 1),
    "lion_32bit": (1, 4),
    "paged_lion_32bit": (1, 4),
    "adafactor": (0, None),
    "sgd": (0, None),
}


@dataclass(frozen=True)
class Options:
    """One estimate's options, checked. ``dtype`` None: the load's own; ``training`` is ``lora`` or
    ``full`` (``qlora`` is ``lora`` with ``quantization="4bit"``); ``gpu_bytes`` only with an auto map."""

    dtype: str | None = None  # bfloat16, float16, float32
    quantization: str | None = None  # 8bit, 4bit
    double_quant: bool = True
    device_map: str | None = None  # cuda, cpu, or one of AUTO_MAPS
    gpu_bytes: int | None = None
    context: int | None = None
    training: str | None = None
    batch_size: int = 1
    gradient_checkpointing: bool = False
    lora_r: int = LORA_R
    lora_targets: str | tuple[str, ...] = "attention"  # or "all-linear", or module names ("q_proj", ...)
    optimizer: str = "adamw_torch"
    prepare_kbit: bool = False  # peft's prepare_model_for_kbit_training: float32 casts, checkpointing on
    gpus: int = 1  # with more: device_map="auto" over that many GPUs of gpu_bytes each


def options(
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
    gpus: int = 1,
) -> Options:
    """The checked ``Options`` for these keywords (a ValueError for any that cannot be estimated). LoRA on
    a quantized model is prepared as QLoRA notebooks do (``prepare_kbit``, which turns gradient checkpointing
    on) unless ``prepare_kbit=False``; ``gradient_checkpointing`` None: on only where prepared."""
    dtype_name = None
    if dtype is not None:
        text = str(dtype).removeprefix("torch.").lower()  # a torch.dtype is fine too
        if text not in DTYPES:
            raise ValueError(
                f"dtype {dtype!r} is not one of bfloat16, float16, float32 (or bf16, fp16, fp32)."
            )
        dtype_name = DTYPES[text]
    quant = None
    if quantization is not None:
        quant = QUANTIZATIONS.get(str(quantization).lower().replace("-", ""))
        if quant is None:
            raise ValueError(
                f"quantization {quantization!r} is not one of '8bit' or '4bit' (bitsandbytes; also 'int8', "
                "'nf4', 'fp4'). For no quantization pass None."
            )
    if training is not None and training not in TRAININGS:
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
    check_int("batch_size", batch_size, 1)
    check_int("lora_r", lora_r, 1)
    optimizer_name = str(optimizer).lower()
    if optimizer_name not in OPTIMIZERS:
        raise ValueError(
            f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)} (TrainingArguments' optim names)."
        )
    targets = _check_lora_targets(lora_targets)
    quantized_lora = training == "lora" and quant is not None
    if prepare_kbit and not quantized_lora:
        raise ValueError("prepare_kbit=True is for LoRA on a quantized model: pass training='qlora' too.")
    prepared = quantized_lora if prepare_kbit is None else bool(prepare_kbit)
    checkpointing = prepared if gradient_checkpointing is None else bool(gradient_checkpointing)
    if context is not None:
        check_int("context", context, 1)
    check_bytes("gpu_bytes", gpu_bytes)
    check_int("gpus", gpus, 1)
    if gpus > 1 and (gpu_bytes is None or str(device_map).lower() not in AUTO_MAPS):
        raise ValueError("gpus= is how many GPUs device_map='auto' spreads over: pass gpu_bytes= (each) too.")
    if gpus > 1 and training is not None:
        raise ValueError("Training spread over several GPUs is not estimated: plan for one (e.g. --gpu t4).")
    if gpu_bytes is not None and str(device_map).lower() not in AUTO_MAPS:
        raise ValueError(
            "gpu_bytes= is the GPU's share of the weights under device_map='auto': pass both, or neither."
        )
    return Options(
        dtype=dtype_name,
        quantization=quant,
        double_quant=double_quant,
        device_map=_check_device_map(device_map),
        gpu_bytes=gpu_bytes,
        context=context,
        training=training,
        batch_size=batch_size,
        gradient_checkpointing=checkpointing,
        lora_r=lora_r,
        lora_targets=targets,
        optimizer=optimizer_name,
        prepare_kbit=prepared,
        gpus=gpus,
    )


def _check_lora_targets(targets: object) -> str | tuple[str, ...]:
    """``attention``, ``all-linear`` or module names (a list or tuple of strings)."""
    if isinstance(targets, str):
        if targets.lower() in LORA_TARGETS:
            return targets.lower()
        return (targets,)
    if isinstance(targets, list | tuple) and targets and all(isinstance(t, str) and t for t in targets):
        return tuple(targets)
    raise ValueError(
        f"lora_targets {targets!r} is not 'attention', 'all-linear' or a list of module names "
        "(e.g. ['q_proj', 'v_proj'])."
    )


def _check_device_map(device_map: str | int | None) -> str | None:
    """None, ``cuda`` (or ``cuda:N`` / a GPU index), an auto map, or ``cpu``."""
    if device_map is None:
        return None
    if isinstance(device_map, int) and not isinstance(device_map, bool) and device_map >= 0:
        return "cuda"
    text = str(device_map).lower()
    if text in GPU_MAPS or re.fullmatch(r"cuda:\d+", text):
        return "cuda"
    if text in AUTO_MAPS or text == "cpu":
        return text
    raise ValueError(
        f"device_map {device_map!r} is not one of 'cuda' (or 'cuda:N', a GPU index), 'auto', 'balanced', "
        "'sequential' or 'cpu'; for a dict device_map, estimate with device_map='auto' and gpu_bytes=."
    )


def check_int(label: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{label} must be a whole number of at least {minimum}, not {value!r}.")


def check_bytes(label: str, value: object) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ValueError(f"{label} must be a number of bytes (an int, 0 or more) or None, not {value!r}.")
