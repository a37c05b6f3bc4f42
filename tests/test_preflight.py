"""Preflight: a %%oomsafe cell whose model load is estimated not to fit is not run (unless --force);
with --auto the first plan that fits runs straight away."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from IPython.utils.capture import capture_output
from transformers import LlamaConfig, LlamaForCausalLM

from tests.oom_budget import simulated_gpu
from tests.stack import BITSANDBYTES_QUANTIZES_HERE, DTYPE, NO_BITSANDBYTES_HERE
from vram_magic import OutOfMemoryHandled, _caps
from vram_magic._preflight import Verdict, judged, load_at, need
from vram_magic._preflight import check as check_reading
from vram_magic.cell import read_cell

MiB = 2**20


def check(cell: str, namespace: dict[str, Any], room_bytes: int) -> Verdict | None:
    """Preflight's verdict on cell text, read with the notebook's names."""
    return check_reading(read_cell(cell, namespace), room_bytes)


def loads_in(cell: str, namespace: dict[str, Any]) -> list[tuple[str | None, ...]]:
    """(model, dtype, quantization, device_map) of each load preflight judges."""
    loads = judged(read_cell(cell, namespace))
    return [(load.model, load.dtype, load.quantization, load.device_map) for load in loads]


LOAD_CELL = (
    "import torch\nfrom transformers import AutoModelForCausalLM\n"
    f'model = AutoModelForCausalLM.from_pretrained(path, {DTYPE}=torch.bfloat16, device_map="cuda")\n'
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 7 M-parameter Llama saved in bfloat16: 13.35 MiB of weights; 8-bit needs about 11.3 MiB."""
    folder = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=8000,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture
