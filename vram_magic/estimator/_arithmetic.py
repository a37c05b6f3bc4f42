"""Pricing a census: the weights at a dtype and quantization, where they are placed, the peak while loading,
and a KV cache and prompt for a context or a training step on top. Each step returns its figures with the
notes (``Note`` data, worded by ``vram_magic.render``) that say how they were reached."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from vram_magic._hf import AUTO_MAPS
from vram_magic._types import Estimate, Note, facts
from vram_magic.estimator._configs import DTYPE_BYTES, pick_dtype, prequantized
from vram_magic.estimator._counting import (
    Census,
    Described,
    built,
    counted,
    described,
    gpu_split,
    offload_split,
)
from vram_magic.estimator._options import OPTIMIZERS, Options

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from vram_magic.estimator._configs import Located

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
_TRAIN_SEQ = 512


@dataclass(frozen=True)
class _Weights:
    """The weights at the load's dtype and quantization: all of them, what transformers' warm-up reserves,
    and the largest quantized weight (elements)."""

    total_bytes: int
    warmup_bytes: int
    largest_quantized: int
    notes: tuple[Note, ...]


@dataclass(frozen=True)
class _Shape:
    """The sizes the activations scale with (``vocab`` 0 for a model without an output layer)."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    width: int  # bytes per element at the load's dtype


@dataclass(frozen=True)
class _Run:
    """What running (a prompt, or a training step) adds to the weights on the GPU."""

    run_bytes: int | None = None
    kv_cache_bytes: int | None = None
    activations_bytes: int | None = None
    training_bytes: int | None = None
    trainable_params: int | None = None
    notes: tuple[Note, ...] = ()
    parts: tuple[tuple[str, int], ...] = ()


def price(located: Located, opts: Options) -> Estimate:
    """The estimate of loading the model ``located`` found with ``opts``."""
    config = described(located)
    dtype_name, dtype_note = pick_dtype(opts.dtype, config, located.folder, opts.quantization)
    census = counted(located, dtype_name)
    width = DTYPE_BYTES[dtype_name]
    quantization, saved_notes = _saved_quantization(config, opts.quantization)
    saved_as = prequantized(config)
    weights = _weights(census, quantization, opts.double_quant, dtype_name)
    if saved_as is not None and saved_as[0] != "bitsandbytes":  # its own layout note says how it is sized
        weights = replace(weights, notes=())

    def meta_model() -> Any:  # built only to place an offload that does not fit: it is never on disk
        return built(located.config(), dtype_name)[1]

    # A checkpoint saved quantized loads its quantized weights as they are: nothing is converted on the GPU.
    converted = None if saved_as is not None else quantization
    if opts.gpus > 1 and opts.gpu_bytes is not None:
        on_gpu, offloaded, placed, busiest = _spread(located, dtype_name, quantization, weights, opts)
        warmup = weights.warmup_bytes * busiest // max(on_gpu, 1)
        load_peak, loading = _load_peak(busiest, warmup, weights.largest_quantized * width, converted)
    else:
        on_gpu, offloaded, placed = _place(
            census, meta_model, weights.total_bytes, quantization, opts.device_map, opts.gpu_bytes
        )
        load_peak, loading = _load_peak(
            on_gpu, weights.warmup_bytes, weights.largest_quantized * width, converted
        )
    text = config.get_text_config()
    shape = _shape(text, census, width)
    run = _Run()
    if opts.training is not None:
        run = _training(census, shape, opts, opts.training, on_gpu, offloaded)
    elif opts.context is not None and on_gpu:
        run = _inference(text, census, shape, opts.context, opts.batch_size, on_gpu, offloaded)
    return Estimate(
        model=located.name,
        model_class=census.model_class,
        params=census.params,
        dtype=dtype_name,
        quantization=quantization,
        device_map=opts.device_map,
        weights_bytes=on_gpu,
        offloaded_bytes=offloaded,
        load_peak_bytes=load_peak,
        peak_bytes=load_peak if run.run_bytes is None else max(load_peak, run.run_bytes),
        kv_cache_bytes=run.kv_cache_bytes,
        activations_bytes=run.activations_bytes,
        training_bytes=run.training_bytes,
        trainable_params=run.trainable_params,
        context=opts.context,
        batch_size=opts.batch_size,
        training=opts.training,
        notes=(located.source, dtype_note, *saved_notes, *weights.notes, *placed, *loading, *run.notes),
        parts=run.parts,
    )


