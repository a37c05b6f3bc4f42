"""Sizes in bytes: written for people (``3.00 GiB``) and read from what people and libraries write.

Binary units throughout: torch's allocator prints KiB/MiB/GiB, and the MPS allocator and numpy print KB/MB/GB
or bare units that also mean powers of 1024.
"""

from __future__ import annotations

import re

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40

# Every unit a size is written with, as a power of 1024.
UNIT_BYTES = {
    "bytes": 1,
    "b": 1,
    "kib": KiB,
    "kb": KiB,
    "k": KiB,
    "mib": MiB,
    "mb": MiB,
    "m": MiB,
    "gib": GiB,
    "gb": GiB,
    "g": GiB,
    "tib": TiB,
    "tb": TiB,
    "t": TiB,
    "pib": 2**50,
    "eib": 2**60,
}
_WRITTEN = (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB))
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def format_bytes(n: int | None) -> str:
    """``3.00 GiB``, ``518.00 MiB``, ``0 B``; ``unknown`` for None."""
    if n is None:
        return "unknown"
    sign, n = ("-", -n) if n < 0 else ("", n)
    for unit, size in _WRITTEN:
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{n} B"


def to_bytes(number: str, unit: str) -> int:
    """``("1.50", "GiB")`` -> bytes; the unit in any case (KeyError for one that is not a size)."""
    return round(float(number) * UNIT_BYTES[unit.lower()])


def parse_size(text: str) -> int | None:
    """``"12GiB"``, ``"12 gb"``, ``"512M"`` -> bytes; None for text that is not a size with a unit."""
    match = _SIZE.match(text)
    if match is None or match.group(2).lower() not in UNIT_BYTES or not match.group(2):
        return None
    return to_bytes(match.group(1), match.group(2))
