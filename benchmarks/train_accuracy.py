"""Benchmark ``vram_magic.estimate(..., training=...)``: the peak of a real Trainer step against the estimate.

For two Llama sizes (0.13 B and attempts.py's 0.85 B, built from a config and saved in bfloat16), each of
LoRA (bf16 base), QLoRA (NF4 base, ``prepare_model_for_kbit_training``) and full fine-tuning (bf16), two batch
sizes, two sequence lengths and gradient checkpointing off and on: the peak of one ``Trainer`` step as torch
measured it (``max_memory_allocated`` and ``max_memory_reserved``, from just before ``train()``) against the
estimate from the config alone. LoRA targets the attention projections (r=16), the optimizer is AdamW.

    python3 benchmarks/train_accuracy.py [--sizes small,large] [--plans lora,qlora,full] [--dry-run]

Needs a CUDA GPU, except with ``--dry-run`` (estimates only, no training). Rows are split in two, and the
split is printed: rows with sequences of 256 tokens are for calibrating the estimator's constants, rows with
512 are for judging it (nothing is fitted on them). Target on the judging rows: within +-15 % of the measured
allocated peak, and never more than 10 % under it.

Each measured row also shows training preflight's floor (``vram_magic._train_preflight``: what preflight
stops a ``%%oomsafe`` cell on, read from the same Trainer cell and the loaded model, plus what was allocated
before ``train()``). A floor above the measured peak would be a false stop: preflight would refuse a step
that fits. Target: none.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import itertools
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from _machine import cpu_name  # benchmarks/_machine.py: scripts run from this folder

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
MAX_OVER, MAX_UNDER = 15.0, 10.0  # % the estimate may be above / below the measured peak
CALIBRATE_SEQ, JUDGE_SEQ = 256, 512
SIZES = {
    "small": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                  intermediate_size=2048, vocab_size=32000),
    "large": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                  intermediate_size=5632, vocab_size=32000),
}  # fmt: skip
BATCHES = (1, 4)
PLANS = ("lora", "qlora", "full")


@dataclass(frozen=True)
class Row:
    size: str
    plan: str
    batch: int
    seq: int
    checkpointing: bool
    estimate: int
    allocated: int | None = None
    reserved: int | None = None
    floor: int | None = None  # training preflight's floor, with what was allocated before train()

    @property
    def role(self) -> str:
        return "calibrate" if self.seq == CALIBRATE_SEQ else "judge"

    def error(self) -> float | None:
        return None if not self.allocated else 100 * (self.estimate - self.allocated) / self.allocated


def estimated(path: str, plan: str, batch: int, seq: int, checkpointing: bool) -> int:
    sys.path.insert(0, str(REPO))
    import vram_magic

    found = vram_magic.estimate(
        path, training=plan, batch_size=batch, context=seq, gradient_checkpointing=checkpointing
    )
    return found.peak_bytes


TRAIN_CELL = "trainer = Trainer(model=model, args=args, train_dataset=data)\ntrainer.train()\n"


def preflight_floor(namespace: dict[str, object]) -> int | None:
    """What training preflight would count for ``TRAIN_CELL`` (None: no verdict)."""
    sys.path.insert(0, str(REPO))
    from vram_magic._train_preflight import check_training
    from vram_magic.cell import read_cell

    verdict = check_training(read_cell(TRAIN_CELL, namespace), room_bytes=0, gpu_here=True)
    return None if verdict is None else verdict.need_bytes


def measured(path: str, plan: str, batch: int, seq: int, checkpointing: bool) -> tuple[int, int, int | None]:
    """One Trainer step from a fresh load: (allocated peak, reserved peak), counted from zero, and
    preflight's floor for it."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM, Trainer, TrainingArguments

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    quantized = None
    if plan == "qlora":
        quantized = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = LlamaForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=quantized, device_map="cuda"
    )
    if plan == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    if plan in ("lora", "qlora"):
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
        model = get_peft_model(model, LoraConfig(r=16, target_modules=targets, task_type="CAUSAL_LM"))
    rows = torch.randint(0, 32000, (batch, seq))
    data = [{"input_ids": row, "labels": row} for row in rows]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=batch,
            max_steps=1,
            bf16=True,
            gradient_checkpointing=checkpointing,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
        )
        namespace = {"model": model, "args": args, "data": data, "Trainer": Trainer}
        floor = preflight_floor(namespace)
        if floor is not None:
            floor += torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()  # the load's own peak is estimate_accuracy.py's business
        Trainer(model=model, args=args, train_dataset=data).train()
        torch.cuda.synchronize()
        peaks = int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved())
    del model, namespace
    gc.collect()
    torch.cuda.empty_cache()
    return (*peaks, floor)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--plans", default=",".join(PLANS))
    parser.add_argument("--dry-run", action="store_true", help="estimates only: no GPU needed")
    args = parser.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not args.dry_run and not torch.cuda.is_available():
        print("train_accuracy.py needs a CUDA GPU (or --dry-run).", file=sys.stderr)
        raise SystemExit(2)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    versions = ", ".join(f"{name} {_version(name)}" for name in ("transformers", "peft", "bitsandbytes"))
    print(
        f"Machine: {cpu_name()} ({platform.system()}), Python {platform.python_version()}, torch "
        f"{torch.__version__}, {versions}, GPU: {gpu}\n"
    )
    # Each row is printed as soon as it is measured: a run cut short by a time limit keeps what it measured.
    print("| role | model | plan | batch x seq | checkpointing | measured allocated | reserved | estimate "
          "| error | preflight floor |")  # fmt: skip
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|", flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes.split(","):
            path = str(Path(folder) / size)
            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(**SIZES[size])).to(torch.bfloat16).save_pretrained(path)
            for plan, batch, seq, checkpointing in itertools.product(
                args.plans.split(","), BATCHES, (CALIBRATE_SEQ, JUDGE_SEQ), (False, True)
            ):
                estimate = estimated(path, plan, batch, seq, checkpointing)
                shape = (path, plan, batch, seq, checkpointing)
                peaks = (None, None, None) if args.dry_run else measured(*shape)
                rows.append(Row(size, plan, batch, seq, checkpointing, estimate, *peaks))
                print(_line(rows[-1]), flush=True)
    judged = [row.error() for row in rows if row.role == "judge" and row.error() is not None]
    if judged:
        met = all(-MAX_UNDER <= e <= MAX_OVER for e in judged if e is not None)
        span = f"errors from {min(judged):+.1f} % to {max(judged):+.1f} %"
        print(
            f"\nJudging rows: {len(judged)}; {span}. Target (within +{MAX_OVER:.0f} % / -{MAX_UNDER:.0f} % "
            f"of the allocated peak): {'met' if met else 'MISSED'}."
        )

    floors = [row for row in rows if row.floor is not None and row.allocated]
    if floors:
        false_stops = [row for row in floors if row.floor > row.allocated]  # type: ignore[operator]
        print(
            f"Preflight floors: {len(floors)} rows; {len(false_stops)} above the measured peak (false "
            f"stops). Target: none, {'met' if not false_stops else 'MISSED'}."
        )


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _line(row: Row) -> str:
    error = row.error()
    return (
        f"| {row.role} | llama-{row.size} | {row.plan} | {row.batch} x {row.seq} | "
        f"{'on' if row.checkpointing else 'off'} | {_gib(row.allocated)} | {_gib(row.reserved)} | "
        f"{_gib(row.estimate)} | {'' if error is None else f'{error:+.1f} %'} | {_gib(row.floor)} |"
    )


def _gib(value: int | None) -> str:
    return "" if value is None else f"{value / GiB:.3f} GiB"


if __name__ == "__main__":
    main()