def _saved_quantization(
    config: PretrainedConfig | Described, asked: str | None
) -> tuple[str | None, tuple[Note, ...]]:
    """The quantization that loads: a checkpoint saved quantized loads its own, whatever was asked."""
    saved_as = prequantized(config)
    if saved_as is None:
        return asked, ()
    method, bits = saved_as
    notes = []
    if asked not in (None, bits):
        notes.append(Note("prequantized", facts(method=method, asked=asked)))
    if method != "bitsandbytes":
        notes.append(Note("prequantized-layout", facts(method=method, bits=bits)))
    return bits, tuple(notes)


def _weights(census: Census, quantization: str | None, double_quant: bool, dtype_name: str) -> _Weights:
    total = census.param_bytes + census.buffer_bytes
    largest = max((numel for numel, _ in census.quantized), default=0)
    if quantization is None:
        return _Weights(total, total, largest, ())
    numel = sum(n for n, _ in census.quantized)
    converted = _quantized_bytes(census.quantized, quantization, double_quant) - census.quantized_bytes
    warmup = total + int(numel * _QUANT_WARMUP_BYTES[quantization]) - census.quantized_bytes
    note = Note(
        "quantization",
        facts(
            quantization=quantization,
            double_quant=double_quant,
            weights=len(census.quantized),
            dtype=dtype_name,
        ),
    )
    return _Weights(total + converted, warmup, largest, (note,))


def _place(
    census: Census,
    meta_model: Callable[[], Any],
    total: int,
    quantization: str | None,
    device_map: str | None,
    gpu_bytes: int | None,
) -> tuple[int, int, tuple[Note, ...]]:
    """(bytes of weights on the GPU, bytes in CPU RAM, notes) for ``device_map``."""
    if device_map == "cpu":
        return 0, total, (Note("on-cpu"),)
    if device_map not in AUTO_MAPS:
        return total, 0, ()
    if gpu_bytes is None:
        return total, 0, (Note("auto-unsized"),)
    if quantization is not None:
        if total > gpu_bytes * 0.9:  # transformers gives bitsandbytes 90% of max_memory
            return total, 0, (Note("auto-quantized", facts(gpu_bytes=gpu_bytes)),)
        return total, 0, ()
    if total <= gpu_bytes:
        return total, 0, ()
    on_gpu = offload_split(meta_model(), gpu_bytes)
    note = Note("offload", facts(gpu_bytes=gpu_bytes, on_gpu_bytes=on_gpu, cpu_bytes=total - on_gpu))
    return on_gpu, total - on_gpu, (note,)


def _spread(
    located: Located, dtype_name: str, quantization: str | None, weights: _Weights, opts: Options
) -> tuple[int, int, tuple[Note, ...], int]:
    """``device_map="auto"`` over ``opts.gpus`` GPUs of ``opts.gpu_bytes``, placed as transformers places it:
    (bytes on the GPUs, bytes left for CPU RAM, notes, bytes on the busiest GPU)."""
    assert opts.gpu_bytes is not None
    shares, elsewhere = gpu_split(located.config(), dtype_name, quantization, (opts.gpu_bytes,) * opts.gpus)
    planned = sum(shares) + elsewhere
    scale = weights.total_bytes / planned if planned else 1.0  # transformers' sizes, in ours
    per_gpu = tuple(round(share * scale) for share in shares)
    on_gpus = sum(per_gpu)
    offloaded = max(weights.total_bytes - on_gpus, 0)
    note = Note(
        "gpu-split",
        facts(gpus=opts.gpus, gpu_bytes=opts.gpu_bytes, per_gpu_bytes=per_gpu, cpu_bytes=offloaded),
    )
    return on_gpus, offloaded, (note,), max(per_gpu, default=0)


