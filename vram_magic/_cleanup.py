"""Free what a failed cell pinned, and measure what came back.

After a cell fails, its traceback keeps every frame of the failing call alive, and with them every tensor
those frames held. The traceback is kept in three places: ``sys.last_*`` and, in IPython,
``InteractiveTB.tb`` and ``last_execution_result.error_in_exec``; clearing only some of them frees nothing.
This module clears them all, clears the frames, drops cached outputs that hold device memory, collects
garbage (a full collection only when a tensor it let go of is still alive) and empties the CUDA cache.

IPython-free: what the shell keeps is reached through a ``Keeper`` (the runner, or a test's fake).
"""

from __future__ import annotations

import gc
import inspect
import sys
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any, Protocol

from vram_magic._oom import exception_chain
from vram_magic._probe import cuda_initialized
from vram_magic._types import Cleanup
from vram_magic._who import tensors_in

_LAST_EXCEPTION_ATTRIBUTES = ("last_type", "last_value", "last_traceback", "last_exc")


class Keeper(Protocol):
    """Where the notebook keeps references a failed cell can pin: its namespace, the errors it keeps, and
    its cached outputs (``vram_magic._runner.CellRunner`` for IPython)."""

    @property
    def namespace(self) -> dict[str, Any]: ...

    def kept_errors(self) -> list[BaseException]: ...

    def drop_kept_errors(self) -> bool: ...

    def drop_outputs(self, holds_memory: Callable[[object], bool]) -> list[tuple[str, object]]: ...


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

    def all_dead(self) -> bool:
        return all(ref() is None for ref, _ in self._refs.values())


def free_memory(
    keeper: Keeper,
    *,
    names: Iterable[str] = (),
    failure: BaseException | None = None,
    device: str = "cuda",
) -> Cleanup:
    """Release a failure's frames, every reference kept to the last failure, the given names and cached
    outputs holding ``device`` memory; then collect and empty the CUDA cache."""
    allocated_before = _cuda_allocated_bytes()
    watch = _DeathWatch(device)
    released: list[str] = []

    kept = [getattr(sys, "last_value", None), getattr(sys, "last_exc", None), *keeper.kept_errors()]
    failures = [exc for exc in (failure, *kept) if isinstance(exc, BaseException)]
    for exc in failures:
        _watch_locals(exc, watch)
        _clear_frames(exc)
    if failures:
        released.append("the failed cell's traceback frames")
    del failures, failure, kept
    if _drop_last_exception() | keeper.drop_kept_errors():
        released.append("IPython's references to the last error")

    for name in names:
        watch.watch(keeper.namespace[name])
        del keeper.namespace[name]
        released.append(f"variable {name}")

    dropped = keeper.drop_outputs(lambda value: bool(tensors_in(value, device)))
    for label, value in dropped:
        watch.watch(value)
        released.append(label)
    del dropped

    # Dropping the references frees most by reference counting; a young-generation collection takes what
    # the failure left in cycles. A full collection (0.1-0.3 s with transformers imported) runs only when a
    # watched tensor is still alive after that.
    gc.collect(1)
    if not watch.all_dead():
        gc.collect()
    if cuda_initialized():
        import torch

        torch.cuda.empty_cache()
    allocated_after = _cuda_allocated_bytes()
    reclaimed = None
    if allocated_before is not None and allocated_after is not None:
        reclaimed = max(allocated_before - allocated_after, 0)
    return Cleanup(released=tuple(released), reclaimed_bytes=reclaimed, freed_tensor_bytes=watch.dead_bytes())


def _watch_locals(exc: BaseException, watch: _DeathWatch) -> None:
    """Watch what the error's frames hold, and empty their locals. A function of its own, so that no loop
    variable outlives it: one holding the innermost frame would keep, through its callers (``f_back``),
    every tensor of the failed call alive until the rescue ends."""
    for frame in _frames_of(exc):
        if _is_user_function_frame(frame):
            local_variables = frame.f_locals
            for value in list(local_variables.values()):  # each its own walk: a model in one local
                watch.watch(value)  # cannot use up the budget before the activations in another
            if isinstance(local_variables, dict):
                # Before Python 3.13, reading f_locals leaves a dict on the frame that clear() keeps.
                local_variables.clear()


def _frames_of(exc: BaseException) -> Iterator[FrameType]:
    for link in exception_chain(exc):
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
    """Clear the error's frames, then drop its traceback: a cleared frame still holds its function, and a
    closure's cells (torch's ``Module._call_impl`` keeps ``kwargs`` in one) would keep tensors alive."""
    for link in exception_chain(exc):
        if link.__traceback__ is not None:
            traceback.clear_frames(link.__traceback__)  # skips frames still running (ours)
            link.__traceback__ = None


def _drop_last_exception() -> bool:
    """Drop Python's own references to the last uncaught error (``sys.last_*``). True if there was one."""
    dropped = False
    for attribute in _LAST_EXCEPTION_ATTRIBUTES:
        if getattr(sys, attribute, None) is not None:
            delattr(sys, attribute)
            dropped = True
    return dropped


def _cuda_allocated_bytes() -> int | None:
    """PyTorch's allocated bytes over all GPUs; None when CUDA is not in use in this process."""
    if not cuda_initialized():
        return None
    import torch

    return sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))
