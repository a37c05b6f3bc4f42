"""The data that flows through vram_magic: observe -> diagnose -> plan -> render.

Every type here is a frozen dataclass with plain fields. Missing data is ``None`` (never -1)
and units live in field names (``free_bytes``). Nothing here imports torch or IPython.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

OOMKind = Literal["cuda", "hip", "xpu", "mps", "cpu", "dispatch"]
CellKind = Literal["load", "merge", "training", "generation", "other"]


def _unallocated(reserved_bytes: int | None, allocated_bytes: int | None) -> int | None:
    if reserved_bytes is None or allocated_bytes is None:
        return None
    return max(reserved_bytes - allocated_bytes, 0)


@dataclass(frozen=True)
class OOMInfo:
    """What an out-of-memory message says. Field names match ``shared/oom-messages/expected.json``."""

    kind: OOMKind
    message: str
    device_index: int | None = None
    requested_bytes: int | None = None
    total_bytes: int | None = None
    free_bytes: int | None = None
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    process_bytes: int | None = None
    allowed_bytes: int | None = None
    other_processes: tuple[tuple[int, int], ...] = ()

    @property
    def unallocated_reserved_bytes(self) -> int | None:
        """Reserved by PyTorch's caching allocator but not handed out: the fragmentation figure."""
        return _unallocated(self.reserved_bytes, self.allocated_bytes)

    def room_bytes(self, freed_bytes: int = 0) -> int | None:
        """How much more this process could take, by the message, once ``freed_bytes`` went back: the GPU's
        free memory, and under a cap no more than the cap less what stays reserved."""
        free = None if self.free_bytes is None else self.free_bytes + freed_bytes
        if self.allowed_bytes is None or self.reserved_bytes is None:
            return free
        capped = max(self.allowed_bytes - max(self.reserved_bytes - freed_bytes, 0), 0)
        return capped if free is None else min(capped, free)


@dataclass(frozen=True)
class ProcessMemory:
    """One process using a GPU, as NVML reports it."""

    pid: int
    used_bytes: int | None


@dataclass(frozen=True)
class GpuSnapshot:
    """One visible GPU at one moment.

    ``allocated_bytes``/``reserved_bytes`` are this process's PyTorch figures (0 when CUDA was never
    initialised here). ``process_bytes`` is everything this process holds on the GPU (NVML), which also
    covers the CUDA context and non-PyTorch libraries. ``other_processes`` are NVML's view of the rest
    and ``others_bytes`` their sum; when NVML cannot see them, ``others_bytes`` is the remainder
    total - free - this process and ``others_are_remainder`` says so.
    """

    index: int
    name: str | None
    total_bytes: int | None
    free_bytes: int | None
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    process_bytes: int | None = None
    cap_bytes: int | None = None
    other_processes: tuple[ProcessMemory, ...] = ()
    others_bytes: int | None = None
    others_are_remainder: bool = False

    @property
    def unallocated_reserved_bytes(self) -> int | None:
        return _unallocated(self.reserved_bytes, self.allocated_bytes)

    @property
    def non_pytorch_bytes(self) -> int | None:
        """What this process holds outside PyTorch's allocator (CUDA context, cuBLAS workspaces, ...)."""
        if self.process_bytes is None or self.reserved_bytes is None:
            return None
        return max(self.process_bytes - self.reserved_bytes, 0)


@dataclass(frozen=True)
class CpuMemory:
    """This machine's RAM and this process's share of it."""

    total_bytes: int | None
    available_bytes: int | None
    process_rss_bytes: int | None


@dataclass(frozen=True)
class Snapshot:
    """Everything ``%vram`` shows. ``problems`` says, in plain words, what could not be read."""

    gpus: tuple[GpuSnapshot, ...]
    cpu: CpuMemory
    problems: tuple[str, ...] = ()

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        from vram_magic.render import mimebundle

        return mimebundle(self, include=include, exclude=exclude)

    def __str__(self) -> str:
        from vram_magic.render import render_snapshot

        return render_snapshot(self)


