"""Per-process GPU caps: rehearse the card a notebook will run on (``%vram cap t4``).

Presets, size parsing, and the target kept when there is no GPU to cap; on a real GPU the cap is
``torch.cuda.set_per_process_memory_fraction`` (torch is imported only when a cap is applied).
"""

from __future__ import annotations

import re
from typing import Any

from vram_magic._probe import surely_no_gpu
from vram_magic._types import Caps
from vram_magic._units import GiB, format_bytes, parse_size

# Usable memory as PyTorch reports it (``total_memory``), not the label on the box; rounded to 0.01 GiB.
PRESETS: dict[str, int] = {
    "t4": round(14.75 * GiB),
    "p100": round(15.89 * GiB),
    "v100-16": round(15.77 * GiB),
    "v100-32": round(31.74 * GiB),
    "l4": round(22.06 * GiB),
    "a10g": round(22.19 * GiB),
    "rtx3090": round(23.69 * GiB),
    "rtx4090": round(23.65 * GiB),
    "a100-40": round(39.39 * GiB),
    "a100-80": round(79.15 * GiB),
    "h100": round(79.18 * GiB),
}
# Cards before Ampere (compute capability under 8.0): no bfloat16, so fixes and estimates use float16 there.
NO_BF16 = frozenset({"t4", "p100", "v100-16", "v100-32"})
_ALIASES = {"v100": "v100-16", "3090": "rtx3090", "4090": "rtx4090", "a100": "a100-80", "a10": "a10g"}
_MIN_CAP_BYTES = 2**20
_MAX_CAP_BYTES = 1024 * GiB  # more than any GPU has

# The cap planned for when no GPU is here to cap (None: no target).
_target_bytes: int | None = None
# The fraction `%vram cap` last set on each GPU: what a torch without a getter for it (2.5) says is set.
_fractions: dict[int, float] = {}
# The preset being rehearsed ("t4"), whose rules (float16 without bfloat16) the fixes follow; None: a size, or
# no cap.
_card: str | None = None


def parse_cap(text: str) -> tuple[int, str]:
    """``"t4"`` or ``"12GiB"`` -> (bytes, a label for messages). Raises ValueError saying what to type."""
    key = text.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key], key.upper()
    size = parse_size(key)
    if size is not None:
        if not _MIN_CAP_BYTES <= size <= _MAX_CAP_BYTES:
            raise ValueError(
                f"A cap of {text.strip()} is not a GPU's memory: type a size from 1MiB to 1024GiB, or a "
                "preset (`%vram cap t4`)."
            )
        return size, text.strip()
    raise ValueError(
        f"{text.strip()!r} is neither a GPU preset nor a size: type `%vram cap t4`, `%vram cap 12GiB` or "
        f"`%vram cap off` (presets: {', '.join(PRESETS)})"
    )


def parse_gpus(text: str) -> tuple[int, int, str]:
    """``"2xt4"`` (Kaggle's two T4s), ``"4x24GiB"`` or ``"t4"`` -> (how many GPUs, bytes each, a label).
    Raises ValueError saying what to type."""
    several = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\S.*)", text)
    if several:
        number = int(several[1])
        if not 1 <= number <= 64:
            raise ValueError(f"{text.strip()}: type from 1 to 64 GPUs, e.g. `--gpu 2xt4`.")
        size, label = parse_cap(several[2])
        return number, size, f"{number} x {label}"
    size, label = parse_cap(text)
    return 1, size, label


def target_bytes() -> int | None:
    """The cap set with no GPU present, which estimates and preflight plan for."""
    return _target_bytes


def set_target_bytes(value: int | None) -> None:
    global _target_bytes
    _target_bytes = value


def rehearsed_card() -> str | None:
    """The preset ``%vram cap`` rehearses (``"t4"``), or None (a size, or no cap)."""
    return _card


def _set_card(card: str | None) -> None:
    global _card
    _card = card


def apply_cap(text: str | None, device: int | None = None) -> Caps:
    """``%vram cap [SIZE|PRESET|off]``: cap every visible GPU (``device``: only that one), or keep the
    target when there is none; no text: what is set. Raises ValueError on a bad size, one larger than a GPU,
    or a GPU that is not here.

    A cap on a GPU is PyTorch's, so it imports torch (about a second the first time); on a machine with no
    GPU for PyTorch (no driver, none visible) torch is not imported."""
    gpus = _gpus()
    if device is not None:
        if not gpus:
            raise ValueError("No GPU here to cap: type `%vram cap t4` (no --device) to plan for a T4.")
        if device not in gpus:
            here = f"GPUs 0 to {len(gpus) - 1}" if len(gpus) > 1 else "only GPU 0"
            raise ValueError(f"There is no GPU {device} here ({here}): e.g. `%vram cap t4 --device cuda:0`.")
        gpus = range(device, device + 1)
    if text is None:
        return Caps("show", tuple((i, _cap_bytes(i)) for i in gpus), _target_bytes)
    if text.lower() == "off":
        for i in gpus:
            _torch().cuda.set_per_process_memory_fraction(1.0, i)
            _fractions[i] = 1.0
        set_target_bytes(None)
        _set_card(None)
        return Caps("off", tuple((i, None) for i in gpus), None)
    size, label = parse_cap(text)
    card = label.lower() if label.lower() in PRESETS else None
    if not gpus:
        set_target_bytes(size)
        _set_card(card)
        return Caps("set", (), size, label, no_bf16=card in NO_BF16)
    cuda = _torch().cuda
    for i in gpus:
        total = cuda.get_device_properties(i).total_memory
        if size > total:
            raise ValueError(f"GPU {i} has {format_bytes(total)}: a cap must be smaller than that.")
    for i in gpus:
        fraction = size / cuda.get_device_properties(i).total_memory
        cuda.set_per_process_memory_fraction(fraction, i)
        _fractions[i] = fraction
    _set_card(card)
    return Caps("set", tuple((i, size) for i in gpus), None, label, no_bf16=card in NO_BF16)


def _gpus() -> range:
    """The indices of the GPUs PyTorch can use; torch is not imported when there surely are none."""
    if surely_no_gpu():
        return range(0)
    cuda = _torch().cuda
    return range(cuda.device_count()) if cuda.is_available() else range(0)


def _torch() -> Any:
    import torch

    return torch


def _cap_bytes(index: int) -> int | None:
    cuda = _torch().cuda
    getter = getattr(cuda, "get_per_process_memory_fraction", None)  # torch 2.5 has none
    fraction = float(getter(index)) if getter is not None else _fractions.get(index, 1.0)
    if fraction >= 1.0:
        return None
    return int(fraction * cuda.get_device_properties(index).total_memory)
