"""Helpers that rewritten cells call (``vram_magic.to_gpu_if_it_fits``, ``vram_magic.chunked``). torch is
imported when they are called."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from vram_magic._units import format_bytes

_Model = TypeVar("_Model")
_Result = TypeVar("_Result")
_HEADROOM_BYTES = 512 * 2**20  # activations and the CUDA context need some room after the weights


def to_gpu_if_it_fits(model: _Model, device: str = "cuda") -> _Model:
    """Move ``model`` to the GPU when its weights fit there with some room to spare; else keep it on CPU
    and say why. Used after a LoRA merge done on the CPU."""
    import torch

    if not torch.cuda.is_available():
        print("Kept on CPU: no GPU is visible.")
        return model
    needed = _weights_bytes(model)
    torch.cuda.empty_cache()  # blocks the merge left cached count as free for this move
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index  # "cuda" is the current GPU
    free, total = torch.cuda.mem_get_info(index)
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch 2.5 has none
    fraction = 1.0 if getter is None else getter(index)
    if fraction < 1.0:  # the cap is a share of CUDA's total
        free = min(free, int(fraction * total) - torch.cuda.memory_allocated(index))
    if needed + _HEADROOM_BYTES > free:
        print(
            f"Kept on CPU: the model needs {format_bytes(needed)} and the GPU has {format_bytes(free)} free."
        )
        return model
    moved: Any = model.to(device)  # type: ignore[attr-defined]
    print(f"Moved to {device}: {format_bytes(needed)}.")
    return moved  # type: ignore[no-any-return]


def _weights_bytes(model: object) -> int:
    from vram_magic._who import tensors_in

    return sum(tensor.untyped_storage().nbytes() for tensor in tensors_in(model, "cpu"))


def chunked(function: Callable[..., _Result], chunks: int = 2) -> Callable[..., _Result]:
    """``function`` (``model.generate``, ``model``) run on ``chunks`` slices of its batch one after another,
    the results joined as one call on the whole batch returns them: tensors concatenated along the batch,
    ``generate()``'s sequences padded with its pad token to the longest, model outputs field by field.

    The batch is the tensors whose first dimension is the batch's (also inside a mapping such as a tokenizer's
    output); everything else (``eos_token_id=[...]``, settings) goes whole to every chunk. Inputs padded
    together keep their padding, so each row's result is the one the whole batch gives it. A cache is left
    out; so is, with a warning, what else cannot be joined (``generate()``'s per-step ``scores`` when the
    chunks stop at different steps). A scalar loss is the chunks' losses weighted by their rows: the
    whole batch's wherever every row has as many labelled tokens."""
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise ValueError(f"chunks must be a whole number of at least 1, not {chunks!r}")

    def run(*args: Any, **kwargs: Any) -> _Result:
        rows = _rows(args, kwargs)
        if rows is None or rows <= 1 or chunks == 1:
            return function(*args, **kwargs)
        size = -(-rows // min(chunks, rows))  # ceil: at most `chunks` parts
        parts, chunk_rows = [], []
        for start in range(0, rows, size):
            part_args = tuple(_sliced(value, rows, start, start + size) for value in args)
            part_kwargs = {key: _sliced(value, rows, start, start + size) for key, value in kwargs.items()}
            parts.append(function(*part_args, **part_kwargs))
            chunk_rows.append(min(size, rows - start))
        return _joined(parts, _pad_id(function, kwargs), chunk_rows)  # type: ignore[no-any-return]

    return run


def _rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The batch size: the first dimension of the first tensor among the arguments (or in a mapping)."""
    for value in (*args, *kwargs.values()):
        found = _first_dimension(value)
        if found is not None:
            return found
    return None


def _first_dimension(value: Any) -> int | None:
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dim") and value.dim() >= 1:
        return int(shape[0])
    if isinstance(value, Mapping):
        for item in value.values():
            found = _first_dimension(item)
            if found is not None:
                return found
    return None


def _sliced(value: Any, rows: int, start: int, stop: int) -> Any:
    """``value``'s rows ``start:stop`` where it has the batch's rows; anything else as it is."""
    if hasattr(value, "dim") and value.dim() >= 1 and value.shape[0] == rows:
        return value[start:stop]
    if isinstance(value, Mapping) and any(_first_dimension(item) == rows for item in value.values()):
        mapping: Any = type(value)
        return mapping({key: _sliced(item, rows, start, stop) for key, item in value.items()})
    return value


def _joined(parts: list[Any], pad_id: int, chunk_rows: list[int]) -> Any:
    """The chunks' results as one result (see ``chunked``)."""
    import torch

    first = parts[0]
    if isinstance(first, torch.Tensor):
        if first.dim() == 0:  # a loss: each chunk's mean, weighted by the chunk's rows
            weights = torch.tensor([float(rows) for rows in chunk_rows], device=first.device)
            return (torch.stack(parts) * weights).sum() / weights.sum()
        return _concatenated(parts, pad_id)
    if isinstance(first, Mapping):  # ModelOutput, BatchEncoding, dict
        joined = {}
        for key in first:
            values = [part.get(key) for part in parts]
            joined[key] = _joined_or_none(values, pad_id, chunk_rows)
            lost = joined[key] is None and all(value is not None for value in values)
            if lost and "Cache" not in type(values[0]).__name__:  # a cache is left out as documented
                warnings.warn(
                    f"vram_magic.chunked: the chunks' `{key}` cannot be joined into one; it is left out "
                    "(run without chunks to get it)",
                    stacklevel=4,
                )
        kind: Any = type(first)
        if _keyword_constructible(first):  # a ModelOutput: the fields that were joined
            return kind(**{key: value for key, value in joined.items() if value is not None})
        return kind(joined)
    if isinstance(first, (list, tuple)) and all(len(part) == len(first) for part in parts):
        if all(isinstance(part, list) for part in parts) and first and not isinstance(first[0], torch.Tensor):
            return [item for part in parts for item in part]  # a pipeline's list of results per input
        items = [_joined_or_none([part[i] for part in parts], pad_id, chunk_rows) for i in range(len(first))]
        return type(first)(items)
    if isinstance(first, list):
        return [item for part in parts for item in part]
    return None


def _joined_or_none(values: list[Any], pad_id: int, chunk_rows: list[int]) -> Any:
    if any(value is None for value in values):
        return None
    try:
        return _joined(values, pad_id, chunk_rows)
    except (TypeError, ValueError, RuntimeError):  # a cache object, ragged lists: not joined
        return None


def _concatenated(tensors: list[Any], pad_id: int) -> Any:
    """Tensors joined along the batch; ones longer in their second dimension than others are right-padded
    with ``pad_id`` first (generate() stops each chunk at its own longest sequence)."""
    import torch

    if tensors[0].dim() >= 2 and len({tensor.shape[1] for tensor in tensors}) > 1:
        longest = max(tensor.shape[1] for tensor in tensors)
        padded = []
        for tensor in tensors:
            extra = [*tensor.shape]
            extra[1] = longest - tensor.shape[1]
            padded.append(torch.cat([tensor, tensor.new_full(extra, pad_id)], dim=1))
        tensors = padded
    return torch.cat(tensors, dim=0)


def _keyword_constructible(value: Any) -> bool:
    return type(value).__module__.startswith("transformers") or type(value) is dict


def _pad_id(function: Any, kwargs: dict[str, Any]) -> int:
    """The token generate() pads finished sequences with: the call's, the model's generation config's, its
    end-of-sequence token, else 0."""
    if isinstance(kwargs.get("pad_token_id"), int):
        return int(kwargs["pad_token_id"])
    config = getattr(getattr(function, "__self__", None), "generation_config", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int):
            return value
    return 0
