"""What vram_magic writes and reads of the Hugging Face loading API, said once: the dtype spellings, the
``device_map`` strategies that spread a model (accelerate's), and the ``BitsAndBytesConfig`` the fixes, the
seed advice and the estimator's plans write."""

from __future__ import annotations

# The spellings of the dtypes a load is estimated in (torch.<name> too), by the dtype's name.
DTYPES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}

# device_map values that let accelerate spread the model over the GPUs (and CPU RAM, and disk).
AUTO_MAPS = frozenset({"auto", "balanced", "balanced_low_0", "sequential"})


def bitsandbytes_config(bits: int, compute: str = "torch.bfloat16", *, offload: bool = False) -> str:
    """The ``BitsAndBytesConfig(...)`` code vram_magic writes: 8-bit (LLM.int8), or 4-bit NF4 with double
    quantization, as QLoRA does, computing in ``compute`` (code: ``torch.float16``, or a dtype variable of
    the cell's); ``offload`` lets accelerate keep layers that do not fit on the CPU, in float32."""
    extra = ", llm_int8_enable_fp32_cpu_offload=True" if offload else ""
    if bits == 8:
        return f"BitsAndBytesConfig(load_in_8bit=True{extra})"
    return (
        'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, '
        f"bnb_4bit_compute_dtype={compute}{extra})"
    )
