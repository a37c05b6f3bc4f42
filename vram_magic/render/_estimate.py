"""Estimates and load plans as a text table (``%vram estimate``, ``str(estimate)``), their labels, and the
words of their notes (the estimator hands in a key and figures; every sentence is here)."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterable
from typing import Any

from vram_magic._types import Estimate, LoadPlan, Note
from vram_magic._units import format_bytes


def render_estimate_table(rows: Iterable[Estimate | LoadPlan]) -> str:
    """Estimates or plans as a plain text table, then their notes (each once)."""
    items = list(rows)
    if not items:
        return "No estimates."
    estimates = [item.estimate if isinstance(item, LoadPlan) else item for item in items]
    models = list(dict.fromkeys(found.model for found in estimates))
    columns: list[tuple[str, list[str]]] = []
    if len(models) > 1:
        columns.append(("model", [found.model for found in estimates]))
    columns.append(("plan", [item.label for item in items]))
    columns.append(("weights on GPU", [format_bytes(found.weights_bytes) for found in estimates]))
    if any(found.offloaded_bytes for found in estimates):
        columns.append(("in CPU RAM", [_maybe_bytes(found.offloaded_bytes or None) for found in estimates]))
    if any(found.kv_cache_bytes for found in estimates):
        columns.append(("KV cache", [_maybe_bytes(found.kv_cache_bytes) for found in estimates]))
    if any(found.activations_bytes for found in estimates):
        columns.append(("activations", [_maybe_bytes(found.activations_bytes) for found in estimates]))
    if any(found.training_bytes for found in estimates):
        columns.append(("grads+optimizer", [_maybe_bytes(found.training_bytes) for found in estimates]))
    columns.append(("peak needed", [format_bytes(found.peak_bytes) for found in estimates]))
    if any(isinstance(item, LoadPlan) for item in items):
        columns.append(
            ("room", [_maybe_bytes(item.room_bytes) if isinstance(item, LoadPlan) else "" for item in items])
        )
        columns.append(("fits", [_fits_word(item) for item in items]))
    widths = [max(len(title), *(len(cell) for cell in cells)) for title, cells in columns]
    lines = []
    if len(models) == 1:
        first = estimates[0]
        lines.append(f"{first.model} ({_count(first.params)} parameters, {first.model_class})")
    lines.append(
        "  "
        + "  ".join(title.ljust(width) for (title, _), width in zip(columns, widths, strict=True)).rstrip()
    )
    for index in range(len(items)):
        row = [cells[index].ljust(width) for (_, cells), width in zip(columns, widths, strict=True)]
        lines.append("  " + "  ".join(row).rstrip())
    labels = [item.label for item in items]
    notes: dict[str, list[str]] = {}  # each note once (as worded), with the rows it belongs to
    for label, found in zip(labels, estimates, strict=True):
        for note in found.notes:
            notes.setdefault(note_text(note), []).append(label)
    if notes:
        lines.append("How this was estimated:")
    for text, owners in notes.items():
        prefix = "" if len(items) == 1 or len(owners) == len(items) else f"{', '.join(owners)}: "
        lines.extend(textwrap.wrap(prefix + text, 88, initial_indent="  - ", subsequent_indent="    "))
    return "\n".join(lines)


def estimate_label(found: Estimate) -> str:
    """``bfloat16``, ``8-bit``, ``4-bit NF4``; ``+ offload`` when some weights go to CPU RAM."""
    text = _QUANTIZED.get(found.quantization or "", found.dtype)
    return f"{text} + offload" if found.offloaded_bytes else text


def plan_label(plan: LoadPlan) -> str:
    """The row's name: its dtype (``bfloat16``), ``8-bit``, ``4-bit NF4`` or ``offload``."""
    return {**_QUANTIZED, "offload": "offload"}.get(plan.key, plan.estimate.dtype)


_QUANTIZED = {"8bit": "8-bit", "4bit": "4-bit NF4"}


def note_text(note: Note) -> str:
    """A note of an estimate in plain words (its key, for a key this version does not know)."""
    word = _NOTES.get(note.key)
    return note.key if word is None else word(dict(note.facts))


def _source(f: dict[str, Any]) -> str:
    if f["origin"] == "path":
        return f"Config: {f['path']}."
    if f["origin"] == "bundled":
        same = f", the same architecture as {f['stands_for']}" if f["stands_for"] else ""
        return (
            f"Config: vram_magic's bundled copy of {f['repo_id']}'s config.json{same} (nothing downloaded)."
        )
    return {
        "object": "Config: the config object given.",
        "cache": "Config: the Hugging Face cache (nothing downloaded).",
        "hub": "Config: downloaded from the Hugging Face Hub.",
    }[f["origin"]]


