"""How long a user waits: every row measured beside its baseline, each in a fresh Python process.

    .venv/bin/python benchmarks/interactive.py [--repeats 3] [--only NAME ...]

Prints one markdown table: each row and its baseline (medians of ``--repeats`` fresh processes), their
ratio, the target and whether it is met. The OOMs are CPU stand-ins (a function pins a tensor and raises
``torch.OutOfMemoryError`` with a real message), so the script runs the same on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import IPython
from _machine import cpu_name  # benchmarks/_machine.py: scripts run from this folder

ROOT = Path(__file__).resolve().parents[1]
MESSAGE_FILE = ROOT / "tests/fixtures/oom_messages/torch2_11_h100_plain.txt"
MODEL = "meta-llama/Llama-3.1-8B"  # a bundled config: no network, no Hugging Face cache needed

# Every child starts here: an IPython shell (as a kernel has one) and a timer that returns seconds.
PRELUDE = """
import json, sys, time
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
shell = InteractiveShell.instance()
def timed(run):
    start = time.perf_counter()
    with capture_output():
        run()
    return time.perf_counter() - start
def cell(text):
    return timed(lambda: shell.run_cell(text))
def line(magic, text):
    return timed(lambda: shell.run_line_magic(magic, text))
result = {}
"""

# A function that pins a tensor and runs out of memory, as a failing load or training step does.
FAILING = """
import torch
MESSAGE = open(%r).read().split(": ", 1)[1].strip()
def step():
    activations = torch.empty(64 * 2**20, dtype=torch.uint8)
    raise torch.OutOfMemoryError(MESSAGE)
"""

# 100k tokenized rows as `datasets.map` or a hand-written tokenizer loop leaves them: lists of dicts of lists.
DATASET = """
ids = list(range(1000, 1128))
dataset = [{"input_ids": list(ids), "attention_mask": [1] * 128, "labels": list(ids)} for _ in range(100_000)]
"""


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    baseline: str
    target: float  # seconds
    child: str  # Python run after PRELUDE; it puts "measured" and "baseline" (seconds) in `result`
    added: bool = True  # the target is on measured - baseline (else on measured alone)
    # (row, key): run that row first, in the same cache, and take its `key` as this row's baseline
    before: tuple[str, str] | None = None


ROWS = [
    Row(
        "load_ext",
        "`%load_ext vram_magic`",
        "`%load_ext` of an empty extension",
        0.1,
        """
import os, pathlib, tempfile
folder = tempfile.mkdtemp()
pathlib.Path(folder, "empty_extension.py").write_text("def load_ipython_extension(ip):\\n    pass\\n")
sys.path.insert(0, folder)
result["baseline"] = line("load_ext", "empty_extension")
result["measured"] = line("load_ext", "vram_magic")
heavy = [m for m in ("torch", "transformers", "libcst", "ipywidgets") if m in sys.modules]
result["note"] = "imports " + ", ".join(heavy) if heavy else "none of torch, transformers, libcst, ipywidgets"
""",
    ),
    Row(
        "estimate",
        f"first `%vram estimate {MODEL}`, torch and transformers already imported, empty cache",
        "importing torch and transformers",
        0.3,
        """
shell.run_line_magic("load_ext", "vram_magic")
result["baseline"] = timed(lambda: (__import__("torch"), __import__("transformers")))
result["measured"] = line("vram", "estimate MODEL")
""",
        added=False,
    ),
    Row(
        "estimate-model-imported",
        "first estimate, empty cache, after a Llama was loaded (transformers' Llama modules imported)",
        "importing torch, transformers and transformers' Llama modules",
        0.3,
        """
shell.run_line_magic("load_ext", "vram_magic")
result["baseline"] = timed(lambda: __import__("transformers.models.llama.modeling_llama"))
result["measured"] = line("vram", "estimate MODEL")
""",
        added=False,
    ),
    Row(
        "estimate-again",
        "the same estimate again",
        "the first estimate",
        0.05,
        """
shell.run_line_magic("load_ext", "vram_magic")
import torch, transformers
result["baseline"] = line("vram", "estimate MODEL")
result["measured"] = line("vram", "estimate MODEL")
""",
        added=False,
    ),
    Row(
        "estimate-cached",
        "first estimate in a new kernel, counted before (disk cache), torch and transformers imported",
        "the first estimate with an empty cache",
        0.1,
        """
shell.run_line_magic("load_ext", "vram_magic")
import torch, transformers
result["measured"] = line("vram", "estimate MODEL")
""",
        added=False,
        before=("estimate", "measured"),
    ),
    Row(
        "estimate-cold",
        "first estimate in a fresh kernel, nothing imported, empty cache",
        "importing torch and transformers",
        0.3,
        """
shell.run_line_magic("load_ext", "vram_magic")
result["measured"] = line("vram", "estimate MODEL")
""",
        before=("imports", "baseline"),
    ),
    Row(
        "cap",
        "first `%vram cap t4` on a machine without a GPU",
        "`%vram cap t4` with torch imported",
        0.3,
        """
shell.run_line_magic("load_ext", "vram_magic")
result["measured"] = line("vram", "cap t4")
result["torch"] = "torch" in sys.modules
import torch
result["baseline"] = line("vram", "cap t4")
result["note"] = "imported torch" if result.pop("torch") else "torch not imported"
""",
        added=False,
    ),
    Row(
        "rescue-dataset",
        "rescue after an OOM, a 100k-row tokenized dataset in the namespace",
        "the same rescue without the dataset",
        0.5,
        """
