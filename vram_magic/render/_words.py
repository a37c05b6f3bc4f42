"""The wording of causes and fixes: every sentence a report says about them is written here, from their data.

Causes and fixes carry a key and their figures (``vram_magic._types``); the text and HTML views and the widget
all read their words from these functions, so a report reads the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from vram_magic._types import Cause, CellKind, Fix, Holder, OOMKind, Report
from vram_magic._units import format_bytes

OOM_HEADS: dict[OOMKind, str] = {
    "cuda": "CUDA out of memory",
    "hip": "ROCm (HIP) out of memory",
    "xpu": "Intel XPU out of memory",
    "mps": "Apple MPS out of memory",
    "cpu": "CPU RAM out of memory",
    "dispatch": "Not enough GPU memory (modules would be dispatched to CPU or disk)",
}

# "Failed at line 3 of a model load cell"
CELL_WORDS: dict[CellKind, str] = {
    "load": "a model load",
    "merge": "a LoRA merge",
    "training": "a training step",
    "generation": "generation",
    "other": "this cell",
}

# "The model load asked for 1.59 GiB more"
_STEP_WORDS: dict[CellKind, str] = {
    "load": "the model load",
    "merge": "the LoRA merge",
    "training": "the training step",
    "generation": "generation",
    "other": "the cell",
}

_QUANTIZED = {"8bit": "8-bit", "4bit": "4-bit (NF4)"}


def summary_line(report: Report) -> str:
    """One line: what ran out, where, the figures that matter, and what was freed (for a load preflight
    stopped: what it would need against the room)."""
    if report.preflight is not None:
        found = report.preflight
        where = (
            "this process can still use on this GPU"
            if found.on_gpu
            else "under the cap planned for (no GPU here)"
        )
        if found.kind == "training":
            return (
                f"Not run: the first training steps would need at least {format_bytes(found.need_bytes)}, "
                f"more than the {format_bytes(found.room_bytes)} {where}."
            )
        return (
            f"Not run: the model load would need about {format_bytes(found.need_bytes)} at its peak, "
            f"more than the {format_bytes(found.room_bytes)} {where}."
        )
    oom = report.oom
    head = OOM_HEADS[oom.kind] if oom else "Out of memory"
    text = f"{head} in {CELL_WORDS[report.analysis.kind]}"
    figures: list[str] = []
    if oom is not None:
        free = oom.room_bytes()
        if oom.requested_bytes is not None:
            figures.append(f"asked for {format_bytes(oom.requested_bytes)}")
            if free is not None:
                figures.append(f"with {format_bytes(free)} free")
        elif free is not None:
            figures.append(f"{format_bytes(free)} free")
        if oom.allowed_bytes is not None:
            figures.append(f"under a {format_bytes(oom.allowed_bytes)} cap")
    if figures:
        text += ": " + " ".join(figures)
    freed = report.cleanup.best_bytes
    if freed > 0:
        text += f"; freed {format_bytes(freed)}"
    return text + "."


# --- causes ------------------------------------------------------------------------------------------------


def cause_text(cause: Cause) -> str:
    """A cause in one or two sentences, its figures in binary units and its names as `code`."""
    return _CAUSES[cause.key](dict(cause.facts))


def _too_big(f: dict[str, Any]) -> str:
    whole = (
        f"this machine's RAM ({format_bytes(f['limit'])})"
        if f["in_ram"]
        else f"this process may use at all ({format_bytes(f['limit'])})"
    )
    return (
        f"{_capitalized(_STEP_WORDS[f['kind']])} asked for {format_bytes(f['requested'])} in one allocation, "
        f"more than {whole}: freeing memory will not help; what the cell runs has to change."
    )


def _need(f: dict[str, Any]) -> str:
    text = f"{_capitalized(_STEP_WORDS[f['kind']])} asked for {format_bytes(f['requested'])} more"
    if f.get("room") is not None:
        text += f"; only {format_bytes(f['room'])} was left to this process"
    elif f.get("free") is not None:
        text += f"; the GPU had {format_bytes(f['free'])} free"
    return text + "."


def holder_size(holder: Holder) -> str:
    """A holder's size as a table shows it: "at least" where the walk stopped before the end."""
    if holder.complete:
        return format_bytes(holder.total_bytes)
    return f"≥ {format_bytes(holder.total_bytes)}" if holder.total_bytes else "not counted"


