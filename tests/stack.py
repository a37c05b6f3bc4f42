"""What differs between the stacks the suite runs on: the newest releases (``make test``) and the oldest this
package supports (``make test-oldest``, pinned in ``.ci/floors.txt``). A test whose right answer depends on
the installed version reads it here, so it checks the right thing on both."""

from __future__ import annotations

import importlib.metadata
import logging

import torch

TRANSFORMERS_MAJOR = int(importlib.metadata.version("transformers").split(".")[0])

# The keyword from_pretrained, from_config and a config take for a dtype: ``dtype`` from transformers 5 on
# (``torch_dtype`` still works there, with a warning); transformers 4 passes ``dtype=`` on to the model's
# __init__, which fails.
DTYPE = "dtype" if TRANSFORMERS_MAJOR >= 5 else "torch_dtype"

# What a from_pretrained without a dtype loads: the checkpoint's own dtype from transformers 5 on
# (``dtype="auto"`` is the default), float32 before.
LOADS_THE_CHECKPOINTS_DTYPE = TRANSFORMERS_MAJOR >= 5


def loaded_dtype(saved: torch.dtype) -> torch.dtype:
    """The dtype a from_pretrained without a dtype gives the weights of a checkpoint saved in ``saved``."""
    return saved if LOADS_THE_CHECKPOINTS_DTYPE else torch.float32


def _bitsandbytes_quantizes_here() -> bool:
    """Whether transformers can load a model quantized by bitsandbytes on this machine (transformers' own
    check): without a GPU only where bitsandbytes has a CPU backend that transformers accepts (transformers 5
    with bitsandbytes 0.50 do; transformers 4.45 with bitsandbytes 0.45 quantize on CUDA only)."""
    from transformers.integrations import validate_bnb_backend_availability

    quiet = logging.getLogger("transformers.integrations.bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return bool(validate_bnb_backend_availability(raise_exception=False))
    except Exception:
        return False
    finally:
        quiet.setLevel(level)


BITSANDBYTES_QUANTIZES_HERE = _bitsandbytes_quantizes_here()
NO_BITSANDBYTES_HERE = (
    "a real bitsandbytes load, and bitsandbytes cannot quantize here: transformers 4.45 with bitsandbytes "
    "0.45 quantize on CUDA only, and there is no GPU"
)
