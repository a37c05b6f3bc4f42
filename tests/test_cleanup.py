"""Freeing what a failed cell pinned: the frames' tensors come back, and a full garbage collection runs only
when something is still left to collect (with transformers imported one costs 0.1-0.3 s)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import pytest
import torch

from vram_magic._cleanup import free_memory

MiB = 2**20


class Notebook:
    """The smallest Keeper: a namespace, and no errors or outputs kept by a shell."""

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {}

    def kept_errors(self) -> list[BaseException]:
        return []

    def drop_kept_errors(self) -> bool:
        return False

    def drop_outputs(self, holds_memory: Callable[[object], bool]) -> list[tuple[str, object]]:
        return []


class Node:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.itself = self  # a reference cycle: only the garbage collector frees it


def failing_step(in_a_cycle: bool) -> None:
    activations = torch.empty(4 * MiB, dtype=torch.uint8)
    if in_a_cycle:
        node = Node(activations)  # noqa: F841 (held by the frame, as a model's hooks hold tensors)
        del activations
        gc.collect()  # the cycle survives two collections and reaches the oldest generation
        gc.collect()
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB.")


@pytest.fixture
def collections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    collect = gc.collect

    def counted(*generation: int) -> int:
        calls.append(generation)
        return collect(*generation)

    monkeypatch.setattr(gc, "collect", counted)
    return calls


def caught(in_a_cycle: bool) -> BaseException:
    try:
        failing_step(in_a_cycle)
    except torch.OutOfMemoryError as error:
        return error
    raise AssertionError("the step did not fail")


def test_a_failure_freed_by_dropping_its_frames_needs_no_full_collection(
    collections: list[tuple[int, ...]],
) -> None:
    cleanup = free_memory(Notebook(), failure=caught(in_a_cycle=False), device="cpu")
    assert cleanup.freed_tensor_bytes == 4 * MiB
    assert () not in collections  # no full collection
    assert collections == [(1,)]


def test_a_tensor_left_in_an_old_cycle_gets_a_full_collection(collections: list[tuple[int, ...]]) -> None:
    error = caught(in_a_cycle=True)
    collections.clear()
    cleanup = free_memory(Notebook(), failure=error, device="cpu")
    assert cleanup.freed_tensor_bytes == 4 * MiB
    assert collections == [(1,), ()]


class Block(torch.nn.Module):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def out_of_memory(module: Any, args: Any, kwargs: Any) -> None:
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")


def test_what_a_module_call_holds_in_a_closure_is_counted_as_freed() -> None:
    """torch's Module._call_impl keeps the call's kwargs in a closure when hooks run: the tensor passed only
    there (here the 64 MiB ``hidden * 2``) is freed by the cleanup itself, and counted."""
    block = Block()
    block.register_forward_pre_hook(out_of_memory, with_kwargs=True)

    def step() -> None:
        hidden = torch.ones(16 * MiB)  # 64 MiB in this frame
        block(hidden=hidden * 2)  # 64 MiB more, held only in the hook's kwargs

    try:
        step()
    except torch.OutOfMemoryError as error:
        failure: BaseException | None = error
    cleanup = free_memory(Notebook(), failure=failure, device="cpu")
    del failure
    assert cleanup.freed_tensor_bytes == 128 * MiB
