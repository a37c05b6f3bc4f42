"""A small GPU, simulated on the CPU: cells run out of memory where CUDA would, with CUDA's own message.

This machine has no GPU, yet the fixes vram_magic offers (8-bit and 4-bit loads, freeing a name, merging on
the CPU, halving the batch) have to be shown to rescue a cell for real. ``simulated_gpu(budget_bytes)`` lends
the test a GPU whose per-process cap is ``budget_bytes``; the cells run their real code on the CPU, and only
the memory accounting is simulated. What is counted, and where it fails:

- **Placement.** A model is on the simulated GPU when the user's cell puts it there:
  ``from_pretrained(..., device_map="cuda" | "cuda:N" | N | torch.device("cuda") | {"": N})`` (loaded with
  ``device_map="cpu"`` for real), ``device_map="auto"`` (or another strategy) without a ``max_memory`` that
  leaves the GPUs out, or ``model.to("cuda")`` / ``model.cuda()`` in the cell. ``model.to("cpu")`` /
  ``model.cpu()`` written in a cell takes it off. Moves made inside libraries (``Trainer`` moves the model to
  its device, which here is the CPU standing for the GPU) change nothing. ``device_map="cpu"`` loads stay on
  the CPU. ``hold(tensor)`` puts a loose tensor on the GPU (a stale activation from an earlier cell).
- **In use.** Every storage reachable from a placed model (its weights as placed, honouring quantization,
  LoRA adapters added later included) or a held tensor, each once, while it lives. Gradients, optimizer
  state and the caching allocator's slack are not counted.
- **Failures.** (1) A load: in ``transformers.modeling_utils.caching_allocator_warmup``, the step that on a
  GPU allocates the whole model at once (a real load fails at once there, measured on an H100), the
  bytes as placed (transformers' own ``get_total_byte_count``, with the quantizer's element sizes) must fit.
  transformers 4.x has no warmup: there the same bytes (counted as 5.x counts them) are asked for as
  ``PreTrainedModel._load_pretrained_model`` starts, the step that puts the weights on the GPU.
  A quantized ``device_map="auto"`` load that does not fit raises bitsandbytes' "Some modules are dispatched
  on the CPU or the disk" ValueError instead, as on a GPU. (2) A LoRA merge: peft's
  ``lora.Linear.get_delta_weight`` allocates the layer's ``out x in`` delta on the layer's device. (3) A
  forward pass with gradients on (a training step, or inference outside ``torch.no_grad()`` on a model whose
  weights require grad) allocates every layer's activations at once, ``layers x batch x seq x (34 x hidden +
  5 x heads x seq)`` bytes (16-bit activations without recomputation, Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models"); (4) without gradients (``generate()``, or under
  ``torch.no_grad()``) one layer's activations at a time and the KV cache, ``batch x seq x (34 x hidden + 5 x
  heads x seq) + 2 x layers x batch x seq x hidden x 2`` bytes.
- **The error** is ``torch.OutOfMemoryError`` with torch 2.x's capped wording (as in
  ``fixtures/oom_messages/torch2_11_h100_from_pretrained_capped.txt``), sizes printed as c10's
  ``format_size`` prints them, on an H100-sized GPU (79.18 GiB) with a 518 MiB CUDA context.

Not modelled: ``device_map="auto"`` spilling an unquantized model to the CPU (it raises NotImplementedError),
partial moves of submodules, fragmentation.
"""

from __future__ import annotations

import contextlib
import sys
import sysconfig
import weakref
from collections.abc import Iterator
from types import FrameType
from typing import Any

import torch

from vram_magic._who import tensors_in

KiB = 2**10
MiB = 2**20
GiB = 2**30
H100_TOTAL_BYTES = round(79.18 * GiB)
CUDA_CONTEXT_BYTES = 518 * MiB
_STRATEGIES = frozenset({"auto", "balanced", "balanced_low_0", "sequential"})
_MOVE_METHODS = frozenset({"to", "cuda", "cpu"})
_LIBRARY_DIRS = tuple({sysconfig.get_paths()[key] for key in ("purelib", "platlib", "stdlib", "platstdlib")})
DISPATCH_MESSAGE = (
    "Some modules are dispatched on the CPU or the disk. Make sure you have enough GPU RAM to fit the "
    "quantized model. If you want to dispatch the model on the CPU or the disk while keeping these modules "
    "in 32-bit, you need to set `llm_int8_enable_fp32_cpu_offload=True` and pass a custom `device_map` to "
    "`from_pretrained`."
)


