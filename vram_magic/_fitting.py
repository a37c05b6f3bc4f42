"""Helpers that rewritten cells call (``vram_magic.to_gpu_if_it_fits``). torch is imported when called."""

from __future__ import annotations

from typing import Any, TypeVar

from vram_magic._render_text import format_bytes

_Model = TypeVar("_Model")
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
    fraction = torch.cuda.get_per_process_memory_fraction(index)
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
