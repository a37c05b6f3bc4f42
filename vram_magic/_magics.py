"""``%vram`` and ``%%oomsafe``: parse what was typed and hand it on.

``%%oomsafe`` goes to the session (``vram_magic._session``), which runs the cell through the runner
(``vram_magic._runner``, the only code that touches IPython's internals). Each ``%vram`` command is one
method below. A mistake in what was typed is one line (a ``UsageError``) that says what to type instead.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import (
    Magics,
    cell_magic,
    line_magic,
    magics_class,
    no_var_expand,
    output_can_be_silenced,
)
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from vram_magic._caps import apply_cap
from vram_magic._errors import Refused
from vram_magic._probe import take_snapshot
from vram_magic._runner import CellRunner, check_shell
from vram_magic._session import Session, counted_device, estimate_text
from vram_magic._timeline import Timeline
from vram_magic._types import Report, Snapshot

_DEFAULT_MAX_ATTEMPTS = 4
_DEVICE = re.compile(r"^(cuda(:\d+)?|cpu(:0)?)$")
# Each %vram option and the commands it goes with.
_OPTIONS_OF: dict[str, tuple[str, ...]] = {
    "device": ("who", "free", "cap"),
    "dtype": ("estimate",),
    "quant": ("estimate",),
    "gpu": ("estimate",),
    "context": ("estimate",),
    "train": ("estimate",),
    "batch": ("estimate",),
    "checkpointing": ("estimate",),
    "optimizer": ("estimate",),
    "lora_targets": ("estimate",),
    "fit": ("estimate",),
    "diff": ("fix",),
    "insert": ("fix",),
}
_COMMANDS = (
    "`%vram`, `%vram who`, `%vram free NAME`, `%vram fix N`, `%vram estimate MODEL`, `%vram cap t4`, "
    "`%vram track on`, `%vram log` or `%vram debug`"
)


@magics_class
class VramMagics(Magics):
    """The two magics, over one session that keeps the last OOM report so later commands can act on it."""

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell, **kwargs)
        self.session = Session(CellRunner(shell))

    @property
    def last_report(self) -> Report | None:
        """The last OOM report, which ``%vram fix N`` acts on."""
        return self.session.last_report

    @magic_arguments()
    @argument(
        "command",
        nargs="?",
        help="nothing: a snapshot; who: names holding VRAM; free: release memory; fix: run fix N of the last "
        "report; estimate: what loading a model needs; cap: behave like a smaller GPU; track: record every "
        "cell's memory; log: the timeline; debug: what the last OOM's frames held",
    )
    @argument("names", nargs="*", help="the variables to free, the fix number, the model, or the cap")
    @argument(
        "--device",
        help="with 'who'/'free': cuda, cuda:N or cpu (default: cuda if a GPU is here); "
        "with 'cap': cuda:N, that GPU only",
    )
    @argument("--dtype", help="with 'estimate': bfloat16, float16 or float32 (default: the checkpoint's)")
    @argument("--quant", choices=("4bit", "8bit"), help="with 'estimate': one quantized load")
    @argument("--gpu", help="with 'estimate': plan for a preset or size (t4, 12GiB) instead of this GPU")
    @argument("--context", type=int, help="with 'estimate': add a KV cache for this many tokens")
    @argument("--train", choices=("lora", "qlora", "full"), help="with 'estimate': add training")
    @argument("--batch", type=int, help="with 'estimate --train': the per-device batch size (default 1)")
    @argument(
        "--checkpointing",
        action="store_true",
        help="with 'estimate --train': gradient checkpointing (on by default for qlora, as "
        "prepare_model_for_kbit_training turns it on)",
    )
    @argument("--optimizer", help="with 'estimate --train': TrainingArguments' optim, e.g. paged_adamw_8bit")
    @argument(
        "--lora-targets",
        help="with 'estimate --train lora|qlora': attention (default), all-linear, or names: q_proj,v_proj",
    )
    @argument("--fit", choices=("batch", "context"), help="with 'estimate --train': the largest that fits")
    @argument("--diff", action="store_true", help="with 'fix': show what the fix changes, run nothing")
    @argument("--insert", action="store_true", help="with 'fix': put the fixed cell in a new cell below")
    @output_can_be_silenced
    @line_magic
    def vram(self, line: str) -> Any:
        """Where VRAM goes, and what to do about it.

        %vram                 a snapshot of every visible GPU and of CPU RAM (s = %vram keeps it)
        %vram who             which names in the notebook hold VRAM, biggest first
                              e.g. %vram who --device cpu
        %vram free [NAME …]   delete NAMEs, release what the last error keeps alive, empty the cache
                              e.g. %vram free trainer
        %vram fix N           run fix N of the last %%oomsafe report (--diff: show it; --insert: new cell)
                              e.g. %vram fix 2 --diff
        %vram estimate MODEL  what loading MODEL needs in 16-bit, 8-bit, 4-bit and offloaded, vs the room
                              e.g. %vram estimate Qwen/Qwen2.5-7B --gpu t4 --train qlora
                              training: --batch 4 --context 1024 --checkpointing --optimizer adamw_8bit
                              --lora-targets all-linear; --fit batch|context: the largest that fits
        %vram cap T4|12GiB    behave like a smaller GPU (real OOMs past the cap); %vram cap off lifts it
                              e.g. %vram cap t4 (every GPU), %vram cap t4 --device cuda:1 (one)
        %vram track on|off    record each cell's peak, end and change per device (off by default; clear
                              forgets the recorded cells)
                              e.g. %vram track on
        %vram log             the timeline: a plot (matplotlib) or a table, and the biggest growers
        %vram debug           what the last OOM's frames held: each frame's tensors, by name
        """
        __tracebackhide__ = True  # IPython's debugger and tracebacks skip this frame
        args = _parse(self.vram, line, "%vram?")
        verbs: dict[str | None, Callable[[Any], Any]] = {
            None: self._snapshot,
            "who": self._who,
            "free": self._free,
            "fix": self._fix,
            "estimate": self._estimate,
            "cap": self._cap,
            "track": self._track,
            "log": self._log,
            "debug": self._debug,
        }
        if args.command not in verbs:
            raise UsageError(f"Unknown %vram command {args.command!r}; type {_COMMANDS}.")
        _check_options_belong(args)
        try:
            return verbs[args.command](args)
        except Refused as refused:
            raise UsageError(str(refused)) from None

    @magic_arguments()
    @argument("--auto", action="store_true", help="on an OOM, try the fixes in order until one works")
    @argument(
        "--record",
        action="store_true",
        help="keep PyTorch's allocation history of the cell: on an OOM, which lines made what (needs CUDA)",
    )
    @argument("--force", action="store_true", help="run a model load even when it is estimated not to fit")
    @argument(
        "--max-attempts",
        type=int,
        default=_DEFAULT_MAX_ATTEMPTS,
        help=f"with --auto: how many runs at most, the first included (default {_DEFAULT_MAX_ATTEMPTS})",
    )
    @no_var_expand
    @cell_magic
    def oomsafe(self, line: str, cell: str) -> Any:
        """Run the cell; on a CUDA out-of-memory error free what it pinned, explain why, offer fixes.

        %%oomsafe              the report, with fixes to run (%vram fix N, or the buttons)
        %%oomsafe --auto       run the fixes estimated to fit, in order, until one works
        %%oomsafe --force      run a load even when it is estimated not to fit
        %%oomsafe --record     on an OOM, the live allocations by line, and the snapshot saved (CUDA only)
        """
        __tracebackhide__ = True  # IPython's debugger and tracebacks skip this frame
        args = _parse(self.oomsafe, line, "%%oomsafe?")
        if args.max_attempts < 1:
            raise UsageError("--max-attempts needs 1 or more runs, e.g. `%%oomsafe --auto --max-attempts 3`.")
        try:
            return self.session.oomsafe(
                cell,
                line,
                auto=args.auto,
                force=args.force,
                max_attempts=args.max_attempts,
                record=args.record,
            )
        except Refused as refused:
            raise UsageError(str(refused)) from None

    def _snapshot(self, args: Any) -> Snapshot:
        return take_snapshot()

    def _who(self, args: Any) -> None:
        from vram_magic.render import render_holders

        if args.names:
            raise UsageError("%vram who takes no names; type `%vram who` alone.")
        device = _device(args.device) if args.device else counted_device()
        print(render_holders(self.session.holders(device), device))

    def _free(self, args: Any) -> None:
        from vram_magic.render import render_cleanup

        names = [_unquoted(name) for name in args.names]
        device = _device(args.device) if args.device else counted_device()
        print(render_cleanup(self.session.free(names, device)))

    def _fix(self, args: Any) -> Any:
        __tracebackhide__ = True  # IPython's debugger and tracebacks skip this frame
        number = int(args.names[0]) if len(args.names) == 1 and args.names[0].isdecimal() else 0
        return self.session.fix(number, diff_only=args.diff, insert=args.insert)

    def _estimate(self, args: Any) -> None:
        if len(args.names) != 1:
            raise UsageError(
                "Type `%vram estimate MODEL`, e.g. `%vram estimate meta-llama/Llama-3.1-8B --gpu t4`."
            )
        options = dict(gpu=args.gpu, dtype=args.dtype, quantization=args.quant, context=args.context)
        train = _training_options(args)
        if train and args.train is None:
            raise UsageError(
                "--batch, --checkpointing, --optimizer and --lora-targets go with --train, e.g. "
                "`%vram estimate MODEL --train qlora --batch 4`."
            )
        try:
            model, snapshot = _unquoted(args.names[0]), take_snapshot()
            text = estimate_text(
                model, snapshot, training=args.train, progress=_progress, fit=args.fit, **options, **train
            )
            print(text)
        except ValueError as error:
            raise UsageError(str(error).splitlines()[0]) from None

    def _cap(self, args: Any) -> None:
        from vram_magic.render import render_cap

        if len(args.names) > 1:
            raise UsageError("Type one size or preset: `%vram cap t4`, `%vram cap 12GiB` or `%vram cap off`.")
        device = None
        if args.device:
            chosen = _device(args.device)
            if chosen == "cpu":
                raise UsageError("A cap is for a GPU: type e.g. `%vram cap t4 --device cuda:1`.")
            device = int(chosen.partition(":")[2] or 0)
        try:
            print(render_cap(apply_cap(args.names[0] if args.names else None, device)))
        except ValueError as error:
            raise UsageError(str(error)) from None

    def _track(self, args: Any) -> None:
        tracker = self.session.tracker
        choice = args.names[0].lower() if len(args.names) == 1 else None
        if args.names and choice not in ("on", "off", "clear"):
            raise UsageError(
                "Type `%vram track on`, `%vram track off`, `%vram track clear` (forget the recorded cells), "
                "or `%vram track` for its state."
            )
        if choice == "on":
            tracker.on, tracker.problem = True, None
        elif choice == "off":
            tracker.stop()
        elif choice == "clear":
            tracker.records.clear()
        recorded = len({record.cell for record in tracker.records})
        state = "on: every cell's memory is recorded" if tracker.on else "off"
        if tracker.problem is not None and not tracker.on:
            state = f"off: it stopped by itself ({tracker.problem})"
        print(f"Tracking is {state} ({recorded} cells recorded; `%vram log` shows them).")

    def _log(self, args: Any) -> None:
        from IPython.display import display

        from vram_magic.render import timeline_bundle

        if args.names:
            raise UsageError("%vram log takes nothing; type `%vram log` alone.")
        tracker = self.session.tracker
        display(timeline_bundle(Timeline(tracker.records), take_snapshot(), tracker.on), raw=True)

    def _debug(self, args: Any) -> None:
        from vram_magic.render import render_post_mortem

        if args.names:
            raise UsageError("%vram debug takes nothing; type `%vram debug` alone.")
        print(render_post_mortem(self.session.last_post_mortem))

    def _cell_starts(self, info: Any) -> None:
        """IPython's ``pre_run_cell``: the tracker notes where memory starts."""
        self.session.tracker.begin(getattr(info, "raw_cell", "") or "")

    def _cell_ended(self, result: Any) -> None:
        """IPython's ``post_run_cell``: the tracker records the cell; the session's reports learn it ran."""
        self.session.tracker.end(getattr(result, "execution_count", None))
        self.session.cell_ran(result)


