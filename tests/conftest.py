"""One IPython shell for the whole session, as IPython's own tests and anywidget's do."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from IPython.testing.globalipapp import get_ipython

# vram_magic's disk cache of counted models (and any other tool's cache) starts empty for every test run, in
# this process and the kernels and scripts it starts, and never touches the user's ~/.cache.
# Removed when the run ends (each run used to leave its folder in /tmp).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="vram_magic_tests_cache_")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

# A real torch 2.x OOM message (captured on an H100 with torch 2.11): what CUDA raises under a 1.5 GiB cap.
CAPPED_LOAD_OOM = (
    "CUDA out of memory. Tried to allocate 1.59 GiB. GPU 0 has a total capacity of 79.18 GiB of which "
    "75.57 GiB is free. Including non-PyTorch memory, this process has 3.60 GiB memory in use. 1.50 GiB "
    "allowed; Of the allocated memory 3.00 GiB is allocated by PyTorch, and 0 bytes is reserved by PyTorch "
    "but unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
    "Management  (https://docs.pytorch.org/docs/stable/notes/cuda.html#optimizing-memory-usage-with-pytorch-cuda-alloc-conf)"
)


@pytest.fixture(scope="session")
def session_shell() -> Any:
    return get_ipython()


@pytest.fixture
def ip(session_shell: Any) -> Iterator[Any]:
    """The shell with vram_magic loaded; the user namespace is restored afterwards."""
    session_shell.run_line_magic("load_ext", "vram_magic")
    names_before = set(session_shell.user_ns)
    yield session_shell
    for name in set(session_shell.user_ns) - names_before:
        del session_shell.user_ns[name]
    session_shell.run_line_magic("unload_ext", "vram_magic")


@pytest.fixture
def tracked(ip: Any) -> Iterator[Any]:
    """The shell with ``%vram track on`` and an empty timeline; tracking off and the timeline empty after."""
    from IPython.utils.capture import capture_output

    from vram_magic import _timeline

    _timeline.TRACKER.records.clear()
    with capture_output():
        ip.run_line_magic("vram", "track on")
    yield ip
    _timeline.TRACKER.stop()
    _timeline.TRACKER.records.clear()