@dataclass(frozen=True)
class Caps:
    """The caps after ``%vram cap``: what was asked (``show``, ``set``, ``off``), each GPU's cap (None: none),
    the cap planned for when there is no GPU, and the preset or size as typed."""

    action: Literal["show", "set", "off"]
    gpu_caps: tuple[tuple[int, int | None], ...]
    target_bytes: int | None
    label: str | None = None
    no_bf16: bool = False  # the card rehearsed has no bfloat16: fixes and estimates use float16


@dataclass(frozen=True)
class Holder:
    """A name in the user namespace that holds memory on the device being counted.

    ``total_bytes`` counts every distinct storage reachable from the name; ``shared_bytes`` is the
    part of it also reachable from the names in ``shared_with``. ``complete`` is False when the walk
    stopped before the end of what the name holds (too many objects): it holds at least ``total_bytes``.
    """

    name: str
    type_name: str
    total_bytes: int
    shared_bytes: int = 0
    shared_with: tuple[str, ...] = ()
    complete: bool = True


@dataclass(frozen=True)
class Cleanup:
    """What freeing did. ``reclaimed_bytes`` is the CUDA allocator's drop (None without CUDA);
    ``freed_tensor_bytes`` counts the tensors we saw die."""

    released: tuple[str, ...]
    reclaimed_bytes: int | None
    freed_tensor_bytes: int

    @property
    def best_bytes(self) -> int:
        return self.reclaimed_bytes if self.reclaimed_bytes is not None else self.freed_tensor_bytes


@dataclass(frozen=True)
class Cause:
    """One reason the cell ran out of memory: ``key`` says which (``need``, ``cap``, ``holder``...) and
    ``facts`` hold its figures; ``text`` words it."""

    key: str
    facts: Facts = ()

    def fact(self, name: str, default: Any = None) -> Any:
        return dict(self.facts).get(name, default)

    @property
    def text(self) -> str:
        from vram_magic.render import cause_text

        return cause_text(self)


@dataclass(frozen=True)
class Fix:
    """One way out; ``title`` and ``why`` word it.

    ``code`` is what the user reads: the diff of a rewritten cell, else the code to type. A fix is runnable
    when it has ``rewritten_cell``: the cell to run, after deleting ``free_names``. ``change`` holds what the
    rewrite changed (the batch sizes, the chunks, the models). ``needed_bytes`` is the estimator's need of the
    fixed cell on the GPU and ``fits`` whether that fits the room (None: unknown). ``by_hand``: why it is
    advice to apply by hand (what it changes is in an earlier cell). ``ram_bytes``: (needed, free) CPU RAM,
    when RAM cannot hold it, so it is not offered to run.
    """

    key: str
    code: str
    rewritten_cell: str | None = None
    free_names: tuple[str, ...] = ()
    needed_bytes: int | None = None
    fits: bool | None = None
    change: Facts = ()
    by_hand: str | None = None
    ram_bytes: tuple[int, int] | None = None

    def fact(self, name: str, default: Any = None) -> Any:
        return dict(self.change).get(name, default)

    @property
    def runnable(self) -> bool:
        return self.rewritten_cell is not None

    @property
    def title(self) -> str:
        from vram_magic.render import fix_title

        return fix_title(self)

    @property
    def why(self) -> str:
        from vram_magic.render import fix_why

        return fix_why(self)


@dataclass(frozen=True)
class Attempt:
    """One run of a cell by ``%%oomsafe --auto``: which fix, how long, and how it ended (``error``: the
    error, other than running out of memory, that the fixed cell raised)."""

    label: str
    seconds: float
    succeeded: bool
    error: str | None = None


@dataclass(frozen=True)
class CellAnalysis:
    """What a cell does, as far as the failed run and a read of its code tell."""

    kind: CellKind
    failed_line: int | None = None
    failed_statement: str | None = None
    assigned_names: tuple[str, ...] = ()
    used_names: tuple[str, ...] = ()
    loads: int = 0  # model loads the cell makes
    generates: bool = False  # the cell calls generate() (not only a forward pass)


