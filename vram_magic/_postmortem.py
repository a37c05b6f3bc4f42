"""A post-mortem that costs no memory: what the failed call's frames held, described before they are freed.

The rescue clears the failed cell's frames (that is what gives the memory back, and what leaves ``%debug``
nothing to show). Just before, ``describe`` keeps, for each frame from the cell down to where the allocation
failed, its function, file, line and the locals that hold tensors (name, shape, dtype, device, bytes;
containers summarised), as strings and numbers: no reference to a tensor or a frame is kept. Parameters
(``nn.Parameter``) are left out: they are the model's weights, which ``%vram who`` names; so are the locals
of the cell's own frame, which are the notebook's variables.
"""

from __future__ import annotations

import inspect
import linecache
import sys
from collections.abc import Iterator, Mapping
from dataclasses import replace
from types import TracebackType
from typing import Any

from vram_magic._oom import exception_chain
from vram_magic._types import FrameRecord, LocalRecord, PostMortem

MAX_LOCALS = 10  # per frame, the biggest
_CONTAINER_ITEMS = 256  # items looked at in a container of a local
_CONTAINER_DEPTH = 2


def describe(
    error: BaseException,
    cell_filename: str,
    cell_number: int | None = None,
    skip: tuple[str, ...] = (),
    namespace: Mapping[str, object] | None = None,
    cell_source: str | None = None,
) -> PostMortem | None:
    """The frames of ``error`` (and of the errors it was raised from) from the first frame of the cell,
    each with the locals that hold tensors. None when torch is not imported or no frame is the cell's. Frames
    of modules named in ``skip`` (or below them) are left out; a local that is also a variable of
    ``namespace`` says which (it outlives the failure); ``cell_source``: the cell as typed, whose line L is
    line L + 1 of ``cell_filename`` (that file starts with the ``%%oomsafe`` line)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    names = {id(value): name for name, value in (namespace or {}).items() if isinstance(value, torch.Tensor)}
    frames: list[FrameRecord] = []
    seen: set[int] = set()
    for number, linked in enumerate(exception_chain(error)):
        started = number > 0  # an error this one was raised from failed below the cell: all its frames count
        for tb in _walk(linked.__traceback__):
            frame = tb.tb_frame
            if frame.f_code.co_filename == cell_filename:
                started = True
            module = str(frame.f_globals.get("__name__", ""))
            if not started or id(frame) in seen or module.startswith(skip):
                continue
            seen.add(id(frame))
            record = _frame_record(frame, tb.tb_lineno, cell_filename, torch, names)
            if record.in_cell and cell_source is not None:
                typed = cell_source.splitlines()
                if 2 <= record.line <= len(typed) + 1:
                    record = replace(record, code=typed[record.line - 2].strip())
            frames.append(record)
    if not frames:
        return None
    # What a frame passes on through *args/**kwargs, the frame it calls names: only the deepest keeps them.
    frames[:-1] = [replace(f, locals=tuple(x for x in f.locals if not x.passed_on)) for f in frames[:-1]]
    return PostMortem(tuple(frames), cell_number)


def _walk(tb: TracebackType | None) -> Iterator[TracebackType]:
    while tb is not None:
        yield tb
        tb = tb.tb_next


def _frame_record(
    frame: Any, line: int, cell_filename: str, torch: Any, notebook_names: dict[int, str]
) -> FrameRecord:
    filename = frame.f_code.co_filename
    code = linecache.getline(filename, line).strip()
    passed_on = _star_parameters(frame.f_code)
    held: list[LocalRecord] = []
    # A cell's (or a module's) own frame has the notebook's namespace as its locals: `%vram who` names those.
    names = () if frame.f_code.co_name == "<module>" else list(frame.f_locals.items())
    first_name: dict[int, str] = {}
    for name, value in names:
        record = _local_record(name, value, torch)
        if record is None:
            continue
        same_as = first_name.setdefault(record.ident, name)
        held.append(
            replace(
                record,
                notebook_name=notebook_names.get(record.ident),
                same_as=same_as if same_as != name else None,
                passed_on=name in passed_on,
            )
        )
    held.sort(key=lambda record: record.nbytes, reverse=True)
    return FrameRecord(
        function=frame.f_code.co_name,
        filename=filename,
        line=line,
        code=code,
        in_cell=filename == cell_filename,
        locals=tuple(held[:MAX_LOCALS]),
    )


def _star_parameters(code: Any) -> frozenset[str]:
    """The names of a function's ``*args`` and ``**kwargs``: what it passes on to the function it calls."""
    names, at = [], code.co_argcount + code.co_kwonlyargcount
    if code.co_flags & inspect.CO_VARARGS:
        names.append(code.co_varnames[at])
        at += 1
    if code.co_flags & inspect.CO_VARKEYWORDS:
        names.append(code.co_varnames[at])
    return frozenset(names)


def _local_record(name: str, value: Any, torch: Any) -> LocalRecord | None:
    if isinstance(value, torch.Tensor):
        if isinstance(value, torch.nn.Parameter):
            return None
        return LocalRecord(
            name=name,
            kind="tensor",
            nbytes=_tensor_bytes(value),
            shape=tuple(int(n) for n in value.shape),
            dtype=str(value.dtype).removeprefix("torch."),
            device=str(value.device),
            ident=id(value),
        )
    if not isinstance(value, list | tuple | set | frozenset | Mapping):
        return None
    tensors: dict[int, int] = {}
    _collect(value, torch, tensors, _CONTAINER_DEPTH)
    if not tensors:
        return None
    kind = f"{type(value).__name__} of {len(tensors)} tensor{'s' if len(tensors) != 1 else ''}"
    return LocalRecord(
        name=name, kind=kind, nbytes=sum(tensors.values()), ident=id(value), members=tuple(tensors.items())
    )


def _collect(value: Any, torch: Any, tensors: dict[int, int], depth: int) -> None:
    """The tensors in a container, a few levels down (not Parameters), by id."""
    items = value.values() if isinstance(value, Mapping) else value
    for i, item in enumerate(items):
        if i >= _CONTAINER_ITEMS:
            return
        if isinstance(item, torch.Tensor):
            if not isinstance(item, torch.nn.Parameter):
                tensors[id(item)] = _tensor_bytes(item)
        elif depth > 1 and isinstance(item, list | tuple | Mapping):
            _collect(item, torch, tensors, depth - 1)


def _tensor_bytes(tensor: Any) -> int:
    try:
        return int(tensor.numel()) * int(tensor.element_size())
    except Exception:  # a tensor subclass that cannot say
        return 0