shell.run_line_magic("load_ext", "vram_magic")
shell.run_cell(FAILING)
cell("%%oomsafe\\nstep()")  # warm-up: the first report imports libcst and the renderers
result["baseline"] = cell("%%oomsafe\\nstep()")
shell.run_cell(DATASET)
result["measured"] = cell("%%oomsafe\\nstep()")
""",
        added=False,
    ),
    Row(
        "who",
        "`%vram who --device cpu` with 300k small tensors in the namespace",
        "`%vram who --device cpu` without them",
        0.3,
        """
shell.run_line_magic("load_ext", "vram_magic")
import torch
shell.run_cell("import torch\\nweights = torch.ones(1024)")
result["baseline"] = line("vram", "who --device cpu")
shell.run_cell("features = [torch.zeros(4) for _ in range(300_000)]")
result["measured"] = line("vram", "who --device cpu")
""",
        added=False,
    ),
    Row(
        "rescue-imports",
        "rescue after an OOM, transformers and peft imported",
        "the same failing cell without `%%oomsafe`",
        0.1,
        """
shell.run_line_magic("load_ext", "vram_magic")
import transformers, peft, transformers.modeling_utils, peft.tuners.lora
shell.run_cell(FAILING)
cell("%%oomsafe\\nstep()")  # warm-up: the first report imports libcst and the renderers
times = []
for _ in range(5):
    times.append((cell("step()"), cell("%%oomsafe\\nstep()")))
    shell.run_line_magic("vram", "free --device cpu")
result["baseline"] = statistics.median(t for t, _ in times)
result["measured"] = statistics.median(t for _, t in times)
""",
    ),
    Row(
        "no-oom",
        "`%%oomsafe` on a cell that does not OOM (median of 200)",
        "the same cell without `%%oomsafe`",
        0.001,
        """
shell.run_line_magic("load_ext", "vram_magic")
plain, ours = [], []
for _ in range(220):
    plain.append(cell("x = sum(range(100))"))
    ours.append(cell("%%oomsafe\\nx = sum(range(100))"))
result["baseline"] = statistics.median(plain[20:])
result["measured"] = statistics.median(ours[20:])
""",
    ),
]


# Run only as another row's baseline: importing torch and transformers in a fresh process.
IMPORTS = Row(
    "imports",
    "importing torch and transformers",
    "",
    0.0,
    """
result["baseline"] = timed(lambda: (__import__("torch"), __import__("transformers")))
result["measured"] = 0.0
""",
)


def run_child(row: Row, cache: str) -> dict[str, object]:
    source = "\n".join(
        [
            PRELUDE,
            "import statistics",
            f"MODEL = {MODEL!r}",
            f"FAILING = {FAILING % str(MESSAGE_FILE)!r}",
            f"DATASET = {DATASET!r}",
            "shell.user_ns['MODEL'] = MODEL",
            textwrap.dedent(row.child).replace("estimate MODEL", f"estimate {MODEL}"),
            "print('RESULT ' + json.dumps(result))",
        ]
    )
    env = {**os.environ, "XDG_CACHE_HOME": cache, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, env=env, cwd=ROOT, check=False
    )
    for output in done.stdout.splitlines():
        if output.startswith("RESULT "):
            return dict(json.loads(output[len("RESULT ") :]))
    raise SystemExit(f"{row.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def measure(row: Row, repeats: int) -> tuple[float, float, str]:
    measured, baseline, notes = [], [], set()
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            if row.before is not None:  # e.g. another kernel that counted the model first
                other, key = row.before
                first = run_child(next(r for r in (*ROWS, IMPORTS) if r.name == other), cache)
            result = run_child(row, cache)
            if row.before is not None:
                result["baseline"] = first[key]
        measured.append(float(result["measured"]))  # type: ignore[arg-type]
        baseline.append(float(result["baseline"]))  # type: ignore[arg-type]
        if "note" in result:
            notes.add(str(result["note"]))
    return statistics.median(measured), statistics.median(baseline), "; ".join(sorted(notes))


def seconds(value: float) -> str:
    return f"{value * 1000:.2f} ms" if value < 0.01 else f"{value:.3f} s"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per row (median)")
    parser.add_argument("--only", nargs="*", choices=[row.name for row in ROWS], help="rows to run")
    args = parser.parse_args()
    import torch  # only for the header line

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(
        f"Machine: {cpu_name()} ({os.cpu_count()} CPUs, {platform.system()}), Python "
        f"{platform.python_version()}, IPython {IPython.__version__}, torch {torch.__version__}, GPU: {gpu}; "
        f"median of {args.repeats} fresh processes per row\n"
    )
    print("| what the user does | time | baseline | baseline time | ratio | target | met |")
    print("|---|---:|---|---:|---:|---|---|")
    for row in ROWS:
        if args.only and row.name not in args.only:
            continue
        measured, baseline, note = measure(row, args.repeats)
        ratio = f"{measured / baseline:.2f}x" if baseline > 0 else "-"
        label = f"{row.label} ({note})" if note else row.label
        judged = measured - baseline if row.added else measured
        target = f"≤ {seconds(row.target)}" + (" added" if row.added else "")
        print(
            f"| {label} | {seconds(measured)} | {row.baseline} | {seconds(baseline)} | {ratio} | {target} "
            f"| {'met' if judged <= row.target else 'MISSED'} ({seconds(judged)}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