def holders_footnote(holders: Sequence[Holder]) -> str | None:
    """Why a name's size is a lower bound, when the walk stopped early for some name."""
    unfinished = [h.name for h in holders if not h.complete]
    if not unfinished:
        return None
    return (
        f"{join_names(unfinished)} {'holds' if len(unfinished) == 1 else 'hold'} too many objects to look "
        "through quickly: the walk stopped early, so any memory further in is not counted."
    )


def _holder(f: dict[str, Any]) -> str:
    name, kind, size = f["name"], f["type_name"], format_bytes(f["total_bytes"])
    if f["rebound"]:
        text = (
            f"`{name}` ({kind}) from an earlier run still holds {size}: this cell re-binds `{name}`, but the "
            "old object stays in memory until the new one is complete."
        )
    else:
        text = f"`{name}` ({kind}) from an earlier cell still holds {size}, and this cell does not use it."
    if f["staying"]:
        text += f" Some of it is shared with {join_names(f['staying'])}, which stays."
    return text


def _other_process(f: dict[str, Any]) -> str:
    if f.get("pid") is None:
        return (
            f"Other processes seem to hold about {format_bytes(f['used_bytes'])} "
            "(total - free - this process; NVML cannot name them here)."
        )
    return f"Process {f['pid']} holds {format_bytes(f['used_bytes'])} on this GPU (another program)."


def _estimate_cause(f: dict[str, Any]) -> str:
    found = f["estimate"]
    return (
        f"Loading {found.model} ({found.label}) needs about {format_bytes(found.peak_bytes)} at its peak: "
        f"{format_bytes(found.weights_bytes)} of weights, reserved in one allocation while loading. "
        "Run it anyway with `%%oomsafe --force`."
    )


_TRAINING_PARTS = {
    "weights": "the weights to move to the GPU",
    "optimizer": "the optimizer's states",
    "gradients": "the gradients",
    "activations": "the activations",
    "logits": "the logits and loss",
}


def _training_cause(f: dict[str, Any]) -> str:
    parts = ", ".join(f"{_TRAINING_PARTS[key]} {format_bytes(size)}" for key, size in f["parts"])
    checkpointing = "with" if f["checkpointing"] else "without"
    return (
        f"Training `{f['model']}` on batches of {f['batch_size']} sequences of at least {f['sequence']} "
        f"tokens (the shortest the first batch can be), {checkpointing} gradient checkpointing, optimizer "
        f"{f['optimizer']}: estimated at {format_bytes(f['estimate_bytes'])} ({parts}). Preflight counts "
        f"only what a step surely holds at once, {format_bytes(f['need_bytes'])}, and even that does not "
        "fit. Run it anyway with `%%oomsafe --force`."
    )


_CAUSES: dict[str, Callable[[dict[str, Any]], str]] = {
    "dispatch": lambda f: (
        "The quantized model does not fit on the GPU: some modules would have to go to the CPU or disk, "
        "which bitsandbytes refuses unless told to."
    ),
    "too-big": _too_big,
    "need": _need,
    "cap": lambda f: (
        f"A per-process cap of {format_bytes(f['cap'])} is set (torch.cuda.set_per_process_memory_fraction): "
        "it is the limit here, not the GPU's size."
    ),
    "holder": _holder,
    "other-process": _other_process,
    "fragmentation": lambda f: (
        f"{format_bytes(f['unallocated'])} was reserved by PyTorch but unallocated, more than the "
        f"{format_bytes(f['requested'])} asked for: fragmentation. Set "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True and restart the kernel."
    ),
    "non-pytorch": lambda f: (
        f"This process holds {format_bytes(f['outside'])} outside PyTorch's allocator "
        "(CUDA context, cuBLAS workspaces, other libraries)."
    ),
    "idle-gpu": lambda f: (
        f"GPU {f['index']} is idle ({format_bytes(f['free_bytes'])} free) while GPU {f['failed']} ran out: "
        'a load with device_map="auto" (or max_memory per GPU) spreads the model over both.'
    ),
    "unknown": lambda f: f"{f['message'].rstrip('.')}. The message gives no figures to say more.",
    "estimate": _estimate_cause,
    "training-estimate": _training_cause,
}


# --- fixes -------------------------------------------------------------------------------------------------


def fix_title(fix: Fix) -> str:
    """What the fix does, with what it changes where the rewrite says (``Halve the batch (16 → 8) ...``)."""
    title = _TITLES[fix.key](fix)
    if fix.fact("fp16"):
        title += "; bf16=True becomes fp16=True (this GPU has no bfloat16)"
    return title


