"""Which names in the user namespace hold memory on a device (``%vram who`` and the OOM report).

The device is a parameter, so the same code runs on CPU in tests. torch is imported only when it is
already in ``sys.modules``: if nothing imported torch, nothing can hold tensors.

What is reachable from a value: tensors (and their own attributes, e.g. a bitsandbytes
``quant_state``), an ``nn.Module``'s parameters and buffers, an optimizer's state and param groups,
the items of dicts/lists/tuples/sets, and the ``__dict__`` of ordinary objects, up to
``_MAX_DEPTH`` steps. Properties and ``__getattr__`` are never called. Memory is counted per
storage (a view or slice counts its whole storage, once). Meta tensors hold no memory and never count.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from vram_magic._types import Holder

# Steps from a name's value into containers and object attributes. A module's parameters and an
# optimizer's state are part of the module/optimizer and take no extra step.
_MAX_DEPTH = 6

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


def find_holders(
    namespace: Mapping[str, object],
    device: str = "cuda",
    *,
    skip: Callable[[str], bool] | None = None,
) -> tuple[Holder, ...]:
    """The names that hold memory on ``device``, biggest first.

    ``device``: ``"cuda"`` matches every ``cuda:N``; ``"cuda:1"`` matches exactly. A storage
    reachable from several names counts in each name's ``total_bytes``, and also in its
    ``shared_bytes``, with the other names in ``shared_with``.
    """
    per_name = _found_by_name(namespace, device, skip)
    owners: dict[tuple[str, int], list[str]] = {}
    for name, (_, found) in per_name.items():
        for key in found:
            owners.setdefault(key, []).append(name)

    holders = []
    for name, (value, found) in per_name.items():
        total = sum(nbytes for nbytes, _ in found.values())
        if total == 0:
            continue
        shared = 0
        others: set[str] = set()
        for key, (nbytes, _) in found.items():
            if len(owners[key]) > 1:
                shared += nbytes
                others.update(owners[key])
        others.discard(name)
        holders.append(Holder(name, _type_name(value), total, shared, tuple(sorted(others))))
    holders.sort(key=lambda h: (-h.total_bytes, h.name))
    return tuple(holders)


def bytes_only_in(
    namespace: Mapping[str, object],
    names: Iterable[str],
    device: str = "cuda",
    *,
    skip: Callable[[str], bool] | None = None,
) -> int:
    """Bytes on ``device`` that deleting ``names`` would free: storages reachable from them and from no
    other name, each counted once (two of ``names`` sharing a model count it once; a name sharing it with
    a name that stays frees none of it)."""
    wanted = set(names)
    leaving: _Found = {}
    staying: set[tuple[str, int]] = set()
    for name, (_, found) in _found_by_name(namespace, device, skip).items():
        if name in wanted:
            leaving.update(found)
        else:
            staying.update(found)
    return sum(nbytes for key, (nbytes, _) in leaving.items() if key not in staying)


def tensors_in(obj: object, device: str = "cuda") -> list[Any]:
    """The tensors on ``device`` reachable from ``obj``, one per storage (the first one found)."""
    if "torch" not in sys.modules:
        return []
    found: _Found = {}
    _walk(obj, device, 0, set(), found)
    return [tensor for _, tensor in found.values()]


def _found_by_name(
    namespace: Mapping[str, object], device: str, skip: Callable[[str], bool] | None
) -> dict[str, tuple[object, _Found]]:
    if "torch" not in sys.modules:
        return {}
    result = {}
    for name, value in list(namespace.items()):
        if name.startswith("_") or name in _IPYTHON_NAMES or isinstance(value, _LEAVES):
            continue
        if skip is not None and skip(name):
            continue
        found: _Found = {}
        # The namespace itself is not walked into (an IPython shell object would lead back to it).
        _walk(value, device, 0, {id(namespace)}, found)
        result[name] = (value, found)
    return result


def _walk(obj: object, device: str, depth: int, seen: set[int], found: _Found) -> None:
    import torch

    if isinstance(obj, _LEAVES) or id(obj) in seen:
        return
    seen.add(id(obj))
    children: Iterable[object]
    try:
        if isinstance(obj, torch.Tensor):
            _add_tensor(obj, device, found)
            children = list(_own_dict(obj).values())
        elif isinstance(obj, torch.nn.Module):
            for tensor in [*obj.parameters(), *obj.buffers()]:
                _walk(tensor, device, depth, seen, found)
            return
        elif isinstance(obj, torch.optim.Optimizer):
            attrs = _own_dict(obj)
            for item in _optimizer_tensors(attrs):
                _walk(item, device, depth, seen, found)
            # The rest, e.g. the optimizer wrapped by accelerate's AcceleratedOptimizer.
            children = [v for k, v in attrs.items() if k not in ("state", "param_groups")]
        elif isinstance(obj, dict):
            children = [*dict.keys(obj), *dict.values(obj)]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = list(obj)
        else:
            children = list(_own_dict(obj).values())
    except Exception:
        return
    if depth >= _MAX_DEPTH:
        return
    for child in children:
        if not isinstance(child, _LEAVES):  # cheap test first: big lists of numbers or strings are common
            _walk(child, device, depth + 1, seen, found)


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