def format_size(nbytes: int) -> str:
    """A size as c10's ``format_size`` prints it in CUDA's messages: ``512 bytes``, ``16.00 KiB``, ..."""
    if nbytes <= KiB:
        return f"{nbytes} bytes"
    for unit, size in (("KiB", KiB), ("MiB", MiB)):
        if nbytes <= size * 1024:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes / GiB:.2f} GiB"


def oom_message(*, requested: int, allowed: int, allocated: int, total: int, context: int) -> str:
    """torch 2.x's CUDA OOM text under a per-process cap (CUDACachingAllocator.cpp), figures filled in."""
    process = allocated + context
    return (
        f"CUDA out of memory. Tried to allocate {format_size(requested)}. GPU 0 has a total capacity of "
        f"{format_size(total)} of which {format_size(total - process)} is free. Including non-PyTorch "
        f"memory, this process has {format_size(process)} memory in use. {format_size(allowed)} allowed; "
        f"Of the allocated memory {format_size(allocated)} is allocated by PyTorch, and 0 bytes is reserved "
        "by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for "
        "Memory Management  (https://docs.pytorch.org/docs/stable/notes/cuda.html"
        "#optimizing-memory-usage-with-pytorch-cuda-alloc-conf)"
    )


def activation_bytes(config: Any, batch: int, seq: int) -> int:
    """A training step's activations (16-bit, no recomputation): L x b x s x (34 h + 5 a s)."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    return int(config.num_hidden_layers * batch * seq * (34 * hidden + 5 * heads * seq))


def inference_bytes(config: Any, batch: int, seq: int) -> int:
    """A forward pass without gradients: one layer's activations at a time, b x s x (34 h + 5 a s), and
    the KV cache, 2 x L x b x s x h in 16-bit."""
    hidden, heads, layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    return int(batch * seq * (34 * hidden + 5 * heads * seq) + 2 * layers * batch * seq * hidden * 2)


class SimulatedGpu:
    """GPU 0 with a per-process cap of ``budget_bytes`` (settable at any time, like
    ``torch.cuda.set_per_process_memory_fraction``). ``failures`` keeps every OOM message it raised."""

    def __init__(self, budget_bytes: int, total_bytes: int = H100_TOTAL_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self.total_bytes = total_bytes
        self.failures: list[str] = []
        self._modules: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        self._hooks: dict[int, list[Any]] = {}
        self._held: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()

    # Accounting ----------------------------------------------------------------------------------

    def in_use_bytes(self) -> int:
        """Bytes of every distinct storage on this GPU now."""
        storages: dict[int, int] = {}
        for owner in [*self._modules, *self._held.values()]:
            for tensor in tensors_in(owner, "cpu"):
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def allocate(self, nbytes: int, *, pending: int = 0) -> None:
        """One allocation of ``nbytes`` (``pending``: bytes this operation already took): raise CUDA's OOM
        when it does not fit under the cap."""
        allocated = self.in_use_bytes() + pending
        if allocated + nbytes <= self.budget_bytes:
            return
        message = oom_message(
            requested=nbytes,
            allowed=self.budget_bytes,
            allocated=allocated,
            total=self.total_bytes,
            context=CUDA_CONTEXT_BYTES,
        )
        self.failures.append(message)
        raise torch.OutOfMemoryError(message)

    def is_on_gpu(self, module: torch.nn.Module) -> bool:
        return any(module is part for placed in self._modules for part in placed.modules())

    # Placement -----------------------------------------------------------------------------------

    def hold(self, tensor: torch.Tensor) -> torch.Tensor:
        """Put a tensor on this GPU (checked against the cap); returns it."""
        self.allocate(tensor.untyped_storage().nbytes())
        self._held[id(tensor)] = tensor
        return tensor

    def place(self, module: torch.nn.Module) -> None:
        """Count ``module`` as on this GPU and watch its training steps."""
        if self.is_on_gpu(module):
            return
        self._modules.add(module)
        from transformers import PreTrainedModel

        self._hooks[id(module)] = [
            part.register_forward_pre_hook(self._forward, with_kwargs=True)
            for part in module.modules()
            if isinstance(part, PreTrainedModel)
        ]

    def move_in(self, module: torch.nn.Module) -> None:
        """``module.to("cuda")``: each tensor not yet here is copied over, one allocation each."""
        here = {t.untyped_storage().data_ptr() for owner in self._modules for t in tensors_in(owner, "cpu")}
        moved = 0
        for tensor in tensors_in(module, "cpu"):
            if tensor.untyped_storage().data_ptr() not in here:
                nbytes = tensor.untyped_storage().nbytes()
                self.allocate(nbytes, pending=moved)
                moved += nbytes
        self.place(module)

    def release(self, module: torch.nn.Module) -> None:
        """``module.to("cpu")``: it and every placed model inside it leave this GPU."""
        inside = {id(part) for part in module.modules()}
        for placed in list(self._modules):
            if id(placed) in inside:
                self._modules.discard(placed)
                for handle in self._hooks.pop(id(placed), []):
                    handle.remove()

    def _forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A forward pass: with gradients on (training, or inference outside ``torch.no_grad()``) autograd
        keeps every layer's activations; without, one layer's and the KV cache."""
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            return
        batch, seq = tokens.shape[:2]
        keeps = torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())
        sizes = activation_bytes if keeps else inference_bytes
        self.allocate(sizes(module.config, batch, seq))