def fix_why(fix: Fix) -> str:
    """Why it helps, then what the checks found: to apply by hand, not expected to fit, too big for RAM."""
    parts = [_WHY[fix.key](fix)]
    if fix.key == "8bit":
        parts.append("LLM.int8 computes in float16; its outputs differ slightly from the 16-bit model's.")
    if fix.by_hand is not None:
        parts.append(f"(Apply it by hand: {fix.by_hand}.)")
    if fix.fits is False and fix.needed_bytes is not None:
        parts.append(f"Estimated not to fit: needs about {format_bytes(fix.needed_bytes)}.")
    elif fix.fits and fix.needed_bytes is not None:
        parts.append(f"Estimated to fit: needs about {format_bytes(fix.needed_bytes)}.")
    if fix.fact("disk_bytes") is not None:
        parts.append("Layers read from disk are slower still.")
    if fix.ram_bytes is not None:
        needed, free = fix.ram_bytes
        parts.append(
            f"Not offered to run: it needs about {format_bytes(needed)} of CPU RAM and {format_bytes(free)} "
            "is free; running out of RAM would kill the kernel and lose every variable."
        )
        disk = fix.fact("disk_free")
        if fix.key == "offload" and disk is not None:
            parts.append(f"Nor does the disk hold the rest: {format_bytes(disk)} is free there.")
    return " ".join(part for part in parts if part)


def numerics_note(fix: Fix) -> str:
    """What a quantized fix changes beyond memory, said once it ran; empty for other fixes."""
    if fix.key not in _QUANTIZED:
        return ""
    bits = _QUANTIZED[fix.key].split(" ")[0]
    note = (
        f"Note: the model now runs with {bits} weights, which changes its numerics slightly; check its "
        "outputs before you rely on them."
    )
    if fix.key == "8bit":
        note += (
            " Its 8-bit matmuls compute in float16 (LLM.int8), so bitsandbytes warns that bfloat16 inputs "
            "are cast: vram_magic shows that warning once, not on every matmul."
        )
    return note


def _models(fix: Fix) -> str:
    """``meta-llama/Llama-3.1-8B`` (one load of a known Hub id), else ``the model`` / ``the models``."""
    model, count = fix.fact("model"), fix.fact("count", 1)
    if model is not None and count == 1:
        return str(model)
    return "the model" if count == 1 else "the models"


def _half_batch_title(fix: Fix) -> str:
    change = dict(fix.change)
    if "old" not in change:
        return "Halve the batch"
    role, old, new = change["role"], change["old"], change["new"]
    what = "the evaluation batch" if role == "eval" else "the batch"
    verb = f"Halve {what}" if old == 2 * new else f"Shrink {what}"
    sizes = f"{verb} ({old} → {new})"
    accumulation, multiplier = change.get("accumulation"), change.get("multiplier", 2)
    negatives = change.get("in_batch_negatives")
    if role == "train" and negatives:
        return f"{sizes}: {negatives} then sees fewer in-batch negatives, which changes what it learns"
    if role == "train" and accumulation is not None:
        more = "double" if multiplier == 2 else f"multiply by {multiplier}"
        steps = f" ({accumulation[0]} → {accumulation[1]})" if isinstance(accumulation, tuple) else ""
        return f"{sizes} and {more} gradient accumulation{steps}: the same effective batch"
    if role == "train":
        return f"{sizes}; the effective batch shrinks too (this code has no gradient accumulation)"
    if role == "eval":
        return sizes
    if role == "unknown":
        return f"{sizes}; where it feeds training, the effective batch shrinks too"
    return f"{sizes}: the same results, in more steps"


def _offload_title(fix: Fix) -> str:
    of = f" of {_models(fix)}" if fix.change else ""
    disk = fix.fact("disk_bytes")
    if disk is not None:
        return (
            f"Offload what does not fit{of} to CPU RAM, and about {format_bytes(disk)} of it to disk "
            f'(offload_folder="{fix.fact("offload_folder")}")'
        )
    return f"Offload what does not fit{of} to CPU RAM"


def _merge_title(fix: Fix) -> str:
    back = fix.fact("back")
    if back is None:
        return "Merge on the CPU"
    if back:
        return "Merge on the CPU, then move the merged model back to the GPU if it fits"
    return "Merge on the CPU (the merged model stays there: this cell saves it from there)"


def _checkpointing_title(fix: Fix) -> str:
    checkpointing, optimizer = fix.fact("checkpointing", True), fix.fact("optimizer", True)
    if checkpointing and optimizer:
        return "Turn on gradient checkpointing and the paged 8-bit AdamW optimizer"
    if optimizer:
        return "Use the paged 8-bit AdamW optimizer (gradient checkpointing is already on)"
    return "Turn on gradient checkpointing"