def _dtype(f: dict[str, Any]) -> str:
    dtype = f["dtype"]
    return {
        "asked": f"dtype {dtype}, as asked.",
        "transformers-4": (
            f"dtype {dtype}: from_pretrained without dtype= loads float32 before transformers 5."
        ),
        "transformers-4-quantized": (
            f"dtype {dtype}: a quantized from_pretrained without dtype= loads {dtype} before transformers 5."
        ),
        "config": f"dtype {dtype}, from the config (what from_pretrained loads when given no dtype).",
        "weights": f"dtype {dtype}, from the checkpoint's weights (the config names none).",
        "assumed": (
            f"dtype {dtype} assumed: the config names none, so from_pretrained loads the checkpoint's own "
            "dtype, float32 for the models saved without one (pass dtype=torch.bfloat16 to halve it)."
        ),
    }[f["origin"]]


def _quantization(f: dict[str, Any]) -> str:
    if f["quantization"] == "8bit":
        what, how = "8-bit", "1 byte per weight plus a float32 scale per row"
    elif f["double_quant"]:
        what, how = "4-bit NF4 with double quantization", "half a byte per weight plus an 8-bit scale per 64"
    else:
        what, how = "4-bit NF4", "half a byte per weight plus a float32 scale per 64"
    return (
        f"bitsandbytes {what}: the {f['weights']} Linear weights take {how}; embeddings, the output "
        f"layer, norms and biases stay in {f['dtype']} (as transformers leaves them)."
    )


def _full_training(f: dict[str, Any]) -> str:
    precision = "float32" if f["width"] == 4 else "its own 16-bit dtype"
    return (
        f"Full fine-tuning: every weight trains in {precision}, with a gradient and the optimizer's states "
        "in that dtype too (as Trainer does with a model loaded so; DeepSpeed or FSDP mixed precision keeps "
        "a float32 master copy and needs more)."
    )


def _lora_targets(targets: str) -> str:
    if targets == "attention":
        return "the attention projections"
    if targets == "all-linear":
        return "every linear layer but the output layer"
    return targets


def _optimizer(f: dict[str, Any]) -> str:
    return f"Optimizer {f['name']}: {f['bytes_per_param']} bytes of state per trainable parameter."


def _activations(f: dict[str, Any]) -> str:
    if "checkpointed_per_hidden" in f:
        per_layer = f["checkpointed_per_hidden"]
        kept = f"{per_layer}*hidden per layer (gradient checkpointing) plus one layer recomputed"
    else:
        kept = f"{f['per_hidden']}*hidden + {f['per_mlp']}*intermediate per layer"
    return (
        f"Activations for {f['batch_size']} x {f['tokens']} tokens: {kept}, in 16-bit bytes per token, plus "
        f"{f['logits_per_vocab']}*vocab for the logits and loss (measured on CPU from transformers' models "
        "with SDPA attention, after Korthikanti et al. 2022). Not yet calibrated on a GPU: one QLoRA Trainer "
        "step of a 0.85 B Llama in bfloat16 (batch 2 x 512, no checkpointing) peaked at 3.59 GiB on an H100 "
        "where this estimate says 2.46 GiB, so read it as a lower bound; the CUDA context and allocator "
        "fragmentation are not counted."
    )


def _kv_cache(f: dict[str, Any]) -> str:
    window = " (sliding-window layers keep at most their window)" if f["sliding"] else ""
    return (
        f"KV cache for {f['batch_size']} x {f['context']} tokens: 2 x layers x KV heads x head size x tokens "
        f"x {f['width']} bytes = {format_bytes(f['kv_bytes'])}{window}."
    )