@dataclass(frozen=True)
class Preflight:
    """A cell not run because what it starts is estimated not to fit: its need, the room, and whether that
    room is a GPU's here (else the cap planned for without one). ``kind``: ``"load"`` (the peak of its model
    loads) or ``"training"`` (the floor of its first training steps, ``vram_magic._train_preflight``)."""

    need_bytes: int
    room_bytes: int
    on_gpu: bool
    kind: str = "load"


@dataclass(frozen=True)
class CellRecord:
    """One cell on one device: ``peak_bytes`` during it, ``end_bytes`` after it, ``delta_bytes`` = end minus
    start. ``device_used_bytes``: NVML's used memory of the whole GPU at the end (other processes' too)."""

    cell: int | None
    source: str
    device: str
    peak_bytes: int
    end_bytes: int
    delta_bytes: int
    seconds: float
    device_used_bytes: int | None = None

    @property
    def start_bytes(self) -> int:
        return self.end_bytes - self.delta_bytes


@dataclass(frozen=True)
class LocalRecord:
    """A local that held tensors: a tensor (``shape``, ``dtype``, ``device``) or a container of them."""

    name: str
    kind: str  # "tensor", or "list of 3 tensors"
    nbytes: int
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    device: str | None = None
    ident: int = 0  # the object's id() while it was alive (a number, not a reference)
    notebook_name: str | None = None  # the notebook's variable that is this same object (it survives)
    same_as: str | None = None  # an earlier local of the same frame that is this same tensor
    passed_on: bool = False  # the frame's *args or **kwargs: the called frame names what they hold
    members: tuple[tuple[int, int], ...] = ()  # a container's tensors: (id(), bytes) of each


@dataclass(frozen=True)
class FrameRecord:
    """One frame of the failed call, from the cell down: where it was and the locals that held tensors."""

    function: str
    filename: str
    line: int
    code: str
    in_cell: bool
    locals: tuple[LocalRecord, ...] = ()


