"""Which names in the user namespace hold memory on a device (``%vram who`` and the OOM report).

The device is a parameter, so the same code runs on CPU in tests. torch is imported only when it is
already in ``sys.modules``: if nothing imported torch, nothing can hold tensors.

What is reachable from a value: tensors (and their own attributes, e.g. a bitsandbytes
``quant_state``), an ``nn.Module``'s parameters and buffers, an optimizer's state and param groups,
the items of dicts/lists/tuples/sets, and the ``__dict__`` of ordinary objects, up to
``_MAX_DEPTH`` steps. Properties and ``__getattr__`` are never called. Memory is counted per
storage (a view or slice counts its whole storage, once). Meta tensors hold no memory and never count.

The walk is bounded, so a notebook holding a big dataset in Python lists is not walked item by item: long
sequences are sampled first (``_SAMPLE``), and the walk from one name stops after ``MAX_VISITS`` objects;
such a name is marked incomplete (``Holder.complete``), and the report says so.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vram_magic._types import Holder

# Steps from a name's value into containers and object attributes. A module's parameters and an
# optimizer's state are part of the module/optimizer and take no extra step.
_MAX_DEPTH = 6
# Objects looked at per name (a module's parameters do not count): past it the walk stops and says so.
# About 0.1 s of walking; a model with thousands of parameters is never cut short.
MAX_VISITS = 20_000
# A container longer than this is first sampled: a sequence whose sampled items are all scalars or strings
# (token ids, texts), or whose first _SAMPLE items hold no tensor at all (rows of a tokenized dataset), is
# taken to hold none and is not walked further.
_SAMPLE = 32

_IPYTHON_NAMES = frozenset({"In", "Out", "exit", "quit", "get_ipython"})

# Values never walked into: no tensors inside, or (modules, classes, functions) not data.
_LEAVES = (
    str,
    bytes,
    bytearray,
    int,
    float,
    complex,
    bool,
    type(None),
    range,
    types.ModuleType,
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    functools.partial,
)

# (device, data_ptr) of one storage -> (its bytes, the first tensor found on it)
_Found = dict[tuple[str, int], tuple[int, Any]]


@dataclass(frozen=True)
class Walked:
    """What each name of a namespace reaches on one device, from one bounded walk."""

    values: dict[str, object]
    found: dict[str, _Found]
    unfinished: frozenset[str]  # names whose walk stopped at MAX_VISITS

    def holders(self) -> tuple[Holder, ...]:
        """The names that hold memory on the device, biggest first; a name whose walk stopped early is
        listed (``complete=False``) even when nothing was found before it stopped.

        A storage reachable from several names counts in each name's ``total_bytes``, and also in its
        ``shared_bytes``, with the other names in ``shared_with``."""
        owners: dict[tuple[str, int], list[str]] = {}
        for name, found in self.found.items():
            for key in found:
                owners.setdefault(key, []).append(name)
        holders = []
        for name, found in self.found.items():
            total = sum(nbytes for nbytes, _ in found.values())
            complete = name not in self.unfinished
            if total == 0 and complete:
                continue
            shared = 0
            others: set[str] = set()
            for key, (nbytes, _) in found.items():
                if len(owners[key]) > 1:
                    shared += nbytes
                    others.update(owners[key])
            others.discard(name)
            value = self.values[name]
            holders.append(Holder(name, _type_name(value), total, shared, tuple(sorted(others)), complete))
        holders.sort(key=lambda h: (-h.total_bytes, h.name))
        return tuple(holders)

    def bytes_only_in(self, names: Iterable[str]) -> int:
        """Bytes that deleting ``names`` would free: storages reachable from them and from no other name,
        each counted once (two of ``names`` sharing a model count it once; a name sharing it with a name
        that stays frees none of it)."""
        wanted = set(names)
        leaving: _Found = {}
        staying: set[tuple[str, int]] = set()
        for name, found in self.found.items():
            if name in wanted:
                leaving.update(found)
            else:
                staying.update(found)
        return sum(nbytes for key, (nbytes, _) in leaving.items() if key not in staying)


def walk_namespace(
    namespace: Mapping[str, object], device: str = "cuda", *, skip: Callable[[str], bool] | None = None
) -> Walked:
    """Walk every data name of ``namespace`` (not ``_private`` ones, IPython's, modules, functions or
    ``skip``'s) for storages on ``device``: ``"cuda"`` matches every ``cuda:N``, ``"cuda:1"`` exactly."""
    values: dict[str, object] = {}
    found: dict[str, _Found] = {}
    unfinished: set[str] = set()
    if "torch" not in sys.modules:  # if nothing imported torch, nothing holds tensors
        return Walked(values, found, frozenset())
    for name, value in list(namespace.items()):
        if name.startswith("_") or name in _IPYTHON_NAMES or isinstance(value, _LEAVES):
            continue
        if skip is not None and skip(name):
            continue
        # The namespace itself is not walked into (an IPython shell object would lead back to it).
        walker = _Walker(device, {id(namespace)})
        walker.walk(value, 0)
        values[name], found[name] = value, walker.found
        if walker.stopped:
            unfinished.add(name)
    return Walked(values, found, frozenset(unfinished))


def find_holders(
    namespace: Mapping[str, object],
    device: str = "cuda",
    *,
    skip: Callable[[str], bool] | None = None,
) -> tuple[Holder, ...]:
    """The names that hold memory on ``device``, biggest first (see ``Walked.holders``)."""
    return walk_namespace(namespace, device, skip=skip).holders()


def bytes_only_in(
    namespace: Mapping[str, object],
    names: Iterable[str],
    device: str = "cuda",
    *,
    skip: Callable[[str], bool] | None = None,
) -> int:
    """Bytes on ``device`` that deleting ``names`` would free (see ``Walked.bytes_only_in``)."""
    return walk_namespace(namespace, device, skip=skip).bytes_only_in(names)


def tensors_in(obj: object, device: str = "cuda") -> list[Any]:
    """The tensors on ``device`` reachable from ``obj`` within the walk's bounds, one per storage."""
    if "torch" not in sys.modules:
        return []
    walker = _Walker(device, set())
    walker.walk(obj, 0)
    return [tensor for _, tensor in walker.found.values()]


class _Walker:
    """One bounded walk from one value: the storages found on ``device``, and whether it stopped early."""

    def __init__(self, device: str, seen: set[int]) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.seen = seen
        self.found: _Found = {}
        self.visits = 0
        self.tensors = 0  # tensors met on any device: a sample that met none holds none
        self.stopped = False

    def walk(self, obj: object, depth: int) -> None:
        if isinstance(obj, _LEAVES) or id(obj) in self.seen or self.stopped:
            return
        if self.visits >= MAX_VISITS:
            self.stopped = True
            return
        self.visits += 1
        self.seen.add(id(obj))
        torch = self.torch
        children: Iterable[object]
        try:
            if isinstance(obj, torch.Tensor):
                self.tensors += 1
                _add_tensor(obj, self.device, self.found)
                if type(obj) is torch.Tensor or type(obj) is torch.nn.Parameter:
                    return
                children = list(_own_dict(obj).values())  # e.g. a bitsandbytes weight's quant_state
            elif isinstance(obj, torch.nn.Module):
                for tensor in [*obj.parameters(), *obj.buffers()]:
                    self.visits -= 1  # a model's own tensors are what matters: never cut short
                    self.walk(tensor, depth)
                return
            elif isinstance(obj, torch.optim.Optimizer):
                attrs = _own_dict(obj)
                for item in _optimizer_tensors(attrs):
                    self.walk(item, depth)
                # The rest, e.g. the optimizer wrapped by accelerate's AcceleratedOptimizer.
                children = [v for k, v in attrs.items() if k not in ("state", "param_groups")]
            elif isinstance(obj, dict):
                children = [*dict.keys(obj), *dict.values(obj)]
            elif isinstance(obj, (list, tuple, set, frozenset)):
                children = obj if isinstance(obj, (list, tuple)) else list(obj)
            else:
                children = list(_own_dict(obj).values())
        except Exception:
            return
        if depth < _MAX_DEPTH:
            self._walk_children(children, depth + 1)

    def _walk_children(self, children: Iterable[object], depth: int) -> None:
        if isinstance(children, (list, tuple)) and len(children) > _SAMPLE:
            step = len(children) // _SAMPLE
            if all(isinstance(children[i], _LEAVES) for i in range(0, len(children), step)):
                return  # token ids, texts, numbers
            tensors_before = self.tensors
            for child in children[:_SAMPLE]:
                self.walk(child, depth)
            if self.tensors == tensors_before:
                return  # rows of Python data: the first ones hold no tensor, the rest are taken alike
            children = children[_SAMPLE:]
        for child in children:
            if self.stopped:
                return
            if not isinstance(child, _LEAVES):  # cheap test first: big lists of numbers or strings are common
                self.walk(child, depth)


def _add_tensor(tensor: Any, device: str, found: _Found) -> None:
    """Record the storage under ``tensor`` if it is on ``device`` and holds memory."""
    where = tensor.device
    if where.type == "meta" or not _matches(where, device):
        return
    try:
        storage = tensor.untyped_storage()
    except Exception:  # sparse tensors and wrapper subclasses have no storage of their own
        return
    nbytes = storage.nbytes()
    if nbytes > 0:
        found.setdefault((str(where), storage.data_ptr()), (nbytes, tensor))


def _optimizer_tensors(attrs: dict[str, Any]) -> list[object]:
    """Params and per-param state (exp_avg, ...) of a torch optimizer, from its ``__dict__``."""
    tensors: list[object] = []
    state = attrs.get("state")
    if isinstance(state, dict):
        for param, per_param in state.items():
            tensors.append(param)
            if isinstance(per_param, dict):
                tensors.extend(per_param.values())
    groups = attrs.get("param_groups")
    if isinstance(groups, list):
        for group in groups:
            if isinstance(group, dict) and isinstance(group.get("params"), list):
                tensors.extend(group["params"])
    return tensors


def _own_dict(obj: object) -> dict[str, Any]:
    """``obj.__dict__`` without calling ``__getattr__`` or ``__getattribute__`` overrides."""
    try:
        attrs = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        return {}
    return attrs if isinstance(attrs, dict) else {}


def _matches(where: Any, device: str) -> bool:
    return str(where) == device if ":" in device else bool(where.type == device)


def _type_name(value: object) -> str:
    # "test_x.<locals>.Box" -> "Box"; "Outer.Inner" stays.
    return type(value).__qualname__.rsplit("<locals>.", 1)[-1]
