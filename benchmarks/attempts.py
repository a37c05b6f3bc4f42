"""Benchmark %%oomsafe --auto on the three seed scenarios (real OOMs on a capped GPU).

How many runs ``--auto`` takes to reach a working cell, and how long, against the working configuration
run alone.

    .venv/bin/python benchmarks/attempts.py [--repeats 3] [--only merge,qlora,load]

Needs a CUDA GPU (a 0.85 B Llama, built from a config, and caps from tests/gpu/scenarios.py). Prints one
markdown report on stdout. Targets: --auto needs <= 2 runs (the cell as written, then one fix) and its time
to a working state is <= 1.2 x the time of the working configuration alone.
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _machine import cpu_name  # benchmarks/_machine.py: scripts run from this folder

REPO = Path(__file__).resolve().parents[1]
MAX_RUNS = 2
MAX_RATIO = 1.2


@dataclass
class Measured:
    runs: int
    ooms: int
    fix_title: str
    auto_seconds: float
    alone_seconds: float
    attempts: list[str]


def machine() -> str:
    import IPython
    import torch
    import transformers

    cpu = cpu_name()
    return (
        f"Machine: {cpu}, Python {platform.python_version()}, IPython {IPython.__version__}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, GPU: {torch.cuda.get_device_name(0)}"
    )


class Bench:
    """One IPython shell with vram_magic loaded; each run starts from the scenario's set-up, capped."""

    def __init__(self, llama: Path, output_dir: Path) -> None:
        from IPython.testing.globalipapp import get_ipython

        from tests.gpu import scenarios

        self.sc = scenarios
        self.llama = llama
        self.output_dir = output_dir
        self.shell = get_ipython()
        self.shell.run_line_magic("load_ext", "vram_magic")
        self.names = set(self.shell.user_ns)

    def _reset(self) -> None:
        from IPython.utils.capture import capture_output

        self.sc.lift_cap()
        for name in set(self.shell.user_ns) - self.names:
            del self.shell.user_ns[name]
        with capture_output():
            self.shell.run_line_magic("vram", "free")
        self.sc.release()

    def _timed(self, cell: str) -> tuple[bool, float, str]:
        from IPython.utils.capture import capture_output

        self.sc.release()
        start = time.perf_counter()
        with capture_output() as captured:
            result = self.shell.run_cell(cell)
        seconds = time.perf_counter() - start
        return bool(result.success), seconds, captured.stdout

    def auto(self, key: str) -> tuple[int, int, float, Any, list[str], str]:
        """``%%oomsafe --auto`` on the scenario's cell: runs, OOMs, seconds, the fix that worked, attempts,
        text. A load preflight stops before it runs counts one run and no OOM."""
        scenario = self.sc.SCENARIOS[key]
        self.sc.prepare(self.shell, scenario, self.llama, self.output_dir)
        with self.sc.recording_reports(self.shell) as reports:
            worked, seconds, out = self._timed(f"%%oomsafe --auto\n{scenario.cell}")
        self._reset()
        if not worked:
            raise SystemExit(f"{scenario.name}: --auto did not reach a working cell:\n{out}")
        preflight = re.search(r"Running fix (\d+) instead: ", out)
        if preflight is not None:  # estimated not to fit before it ran: the first plan that fits ran instead
            fix = self.sc.magics(self.shell).last_report.fixes[int(preflight.group(1)) - 1]
            return 1, len(reports), seconds, fix, [f"preflight ran {fix.title} first ({seconds:.1f} s)"], out
        if not reports:
            raise SystemExit(f"{scenario.name}: the cell as written did not run out of memory:\n{out}")
        ran = re.search(r"--auto: fix (\d+) worked", out)
        counted = re.search(r"Attempts by --auto \((\d+) runs", out)
        assert ran is not None and counted is not None, out
        last = self.sc.magics(self.shell).last_report  # newer vram_magic keeps what ran there
        source = last if last is not None and last.attempts else reports[0]
        fix = source.fixes[int(ran.group(1)) - 1]
        attempts = [line.strip() for line in out.splitlines() if re.match(r"  \d+\. .*\(\d+\.\d s\)$", line)]
        return int(counted.group(1)), len(reports), seconds, fix, attempts, out

    def alone(self, key: str, fix: Any) -> float:
        """The configuration that worked, run on its own from the same set-up and cap."""
        scenario = self.sc.SCENARIOS[key]
        self.sc.prepare(self.shell, scenario, self.llama, self.output_dir)
        for name in fix.free_names:  # what the fix freed is gone before the clock starts
            del self.shell.user_ns[name]
        worked, seconds, out = self._timed(fix.rewritten_cell)
        self._reset()
        if not worked:
            raise SystemExit(f"{scenario.name}: the working configuration failed on its own:\n{out}")
        return seconds

    def measure(self, key: str, repeats: int) -> Measured:
        _, _, _, fix, _, _ = self.auto(key)  # warm-up: CUDA kernels, bitsandbytes, the page cache
        self.alone(key, fix)
        autos, alones = [], []
        runs = ooms = 0
        attempts: list[str] = []
        for _ in range(repeats):
            runs, ooms, seconds, fix, attempts, _ = self.auto(key)
            autos.append(seconds)
            alones.append(self.alone(key, fix))
        return Measured(runs, ooms, fix.title, statistics.median(autos), statistics.median(alones), attempts)


def report(results: dict[str, Measured], names: dict[str, str], repeats: int) -> str:
    lines = [
        f"Median of {repeats} run(s) each, after one warm-up; the cell's wall time (set-up excluded).",
        "",
        "| scenario | --auto runs | OOMs | fix that worked | time to a working state s "
        "| working config alone s | ratio | targets |",
        "|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for key, m in results.items():
        ratio = m.auto_seconds / m.alone_seconds
        met = m.runs <= MAX_RUNS and ratio <= MAX_RATIO
        lines.append(
            f"| {names[key]} | {m.runs} | {m.ooms} | {m.fix_title} | {m.auto_seconds:.2f} "
            f"| {m.alone_seconds:.2f} | {ratio:.2f}x | {'met' if met else 'MISSED'} |"
        )
    lines += [
        "",
        f"Targets: <= {MAX_RUNS} runs and <= {MAX_RATIO}x the working configuration's time. A load that "
        "preflight estimates not to fit runs its first fitting plan at once: 1 run, 0 OOMs.",
        "",
    ]
    for key, m in results.items():
        lines.append(f"{names[key]}, attempts of the last --auto run:")
        lines += [f"  {attempt}" for attempt in m.attempts]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed --auto/alone pairs per scenario")
    parser.add_argument("--only", default="merge,qlora,load", help="scenarios, comma-separated")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats needs 1 or more")
    import torch

    if not torch.cuda.is_available():
        print(
            "benchmarks/attempts.py needs a CUDA GPU: torch.cuda.is_available() is False here. Run it on a "
            "machine with one (see benchmarks/README.md); on CPU, tests/test_scenario_notebooks.py runs the "
            "same three scenarios against a simulated GPU.",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(REPO))
    from tests.gpu import scenarios

    keys = [key.strip() for key in args.only.split(",") if key.strip()]
    unknown = [key for key in keys if key not in scenarios.SCENARIOS]
    if unknown:
        parser.error(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(scenarios.SCENARIOS)}"
        )
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory(prefix="vram-attempts-") as folder:
        llama = scenarios.save_llama(Path(folder, "llama"))
        bench = Bench(llama, Path(folder, "trainer"))
        results = {key: bench.measure(key, args.repeats) for key in keys}
    names = {key: scenarios.SCENARIOS[key].name for key in keys}
    print(report(results, names, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
