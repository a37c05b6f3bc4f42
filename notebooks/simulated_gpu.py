"""A SIMULATED GPU for the scenario notebooks on machines without one: it raises the error a GPU capped with
``torch.cuda.set_per_process_memory_fraction`` raises, in torch's wording, when what is put on it passes the
cap. On a GPU the notebooks never use it: they cap the real GPU and run out of memory for real.
"""

import weakref

import torch

MiB, GiB = 2**20, 2**30
# torch 2.11's message on an H100 (79.18 GiB) under a per-process cap, with {blanks} for the sizes here
CAPPED_OOM = (
    "CUDA out of memory. Tried to allocate {size}. GPU 0 has a total capacity of 79.18 GiB of which {free} "
    "is free. Including non-PyTorch memory, this process has {used} memory in use. {cap} allowed; Of the "
    "allocated memory {allocated} is allocated by PyTorch, and 0 bytes is reserved by PyTorch but "
    "unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
    "Management  (https://docs.pytorch.org/docs/stable/notes/cuda.html"
    "#optimizing-memory-usage-with-pytorch-cuda-alloc-conf)"
)


def torch_size(n):  # sizes as torch writes them
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.2f} MiB"


class SimulatedGpu:
    """SIMULATED GPU, for machines without one. Models put on it count against `cap` while they exist
    (deleting one gives its share back); asking for more than is left raises the error a GPU capped with
    torch.cuda.set_per_process_memory_fraction raises, in torch's wording, with these sizes."""

    def __init__(self, cap, holding=()):
        self.cap = cap
        self.models = weakref.WeakKeyDictionary()  # model -> its bytes, forgotten once it is deleted
        for model in holding:
            self.models[model] = model.get_memory_footprint()

    def allocate(self, nbytes):
        held = sum(self.models.values())
        if held + nbytes > self.cap:
            print(f"SIMULATED: no GPU here; this is the error a GPU capped at {torch_size(self.cap)} raises.")
            in_use = held + 500 * MiB  # and a CUDA context
            sizes = {"size": nbytes, "free": 79.18 * GiB - in_use, "used": in_use, "cap": self.cap}
            sizes["allocated"] = held
            raise torch.OutOfMemoryError(CAPPED_OOM.format(**{k: torch_size(v) for k, v in sizes.items()}))

    def guard(self, model, method, needs):
        """Make `model.<method>(...)` ask this GPU for `needs` bytes before it runs."""
        real = getattr(model, method)

        def guarded(*args, **kwargs):
            self.allocate(needs)
            return real(*args, **kwargs)

        setattr(model, method, guarded)

    def charge_activations(self, model, per_sequence):
        """Make each forward pass of `model` ask this GPU for `per_sequence` bytes per sequence."""

        def forward_pre_hook(module, args, kwargs):
            self.allocate(kwargs["input_ids"].shape[0] * per_sequence)

        model.register_forward_pre_hook(forward_pre_hook, with_kwargs=True)

    def loads(self, model_class):
        """`model_class`, but its from_pretrained puts the model on this GPU after loading it."""
        gpu = self

        class OnTheSimulatedGpu(model_class):
            @classmethod
            def from_pretrained(cls, *args, **kwargs):
                model = super().from_pretrained(*args, **kwargs)  # real, in CPU RAM
                # offloaded with max_memory: it names no GPU here (there is none), so all stays in CPU RAM
                nbytes = 0 if "max_memory" in kwargs else model.get_memory_footprint()
                gpu.allocate(nbytes)
                gpu.models[model] = nbytes
                return model

        OnTheSimulatedGpu.__name__ = OnTheSimulatedGpu.__qualname__ = model_class.__name__
        return OnTheSimulatedGpu