def _chunk_title(fix: Fix) -> str:
    chunks = fix.fact("chunks")
    if chunks is None:
        return "Run the batch in chunks"
    return f"Run the batch in {chunks} chunks: the same outputs, less memory at a time"


_TITLES: dict[str, Callable[[Fix], str]] = {
    "bf16": lambda fix: f"Load {_models(fix)} in {fix.fact('dtype', 'bfloat16')}",
    "8bit": lambda fix: f"Load {_models(fix)} in 8-bit",
    "4bit": lambda fix: f"Load {_models(fix)} in 4-bit (NF4)",
    "offload": _offload_title,
    "cpu": lambda fix: "Run the cell on the CPU",
    "merge-cpu": _merge_title,
    "half-batch": _half_batch_title,
    "checkpointing": _checkpointing_title,
    "chunk": _chunk_title,
    "inference-mode": lambda fix: "Run the forward pass under torch.inference_mode(): no activations kept",
    "offload-cache": lambda fix: (
        'Keep the KV cache in CPU RAM while generating (cache_implementation="offloaded"; slower)'
    ),
    "smaller-generation": lambda fix: "Generate fewer tokens at once",
    "free": lambda fix: f"Free {join_names(fix.free_names)}, then run the cell again",
    "lift-cap": lambda fix: "Lift the per-process cap",
    "other-process": lambda fix: "Stop the other programs using this GPU",
    "expandable-segments": lambda fix: "Let PyTorch grow memory segments instead of fragmenting them",
}


def _half_batch_why(fix: Fix) -> str:
    loss = fix.fact("in_batch_negatives")
    if not loss:
        return "Activations shrink with the batch."
    keep = (
        "a smaller mini_batch_size keeps the batch and saves memory instead"
        if loss.startswith("Cached")
        else "CachedMultipleNegativesRankingLoss(model, mini_batch_size=...) keeps the batch and saves memory"
    )
    return (
        f"Activations shrink with the batch. {loss} takes its negatives from the batch itself, so gradient "
        f"accumulation does not bring them back; {keep}."
    )


def _free_why(fix: Fix) -> str:
    holds = "Together they hold" if len(fix.free_names) > 1 else "It holds"
    text = f"{holds} about {format_bytes(fix.fact('freed_bytes'))} that this cell does not need."
    shortfall = fix.fact("shortfall_bytes")
    if shortfall is not None and fix.fact("freed_bytes") < shortfall:
        text += f" Not enough alone: the cell was {format_bytes(shortfall)} short."
    return text


_WHY: dict[str, Callable[[Fix], str]] = {
    "bf16": lambda fix: "Half the memory of float32 weights, in the precision most models were trained in.",
    "8bit": lambda fix: (
        "One byte per weight (half of 16-bit, a quarter of 32-bit) with little quality loss (LLM.int8)."
    ),
    "4bit": lambda fix: "A quarter of a 16-bit model's weights; the usual QLoRA setting; some quality loss.",
    "offload": lambda fix: "Keeps full precision; layers that do not fit run from CPU RAM (much slower).",
    "cpu": lambda fix: "Much slower, and only if CPU RAM holds the model.",
    "merge-cpu": lambda fix: (
        "Merging needs the base weights and the adapters at once; CPU RAM is usually larger."
    ),
    "half-batch": lambda fix: _half_batch_why(fix),
    "checkpointing": lambda fix: (
        "Recomputes activations instead of storing them; the optimizer state pages to CPU when needed."
    ),
    "chunk": lambda fix: "The same outputs; the KV cache and activations of part of the batch at a time.",
    "inference-mode": lambda fix: "Without gradients nothing is kept for a backward pass.",
    "offload-cache": lambda fix: "For long generations, where the cache outgrows the weights; slower.",
    "smaller-generation": lambda fix: "The KV cache grows with batch x (prompt + new tokens).",
    "free": _free_why,
    "lift-cap": lambda fix: "Only if you did not set it on purpose to rehearse a smaller GPU.",
    "other-process": lambda fix: (
        "Another notebook's kernel or a leftover training run is the usual one; shut it down if it is yours."
    ),
    "expandable-segments": lambda fix: (
        "Read once when CUDA starts: put this in the first cell and restart the kernel (a restart loses your "
        "variables; save what you need first)."
    ),
}


def join_names(names: Sequence[str]) -> str:
    """Names as code, joined: `a`; `a` and `b`; `a`, `b` and `c`."""
    quoted = [f"`{name}`" for name in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]
