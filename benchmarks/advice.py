"""How right is the advice? Every fix on other people's cells, and fix 1 / --auto on realistic failing cells.

    .venv/bin/python benchmarks/advice.py

Two tables (CPU; no GPU needed, no network):

1. The corpus (tests/fixtures/real_cells: 82 cells of 18 public repositories, verbatim): every fix through
   the checks the rescue makes before it offers one, against a careful engineer's verdict per cell and fix.
   Counts crashes, broken results, false refusals and wrong applications.
2. The scenarios (tests/advice_scenarios.py: cells written as those notebooks write them, run for real on the
   simulated small GPU of tests/oom_budget.py): does ``%vram fix 1`` leave the notebook working, and does
   ``%%oomsafe --auto`` end in a working state, in how many runs.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # no config is fetched: the estimator says what it knows
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

from _machine import cpu_name  # noqa: E402


def corpus_table() -> str:
    from tests.real_cells import JUDGED_FIXES, judge, load_cells

    cells = load_cells()
    judgement = judge(cells)
    lines = [
        f"Corpus: {len(cells)} cells of {len({cell.repo for cell in cells})} repositories, "
        f"{len(JUDGED_FIXES)} fixes each",
        "",
        "| fix | offered | engineer: apply / either / refuse | false refusals | wrong applications "
        "| problems |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for fix in JUDGED_FIXES:
        mine = [o for o in judgement.outcomes if o.fix == fix]
        verdicts = [sum(o.expected == v for o in mine) for v in ("apply", "either", "refuse")]
        false = sum(o in judgement.false_refusals for o in mine)
        wrong = sum(o in judgement.wrong_applications for o in mine)
        problems = sum(o.problem is not None for o in mine)
        verdict = " / ".join(map(str, verdicts))
        offered = sum(o.applied for o in mine)
        lines.append(f"| {fix} | {offered} | {verdict} | {false} | {wrong} | {problems} |")
    lines.append(
        f"| **all** | {sum(o.applied for o in judgement.outcomes)} | | {len(judgement.false_refusals)} | "
        f"{len(judgement.wrong_applications)} | {len(judgement.problems)} |"
    )
    for outcome in judgement.false_refusals:
        lines.append(f"- false refusal: {outcome.cell} / {outcome.fix}: {outcome.reason}")
    for outcome in judgement.wrong_applications:
        lines.append(f"- wrong application: {outcome.cell} / {outcome.fix}")
    return "\n".join(lines)


def scenario_table() -> str:
    from IPython.testing.globalipapp import get_ipython

    from tests.advice_scenarios import SCENARIOS, build_checkpoints, measure

    ip = get_ipython()
    ip.run_line_magic("load_ext", "vram_magic")
    names = build_checkpoints(Path(tempfile.mkdtemp(prefix="vram-advice-")))
    lines = [
        "| scenario | fix 1 | fix 1 works | --auto | --auto runs |",
        "|---|---|---|---|---:|",
    ]
    fix_ok = auto_ok = 0
    for scenario in SCENARIOS:
        first = measure(ip, scenario, names, "fix 1")
        auto = measure(ip, scenario, names, "auto")
        fix_ok += first.worked
        auto_ok += auto.worked
        lines.append(
            f"| {scenario.name} | {first.fix} | {'yes' if first.worked else 'no: ' + first.detail} | "
            f"{'works' if auto.worked else 'no: ' + auto.detail} | {auto.runs} |"
        )
    total = len(SCENARIOS)
    lines.append(f"| **all** | | **{fix_ok}/{total}** | **{auto_ok}/{total}** | |")
    return "\n".join(lines)


def main() -> None:
    import IPython
    import torch
    import transformers

    started = time.perf_counter()
    print(
        f"Machine: {cpu_name()}, Python {platform.python_version()}, IPython {IPython.__version__}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, no GPU (simulated)\n"
    )
    print(corpus_table())
    print()
    print(scenario_table())
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