def _training_options(args: Any) -> dict[str, Any]:
    """The training options typed, as ``estimate`` takes them."""
    train: dict[str, Any] = {}
    if args.batch is not None:
        train["batch_size"] = args.batch
    if args.checkpointing:
        train["gradient_checkpointing"] = True
    if args.optimizer is not None:
        train["optimizer"] = args.optimizer
    if args.lora_targets is not None:
        targets = [name.strip() for name in args.lora_targets.split(",") if name.strip()]
        train["lora_targets"] = targets[0] if len(targets) == 1 else targets
    return train


def _check_options_belong(args: Any) -> None:
    """An option given to a command it does not go with is a mistake, not something to ignore."""
    for option, commands in _OPTIONS_OF.items():
        value = getattr(args, option)
        if value is None or value is False or args.command in commands:
            continue
        flag = f"--{option.replace('_', '-')}"
        used = f"`%vram {args.command} {flag}`" if args.command else f"`%vram {flag}`"
        raise UsageError(f"{used}: {flag} goes with {' or '.join(f'`%vram {c}`' for c in commands)}.")


def _progress(line: str) -> None:
    """A line before a step that takes seconds, shown at once (a notebook's output is otherwise batched)."""
    print(line, flush=True)


def _unquoted(word: str) -> str:
    """``"gpt2"`` or ``'gpt2'`` as typed (IPython's argument splitting keeps the quotes): ``gpt2``."""
    if len(word) >= 2 and word[0] == word[-1] and word[0] in "'\"":
        return word[1:-1]
    return word