# Patches ------------------------------------------------------------------------------------------


def _is_strategy(device_map: Any) -> bool:
    return isinstance(device_map, str) and device_map in _STRATEGIES


def _means_gpu(device_map: Any, max_memory: Any) -> bool:
    """Does this from_pretrained device_map put the model on the GPU (on a machine with one)?"""
    if device_map is None or device_map == "cpu":
        return False
    if isinstance(device_map, torch.device):
        return device_map.type == "cuda"
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return True
    if isinstance(device_map, str) and (device_map == "cuda" or device_map.startswith("cuda:")):
        return True
    if _is_strategy(device_map):
        if max_memory is None:
            return True
        if any(key not in ("cpu", "disk") for key in max_memory):
            raise NotImplementedError("simulated_gpu does not model max_memory limits for GPUs")
        return False  # max_memory leaves the GPUs out: everything goes to the CPU
    if isinstance(device_map, dict) and {str(where) for where in device_map.values()} <= {"cpu"}:
        return False
    if isinstance(device_map, dict) and all(_means_gpu(where, None) for where in device_map.values()):
        return True  # {"": 0}: all of it on one GPU
    raise NotImplementedError(f"simulated_gpu does not model device_map={device_map!r}")


def _moved_by_the_user(frame: FrameType | None) -> bool:
    """Whether a move was written in the user's code (a cell, a test), not made inside a library.
    ``to`` methods of torch/transformers/peft that call each other are skipped to find the caller."""
    while frame is not None and frame.f_code.co_name in _MOVE_METHODS:
        frame = frame.f_back
    return frame is not None and not frame.f_code.co_filename.startswith(_LIBRARY_DIRS)