def _load_peak(
    on_gpu: int, warmup: int, largest_bytes: int, quantization: str | None
) -> tuple[int, tuple[Note, ...]]:
    """The most the GPU holds while loading, and how; ``largest_bytes`` is the largest quantized weight in
    16-bit."""
    if on_gpu == 0:
        return 0, ()
    if quantization is None:
        return on_gpu, (Note("load-warmup"),)
    factor = _CONVERT_FACTOR[quantization]
    converting = factor * largest_bytes
    note = Note("load-quantizing", facts(converting_bytes=converting, factor=factor))
    return max(warmup, on_gpu + converting), (note,)


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


def _shape(text: Any, census: Census, width: int) -> _Shape:
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    return _Shape(
        hidden=hidden,
        intermediate=int(getattr(text, "intermediate_size", 0) or getattr(text, "n_inner", 0) or 4 * hidden),
        layers=int(getattr(text, "num_hidden_layers", 0) or 0),
        vocab=int(getattr(text, "vocab_size", 0) or 0) if census.has_lm_head else 0,
        width=width,
    )


def _training(
    census: Census, shape: _Shape, opts: Options, training: str, on_gpu: int, offloaded: int
) -> _Run:
    """A training step (``training``: lora or full): the trainable weights, their gradients and optimizer
    states, peft's float32 casts when prepared for k-bit training, and the activations and logits."""
    seq = opts.context if opts.context is not None else _TRAIN_SEQ
    notes = []
    if opts.context is None:
        notes.append(Note("train-sequence", facts(tokens=_TRAIN_SEQ)))
    states, state_width = OPTIMIZERS[opts.optimizer]
    parts: list[tuple[str, int]] = [("weights", on_gpu)]
    if training == "full":  # the weights train in their own dtype, and so do the optimizer's states
        trainable, width = census.params, shape.width
        notes.append(Note("full-training", facts(width=width)))
    else:  # peft keeps the adapters in float32 whatever the base's dtype
        trainable, width = _lora_params(census, opts), 4
        parts.append(("adapters", trainable * width))
        notes.append(Note("lora", facts(r=opts.lora_r, targets=_targets_label(opts), params=trainable)))
    per_param = states * (state_width or width)
    parts += [("gradients", trainable * width), ("optimizer", trainable * per_param)]
    notes.append(Note("optimizer", facts(name=opts.optimizer, bytes_per_param=per_param)))
    if opts.prepare_kbit and shape.width < 4:
        kept = census.params - sum(elements for elements, _ in census.quantized)
        parts.append(("float32-casts", kept * (4 - shape.width)))
        notes.append(Note("kbit-casts", facts(params=kept)))
    layers, logits, activations_note = _training_activations(census, shape, opts, training, seq)
    parts += [("activations", layers), ("logits", logits)]
    notes.append(activations_note)
    if offloaded:
        notes.append(Note("train-offloaded"))
    training_bytes = sum(size for key, size in parts if key not in ("weights", "activations", "logits"))
    return _Run(
        run_bytes=sum(size for _, size in parts),
        activations_bytes=layers + logits,
        training_bytes=training_bytes,
        trainable_params=trainable,
        notes=tuple(notes),
        parts=tuple(parts),
    )


def _lora_params(census: Census, opts: Options) -> int:
    """What LoRA adds at rank ``opts.lora_r`` on the targeted Linear layers: r x (rows + columns) each."""
    targets = opts.lora_targets
    size = sum(
        total
        for leaf, attention, total in census.linear_leaves
        if targets == "all-linear" or (attention if targets == "attention" else leaf in targets)
    )
    return opts.lora_r * size


def _targets_label(opts: Options) -> str:
    targets = opts.lora_targets
    return targets if isinstance(targets, str) else ", ".join(targets)


