"""Benchmark ``%%oomsafe``: its overhead on cells that do not OOM, and the memory it reclaims after one.

    .venv/bin/python benchmarks/oomsafe.py [--device cuda|cpu] [--runs 300] [--size-mib 256]

Prints one markdown report on stdout. Targets: <= 1 ms median added per cell; 100 % reclaimed (plain: 0 %).
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import IPython
import torch
from _machine import cpu_name  # benchmarks/_machine.py: scripts run from this folder
from IPython.testing.globalipapp import get_ipython
from IPython.utils.capture import capture_output

MiB = 2**20
# A real torch 2.11 message captured on an H100; on CUDA the benchmark triggers a real OOM instead.
MESSAGE_FILE = Path(__file__).parents[1] / "tests/fixtures/oom_messages/torch2_11_h100_plain.txt"
LOOP_CELL = "\n".join(
    ["total = 0", "squares = []", "for i in range(50):", "    total += i", "    squares.append(i * i)"]
    + [f"v{n} = total + {n}" for n in range(14)]
    + ["del squares"]
)
CELLS = {
    "`x = 1`": "x = 1\n",
    "20-line cell with a loop": LOOP_CELL + "\n",
    "last expression shown": "y = [i * i for i in range(20)]\nsum(y)\n",
}
# The user's function holds `weights` when it fails, as transformers' caching_allocator_warmup does.
SETUP = """
import torch, weakref
PINNED = []
def load_model(nbytes, device, message):
    weights = torch.empty(nbytes, dtype=torch.uint8, device=device)
    PINNED.append(weakref.ref(weights))
    if device == "cuda":
        torch.empty(2**50, dtype=torch.uint8, device=device)  # a real CUDA OOM (1 PiB)
    raise torch.OutOfMemoryError(message)
"""


def machine(device: str) -> str:
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"Machine: {cpu} ({platform.system()}), Python {platform.python_version()}, IPython "
        f"{IPython.__version__}, torch {torch.__version__}, GPU: {gpu}; device: {device}"
    )


def timed_ms(shell: Any, cell: str) -> float:
    start = time.perf_counter_ns()
    shell.run_cell(cell)  # silent=False: `silent` skips the display of the last expression
    return (time.perf_counter_ns() - start) / 1e6


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


def overhead(shell: Any, runs: int, warmup: int) -> list[str]:
    rows = [
        "| cell | plain median (p90) ms | %%oomsafe median (p90) ms | median added ms |",
        "|---|---:|---:|---:|",
    ]
    for label, cell in CELLS.items():
        magic_cell = "%%oomsafe\n" + cell
        plain: list[float] = []
        ours: list[float] = []
        gc.collect()
        for n in range(warmup + runs):  # interleaved, so drift hits both the same
            pair = (timed_ms(shell, cell), timed_ms(shell, magic_cell))
            if n >= warmup:
                plain.append(pair[0])
                ours.append(pair[1])
        plain_result, magic_result = shell.run_cell(cell), shell.run_cell(magic_cell)
        if not magic_result.success or magic_result.result != plain_result.result:
            raise SystemExit(f"{label}: %%oomsafe did not run it as the plain shell does")
        plain_ms, ours_ms = statistics.median(plain), statistics.median(ours)
        rows.append(
            f"| {label} | {plain_ms:.3f} ({p90(plain):.3f}) | {ours_ms:.3f} ({p90(ours):.3f}) "
            f"| {ours_ms - plain_ms:+.3f} |"
        )
    return rows


def allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else 0


def oom_cell(shell: Any, cell: str, size: int, device: str, error: str) -> tuple[float, float]:
    """Run a failing cell; return (its wall ms, the % of the pinned tensor that is freed after it)."""
    before = allocated(device)
    ms = timed_ms(shell, cell)
    raised = type(shell.last_execution_result.error_in_exec).__name__
    if raised != error:
        raise SystemExit(f"{cell!r} raised {raised}, not {error}")
    if device == "cuda":
        torch.cuda.synchronize()
        still_held = allocated(device) - before
    else:
        still_held = size if shell.user_ns["PINNED"][-1]() is not None else 0
    shell.run_line_magic("vram", f"free --device {device}")  # reset for the next run
    if shell.user_ns["PINNED"][-1]() is not None or allocated(device) > before:
        raise SystemExit(f"`%vram free` did not release the tensor after {cell!r}")
    return ms, 100 * (size - still_held) / size


def reclaimed(shell: Any, device: str, size: int, repeats: int) -> list[str]:
    shell.user_ns["OOM_MESSAGE"] = MESSAGE_FILE.read_text().split(": ", 1)[1].strip()
    shell.run_cell(SETUP)
    call = f"load_model({size}, {device!r}, OOM_MESSAGE)\n"
    plain = [oom_cell(shell, call, size, device, "OutOfMemoryError") for _ in range(repeats)]
    ours = [oom_cell(shell, "%%oomsafe\n" + call, size, device, "OutOfMemoryHandled") for _ in range(repeats)]
    rows = [
        f"| failing cell ({size // MiB} MiB pinned, {repeats} runs) | reclaimed | median wall ms |",
        "|---|---:|---:|",
    ]
    for label, results in (("plain IPython", plain), ("%%oomsafe", ours)):
        percents = {f"{percent:.0f} %" for _, percent in results}
        rows.append(
            f"| {label} | {' / '.join(sorted(percents))} | {statistics.median(m for m, _ in results):.1f} |"
        )
    added = statistics.median(m for m, _ in ours) - statistics.median(m for m, _ in plain)
    rows.append(f"| OOM handling added by %%oomsafe | | {added:+.1f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--runs", type=int, default=300, help="timed runs per cell (after warm-up)")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--size-mib", type=int, default=256, help="the tensor the failing cell pins")
    parser.add_argument("--oom-repeats", type=int, default=11)
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    shell = get_ipython()  # type: ignore[no-untyped-call]
    shell.run_line_magic("load_ext", "vram_magic")
    with capture_output():  # cell output, tracebacks and the reports stay off the table
        overhead_rows = overhead(shell, args.runs, args.warmup)
        memory_rows = reclaimed(shell, device, args.size_mib * MiB, args.oom_repeats)
    print("\n".join([machine(device), "", *overhead_rows, "", *memory_rows]))


if __name__ == "__main__":
    main()
