"""Per-process GPU caps: rehearse the card a notebook will run on (``%vram cap t4``).

Pure Python: presets, size parsing and the target kept when there is no GPU to cap. The magic applies a
cap on a real GPU with ``torch.cuda.set_per_process_memory_fraction``.
"""

from __future__ import annotations

import re

_GiB = 2**30

# Usable memory as PyTorch reports it (``total_memory``), not the label on the box; rounded to 0.01 GiB.
PRESETS: dict[str, int] = {
    "t4": round(14.75 * _GiB),
    "p100": round(15.89 * _GiB),
    "v100-16": round(15.77 * _GiB),
    "v100-32": round(31.74 * _GiB),
    "l4": round(22.06 * _GiB),
    "a10g": round(22.19 * _GiB),
    "rtx3090": round(23.69 * _GiB),
    "rtx4090": round(23.65 * _GiB),
    "a100-40": round(39.39 * _GiB),
    "a100-80": round(79.15 * _GiB),
    "h100": round(79.18 * _GiB),
}
_ALIASES = {"v100": "v100-16", "3090": "rtx3090", "4090": "rtx4090", "a100": "a100-80", "a10": "a10g"}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m)$", re.IGNORECASE)
_UNIT_BYTES = {"gib": _GiB, "gb": _GiB, "g": _GiB, "mib": 2**20, "mb": 2**20, "m": 2**20}

# The cap planned for when no GPU is here to cap (None: no target).
_target_bytes: int | None = None


def parse_cap(text: str) -> tuple[int, str]:
    """``"t4"`` or ``"12GiB"`` -> (bytes, a label for messages). Raises ValueError saying what to type."""
    key = text.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key], key.upper()
    match = _SIZE.match(key)
    if match and float(match.group(1)) > 0:
        size = round(float(match.group(1)) * _UNIT_BYTES[match.group(2).lower()])
        return size, text.strip()
    raise ValueError(
        f"{text.strip()!r} is neither a GPU preset nor a size: type `%vram cap t4`, `%vram cap 12GiB` or "
        f"`%vram cap off` (presets: {', '.join(PRESETS)})"
    )


def target_bytes() -> int | None:
    """The cap set with no GPU present, which estimates and preflight plan for."""
    return _target_bytes


def set_target_bytes(value: int | None) -> None:
    global _target_bytes
    _target_bytes = value