def _training_activations(
    census: Census, shape: _Shape, opts: Options, training: str, seq: int
) -> tuple[int, int, Note]:
    """Bytes of activations at the peak of a training step on sequences of ``seq`` tokens: the layers',
    the logits' and loss's, and how."""
    hidden, width = shape.hidden, shape.width
    per_hidden, per_mlp = _ACTIVATIONS[("gated" if census.gated_mlp else "plain", training)]
    tokens = seq * opts.batch_size
    layer = (per_hidden * hidden + per_mlp * shape.intermediate) * width // 2 * tokens
    logits = _LOGITS_PER_VOCAB * shape.vocab * tokens
    counted = facts(batch_size=opts.batch_size, tokens=seq, logits_per_vocab=_LOGITS_PER_VOCAB)
    if opts.gradient_checkpointing:  # each layer's input, then one layer recomputed at a time (after the
        # logits' peak)
        kept = shape.layers * _CHECKPOINTED_PER_HIDDEN * hidden * width // 2 * tokens
        note = Note("activations", counted + facts(checkpointed_per_hidden=_CHECKPOINTED_PER_HIDDEN))
        # The peak is at the logits or at one recomputed layer, whichever is bigger: the layer counts only
        # beyond the logits.
        return kept + max(layer - logits, 0), logits, note
    note = Note("activations", counted + facts(per_hidden=per_hidden, per_mlp=per_mlp))
    return shape.layers * layer, logits, note


def _inference(
    text: Any, census: Census, shape: _Shape, context: int, batch_size: int, on_gpu: int, offloaded: int
) -> _Run:
    """Running a prompt of ``context`` tokens: the KV cache, one layer's working memory and the logits."""
    width = shape.width
    kv = _kv_cache_bytes(text, census, context, batch_size, width)
    per_token = (_PREFILL[0] * shape.hidden + _PREFILL[1] * shape.intermediate) * width // 2
    activations = per_token * context * batch_size
    if census.can_generate:
        activations += shape.vocab * batch_size * (width + 4)  # the last token's logits, and a float32 copy
    elif shape.vocab:
        activations += shape.vocab * context * batch_size * width  # an encoder's head scores every token
    if census.can_generate:
        sliding = "sliding_attention" in _layer_types(text)
        kv_note = Note(
            "kv-cache",
            facts(batch_size=batch_size, context=context, width=width, kv_bytes=kv, sliding=sliding),
        )
    else:
        kv_note = Note("no-kv-cache")
    prompt = Note("prompt", facts(per_hidden=(_PREFILL[0] * width) // 2, per_mlp=(_PREFILL[1] * width) // 2))
    notes = [kv_note, prompt]
    run = on_gpu + kv + activations
    if offloaded:
        run += census.largest_layer_bytes
        notes.append(Note("offload-layer", facts(layer_bytes=census.largest_layer_bytes)))
    return _Run(run_bytes=run, kv_cache_bytes=kv, activations_bytes=activations, notes=tuple(notes))


def _layer_types(text: Any) -> list[str]:
    """Each layer's attention, "sliding_attention" or "full_attention", as the config names them; a config of
    transformers 4 names none, and its Gemma 2 alternates, sliding first."""
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    named = getattr(text, "layer_types", None)
    if named:
        return list(named)
    if getattr(text, "model_type", None) == "gemma2" and getattr(text, "sliding_window", None):
        return ["full_attention" if i % 2 else "sliding_attention" for i in range(layers)]
    return ["full_attention"] * layers


def _kv_cache_bytes(text: Any, census: Census, context: int, batch_size: int, width: int) -> int:
    """2 (keys, values) x layers x KV heads x head size x tokens x batch x bytes; sliding-window layers keep
    at most their window."""
    if not census.can_generate:
        return 0
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(text, "num_key_value_heads", 0) or heads)
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    head_dim = int(getattr(text, "head_dim", 0) or (hidden // heads if heads else 0))
    window = getattr(text, "sliding_window", None)
    kinds = _layer_types(text)
    tokens = sum(
        min(context, int(window)) if kind == "sliding_attention" and window else context for kind in kinds
    )
    return 2 * kv_heads * head_dim * tokens * batch_size * width