def _device(text: str) -> str:
    """``--device``: cuda, cuda:N or cpu (``cpu:0`` is cpu)."""
    device = text.strip().lower()
    if not _DEVICE.match(device):
        raise UsageError(f"--device {text!r}: type cuda, cuda:N or cpu, e.g. `%vram who --device cpu`.")
    return device.removesuffix(":0") if device.startswith("cpu") else device


def _parse(magic: Any, line: str, help_command: str) -> Any:
    """Parse magic arguments; a mistake is one line that says where the help is."""
    try:
        return parse_argstring(magic, line)
    except UsageError as error:
        raise UsageError(f"{error}; type `{help_command}` for the usage.") from None
    except ValueError as error:  # the shell-like splitting: "No closing quotation"
        raise UsageError(f"{error} in `{line.strip()}`; type `{help_command}` for the usage.") from None


def load(shell: Any) -> None:
    """Register the magics (once, however often ``%load_ext`` runs) and the event that ends a report's
    fixes once its cell runs again. A shell without what the runner needs stops here, saying why."""
    check_shell(shell)
    if "VramMagics" not in shell.magics_manager.registry:
        shell.register_magics(VramMagics)
        magics = shell.magics_manager.registry["VramMagics"]
        shell.events.register("pre_run_cell", magics._cell_starts)
        shell.events.register("post_run_cell", magics._cell_ended)


def unload(shell: Any) -> None:
    """Remove every magic ``load`` added."""
    manager = shell.magics_manager
    magics = manager.registry.pop("VramMagics", None)
    if magics is not None:
        magics.session.tracker.stop()
        for event, callback in (("pre_run_cell", magics._cell_starts), ("post_run_cell", magics._cell_ended)):
            with contextlib.suppress(ValueError):  # not registered
                shell.events.unregister(event, callback)
    manager.magics["line"].pop("vram", None)
    manager.magics["cell"].pop("oomsafe", None)
