"""Free what a failed cell pinned, and measure what came back.

After a cell fails, its traceback keeps every frame of the failing call alive, and with them every tensor
those frames held. IPython keeps that traceback in three places (see shared/DESIGN.md, "Facts"):
``sys.last_*``, ``shell.InteractiveTB.tb`` and ``shell.last_execution_result.error_in_exec``. Clearing
only some of them frees nothing. This module clears them all, clears the frames, drops output-cache
entries that hold device memory, collects garbage and empties the CUDA cache.

No IPython import here: the shell is passed in and used through its attributes.
"""

from __future__ import annotations

import gc
import inspect
import sys
import traceback
import weakref
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any

from vram_magic._probe import cuda_initialized
from vram_magic._types import Cleanup
from vram_magic._who import tensors_in

_LAST_EXCEPTION_ATTRIBUTES = ("last_type", "last_value", "last_traceback", "last_exc")


class _DeathWatch:
    """Weak references to tensors, so we can count the bytes that really died."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._refs: dict[int, tuple[weakref.ref[Any], int]] = {}

    def watch(self, obj: object) -> None:
        for tensor in tensors_in(obj, self.device):
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in self._refs:
                self._refs[key] = (weakref.ref(tensor), storage.nbytes())

    def dead_bytes(self) -> int:
        return sum(nbytes for ref, nbytes in self._refs.values() if ref() is None)


def free_memory(
    shell: Any,
    *,
    names: Iterable[str] = (),
    failure: BaseException | None = None,
    device: str = "cuda",
) -> Cleanup:
    """Release a failure's frames, IPython's references to the last failure, the given names and
    output-cache entries holding ``device`` memory; then collect and empty the CUDA cache."""
    allocated_before = _cuda_allocated_bytes()
    watch = _DeathWatch(device)
    released: list[str] = []

    failures = [exc for exc in (failure, *_ipython_failures(shell)) if exc is not None]
    for exc in failures:
        for frame in _frames_of(exc):
            if _is_user_function_frame(frame):
                local_variables = frame.f_locals
                watch.watch(dict(local_variables))
                if isinstance(local_variables, dict):
                    # Before Python 3.13, reading f_locals leaves a dict on the frame that clear() keeps.
                    local_variables.clear()
        _clear_frames(exc)
    if failures:
        released.append("the failed cell's traceback frames")
    del failures, failure
    if _drop_ipython_failures(shell):
        released.append("IPython's references to the last error")

    for name in names:
        watch.watch(shell.user_ns[name])
        del shell.user_ns[name]
        released.append(f"variable {name}")

    released.extend(_drop_output_cache(shell, watch))

    gc.collect()
    if cuda_initialized():
        import torch

        torch.cuda.empty_cache()
    allocated_after = _cuda_allocated_bytes()
    reclaimed = None
    if allocated_before is not None and allocated_after is not None:
        reclaimed = max(allocated_before - allocated_after, 0)
    return Cleanup(released=tuple(released), reclaimed_bytes=reclaimed, freed_tensor_bytes=watch.dead_bytes())


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, its causes and contexts, each once."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def _frames_of(exc: BaseException) -> Iterator[FrameType]:
    for link in _exception_chain(exc):
        tb = link.__traceback__
        while tb is not None:
            yield tb.tb_frame
            tb = tb.tb_next


def _is_user_function_frame(frame: FrameType) -> bool:
    """A frame of the user's code below the cell's top level (whose locals are the user namespace)."""
    module = str(frame.f_globals.get("__name__", ""))
    ours = module.split(".")[0] in {"vram_magic", "IPython", "ipykernel"}
    return not ours and bool(frame.f_code.co_flags & inspect.CO_NEWLOCALS)


def _clear_frames(exc: BaseException) -> None:
    for link in _exception_chain(exc):
        if link.__traceback__ is not None:
            traceback.clear_frames(link.__traceback__)  # skips frames still running (ours)


def _ipython_failures(shell: Any) -> list[BaseException]:
    found = [getattr(sys, "last_value", None), getattr(sys, "last_exc", None)]
    result = getattr(shell, "last_execution_result", None)
    found.append(getattr(result, "error_in_exec", None))
    return [exc for exc in found if isinstance(exc, BaseException)]


def _drop_ipython_failures(shell: Any) -> bool:
    """Drop every reference IPython keeps to the last error. True if there was one."""
    dropped = False
    for attribute in _LAST_EXCEPTION_ATTRIBUTES:
        if getattr(sys, attribute, None) is not None:
            delattr(sys, attribute)
            dropped = True
    interactive_tb: Any = getattr(shell, "InteractiveTB", None)
    if getattr(interactive_tb, "tb", None) is not None:
        interactive_tb.tb = None
        dropped = True
    result: Any = getattr(shell, "last_execution_result", None)
    if getattr(result, "error_in_exec", None) is not None:
        result.error_in_exec = None
        dropped = True
    return dropped


def _drop_output_cache(shell: Any, watch: _DeathWatch) -> list[str]:
    """Remove ``Out[N]``/``_N`` and ``_``, ``__``, ``___`` entries that hold device memory."""
    released: list[str] = []
    user_ns: dict[str, Any] = shell.user_ns
    output_cache: dict[int, Any] = user_ns.get("_oh", {})
    for number, value in list(output_cache.items()):
        if tensors_in(value, watch.device):
            watch.watch(value)
            del output_cache[number]
            user_ns.pop(f"_{number}", None)
            getattr(shell, "user_ns_hidden", {}).pop(f"_{number}", None)
            released.append(f"Out[{number}]")
    displayhook = getattr(shell, "displayhook", None)
    for underscores in ("_", "__", "___"):
        value = getattr(displayhook, underscores, None)
        if value is None or not tensors_in(value, watch.device):
            continue
        watch.watch(value)
        setattr(displayhook, underscores, "")
        for namespace in (user_ns, getattr(shell, "user_ns_hidden", {})):
            if namespace.get(underscores) is value:
                namespace[underscores] = ""
        released.append(underscores)
    return released


def _cuda_allocated_bytes() -> int | None:
    """PyTorch's allocated bytes over all GPUs; None when CUDA is not in use in this process."""
    if not cuda_initialized():
        return None
    import torch

    return sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))
