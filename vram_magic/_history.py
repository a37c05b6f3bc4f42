"""``%%oomsafe --record``: PyTorch's allocation history for one cell, saved and read when it runs out.

Recording uses ``torch.cuda.memory._record_memory_history`` (Python stacks, a bounded number of entries) and
stops when the cell ends. On an OOM the snapshot (``torch.cuda.memory._snapshot()``) is saved as a pickle that
https://pytorch.org/memory_viz opens, and as an HTML page drawn by torch's own ``_memory_viz``; the live
allocations at the moment of failure are grouped by the line of the cell (or the user's function) that made
them. The snapshot format is the one ``_snapshot``'s docstring documents: ``segments`` of ``blocks``, each
with ``size``, ``state`` and ``frames`` (``filename``, ``line``, ``name``).
"""

from __future__ import annotations

import os
import pickle
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vram_magic._types import AllocationGroup

MAX_ENTRIES = 100_000  # allocation events kept (each a few KB): the last ones win
_LIVE = "active_allocated"
_LIBRARY_ROOTS = tuple(
    os.path.normcase(os.path.realpath(path))
    for path in {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
)


def start(max_entries: int = MAX_ENTRIES) -> str | None:
    """Start recording; None when it started, else why not (one line)."""
    try:
        import torch
    except ImportError:
        return "--record needs PyTorch with a CUDA GPU; the cell runs without recording."
    try:
        if not torch.cuda.is_available():
            return "--record needs a CUDA GPU (none is visible); the cell runs without recording."
        torch.cuda.memory._record_memory_history(
            enabled="all", context="alloc", stacks="python", max_entries=max_entries
        )
    except Exception as error:
        return f"--record could not start PyTorch's allocation history ({error}); the cell runs without it."
    return None


def stop() -> None:
    """Stop recording (and let PyTorch drop the history)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            torch.cuda.memory._record_memory_history(enabled=None)
        except Exception:  # nothing was recording
            return


def take() -> dict[str, Any] | None:
    """The allocator's snapshot now, with the recorded history; None when it cannot be taken."""
    torch = sys.modules.get("torch")
    try:
        return dict(torch.cuda.memory._snapshot()) if torch is not None else None
    except Exception:
        return None


def save(
    snapshot: Mapping[str, Any], folder: str | os.PathLike[str], cell: int | None
) -> tuple[str, str | None]:
    """Write ``vram-oom-cell<N>.pickle`` (PyTorch's memory viewer opens it) and, where torch can draw it,
    ``vram-oom-cell<N>.html``; their paths."""
    stem = Path(folder) / f"vram-oom-cell{cell if cell is not None else ''}"
    pickle_path = stem.with_suffix(".pickle")
    with open(pickle_path, "wb") as out:
        pickle.dump(dict(snapshot), out)
    html_path: Path | None = stem.with_suffix(".html")
    try:
        from torch.cuda import _memory_viz

        assert html_path is not None
        page = _memory_viz.trace_plot(dict(snapshot))  # type: ignore[no-untyped-call]
        html_path.write_text(page, encoding="utf-8")
    except Exception:  # an older torch, or a snapshot it cannot draw: the pickle is enough
        html_path = None
    return str(pickle_path), str(html_path) if html_path is not None else None


def group_by_line(
    snapshot: Mapping[str, Any],
    cell_filename: str,
    cell_source: str,
    device: int | None = None,
    limit: int = 5,
) -> tuple[AllocationGroup, ...]:
    """The live allocations of ``snapshot`` (on GPU ``device``, or all), grouped by what made them: the line
    of the cell (``cell_filename``, whose line 1 is the ``%%oomsafe`` line, so that its line L is line L - 1
    of ``cell_source``, the cell as typed), else the deepest of the user's own functions, else the library
    function that allocated; biggest first."""
    lines = cell_source.splitlines()
    groups: dict[str, tuple[int, int, int | None, str]] = {}
    for segment in snapshot.get("segments", ()):
        if device is not None and segment.get("device", device) != device:
            continue
        for block in segment.get("blocks", ()):
            if block.get("state") != _LIVE:
                continue
            where, line = _made_by(block.get("frames") or (), cell_filename)
            nbytes, count, _, _ = groups.get(where, (0, 0, None, ""))
            code = lines[line - 2].strip() if line is not None and 2 <= line <= len(lines) + 1 else ""
            groups[where] = (nbytes + int(block.get("size", 0)), count + 1, line, code)
    found = [AllocationGroup(where, n, c, line, code) for where, (n, c, line, code) in groups.items()]
    return tuple(sorted(found, key=lambda group: group.nbytes, reverse=True)[:limit])


def _made_by(frames: Any, cell_filename: str) -> tuple[str, int | None]:
    """Which line of the cell, or which function, made an allocation (its frames, innermost first)."""
    for frame in frames:
        if frame.get("filename") == cell_filename:
            line = int(frame.get("line", 0))
            return f"line {line}", line
    for frame in frames:
        filename = str(frame.get("filename", ""))
        if filename and not filename.startswith("<") and not _is_library(filename):
            return f"{frame.get('name', '?')} ({os.path.basename(filename)}:{frame.get('line', '?')})", None
    if frames:
        return f"{frames[0].get('name', '?')} (library code)", None
    return "no stack recorded (made before recording started)", None


def _is_library(filename: str) -> bool:
    path = os.path.normcase(os.path.realpath(filename))
    return path.startswith(_LIBRARY_ROOTS)
