"""vram_magic: survive CUDA out-of-memory errors in notebooks.

``%load_ext vram_magic`` adds ``%%oomsafe`` and ``%vram``. Importing this package imports neither
torch nor IPython; the magics module is imported only when the extension is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from vram_magic._errors import CellSyntaxError, NotApplicable, OutOfMemoryHandled, Refused
from vram_magic._oom import is_oom, parse_oom_message
from vram_magic._types import (
    AllocationGroup,
    Cause,
    CellRecord,
    Cleanup,
    CpuMemory,
    Estimate,
    Fix,
    GpuSnapshot,
    Holder,
    LoadPlan,
    Note,
    OOMInfo,
    PostMortem,
    ProcessMemory,
    Recording,
    Report,
    Snapshot,
)

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

    from vram_magic._timeline import Timeline

__version__ = "0.1.0"
_Model = TypeVar("_Model")
_Result = TypeVar("_Result")

__all__ = [
    "AllocationGroup",
    "Cause",
    "CellRecord",
    "CellSyntaxError",
    "Cleanup",
    "CpuMemory",
    "Estimate",
    "Fix",
    "GpuSnapshot",
    "Holder",
    "LoadPlan",
    "NotApplicable",
    "Note",
    "OOMInfo",
    "OutOfMemoryHandled",
    "PostMortem",
    "ProcessMemory",
    "Recording",
    "Refused",
    "Report",
    "Snapshot",
    "__version__",
    "chunked",
    "estimate",
    "find_holders",
    "is_oom",
    "load_ipython_extension",
    "parse_oom_message",
    "rewrite",
    "snapshot",
    "timeline",
    "to_gpu_if_it_fits",
    "unload_ipython_extension",
]


def snapshot() -> Snapshot:
    """Take a VRAM/RAM snapshot of every visible GPU (what ``%vram`` shows)."""
    from vram_magic._probe import take_snapshot

    return take_snapshot()


def timeline() -> Timeline:
    """The cells recorded since ``%vram track on``: one ``CellRecord`` per cell and device (``cell``,
    ``source``, ``device``, ``peak_bytes``, ``end_bytes``, ``delta_bytes``, ``seconds``), oldest first; the
    list has ``.to_pandas()`` where pandas is installed."""
    from vram_magic._timeline import TRACKER
    from vram_magic._timeline import Timeline as _Timeline

    return _Timeline(TRACKER.records)


def find_holders(namespace: dict[str, Any], device: str = "cuda") -> tuple[Holder, ...]:
    """Which names in ``namespace`` hold memory on ``device``, biggest first (what ``%vram who`` shows)."""
    from vram_magic._who import find_holders as _find_holders

    return _find_holders(namespace, device=device)


def estimate(model: Any, **options: Any) -> Estimate:
    """What loading ``model`` (a hub id, a local folder or a config) needs on the GPU, from its config alone:
    ``params``, ``weights_bytes``, ``peak_bytes`` and notes. Options: ``dtype``, ``quantization`` ("4bit",
    "8bit"), ``device_map``, ``context``, ``training`` ("lora", "qlora", "full"), ``batch_size``."""
    from vram_magic.estimator import estimate as _estimate

    return _estimate(model, **options)


def rewrite(source: str, fix: str, **options: object) -> str:
    """``source`` with ``fix`` applied ("4bit", "8bit", "bf16", "offload", "cpu", "merge-cpu",
    "half-batch", "checkpointing", "chunk", "inference-mode", "offload-cache"); raises
    ``vram_magic.NotApplicable`` (a ValueError) saying why not."""
    from vram_magic.fixes import rewrite as _rewrite

    return _rewrite(source, fix, **options)


def to_gpu_if_it_fits(model: _Model) -> _Model:
    """Move ``model`` to the GPU if its weights fit there; else keep it on the CPU and say why."""
    from vram_magic._helpers import to_gpu_if_it_fits as _to_gpu_if_it_fits

    return _to_gpu_if_it_fits(model)


def chunked(function: Callable[..., _Result], chunks: int = 2) -> Callable[..., _Result]:
    """``function`` (``model.generate``, ``model``) run on ``chunks`` slices of its batch one after another,
    with the results joined as one call on the whole batch returns them."""
    from vram_magic._helpers import chunked as _chunked

    return _chunked(function, chunks)


def load_ipython_extension(ipython: InteractiveShell) -> None:
    """Called by ``%load_ext vram_magic``."""
    from vram_magic._magics import load

    load(ipython)


def unload_ipython_extension(ipython: InteractiveShell) -> None:
    """Called by ``%unload_ext vram_magic``: removes every magic this extension added."""
    from vram_magic._magics import unload

    unload(ipython)
