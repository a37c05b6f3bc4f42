"""Words for what the failed call's frames held (``%vram debug``), the allocations ``--record`` grouped by
line, and the cells that grew memory (``%vram track``)."""

from __future__ import annotations

import os

from vram_magic._types import AllocationGroup, CellRecord, FrameRecord, LocalRecord, PostMortem, Recording
from vram_magic._units import format_bytes

NO_POST_MORTEM = (
    "No post-mortem yet: it is kept when a `%%oomsafe` cell runs out of memory while PyTorch is imported "
    "(the frames of the failed call, from the cell down, with the tensors they held)."
)
MEMORY_VIEWER = "https://pytorch.org/memory_viz"


def frame_place(frame: FrameRecord, cell: int | None) -> str:
    """``cell [12], line 3`` for the cell's own frame; ``forward (modeling_llama.py:345)`` below it."""
    if frame.in_cell:
        where = f"cell [{cell}]" if cell is not None else "the cell"
        return (
            f"{where}, line {frame.line}"
            if frame.function == "<module>"
            else (f"{frame.function} ({where}, line {frame.line})")
        )
    return f"{frame.function} ({os.path.basename(frame.filename)}:{frame.line})"


def local_text(local: LocalRecord) -> str:
    """``float32 [2, 32, 4096, 4096] on cuda:0, 4.00 GiB`` or ``list of 3 tensors, 1.20 GiB``."""
    if local.same_as is not None:
        return f"the same {'tensor' if local.shape is not None else 'object'} as `{local.same_as}`"
    if local.shape is None:
        return f"{local.kind}, {format_bytes(local.nbytes)}"
    shape = ", ".join(str(n) for n in local.shape)
    text = f"{local.dtype} [{shape}] on {local.device}, {format_bytes(local.nbytes)}"
    return text + (f" (the notebook's `{local.notebook_name}`)" if local.notebook_name else "")


def held_items(post_mortem: PostMortem, limit: int = 3) -> tuple[str, ...]:
    """The biggest locals of the failed call, for the report: "`attn_weights` in forward (…): …"."""
    return tuple(
        f"`{local.name}` in {frame_place(frame, post_mortem.cell)}: {local_text(local)}"
        for frame, local in post_mortem.biggest(limit)
        if local.nbytes > 0 and local.notebook_name is None
    )


def render_post_mortem(post_mortem: PostMortem | None) -> str:
    """Every frame of the last OOM, from the cell down, with the tensors each held (``%vram debug``)."""
    if post_mortem is None:
        return NO_POST_MORTEM
    cell = f"cell [{post_mortem.cell}]" if post_mortem.cell is not None else "the cell"
    lines = [
        f"The last out-of-memory error, in {cell}: each frame from the cell down to where the allocation "
        "failed, with the tensors its locals held then (freed since: only these words are kept)."
    ]
    for frame in post_mortem.frames:
        lines.append(f"  {frame_place(frame, post_mortem.cell)}: {frame.code}".rstrip(": "))
        width = max((len(local.name) for local in frame.locals), default=0)
        lines += [f"      {local.name:<{width}}  {local_text(local)}" for local in frame.locals]
    return "\n".join(lines)


def allocation_items(groups: tuple[AllocationGroup, ...]) -> tuple[str, ...]:
    """ "line 12 `logits = model(**batch)`: 6.20 GiB in 3 tensors"."""
    items = []
    for group in groups:
        code = f" `{group.code}`" if group.code else ""
        count = f"{group.count} allocation{'s' if group.count != 1 else ''}"
        items.append(f"{group.where}{code}: {format_bytes(group.nbytes)} in {count}")
    return tuple(items)


def recording_text(recording: Recording) -> str:
    """Where the snapshot went, or why it did not."""
    if recording.problem is not None:
        return f"The allocation history is not saved: {recording.problem}."
    if recording.pickle_path is None:
        return ""
    text = f"Allocation history saved: {recording.pickle_path} (open it at {MEMORY_VIEWER})"
    if recording.html_path is not None:
        text += f" and {recording.html_path}"
    return text + "."


def grower_items(growers: tuple[CellRecord, ...]) -> tuple[str, ...]:
    """ "cell [7] `trainer = Trainer(...)` added 9.20 GiB (peak 10.1 GiB during it)"."""
    return tuple(
        f"cell [{record.cell if record.cell is not None else '?'}] `{record.source}` added "
        f"{format_bytes(record.delta_bytes)} (peak {format_bytes(record.peak_bytes)} during it)"
        for record in growers
    )
