"""Fixes for inference and generation: chunks, no gradients, an offloaded KV cache.

chunk: one batched ``model.generate(**inputs)`` or ``model(**inputs)`` runs in chunks of the batch
(``vram_magic.chunked(model.generate, chunks=2)(**inputs)``): the same outputs, a fraction of the memory at a
time. inference-mode: a forward pass outside ``torch.no_grad()`` keeps every activation for a backward that
never comes; ``with torch.inference_mode():`` drops them. offload-cache: ``generate(...,
cache_implementation="offloaded")`` keeps the KV cache in CPU RAM but for the layer running.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from vram_magic._errors import NotApplicable
from vram_magic._types import facts
from vram_magic.cell import Cell, Generate, dotted
from vram_magic.fixes._base import Options, Rewritten, finish
from vram_magic.fixes._edit import Edits, code, find_arg, set_kwarg, string, with_keyword

_CHUNKED = "vram_magic.chunked"


def chunk(cell: Cell, options: Options) -> Rewritten:
    if cell.trains:
        raise NotApplicable("this cell trains: a training step is made smaller by its batch size")
    edits = Edits()
    chunks = 0
    for call, batched in _batched_calls(cell):
        if not batched:
            continue
        chunks = options.factor
        edits.needs.add("vram_magic")
        edits.change(
            call,
            lambda node: node.with_changes(
                func=cst.parse_expression(f"{_CHUNKED}({code(node.func).strip()}, chunks={options.factor})")
            ),
        )
    for call in _chunked_calls(cell):  # already in chunks: more of them
        inner = call.func
        assert isinstance(inner, cst.Call)
        current = next(
            (cell.names.integer(a.value) for a in inner.args if a.keyword and a.keyword.value == "chunks"),
            None,
        )
        if current is None:
            continue
        chunks = current * options.factor
        edits.change(inner, with_keyword("chunks", cst.Integer(str(chunks))))
    if not edits:
        raise NotApplicable("this cell makes no batched generate() or forward call to split into chunks")
    return finish(cell, "chunk", edits, facts(chunks=chunks))


def _batched_calls(cell: Cell) -> list[tuple[cst.Call, bool | None]]:
    calls: list[tuple[cst.Call, bool | None]] = [(g.call, g.batched) for g in _on_gpu(cell)]
    calls += [(f.call, f.batched) for f in cell.forwards if not f.in_training]
    return calls


def _chunked_calls(cell: Cell) -> list[cst.Call]:
    found = []
    for call in m.findall(cell.module, m.Call(func=m.Call())):
        assert isinstance(call, cst.Call) and isinstance(call.func, cst.Call)
        if dotted(call.func.func) == _CHUNKED:
            found.append(call)
    return found


def inference_mode(cell: Cell, options: Options) -> Rewritten:
    if cell.trains:
        raise NotApplicable("this cell trains: its forward passes need their gradients")
    forwards = [
        f
        for f in cell.forwards
        if f.grad == "on" and not f.in_training and not _deferred(f.call, f.statement)
    ]
    if not forwards:
        if cell.forwards:
            raise NotApplicable("its forward passes already run without gradients", already=True)
        raise NotApplicable("this cell calls no model on inputs outside torch.no_grad()")
    edits = Edits()
    edits.needs.add("torch")
    for forward in forwards:
        edits.wrap[id(forward.statement)] = "torch.inference_mode()"
    return finish(cell, "inference-mode", edits)


def _on_gpu(cell: Cell) -> list[Generate]:
    """The generate() calls of transformers models that may run on a GPU (not another library's engine,
    not a model this cell keeps in CPU RAM)."""
    return [g for g in cell.generates if g.of_model is not False and not g.on_cpu]


def offload_cache(cell: Cell, options: Options) -> Rewritten:
    generates = _on_gpu(cell)
    targets = [
        g
        for g in generates
        if g.cache_implementation is None and find_arg(g.call, "past_key_values") is None  # its own cache
    ]
    if not targets:
        if generates:
            raise NotApplicable("its generate() already chooses its cache", already=True)
        raise NotApplicable("this cell calls no generate()")
    edits = Edits()
    for generate in targets:
        edits.change(generate.call, lambda call: set_kwarg(call, "cache_implementation", string("offloaded")))
    return finish(cell, "offload-cache", edits)


def _deferred(call: cst.Call, statement: cst.CSTNode) -> bool:
    """Whether ``call`` sits in a lambda or a function the statement only defines: it runs later, outside
    whatever wraps the statement."""
    for holder in m.findall(statement, m.Lambda() | m.FunctionDef()):
        if any(inner is call for inner in m.findall(holder, m.Call())):
            return True
    return False
