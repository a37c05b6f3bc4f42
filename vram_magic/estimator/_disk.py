"""Counted models kept on disk, so that an estimate in a new kernel needs neither transformers' model code nor
a build: ``$XDG_CACHE_HOME/vram_magic/estimates`` (``~/.cache/vram_magic/estimates`` by default).

An entry is keyed by the config's values as saved, the versions of transformers and accelerate, and
``FORMAT``; it holds what ``_counting`` counted (plain JSON). A file that cannot be read or written is left
alone: the model is counted again, and nothing fails.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import tempfile
from pathlib import Path
from typing import Any

FORMAT = 3  # bump when what is counted, or how, changes


def folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vram_magic" / "estimates"


def key_of(values: dict[str, Any]) -> str:
    """The entry's name: a hash of the config's values, the libraries that count it, and ``FORMAT``."""
    text = json.dumps(
        {"config": values, "versions": _versions(), "format": FORMAT}, sort_keys=True, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def read(key: str) -> dict[str, Any]:
    """The entry saved under ``key``; empty when there is none or it cannot be read."""
    try:
        entry = json.loads((folder() / f"{key}.json").read_text())
    except (OSError, ValueError):
        return {}
    return entry if isinstance(entry, dict) else {}


def write(key: str, entry: dict[str, Any]) -> None:
    """Save ``entry`` under ``key`` (written whole, then renamed: a reader never sees half of it)."""
    with contextlib.suppress(OSError, TypeError, ValueError):
        where = folder()
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=where, suffix=".tmp", delete=False) as handle:
            json.dump(entry, handle)
        os.replace(handle.name, where / f"{key}.json")


@functools.cache
def _versions() -> dict[str, str]:
    found = {}
    for name in ("transformers", "accelerate"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "none"
    return found