def rehearsal(ip: Any, checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """No GPU here: a 12 MiB cap is the target preflight plans for. What a cell puts on the GPU
    (``device_map="cuda"``) loads into a big simulated GPU (tests/oom_budget.py), so it can run."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; tests/gpu covers preflight for real")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ip.user_ns["path"] = str(checkpoint)
    _caps.set_target_bytes(12 * MiB)
    with simulated_gpu(budget_bytes=2**30):
        yield ip
    _caps.set_target_bytes(None)


def test_the_loads_of_a_cell_are_read_without_running_it() -> None:
    cell = (
        "tok = AutoTokenizer.from_pretrained(name)\n"
        'base = AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.float16, device_map="auto")\n'
        "quant = LlamaForCausalLM.from_pretrained('org/m', quantization_config=bnb)\n"
        "peft = PeftModel.from_pretrained(base, 'adapter')\n"
        "unknown = AutoModel.from_pretrained(some_call())\n"
    )
    namespace = {"name": "org/base", "bnb": SimpleNamespace(load_in_4bit=True, load_in_8bit=False)}
    # The auto-placed base is left to accelerate; the 4-bit load goes to the GPU (bitsandbytes puts it there).
    assert loads_in(cell, namespace) == [("org/m", None, "4bit", None)]
    reading = read_cell(cell, namespace)
    assert [(load.kind, load.model, load.dtype) for load in reading.loads] == [
        ("model", "org/base", "float16"),
        ("model", "org/m", None),
        ("adapter", "adapter", None),
        ("model", None, None),
    ]
    assert loads_in("x = 1\n", {}) == []


AUTO = ", device_map='auto'"


def _load(placement: str = ', device_map="cuda"') -> str:
    return f"AutoModelForCausalLM.from_pretrained(path, {DTYPE}=torch.bfloat16{placement})"


@pytest.mark.parametrize(
    "cell",
    [
        f"def load():\n    return {_load()}\n",
        f"if small:\n    model = {_load()}\n",
        f"try:\n    model = {_load()}\nexcept torch.OutOfMemoryError:\n    model = None\n",
        f"for name in names:\n    model = {_load()}\n",
        f"load = lambda: {_load()}\n",
        f"model = {_load()} if big else None\n",
        f"model = cached or {_load()}\n",
        f"models = [{_load()} for _ in range(2)]\n",
        f"model = {_load(AUTO)}\n",  # accelerate offloads what does not fit
        f"model = {_load(', device_map=my_map')}\n",  # placement unknown until it runs
        f"model = {_load('')}\n",  # no device_map: transformers loads into CPU RAM
        f"model = {_load('')}.to(torch.bfloat16)\n",  # a cast, not a move
        f"path = next_checkpoint()\nmodel = {_load()}\n",  # `path` is re-bound: its old value misleads
    ],
    ids=[
        "function",
        "branch",
        "try",
        "loop",
        "lambda",
        "conditional-expression",
        "or",
        "comprehension",
        "device-map-auto",
        "device-map-unknown",
        "cpu-ram",
        "cast",
        "rebound-name",
    ],
)
def test_preflight_judges_only_loads_that_surely_run_on_the_gpu(cell: str, rehearsal: Any) -> None:
    assert check(cell, rehearsal.user_ns, 12 * MiB) is None
    assert check(f"model = {_load()}\n", rehearsal.user_ns, 12 * MiB) is not None  # the same load, plainly


@pytest.mark.parametrize(
    "cell",
    [
        f"model = {_load(', device_map=0')}\n",
        f"model = {_load('')}.to('cuda')\n",
        f"model = {_load('')}.cuda()\n",
        f"model = {_load('')}\nmodel.to(device)\n",  # device = "cuda:0" in the notebook
        f"model = {_load('')}\nmodel = model.cuda()\n",
        f"with torch.device('cuda'):\n    model = {_load('')}\n",
        f"model = {_load(', load_in_8bit=True')}\n",  # bitsandbytes puts it on the GPU
        f"model = {_load(AUTO + ', load_in_8bit=True')}\n",  # and refuses to offload it
    ],
    ids=[
        "gpu-index",
        "to-cuda",
        "cuda",
        "moved-later",
        "rebound-to-cuda",
        "with-cuda-device",
        "quantized",
        "quantized-auto",
    ],
)
def test_loads_that_surely_go_to_the_gpu_are_judged(cell: str, rehearsal: Any) -> None:
    rehearsal.user_ns["device"] = "cuda:0"
    assert check(cell, rehearsal.user_ns, 4 * MiB) is not None, cell


def test_a_quantization_config_built_in_the_cell_is_read(rehearsal: Any) -> None:
    cell = (
        "bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4')\n"
        "model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, device_map='cuda:0')\n"
    )
    verdict = check(cell, rehearsal.user_ns, 4 * MiB)
    assert verdict is not None and verdict.loads[0].quantization == "4bit"


def _assigned(extra: str) -> str:
    return "model = " + _load(extra) + "\n"


OFFLOAD_8BIT = "BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True)"


@pytest.mark.parametrize(
    "cell",
    [
        _assigned(", quantization_config=QuantoConfig(weights='int4')"),
        _assigned(", quantization_config=BitsAndBytesConfig(**settings)"),
        _assigned(", load_in_4bit=use_4bit"),
        "bnb = make_config()\n" + _assigned(", quantization_config=bnb"),
        _assigned(", config=small_config"),
        _assigned(", num_hidden_layers=2"),
        _assigned(", **options"),
        "mid = 'x'\nmid = path\n" + _assigned("").replace("(path", "(mid"),
        "model = AutoModelForCausalLM.from_pretrained(path, device_map='auto', "
        f"quantization_config={OFFLOAD_8BIT})\n",
    ],
    ids=[
        "another-quantization",
        "bnb-kwargs",
        "flag-in-a-variable",
        "config-from-a-call",
        "config",
        "config-field",
        "kwargs",
        "rebound-twice",
        "8bit-offload-allowed",
    ],
)
def test_loads_whose_size_is_only_known_when_the_cell_runs_are_not_judged(cell: str, rehearsal: Any) -> None:
    assert check(cell, rehearsal.user_ns, 4 * MiB) is None, cell


def test_a_model_let_go_before_the_next_load_is_not_counted_twice(rehearsal: Any) -> None:
    load8 = _load(", load_in_8bit=True")
    one = check(f"a = {load8}\n", rehearsal.user_ns, 4 * MiB)
    kept = check(f"a = {load8}\nb = {load8}\n", rehearsal.user_ns, 4 * MiB)
    deleted = check(f"a = {load8}\ndel a\nb = {load8}\n", rehearsal.user_ns, 4 * MiB)
    rebound = check(f"a = {load8}\na = None\nb = {load8}\n", rehearsal.user_ns, 4 * MiB)
    replaced = check(f"a = {load8}\na = {load8}\n", rehearsal.user_ns, 4 * MiB)  # the old one held meanwhile
    assert one is not None and kept is not None and deleted is not None and rebound is not None
    assert replaced is not None
    weights = one.estimates[0].weights_bytes
    assert deleted.need_bytes == rebound.need_bytes == one.need_bytes
    assert kept.need_bytes == replaced.need_bytes == one.need_bytes + weights


def test_a_move_counts_only_for_the_model_still_bound_and_where_it_surely_runs(rehearsal: Any) -> None:
    cpu_load = _load("")
    for cell in (
        f"m = {cpu_load}\ndel m\nm = None\nm.to('cuda')\n",
        f"m = {cpu_load}\nm = something_else()\nm.cuda()\n",
        f"m = {cpu_load}\ndef to_gpu():\n    m.cuda()\n",
        f"m = {cpu_load}\ntry:\n    m.cuda()\nexcept RuntimeError:\n    pass\n",
        f"m = {cpu_load}\nfor m in models:\n    pass\nm.cuda()\n",
    ):
        assert check(cell, rehearsal.user_ns, 4 * MiB) is None, cell
    for cell in (f"m = {cpu_load}.half().cuda()\n", f"m = {cpu_load}\nm = m.to(torch.float16).to('cuda')\n"):
        assert check(cell, rehearsal.user_ns, 4 * MiB) is not None, cell


def test_a_cell_with_magics_is_still_judged(rehearsal: Any) -> None:
    with capture_output() as captured:
        result = rehearsal.run_cell("%%oomsafe\n%env TOKENIZERS_PARALLELISM=false\n" + LOAD_CELL)
    assert isinstance(result.error_in_exec, OutOfMemoryHandled)
    assert "Not run" in captured.stdout and "model" not in rehearsal.user_ns


def test_load_at_finds_the_innermost_load_on_the_failed_line(rehearsal: Any) -> None:
    ns = {**rehearsal.user_ns, "other": "gpt2"}
    nested = f"outer = Wrapper.from_pretrained(\n    other,\n    base={_load()},\n)\n"
    found = load_at(read_cell(nested, ns), 3)
    assert found is not None and found.model == ns["path"]
    chained = f"model = (\n    {_load('')}\n    .to('cuda')\n)\n"
    found = load_at(read_cell(chained, ns), 3)  # the OOM is reported on the .to line
    assert found is not None and found.model == ns["path"]


def test_a_model_the_cell_names_itself_is_judged_by_the_cells_own_value(rehearsal: Any) -> None:
    where = rehearsal.user_ns.pop("path")
    rehearsal.user_ns["path"] = "an/old-model"  # what an earlier cell bound
    verdict = check(f"path = {where!r}\nmodel = {_load()}\n", rehearsal.user_ns, 4 * MiB)
    assert verdict is not None and verdict.loads[0].model == where


def test_a_cell_that_only_defines_a_loader_runs(rehearsal: Any) -> None:
    ip = rehearsal
    cell = (
        "import torch\nfrom transformers import AutoModelForCausalLM\n"
        + f"def load():\n    return {_load()}\n"
    )
    with capture_output() as captured:
        result = ip.run_cell("%%oomsafe\n" + cell)
    assert result.success and "Not run" not in captured.stdout and callable(ip.user_ns["load"])


def test_a_load_that_cannot_fit_is_not_run(rehearsal: Any) -> None:
    ip = rehearsal
    with capture_output() as captured:
        result = ip.run_cell("%%oomsafe\n" + LOAD_CELL)
    assert isinstance(result.error_in_exec, OutOfMemoryHandled)
    assert "model" not in ip.user_ns
    headline = (
        "Not run: the model load would need about 13.35 MiB at its peak, more than the 12.00 MiB under the "
        "cap planned for (no GPU here)."
    )
    assert captured.outputs[0].data["text/plain"].startswith(headline)
    assert captured.stdout == f"OutOfMemoryHandled: {headline} See the report above.\n"
    report = ip.magics_manager.registry["VramMagics"].last_report
    # bfloat16 is left out (the checkpoint is bfloat16 already); 4-bit comes before offloading, which keeps
    # full precision but runs the offloaded layers from CPU RAM, many times slower.
    assert [(fix.key, fix.fits) for fix in report.fixes] == [
        ("8bit", True),
        ("4bit", True),
        ("offload", True),
        ("cpu", True),
    ]


def test_the_fixes_are_judged_for_the_load_that_does_not_fit(rehearsal: Any) -> None:
    from vram_magic import estimate

    ip = rehearsal
    cell = (
        "import torch\nfrom transformers import AutoModelForCausalLM\n"
        "reference = AutoModelForCausalLM.from_pretrained('gpt2', device_map='auto')\n"  # placed: not judged
        "model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map='cuda')\n"
    )
    with capture_output():
        result = ip.run_cell("%%oomsafe\n" + cell)
    assert isinstance(result.error_in_exec, OutOfMemoryHandled)
    fixes = {fix.key: fix for fix in ip.magics_manager.registry["VramMagics"].last_report.fixes}
    for key, dtype in (("8bit", "float32"), ("4bit", "float32"), ("bf16", "bfloat16")):
        # The fixed cell loads both models this way: gpt2 first (and keeps it), then the model that failed.
        quantization = None if key == "bf16" else key
        first = estimate("gpt2", dtype=None if key != "bf16" else dtype, quantization=quantization)
        second = estimate(ip.user_ns["path"], dtype=dtype, quantization=quantization)
        if key == "bf16":  # accelerate still places gpt2 (device_map='auto', not quantized): not counted
            expected = second.peak_bytes
        else:  # quantized with device_map='auto', it stays on the GPU (bitsandbytes does not offload)
            expected = max(first.peak_bytes, second.peak_bytes + first.weights_bytes)
        assert fixes[key].needed_bytes == expected, key
    # In float32 the embeddings bitsandbytes leaves alone (16 MiB) are more than the 12 MiB cap.
    assert [fixes[key].fits for key in ("bf16", "8bit", "4bit", "offload", "cpu")] == [False] * 3 + [True] * 2


def test_an_estimator_that_fails_never_stops_the_cell(
    rehearsal: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vram_magic import _preflight

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("an architecture the meta device cannot build")

    monkeypatch.setattr(_preflight, "estimate", broken)
    assert need(judged(read_cell(LOAD_CELL, rehearsal.user_ns))) is None
    with capture_output() as captured:
        result = rehearsal.run_cell("%%oomsafe\n" + LOAD_CELL)
    assert result.success and "model" in rehearsal.user_ns and "Not run" not in captured.stdout


def test_force_runs_it_anyway_and_a_load_that_fits_runs_silently(rehearsal: Any) -> None:
    ip = rehearsal
    with capture_output() as captured:
        forced = ip.run_cell("%%oomsafe --force\n" + LOAD_CELL)
    assert forced.success and "Not run" not in captured.stdout
    _caps.set_target_bytes(20 * MiB)
    del ip.user_ns["model"]
    with capture_output() as captured:
        fits = ip.run_cell("%%oomsafe\n" + LOAD_CELL)
    assert fits.success and "model" in ip.user_ns and "Not run" not in captured.stdout


@pytest.mark.skipif(not BITSANDBYTES_QUANTIZES_HERE, reason=NO_BITSANDBYTES_HERE)
def test_auto_runs_the_first_plan_that_fits_with_no_oom(rehearsal: Any) -> None:
    import bitsandbytes as bnb

    ip = rehearsal
    with capture_output() as captured:
        result = ip.run_cell("%%oomsafe --auto\n" + LOAD_CELL)
    assert result.success
    assert "Running fix 1 instead: Load the model in 8-bit." in captured.stdout
    assert "Fix 1 worked: Load the model in 8-bit" in captured.stdout
    assert isinstance(ip.user_ns["model"].model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)


def test_without_a_gpu_or_a_planned_cap_there_is_no_preflight(ip: Any, checkpoint: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _caps.set_target_bytes(None)
    ip.user_ns["path"] = str(checkpoint)
    with simulated_gpu(budget_bytes=2**30), capture_output() as captured:
        result = ip.run_cell("%%oomsafe\n" + LOAD_CELL)
    assert result.success and captured.stdout.strip() == ""


def test_the_qlora_device_map_of_one_gpu_is_judged(rehearsal: Any) -> None:
    one_gpu = ', device_map={"": 0}'
    cell = f"model = {_load(one_gpu)}\n"
    verdict = check(cell, rehearsal.user_ns, 4 * MiB)
    assert verdict is not None and not verdict.fits


def test_a_checkpoint_saved_in_4bit_is_judged_as_saved_and_runs(rehearsal: Any, tmp_path: Path) -> None:
    config = json.loads((Path(rehearsal.user_ns["path"]) / "config.json").read_text())
    saved = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": saved}))
    cell = f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, device_map='cuda')\n"
    verdict = check(cell, rehearsal.user_ns, 12 * MiB)
    # 13.35 MiB in bfloat16 would not fit the 12 MiB; saved in 4-bit it does.
    assert verdict is not None and verdict.loads[0].model == str(tmp_path)
    assert verdict.estimates[0].quantization == "4bit" and verdict.fits


def test_a_cast_before_the_move_is_the_dtype_the_gpu_receives() -> None:
    """``torch_dtype=torch.float32`` then ``.half().cuda()``: the GPU gets float16 (found in review)."""
    before = read_cell(
        "model = AutoModelForCausalLM.from_pretrained(p, torch_dtype=torch.float32).half().cuda()\n"
    )
    assert before.loads[0].dtype == "float16"
    after = read_cell("model = AutoModelForCausalLM.from_pretrained(p).cuda().half()\n")
    assert after.loads[0].dtype is None  # the GPU first holds the checkpoint's own dtype


def test_preflight_never_stops_a_cell_it_cannot_read(rehearsal: Any) -> None:
    """A sum hundreds of terms long is too deep for libcst: the cell runs as without the magic."""
    long_sum = " + ".join(["'a'"] * 450)
    imports = "import torch\nfrom transformers import AutoModelForCausalLM\n"
    cell = f"%%oomsafe\n{imports}model = {_load()}\ns = {long_sum}\n"  # over the 12 MiB planned for
    with capture_output():
        result = rehearsal.run_cell(cell)
    assert result.success, result.error_in_exec
    assert rehearsal.user_ns["s"] == "a" * 450