@dataclass(frozen=True)
class PostMortem:
    """The frames of the last OOM, the cell's first; ``cell`` is the cell number where known."""

    frames: tuple[FrameRecord, ...]
    cell: int | None = None

    def biggest(self, limit: int = 3) -> list[tuple[FrameRecord, LocalRecord]]:
        """The locals that held most, over every frame; a tensor passed down from frame to frame is named
        once, by the deepest frame that has it; a container, only when a tenth of it or more is in tensors
        that no frame names."""
        deepest: dict[int, tuple[FrameRecord, LocalRecord]] = {}
        named = {local.ident for frame in self.frames for local in frame.locals if not local.members}
        for frame in self.frames:
            for local in frame.locals:
                unnamed = sum(nbytes for ident, nbytes in local.members if ident not in named)
                if local.same_as is None and (not local.members or unnamed >= local.nbytes // 10):
                    deepest[local.ident] = (frame, local)
        return sorted(deepest.values(), key=lambda pair: pair[1].nbytes, reverse=True)[:limit]


@dataclass(frozen=True)
class AllocationGroup:
    """Live allocations made by one line of the cell (``line`` and its ``code``) or one of the user's own
    functions (``function`` in ``filename``), or by library code only (``where`` says which)."""

    where: str
    nbytes: int
    count: int
    line: int | None = None
    code: str = ""


@dataclass(frozen=True)
class Recording:
    """What ``--record`` kept of an OOM: the groups, biggest first, and the files saved (or why not)."""

    groups: tuple[AllocationGroup, ...]
    pickle_path: str | None = None
    html_path: str | None = None
    problem: str | None = None


@dataclass(frozen=True)
class Report:
    """One OOM, explained: the single object every renderer reads."""

    error_text: str
    oom: OOMInfo | None
    cell: str
    analysis: CellAnalysis
    snapshot: Snapshot
    holders: tuple[Holder, ...]
    cleanup: Cleanup
    causes: tuple[Cause, ...]
    fixes: tuple[Fix, ...]
    traceback_text: str = ""
    rebound_names: tuple[str, ...] = ()
    attempts: tuple[Attempt, ...] = ()
    preflight: Preflight | None = None  # a load that was not run: the report is about its estimate
    growers: tuple[CellRecord, ...] = ()  # with %vram track on: the cells that grew memory most
    post_mortem: PostMortem | None = None  # what the failed call's frames held
    recording: Recording | None = None  # with %%oomsafe --record: the live allocations by line

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        from vram_magic.render import mimebundle

        return mimebundle(self, include=include, exclude=exclude)

    def __str__(self) -> str:
        from vram_magic.render import render_report

        return render_report(self)


Facts = tuple[tuple[str, Any], ...]


def facts(**values: Any) -> Facts:
    """Named figures for a ``Note`` or a ``Cause``, in a hashable form."""
    return tuple(values.items())


@dataclass(frozen=True)
class Note:
    """One thing to know about a figure (an assumption, an approximation): ``key`` says which, ``facts`` hold
    its figures; ``str(note)`` words it."""

    key: str
    facts: Facts = ()

    def fact(self, name: str, default: Any = None) -> Any:
        return dict(self.facts).get(name, default)

    def __str__(self) -> str:
        from vram_magic.render import note_text

        return note_text(self)


@dataclass(frozen=True)
class Estimate:
    """What loading (and, when asked, running or training) a model needs on one GPU.

    ``weights_bytes`` is what the weights take on the GPU as placed (quantized, and only the GPU's share when
    ``device_map="auto"`` offloads); ``offloaded_bytes`` what goes to CPU RAM instead. ``load_peak_bytes`` is
    the most the GPU must hold at once while loading; ``peak_bytes`` adds the KV cache and activations for
    ``context`` tokens, or a training step, when asked. Figures not asked for are None.
    """

    model: str
    model_class: str
    params: int
    dtype: str
    quantization: str | None
    device_map: str | None
    weights_bytes: int
    offloaded_bytes: int
    load_peak_bytes: int
    peak_bytes: int
    kv_cache_bytes: int | None = None
    activations_bytes: int | None = None
    training_bytes: int | None = None
    trainable_params: int | None = None
    context: int | None = None
    batch_size: int = 1
    training: str | None = None
    notes: tuple[Note, ...] = ()
    # A training step's parts, as (key, bytes): "weights", "adapters", "gradients", "optimizer",
    # "float32-casts", "activations", "logits"; their sum less nothing is ``peak_bytes`` when training.
    parts: tuple[tuple[str, int], ...] = ()
    max_batch_size: int | None = None  # with room_bytes: the largest batch whose step fits (0: none fits)
    max_context: int | None = None  # with room_bytes: the longest sequence whose step fits at this batch

    @property
    def label(self) -> str:
        """``bfloat16``, ``8-bit``, ``4-bit NF4``; ``+ offload`` when some weights go to CPU RAM."""
        from vram_magic.render import estimate_label

        return estimate_label(self)

    def __str__(self) -> str:
        from vram_magic.render import render_estimate_table

        return render_estimate_table((self,))


@dataclass(frozen=True)
class LoadPlan:
    """One way to load a model, with what it needs against the room there is (``fits`` None: room unknown).

    ``key`` is the fix it stands for (``bf16``/``fp16``/``fp32``, ``8bit``, ``4bit``, ``offload``) and ``how``
    the ``from_pretrained`` keywords that do it.
    """

    key: str
    how: str
    estimate: Estimate
    need_bytes: int
    room_bytes: int | None
    fits: bool | None

    @property
    def label(self) -> str:
        """The row's name: its dtype (``bfloat16``), ``8-bit``, ``4-bit NF4`` or ``offload``."""
        from vram_magic.render import plan_label

        return plan_label(self)

    def __str__(self) -> str:
        from vram_magic.render import render_estimate_table

        return render_estimate_table((self,))
