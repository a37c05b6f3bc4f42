"""Benchmark ``vram_magic.estimator.estimate``: its load peak against the real one, and against accelerate's.

For each model (Llama, Qwen2 and BERT, built from a config and saved in bfloat16) and each way to load it
(bf16, 8-bit, 4-bit NF4, CPU offload), the peak GPU memory of ``from_pretrained`` as measured by torch, our
estimate from the config alone, and the figure accelerate's ``estimate-memory`` command gives.

    .venv/bin/python benchmarks/estimate_accuracy.py [--only llama,qwen,bert] [--sizes small,large]
    .venv/bin/python benchmarks/estimate_accuracy.py --dry-run

Needs a CUDA GPU, except with ``--dry-run`` (builds, saves and loads the models on CPU, runs both estimators,
measures nothing). Prints one markdown report on stdout. Target: our estimate within +-10 % of the measured
peak, and never more than 5 % under it.
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _machine import cpu_name  # benchmarks/_machine.py: scripts run from this folder

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
MAX_OVER = 10.0  # % our estimate may be above the measured peak
MAX_UNDER = 5.0  # % it may be below

# name -> (transformers class, {size: config keywords}); the large Llama is attempts.py's 0.85 B.
MODELS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "llama": (
        "LlamaForCausalLM",
        {
            "small": {
                "hidden_size": 768,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "num_key_value_heads": 4,
                "intermediate_size": 2048,
                "vocab_size": 32000,
            },
            "large": {
                "hidden_size": 2048,
                "num_hidden_layers": 16,
                "num_attention_heads": 16,
                "num_key_value_heads": 4,
                "intermediate_size": 5632,
                "vocab_size": 32000,
            },
        },
    ),
    "qwen": (  # tied embeddings and q/k/v biases, as Qwen2.5; "large" is Qwen2.5-0.5B's shape
        "Qwen2ForCausalLM",
        {
            "small": {
                "hidden_size": 512,
                "num_hidden_layers": 12,
                "num_attention_heads": 8,
                "num_key_value_heads": 2,
                "intermediate_size": 1536,
                "vocab_size": 151936,
                "tie_word_embeddings": True,
            },
            "large": {
                "hidden_size": 896,
                "num_hidden_layers": 24,
                "num_attention_heads": 14,
                "num_key_value_heads": 2,
                "intermediate_size": 4864,
                "vocab_size": 151936,
                "tie_word_embeddings": True,
            },
        },
    ),
    "bert": (  # bert-base and bert-large shapes, two labels
        "BertForSequenceClassification",
        {
            "small": {
                "hidden_size": 768,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "intermediate_size": 3072,
                "vocab_size": 30522,
                "num_labels": 2,
            },
            "large": {
                "hidden_size": 1024,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "intermediate_size": 4096,
                "vocab_size": 30522,
                "num_labels": 2,
            },
        },
    ),
}
PLANS = ("bf16", "8bit", "4bit", "offload")
NO_OFFLOAD = {"bert"}  # at 0.2-0.7 GiB, offloading half of a BERT tells nothing the causal LMs do not


@dataclass
class Built:
    key: str
    size: str
    class_name: str
    path: Path
    bf16_bytes: (
        int  # parameters and buffers in bfloat16, tied weights once: what half of sets the offload cap
    )


@dataclass
class Row:
    model: str
    params: int
    plan: str
    actual: int | None
    reserved: int | None
    ours: int
    theirs: float
    theirs_rule: str


def machine() -> str:
    import bitsandbytes
    import torch
    import transformers

    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"Machine: {cpu}, Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, bitsandbytes {bitsandbytes.__version__}, GPU: {gpu}"
    )


def build(key: str, size: str, folder: Path, device: str) -> Built:
    """Build the model from its config on ``device`` (random weights), save it in bfloat16 to ``folder``."""
    import torch
    import transformers

    class_name, sizes = MODELS[key]
    model_class = getattr(transformers, class_name)
    config = model_class.config_class(**sizes[size])
    with torch.device(device):
        model = model_class(config).to(torch.bfloat16)
    unique = {id(t): t for t in (*model.parameters(), *model.buffers())}
    bf16_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    path = folder / f"{key}-{size}"
    model.save_pretrained(path)
    del model, unique
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return Built(key, size, class_name, path, bf16_bytes)


def load_kwargs(plan: str, built: Built, device: str) -> dict[str, Any]:
    """The ``from_pretrained`` keywords of a plan; on CPU (``--dry-run``) all go to ``device_map="cpu"``."""
    import torch
    from transformers import BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16, "device_map": device}
    if plan == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif plan == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    elif plan == "offload" and device == "cuda":
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = {0: built.bf16_bytes // 2, "cpu": "32GiB"}
    return kwargs


def ours(built: Built, plan: str) -> tuple[int, int]:
    """(params, peak_bytes) from vram_magic's estimate, from the saved folder's config.json alone."""
    from vram_magic.estimator import estimate

    if plan == "offload":
        found = estimate(built.path, dtype="bfloat16", device_map="auto", gpu_bytes=built.bf16_bytes // 2)
    else:
        quantization = plan if plan in ("8bit", "4bit") else None
        found = estimate(built.path, dtype="bfloat16", quantization=quantization, device_map="cuda")
    return found.params, found.peak_bytes


def accelerate_total(built: Built) -> int:
    """accelerate's ``estimate-memory`` total for the model, in float32 bytes.

    As accelerate 1.15's ``accelerate/commands/estimate.py`` does: ``create_empty_model`` builds
    ``AutoModel.from_config(config, torch_dtype=torch.float32)`` under ``init_empty_weights()`` (the base
    model: no LM or classification head, unless the config has an ``auto_map``), then ``gather_data`` takes
    ``total_size, largest_layer = calculate_maximum_sizes(model)``.
    """
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(built.path)
    with init_empty_weights():
        model = AutoModel.from_config(config, dtype=torch.float32)
    total_size, _largest_layer = calculate_maximum_sizes(model)
    return int(total_size)


def accelerate_figure(total_fp32: int, plan: str) -> tuple[float, str]:
    """``gather_data``'s rule: float16 (and so bf16) is the float32 total / 2, int8 / 4, int4 / 8. It has no
    offload: for that plan its figure is the 16-bit total it would print."""
    divisor = {"8bit": 4, "4bit": 8}.get(plan, 2)
    rule = {"8bit": "int8", "4bit": "int4"}.get(plan, "float16")
    return total_fp32 / divisor, rule


def measure(built: Built, plan: str) -> tuple[int, int]:
    """(peak allocated, peak reserved) on the GPU during ``from_pretrained``, above what was held before."""
    import torch
    import transformers

    model_class = getattr(transformers, built.class_name)
    kwargs = load_kwargs(plan, built, "cuda")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    allocated_before = torch.cuda.memory_allocated()
    reserved_before = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    model = model_class.from_pretrained(built.path, **kwargs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - allocated_before
    reserved = torch.cuda.max_memory_reserved() - reserved_before
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return peak, reserved


def load_on_cpu(built: Built, plan: str) -> float:
    """``--dry-run``: load the plan on CPU (``device_map="cpu"``) to check its keywords; seconds taken."""
    import transformers

    model_class = getattr(transformers, built.class_name)
    start = time.perf_counter()
    model = model_class.from_pretrained(built.path, **load_kwargs(plan, built, "cpu"))
    seconds = time.perf_counter() - start
    del model
    gc.collect()
    return seconds


def error_pct(figure: float, actual: int | None) -> float | None:
    return None if not actual else (figure - actual) / actual * 100


def verdict(error: float | None) -> str:
    if error is None:
        return "dry run"
    return "met" if -MAX_UNDER <= error <= MAX_OVER else "MISSED"


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.3f} GiB"


def pct(n: float | None) -> str:
    return "-" if n is None else f"{n:+.1f} %"


def report(rows: list[Row]) -> str:
    lines = [
        "| model | params | plan | actual peak (reserved) | our estimate | error | accelerate (rule) "
        "| its error | verdict |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    met = 0
    for row in rows:
        ours_error = error_pct(row.ours, row.actual)
        theirs_error = error_pct(row.theirs, row.actual)
        met += verdict(ours_error) == "met"
        actual = "-" if row.actual is None else f"{gib(row.actual)} ({gib(row.reserved)})"
        lines.append(
            f"| {row.model} | {row.params / 1e9:.3f} B | {row.plan} | {actual} | {gib(row.ours)} "
            f"| {pct(ours_error)} | {gib(row.theirs)} ({row.theirs_rule}) | {pct(theirs_error)} "
            f"| {verdict(ours_error)} |"
        )
    measured = sum(row.actual is not None for row in rows)
    lines += [
        "",
        f"Target: our estimate within +-{MAX_OVER:.0f} % of the actual peak and never more than "
        f"{MAX_UNDER:.0f} % under it; met on {met} of {measured} measured rows. Actual peak: "
        "torch.cuda.max_memory_allocated() during from_pretrained, above what was allocated before "
        "(max_memory_reserved() likewise, in brackets). accelerate: its estimate-memory rule (the base model "
        "from AutoModel in float32, calculate_maximum_sizes' total, /2 for 16-bit, /4 int8, /8 int4; it has "
        "no offload, so that row shows its 16-bit total).",
    ]
    return "\n".join(lines)


def parse_list(text: str, choices: tuple[str, ...] | list[str], what: str, parser: Any) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in choices]
    if unknown or not items:
        parser.error(f"unknown {what} {', '.join(unknown) or '(none)'}; choose from {', '.join(choices)}")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--only", default="llama,qwen,bert", help="models, comma-separated: llama,qwen,bert")
    parser.add_argument("--sizes", default=None, help="small,large (default both; small only with --dry-run)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="no GPU: build, save and load on CPU and run both estimators, without measuring",
    )
    args = parser.parse_args(argv)
    keys = parse_list(args.only, tuple(MODELS), "model(s)", parser)
    sizes = parse_list(
        args.sizes or ("small" if args.dry_run else "small,large"), ("small", "large"), "size(s)", parser
    )
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "benchmarks/estimate_accuracy.py needs a CUDA GPU: torch.cuda.is_available() is False here. "
            "Run it on a machine with one (see benchmarks/README.md), or pass --dry-run to check it on CPU "
            "without measuring.",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(REPO))
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    device = "cpu" if args.dry_run else "cuda"
    print(machine() + ("; --dry-run: nothing measured" if args.dry_run else ""), flush=True)
    rows: list[Row] = []
    cpu_loads: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vram-estimate-") as folder:
        for key in keys:
            for size in sizes:
                built = build(key, size, Path(folder), device)
                total_fp32 = accelerate_total(built)
                for plan in PLANS:
                    if plan == "offload" and key in NO_OFFLOAD:
                        continue
                    params, peak = ours(built, plan)
                    theirs, rule = accelerate_figure(total_fp32, plan)
                    actual: int | None = None
                    reserved: int | None = None
                    if args.dry_run:
                        cpu_loads.append(f"{key}-{size} {plan} {load_on_cpu(built, plan):.1f} s")
                    else:
                        actual, reserved = measure(built, plan)
                    rows.append(Row(f"{key}-{size}", params, plan, actual, reserved, peak, theirs, rule))
                    print(f"# {key}-{size} {plan} done", file=sys.stderr, flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
    print(report(rows))
    if cpu_loads:
        print("\nLoaded on CPU (device_map='cpu', the offload plan as bf16): " + ", ".join(cpu_loads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