def _bytes_as_placed(model: torch.nn.Module) -> int:
    """A model's bytes once loaded, counted as transformers 5's ``get_total_byte_count`` counts them: each
    tensor of its state dict once (tied weights once), the weights bitsandbytes quantizes at its element size
    (half a byte in 4-bit, one in 8-bit), the rest at their dtype's."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    total = 0.0
    tensors = model.state_dict(keep_vars=True)  # what the checkpoint fills: no buffer that is not saved
    for name, tensor in {id(tensor): (name, tensor) for name, tensor in tensors.items()}.values():
        module = model.get_submodule(name.rpartition(".")[0])
        quantized = bnb is not None and not name.endswith(".bias")
        if quantized and isinstance(module, bnb.nn.Linear4bit):
            total += tensor.numel() * 0.5
        elif quantized and isinstance(module, bnb.nn.Linear8bitLt):
            total += tensor.numel()
        else:
            total += tensor.numel() * tensor.element_size()
    return int(total)


@contextlib.contextmanager
def simulated_gpu(budget_bytes: int) -> Iterator[SimulatedGpu]:
    """Lend a simulated GPU with a cap of ``budget_bytes`` until the block ends (see the module's doc)."""
    import peft.tuners.lora.layer as lora_layer
    import transformers.modeling_utils as modeling_utils

    gpu = SimulatedGpu(budget_bytes)
    loads: list[tuple[bool, bool]] = []  # the load now running: (on the GPU, device_map is a strategy)
    pretrained = modeling_utils.PreTrainedModel
    original_from_pretrained = pretrained.__dict__["from_pretrained"]
    has_warmup = hasattr(modeling_utils, "caching_allocator_warmup")  # transformers 5
    original_warmup = getattr(modeling_utils, "caching_allocator_warmup", None)
    original_load_pretrained_model = pretrained.__dict__["_load_pretrained_model"]
    original_delta = lora_layer.Linear.get_delta_weight
    original_to, original_cpu = torch.nn.Module.to, torch.nn.Module.cpu

    def from_pretrained(cls: Any, *args: Any, **kwargs: Any) -> Any:
        device_map = kwargs.get("device_map")
        on_gpu = _means_gpu(device_map, kwargs.get("max_memory"))
        if on_gpu and not _is_strategy(device_map):
            kwargs["device_map"] = "cpu"  # this machine's stand-in for the GPU
        loads.append((on_gpu, _is_strategy(device_map)))
        try:
            model = original_from_pretrained.__func__(cls, *args, **kwargs)
        finally:
            loads.pop()
        if on_gpu:
            gpu.place(model)
        return model

    def allocate_the_load(nbytes: int, quantized: bool) -> None:
        strategy = loads[-1][1]
        if strategy and gpu.in_use_bytes() + nbytes > gpu.budget_bytes:
            if quantized:
                raise ValueError(DISPATCH_MESSAGE)
            raise NotImplementedError("simulated_gpu does not model device_map='auto' spilling to the CPU")
        gpu.allocate(nbytes)

    def warmup(model: Any, expanded_device_map: dict[str, Any], hf_quantizer: Any) -> None:
        if loads and loads[-1][0]:
            everything_here = {name: torch.device("cpu") for name in expanded_device_map}
            counts = modeling_utils.get_total_byte_count(model, everything_here, hf_quantizer)
            allocate_the_load(int(sum(counts.values())), hf_quantizer is not None)
        original_warmup(model, expanded_device_map, hf_quantizer)

    def load_pretrained_model(cls: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
        if loads and loads[-1][0]:
            hf_quantizer = kwargs.get("hf_quantizer")
            allocate_the_load(_bytes_as_placed(model), hf_quantizer is not None)
        return original_load_pretrained_model.__func__(cls, model, *args, **kwargs)

    def get_delta_weight(layer: Any, adapter: str) -> torch.Tensor:
        if gpu.is_on_gpu(layer):
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            gpu.allocate(b.shape[0] * a.shape[1] * b.element_size())
        delta: torch.Tensor = original_delta(layer, adapter)
        return delta

    def to(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        user = _moved_by_the_user(sys._getframe(1))
        if device is not None and device.type == "cuda":
            dtype = torch._C._nn._parse_to(*args, **kwargs)[1]
            result = original_to(module, dtype) if dtype is not None else module
            if user:
                gpu.move_in(result)
            return result
        result = original_to(module, *args, **kwargs)
        if user and device is not None and device.type == "cpu":
            gpu.release(result)
        return result

    def cuda(module: torch.nn.Module, device: Any = None) -> torch.nn.Module:
        gpu.move_in(module)
        return module

    def cpu(module: torch.nn.Module) -> torch.nn.Module:
        result = original_cpu(module)
        if _moved_by_the_user(sys._getframe(1)):
            gpu.release(result)
        return result

    patches: list[tuple[Any, str, Any]] = [
        (pretrained, "from_pretrained", classmethod(from_pretrained)),
        (modeling_utils, "caching_allocator_warmup", warmup)
        if has_warmup
        else (pretrained, "_load_pretrained_model", classmethod(load_pretrained_model)),
        (lora_layer.Linear, "get_delta_weight", get_delta_weight),
        (torch.nn.Module, "to", to),
        (torch.nn.Module, "cuda", cuda),
        (torch.nn.Module, "cpu", cpu),
    ]
    originals = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    for owner, name, replacement in patches:
        setattr(owner, name, replacement)
    try:
        yield gpu
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
