"""What ``%vram track on`` costs each cell: the same cells with tracking off and on, interleaved.

    .venv/bin/python benchmarks/timeline.py [--runs 300] [--warmup 30] [--sampler]

Prints one markdown table on stdout. Targets: <= 0.2 ms median added per cell on CPU (RSS read twice and
the sampler thread woken and put to sleep), <= 1 ms on a GPU (PyTorch's peak statistics reset and read for
each GPU in use, and NVML's used memory). With a CUDA GPU, CUDA is initialised first, so the GPU path runs.
On Linux the CPU peak is the kernel's high-water mark; ``--sampler`` measures the sampling thread used
elsewhere (macOS, Windows, a kernel without /proc/self/clear_refs) instead.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from typing import Any

import IPython
import torch
from _machine import cpu_name  # benchmarks/_machine.py: scripts run from this folder
from IPython.testing.globalipapp import get_ipython
from IPython.utils.capture import capture_output

ALLOCATES = "a cell that allocates and frees 64 MiB"
CELLS = {"`x = 1`": "x = 1\n", ALLOCATES: "t = torch.ones(64 * 2**20, dtype=torch.uint8)\ndel t\n"}


def timed_ms(shell: Any, cell: str) -> float:
    start = time.perf_counter_ns()
    shell.run_cell(cell, store_history=True)
    return (time.perf_counter_ns() - start) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--sampler", action="store_true", help="the RSS sampler instead of Linux's peak")
    args = parser.parse_args()
    if args.sampler:
        from vram_magic import _timeline

        _timeline.TRACKER = _timeline.Tracker(read_rss=_timeline._process_rss)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cells = dict(CELLS)
    if device == "cuda":
        torch.zeros(1, device="cuda")
        cells[ALLOCATES] = cells[ALLOCATES].replace("dtype=torch.uint8)", "dtype=torch.uint8, device='cuda')")
    shell = get_ipython()
    shell.run_line_magic("load_ext", "vram_magic")
    shell.run_cell("import torch")
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none"
    print(
        f"Machine: {cpu_name()} ({platform.system()}), Python {platform.python_version()}, IPython "
        f"{IPython.__version__}, torch {torch.__version__}, GPU: {gpu}; CPU peak: "
        f"{'sampled' if args.sampler else 'the kernel high-water mark where it can be reset'}; "
        f"median of {args.runs} cells each\n"
    )
    print("| cell | tracking off median ms | tracking on median ms | added ms | target | met |")
    print("|---|---:|---:|---:|---|---|")
    target = 1.0 if device == "cuda" else 0.2
    rows = []
    with capture_output():
        for label, cell in cells.items():
            off: list[float] = []
            on: list[float] = []
            gc.collect()
            for n in range(args.warmup + args.runs):  # interleaved, so drift hits both the same
                shell.run_line_magic("vram", "track off")
                plain = timed_ms(shell, cell)
                shell.run_line_magic("vram", "track on")
                tracked = timed_ms(shell, cell)
                if n >= args.warmup:
                    off.append(plain)
                    on.append(tracked)
            shell.run_line_magic("vram", "track clear")
            added = statistics.median(on) - statistics.median(off)
            row = (
                f"| {label} | {statistics.median(off):.3f} | {statistics.median(on):.3f} | {added:+.3f} "
                f"| ≤ {target} ms ({device}) | {'met' if added <= target else 'MISSED'} |"
            )
            rows.append(row)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