_NOTES: dict[str, Callable[[dict[str, Any]], str]] = {
    "source": _source,
    "dtype": _dtype,
    "prequantized": lambda f: (
        f"The checkpoint is saved quantized ({f['method']}): its own quantization loads, not {f['asked']}."
    ),
    "prequantized-layout": lambda f: (
        f"Saved quantized with {f['method']} ({f['bits']}): its weights are sized as bitsandbytes' "
        f"{f['bits']} layout (within a few percent: a scale per group of weights)."
    ),
    "quantization": _quantization,
    "on-cpu": lambda f: "device_map='cpu': nothing goes to the GPU.",
    "gpu-split": lambda f: (
        f'device_map="auto" over {f["gpus"]} GPUs of {format_bytes(f["gpu_bytes"])} each, placed as '
        "transformers places it (balanced, whole layers): "
        + " + ".join(format_bytes(share) for share in f["per_gpu_bytes"])
        + (f", and {format_bytes(f['cpu_bytes'])} that fits on none (CPU RAM)." if f["cpu_bytes"] else ".")
    ),
    "auto-unsized": lambda f: (
        "device_map='auto' puts on the GPU what fits in 90% of its free memory and the rest in CPU RAM: "
        "this counts it all on the GPU; pass gpu_bytes= (or use load_plans()) for the split."
    ),
    "auto-quantized": lambda f: (
        f"With {format_bytes(f['gpu_bytes'])} for weights, device_map='auto' would put layers on the CPU, "
        "which bitsandbytes refuses ('Some modules are dispatched on the CPU or the disk') unless "
        "llm_int8_enable_fp32_cpu_offload=True: counted all on the GPU."
    ),
    "offload": lambda f: (
        f"device_map='auto' with {format_bytes(f['gpu_bytes'])} for weights (accelerate's own placement): "
        f"{format_bytes(f['on_gpu_bytes'])} on the GPU, {format_bytes(f['cpu_bytes'])} in CPU RAM; each "
        "forward pass brings the CPU layers through the GPU one at a time (slow)."
    ),
    "load-warmup": lambda f: (
        "Loading reserves the GPU's share in one allocation before copying (transformers' "
        "caching_allocator_warmup): all of it must be free at once."
    ),
    "load-quantizing": lambda f: (
        f"Loading quantizes one weight at a time on the GPU: peak = weights + "
        f"{format_bytes(f['converting_bytes'])} ({f['factor']}x the largest weight in 16-bit, calibrated on "
        "one H100 load)."
    ),
    "train-sequence": lambda f: (
        f"Training on sequences of {f['tokens']} tokens (pass context= for another length)."
    ),
    "full-training": _full_training,
    "lora": lambda f: (
        f"LoRA r={f['r']} on {_lora_targets(f['targets'])} ({_count(f['params'])} parameters), kept in "
        "float32 by peft, as their gradients (pass lora_targets= / --lora-targets for others)."
    ),
    "optimizer": _optimizer,
    "kbit-casts": lambda f: (
        f"prepare_model_for_kbit_training casts the {_count(f['params'])} parameters that stay unquantized "
        "(embeddings, output layer, norms) to float32, and turns gradient checkpointing on (pass "
        "prepare_kbit=False if the notebook does not call it)."
    ),
    "activations": _activations,
    "train-offloaded": lambda f: (
        "Training with layers offloaded to the CPU is not modelled: they are not counted."
    ),
    "kv-cache": _kv_cache,
    "no-kv-cache": lambda f: "No KV cache: this model does not generate.",
    "prompt": lambda f: (
        f"Running the prompt needs about {f['per_hidden']}*hidden + {f['per_mlp']}*intermediate bytes per "
        "token for one layer at a time (measured on CPU with SDPA attention; the CUDA context and cuBLAS "
        "workspaces are not counted)."
    ),
    "offload-layer": lambda f: (
        f"Running adds room for one offloaded layer ({format_bytes(f['layer_bytes'])}) brought to the GPU."
    ),
}


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def _maybe_bytes(n: int | None) -> str:
    return "" if n is None else format_bytes(n)


def _fits_word(item: Estimate | LoadPlan) -> str:
    if not isinstance(item, LoadPlan) or item.fits is None:
        return "?" if isinstance(item, LoadPlan) else ""
    return "yes" if item.fits else "no"


_PART_WORDS = {
    "weights": "weights on the GPU",
    "adapters": "LoRA adapters (float32)",
    "gradients": "gradients",
    "optimizer": "optimizer states",
    "float32-casts": "float32 casts (prepare_model_for_kbit_training)",
    "activations": "activations",
    "logits": "logits and loss",
}


def render_training(found: Estimate, plan: str, fit: str | None = None) -> str:
    """A training step's parts for ``plan`` and the largest batch and context that fit (``fit``: only the
    one asked, "batch" or "context")."""
    batch = f"batch {found.batch_size}"
    seq = f"sequences of {found.context} tokens" if found.context is not None else "512-token sequences"
    lines = []
    if fit is None:
        lines.append(f"A training step, {plan}, {batch} of {seq}:")
        words = [(_PART_WORDS.get(key, key), size) for key, size in found.parts]
        width = max(len(word) for word, _ in words)
        lines += [f"  {word:<{width}}  {format_bytes(size):>10}" for word, size in words]
        lines.append(f"  {'peak':<{width}}  {format_bytes(found.peak_bytes):>10}")
    if found.max_batch_size is not None and fit in (None, "batch"):
        largest = found.max_batch_size
        lines.append(
            f"Largest batch that fits ({plan}, {seq}): {largest}."
            if largest
            else f"No batch fits ({plan}, {seq}): not even 1."
        )
    if found.max_context is not None and fit in (None, "context"):
        longest = found.max_context
        lines.append(
            f"Longest sequence that fits ({plan}, {batch}): {longest} tokens."
            if longest
            else f"No sequence fits ({plan}, {batch})."
        )
    if fit is not None and len(lines) == 0:
        lines.append("No room is known here to fit in: pass --gpu (e.g. --gpu t4).")
    return "\n".join(lines)
