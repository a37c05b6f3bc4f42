"""A per-cell memory timeline (``%vram track on``): each cell's peak, end and change, per device.

On a GPU the figures are PyTorch's allocated memory (its peak statistics reset at each cell's start) plus
NVML's used memory of the whole device (other processes included). For CPU RAM they are the process's
resident set (RSS). Its peak is exact on Linux: the kernel's high-water mark (``VmHWM``), reset at each cell's
start through ``/proc/self/clear_refs`` (so ``getrusage``'s ``ru_maxrss`` also counts from the cell's start
while tracking is on). Elsewhere a background thread samples the RSS every few milliseconds while a cell runs,
and a shorter peak can be missed. Torch is never imported here: a GPU is counted once the notebook uses CUDA.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from vram_magic import _probe
from vram_magic._types import CellRecord

SAMPLE_SECONDS = 0.005  # how often the RSS sampler looks while a cell runs
FIRST_LINE_CHARS = 80


class Timeline(list[CellRecord]):
    """The records of ``vram_magic.timeline()``, oldest first; ``to_pandas()`` where pandas is installed."""

    def to_pandas(self) -> Any:
        try:
            pandas = importlib.import_module("pandas")
        except ImportError:
            raise ImportError("to_pandas() needs pandas: pip install pandas") from None
        columns = [*CellRecord.__dataclass_fields__]
        return pandas.DataFrame([asdict(record) for record in self], columns=columns)

    def devices(self) -> list[str]:
        """The devices recorded, in the order they first appear."""
        return list(dict.fromkeys(record.device for record in self))


def first_line(source: str) -> str:
    """The first line of a cell that says something (not blank, not a cell magic's line)."""
    for line in source.splitlines():
        text = line.strip()
        if text and not text.startswith("%%"):
            return text if len(text) <= FIRST_LINE_CHARS else text[: FIRST_LINE_CHARS - 1] + "…"
    return ""


def growers(records: Sequence[CellRecord], device: str, limit: int = 3) -> list[CellRecord]:
    """The cells that added most to ``device`` since its memory was last at its lowest (for a GPU: since it
    was last near empty), biggest first; only cells that added something."""
    mine = [record for record in records if record.device == device]
    if not mine:
        return []
    lowest = min(record.start_bytes for record in mine)
    near = lowest + max(lowest // 20, 64 * 2**20)  # within 5 % (or 64 MiB) of the lowest counts as as low
    since = max(i for i, record in enumerate(mine) if record.start_bytes <= near)
    grown = [record for record in mine[since:] if record.delta_bytes > 0]
    return sorted(grown, key=lambda record: record.delta_bytes, reverse=True)[:limit]


class _RssSampler:
    """Samples the process's RSS while a cell runs; ``stop()`` returns the peak seen since ``start()``."""

    def __init__(self, read_rss: Callable[[], int], seconds: float = SAMPLE_SECONDS) -> None:
        self._read, self._seconds = read_rss, seconds
        self._running = threading.Event()
        self._peak = 0
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        now = self._read()
        self._peak = now
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="vram_magic-rss", daemon=True)
            self._thread.start()
        self._running.set()
        return now

    def stop(self) -> tuple[int, int]:
        """(peak, now)."""
        self.pause()
        now = self._read()
        return max(self._peak, now), now

    def pause(self) -> None:
        """Stop sampling until the next ``start()``."""
        self._running.clear()

    def _loop(self) -> None:
        while True:
            self._running.wait()
            try:
                rss = self._read()
            except Exception:  # a process that cannot read its RSS any more: stop sampling
                return
            if rss > self._peak:
                self._peak = rss
            time.sleep(self._seconds)


class _KernelPeak:
    """Linux's own high-water mark of the RSS: reset at ``start()``, read at ``stop()``. Exact, no thread.
    The /proc files stay open (re-read in place: a few microseconds) and are opened again after a fork."""

    def __init__(self) -> None:
        self._pid = -1
        self._clear_refs = self._statm = self._status = -1
        self._page = os.sysconf("SC_PAGE_SIZE")

    @classmethod
    def opened(cls) -> _KernelPeak | None:
        """One whose files could be opened and read, or None (not Linux, or /proc refuses)."""
        peaks = cls()
        try:
            peaks.stop()
        except (OSError, ValueError):
            return None
        return peaks

    def start(self) -> int:
        self._open()
        os.write(self._clear_refs, b"5")  # proc(5): reset the peak RSS to the current RSS (Linux 4.0 on)
        return int(os.pread(self._statm, 256, 0).split()[1]) * self._page

    def stop(self) -> tuple[int, int]:
        """(peak, now)."""
        self._open()
        status = os.pread(self._status, 16384, 0)
        peak, now = _status_kib(status, b"VmHWM:"), _status_kib(status, b"VmRSS:")
        return max(peak, now), now

    def _open(self) -> None:
        if self._pid == os.getpid():
            return
        self._clear_refs = os.open("/proc/self/clear_refs", os.O_WRONLY)
        self._statm = os.open("/proc/self/statm", os.O_RDONLY)
        self._status = os.open("/proc/self/status", os.O_RDONLY)
        self._pid = os.getpid()


def _status_kib(status: bytes, field: bytes) -> int:
    """A ``VmXXX:   12345 kB`` field of /proc/self/status, in bytes."""
    start = status.index(field) + len(field)
    return int(status[start : status.index(b"kB", start)]) * 1024


def _process_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class Tracker:
    """Records each cell between ``begin`` and ``end`` (IPython's pre/post_run_cell, wired by the magics)."""

    def __init__(self, read_rss: Callable[[], int] | None = None, gpus: Any = None) -> None:
        """``read_rss``: sample this instead of the RSS (tests); by default the kernel's peak where Linux
        gives it, else the RSS sampled."""
        self.records = Timeline()
        self.on = False
        self._read_rss = read_rss
        self._peaks: _RssSampler | _KernelPeak | None = None  # chosen at the first cell, not on import
        self._gpus = gpus if gpus is not None else _CudaCounters()
        self._cell: tuple[str, float, int, dict[int, int]] | None = None
        self.problem: str | None = None  # why tracking stopped by itself, if it did

    def begin(self, source: str) -> None:
        """A cell starts: reset the peaks, note where memory starts. Never raises (it runs before every
        cell): a failure turns tracking off and is kept in ``problem``."""
        if not self.on:
            return
        try:
            rss = self._rss().start()
            self._cell = (first_line(source), time.perf_counter(), rss, self._gpus.start())
        except Exception as error:
            self._give_up(error)

    def end(self, cell: int | None) -> None:
        """Cell number ``cell`` ended: record its peak, end and change on each device. A cell that began
        before tracking was turned on is not recorded. Never raises, as ``begin``."""
        if self._cell is None:
            return
        try:
            self._record(cell, *self._cell)
        except Exception as error:
            self._give_up(error)
        self._cell = None

    def _record(
        self, cell: int | None, source: str, started: float, rss_start: int, gpu_start: dict[int, int]
    ) -> None:
        seconds = time.perf_counter() - started
        rss_peak, rss_end = self._rss().stop()
        for index, (peak, end, used) in self._gpus.end().items():
            delta = end - gpu_start.get(index, 0)
            self.records.append(CellRecord(cell, source, f"cuda:{index}", peak, end, delta, seconds, used))
        self.records.append(CellRecord(cell, source, "cpu", rss_peak, rss_end, rss_end - rss_start, seconds))

    def stop(self) -> None:
        """Stop recording (what was recorded stays)."""
        self.on = False
        self._cell = None
        if isinstance(self._peaks, _RssSampler):
            self._peaks.pause()

    def _give_up(self, error: Exception) -> None:
        self.stop()
        self.problem = f"{type(error).__name__}: {error}"

    def _rss(self) -> _RssSampler | _KernelPeak:
        if self._peaks is None:
            kernel = _KernelPeak.opened() if self._read_rss is None else None
            self._peaks = kernel or _RssSampler(self._read_rss or _process_rss)
        return self._peaks

    def growers(self, device: str, limit: int = 3) -> list[CellRecord]:
        return growers(self.records, device, limit)


class _CudaCounters:
    """PyTorch's allocated memory and its peak on each GPU that has a CUDA context; NVML's used memory."""

    def __init__(self) -> None:
        self._nvml_indices: list[int] | None = None

    def _devices(self) -> list[int]:
        if not _probe.cuda_initialized():
            return []
        torch = sys.modules["torch"]
        return [i for i in range(torch.cuda.device_count()) if _probe.has_context(i)]

    def start(self) -> dict[int, int]:
        """Reset each GPU's peak; what each holds now."""
        held: dict[int, int] = {}
        torch = sys.modules.get("torch")
        for index in self._devices():  # none unless torch has initialised CUDA
            assert torch is not None
            torch.cuda.reset_peak_memory_stats(index)
            held[index] = int(torch.cuda.memory_allocated(index))
        return held

    def end(self) -> dict[int, tuple[int, int, int | None]]:
        """Each GPU's (peak, now, NVML used). A GPU first used during the cell started at 0, and its peak
        since CUDA started is the cell's."""
        devices = self._devices()
        if not devices:
            return {}
        torch = sys.modules["torch"]
        used = self._nvml_used()
        figures = {}
        for index in devices:
            peak, now = int(torch.cuda.max_memory_allocated(index)), int(torch.cuda.memory_allocated(index))
            figures[index] = (peak, now, used[index] if index < len(used) else None)
        return figures

    def _nvml_used(self) -> list[int | None]:
        if self._nvml_indices is None:
            self._nvml_indices = _probe.visible_nvml_indices()
        return _probe.nvml_used_bytes(self._nvml_indices)


TRACKER = Tracker()  # the notebook's timeline: one per process, as there is one kernel
