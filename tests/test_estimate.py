"""Estimates from a config alone, checked against real models loaded on the CPU (bf16, fp32, and
bitsandbytes 8-bit/4-bit, which work on CPU), published parameter counts, and the peaks measured on an H100
for the 0.85 B Llama of tests/gpu/scenarios.py. Nothing here reaches the network: the Hub is blocked and
HF_HUB_OFFLINE is set."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.gpu.scenarios import LLAMA_085B  # the 0.85 B Llama measured on an H100
from tests.stack import BITSANDBYTES_QUANTIZES_HERE, DTYPE, NO_BITSANDBYTES_HERE, TRANSFORMERS_MAJOR
from vram_magic._types import Note, facts
from vram_magic._units import format_bytes
from vram_magic._who import tensors_in
from vram_magic.estimator import (
    CONFIGS_DIR,
    Estimate,
    LoadPlan,
    _configs,
    _counting,
    bundled_models,
    estimate,
    load_config,
    load_plans,
)
from vram_magic.estimator._options import Options, options
from vram_magic.render import note_text, render_estimate_table

MiB = 2**20
GiB = 2**30
HINT = "Pass a local path, or run once online so the config is cached."
needs_bitsandbytes = pytest.mark.skipif(not BITSANDBYTES_QUANTIZES_HERE, reason=NO_BITSANDBYTES_HERE)
# The dtype the bundled configs name (bfloat16), asked for where from_pretrained would not load it untold
# (transformers 4 loads float32): for the tests about other things than the dtype.
AS_CONFIGURED: dict[str, Any] = {} if TRANSFORMERS_MAJOR >= 5 else {"dtype": "bfloat16"}


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Every test runs offline, with sockets that refuse to connect (and record who tried)."""
    attempts: list[object] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise OSError("network blocked by tests/test_estimate.py")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield attempts


@pytest.fixture
def empty_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def real_bytes(model: Any) -> int:
    """What a loaded model holds, counted the way vram_magic counts holders: one per storage."""
    return sum(tensor.untyped_storage().nbytes() for tensor in tensors_in(model, "cpu"))


def tiny_configs() -> dict[str, tuple[Any, str]]:
    from transformers import BertConfig, GPT2Config, LlamaConfig, Qwen2Config

    small = {"num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1000}
    llama = {"hidden_size": 256, "intermediate_size": 704, "num_key_value_heads": 2, **small}
    return {
        "llama": (LlamaConfig(**llama), "AutoModelForCausalLM"),
        "llama-tied": (LlamaConfig(**llama, tie_word_embeddings=True), "AutoModelForCausalLM"),
        "qwen2": (Qwen2Config(**llama), "AutoModelForCausalLM"),  # biases on q, k, v
        "gpt2": (  # Conv1D, not Linear
            GPT2Config(n_embd=256, n_layer=2, n_head=4, vocab_size=1000, n_positions=128),
            "AutoModelForCausalLM",
        ),
        "bert": (  # an encoder, with int64 buffers
            BertConfig(hidden_size=256, intermediate_size=512, max_position_embeddings=128, **small),
            "AutoModelForMaskedLM",
        ),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny model built from its config and saved in bfloat16 to its own folder."""
    import transformers

    folders = {}
    for name, (config, auto) in tiny_configs().items():
        torch.manual_seed(0)
        model = getattr(transformers, auto).from_config(config, **{DTYPE: torch.bfloat16})
        folders[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(folders[name])
    return folders


def load(folder: Path, dtype: torch.dtype | None = None, **kwargs: Any) -> Any:
    """The model saved in ``folder``, on the CPU; ``dtype`` is passed as this transformers names it."""
    import transformers

    auto = getattr(transformers, json.loads((folder / "config.json").read_text())["architectures"][0])
    if dtype is not None:
        kwargs[DTYPE] = dtype
    return auto.from_pretrained(folder, device_map="cpu", **kwargs)


# --- weights against real models ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", list(tiny_configs()))
def test_weights_equal_a_real_load_byte_for_byte(saved: dict[str, Path], name: str, dtype: str) -> None:
    model = load(saved[name], dtype=getattr(torch, dtype))
    found = estimate(str(saved[name]), dtype=dtype)

    assert found.weights_bytes == real_bytes(model)
    assert found.weights_bytes == sum(
        t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
    )
    assert found.params == sum(p.numel() for p in model.parameters())  # tied weights once
    assert found.weights_bytes == found.peak_bytes == found.load_peak_bytes  # one warm-up allocation
    assert found.offloaded_bytes == 0
    assert found.kv_cache_bytes is None and found.training_bytes is None


@needs_bitsandbytes
@pytest.mark.parametrize(("quantization", "double_quant"), [("8bit", False), ("4bit", True), ("4bit", False)])
@pytest.mark.parametrize("name", list(tiny_configs()))
def test_quantized_weights_match_a_real_bitsandbytes_load_on_cpu(
    saved: dict[str, Path], name: str, quantization: str, double_quant: bool
) -> None:
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    else:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = load(saved[name], dtype=torch.bfloat16, quantization_config=bnb)
    found = estimate(str(saved[name]), dtype="bfloat16", quantization=quantization, double_quant=double_quant)
    real = real_bytes(model)

    assert found.weights_bytes == pytest.approx(real, rel=0.01)  # byte-exact with bitsandbytes 0.50
    assert found.weights_bytes < estimate(str(saved[name]), dtype="bfloat16").weights_bytes
    assert found.load_peak_bytes > found.weights_bytes  # a 16-bit weight is converted on the GPU


def test_tied_embeddings_are_counted_once(saved: dict[str, Path]) -> None:
    untied = estimate(str(saved["llama"]))
    tied = estimate(str(saved["llama-tied"]))

    assert untied.params - tied.params == 1000 * 256  # the lm_head that is the embedding


def test_lora_parameters_are_the_ones_peft_adds(saved: dict[str, Path]) -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        load(saved["llama"], dtype=torch.bfloat16),
        LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    trainable, _ = model.get_nb_trainable_parameters()
    found = estimate(str(saved["llama"]), training="lora")

    assert found.trainable_params == trainable
    assert found.training_bytes == 16 * trainable


def _part(found: Any, key: str) -> int:
    return dict(found.parts)[key]


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_lora_targets_count_what_peft_adds(saved: dict[str, Path], targets: Any) -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        load(saved["llama"], dtype=torch.bfloat16), LoraConfig(r=8, target_modules=targets)
    )
    trainable, _ = model.get_nb_trainable_parameters()
    found = estimate(str(saved["llama"]), training="lora", lora_r=8, lora_targets=targets)

    assert found.trainable_params == trainable
    adapters = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in adapters} == {torch.float32}  # peft keeps adapters in float32 on a bf16 base
    assert _part(found, "adapters") == _part(found, "gradients") == 4 * trainable


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_optimizer_states_are_what_trainer_keeps(saved: dict[str, Path], dtype: str, tmp_path: Path) -> None:
    """A real Trainer step (on CPU) of a full fine-tune: the optimizer's states, measured, for each optim."""
    from transformers import Trainer, TrainingArguments

    rows = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in rows]
    for optim in ("adamw_torch", "sgd", "adafactor"):
        model = load(saved["llama"], dtype=getattr(torch, dtype))
        args = TrainingArguments(
            output_dir=str(tmp_path / optim),
            per_device_train_batch_size=2,
            max_steps=1,
            bf16=dtype == "bfloat16",
            use_cpu=True,
            optim=optim,
            report_to=[],
            save_strategy="no",
        )
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        kept = sum(
            state.numel() * state.element_size()
            for states in trainer.optimizer.state.values()
            for state in states.values()
            if torch.is_tensor(state) and state.dim() > 0
        )
        found = estimate(str(saved["llama"]), dtype=dtype, training="full", optimizer=optim)
        assert found.trainable_params == sum(p.numel() for p in model.parameters())
        if optim == "adafactor":  # a row and a column per matrix: under a byte a parameter even here
            assert _part(found, "optimizer") == 0 and kept < found.params // 4
        else:
            assert _part(found, "optimizer") == kept, optim
        width = 2 if dtype == "bfloat16" else 4
        assert _part(found, "gradients") == width * found.params  # gradients like the weights


@needs_bitsandbytes
def test_prepare_model_for_kbit_training_adds_what_the_estimate_says(saved: dict[str, Path]) -> None:
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = load(saved["llama"], quantization_config=quantized)
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    model = prepare_model_for_kbit_training(model)
    after = sum(p.numel() * p.element_size() for p in model.parameters())
    found = estimate(str(saved["llama"]), training="qlora")

    assert _part(found, "float32-casts") == after - before
    assert model.is_gradient_checkpointing and estimate(str(saved["llama"]), training="qlora") == found
    assert (
        found.activations_bytes
        == estimate(str(saved["llama"]), training="qlora", gradient_checkpointing=True).activations_bytes
    )
    unprepared = estimate(str(saved["llama"]), training="qlora", prepare_kbit=False)
    assert "float32-casts" not in dict(unprepared.parts)


def test_the_parts_add_up_to_the_peak_and_the_largest_batch_is_the_last_that_fits(
    empty_hub_cache: Path,
) -> None:
    found = estimate("meta-llama/Llama-3.2-1B", training="qlora", context=1024, batch_size=4)
    assert [key for key, _ in found.parts] == [
        "weights",
        "adapters",
        "gradients",
        "optimizer",
        "float32-casts",
        "activations",
        "logits",
    ]
    assert sum(size for _, size in found.parts) == found.peak_bytes
    room = 6 * GiB
    fitted = estimate("meta-llama/Llama-3.2-1B", training="qlora", context=1024, room_bytes=room)
    largest = fitted.max_batch_size
    assert largest is not None and largest > 1
    assert (
        estimate("meta-llama/Llama-3.2-1B", training="qlora", context=1024, batch_size=largest).peak_bytes
        <= room
    )
    assert (
        estimate("meta-llama/Llama-3.2-1B", training="qlora", context=1024, batch_size=largest + 1).peak_bytes
        > room
    )
    longest = fitted.max_context
    assert longest is not None
    assert estimate("meta-llama/Llama-3.2-1B", training="qlora", context=longest).peak_bytes <= room
    assert estimate("meta-llama/Llama-3.2-1B", training="qlora", context=longest + 1).peak_bytes > room
    assert estimate("meta-llama/Llama-3.2-1B", training="full", room_bytes=GiB).max_batch_size == 0


# --- bundled configs --------------------------------------------------------------------------------

# Published parameter counts (model cards and the counts the Hub shows), with embeddings.
KNOWN_PARAMS = {
    "meta-llama/Llama-3.1-8B": 8.03e9,
    "meta-llama/Llama-3.1-70B": 70.6e9,
    "meta-llama/Llama-3.2-1B": 1.24e9,
    "meta-llama/Llama-3.2-3B": 3.21e9,
    "meta-llama/Meta-Llama-3-8B": 8.03e9,
    "meta-llama/Llama-2-7b-hf": 6.74e9,
    "mistralai/Mistral-7B-v0.3": 7.25e9,
    "Qwen/Qwen2.5-0.5B": 0.494e9,
    "Qwen/Qwen2.5-1.5B": 1.54e9,
    "Qwen/Qwen2.5-3B": 3.09e9,
    "Qwen/Qwen2.5-7B": 7.62e9,
    "Qwen/Qwen2.5-14B": 14.7e9,
    "google/gemma-2-2b": 2.61e9,
    "google/gemma-2-9b": 9.24e9,
    "microsoft/Phi-3-mini-4k-instruct": 3.82e9,
    "microsoft/Phi-3.5-mini-instruct": 3.82e9,
    "google-bert/bert-base-uncased": 110e6,
    "google-bert/bert-large-uncased": 336e6,
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": 1.1e9,
    "HuggingFaceTB/SmolLM2-135M": 135e6,
    "HuggingFaceTB/SmolLM2-360M": 362e6,
    "HuggingFaceTB/SmolLM2-1.7B": 1.71e9,
    "openai-community/gpt2": 124e6,
}


def test_every_bundled_config_has_a_known_count() -> None:
    assert set(bundled_models()) == set(KNOWN_PARAMS)
    assert len(bundled_models()) >= 20


@pytest.mark.parametrize("repo_id", sorted(KNOWN_PARAMS))
def test_bundled_configs_give_the_published_parameter_counts(repo_id: str, empty_hub_cache: Path) -> None:
    found = estimate(repo_id)

    assert found.params == pytest.approx(KNOWN_PARAMS[repo_id], rel=0.01)
    assert "bundled copy" in str(found.notes[0])


def test_bundled_files_are_config_json_content() -> None:
    from transformers import AutoConfig

    for path in CONFIGS_DIR.glob("*--*.json"):
        values = json.loads(path.read_text())
        assert values["architectures"] and values["model_type"], path.name
        assert AutoConfig.for_model(**values).model_type == values["model_type"]
    aliases = json.loads((CONFIGS_DIR / "aliases.json").read_text())
    assert set(aliases.values()) <= set(bundled_models())


def test_bundled_dtypes_follow_the_published_configs(empty_hub_cache: Path) -> None:
    if TRANSFORMERS_MAJOR < 5:  # from_pretrained without a dtype loads float32, whatever the config says
        for repo_id in ("google/gemma-2-2b", "meta-llama/Llama-2-7b-hf", "google-bert/bert-base-uncased"):
            found = estimate(repo_id)
            assert found.dtype == "float32"
            assert any("before transformers 5" in str(note) for note in found.notes)
        return
    assert estimate("google/gemma-2-2b").dtype == "float32"  # loads in float32 unless told otherwise
    assert estimate("meta-llama/Llama-2-7b-hf").dtype == "float16"
    # Its config names no dtype: transformers 5 then loads the checkpoint's own dtype, float32 for BERT.
    # bfloat16 was assumed before, which halved its estimate.
    bert = estimate("google-bert/bert-base-uncased")
    assert bert.dtype == "float32"
    assert any("assumed" in str(note) for note in bert.notes)


def test_short_names_and_instruct_variants_find_the_bundled_config(empty_hub_cache: Path) -> None:
    assert estimate("bert-base-uncased").params == estimate("google-bert/bert-base-uncased").params
    assert estimate("gpt2").params == estimate("openai-community/gpt2").params
    instruct = estimate("meta-llama/Llama-3.1-8B-Instruct")
    assert instruct.params == estimate("meta-llama/Llama-3.1-8B").params
    assert "same architecture" in str(instruct.notes[0])


# --- config lookup, offline -------------------------------------------------------------------------


def test_an_unknown_model_offline_says_what_to_do_without_touching_the_network(
    no_network: list[object], empty_hub_cache: Path
) -> None:
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE") as raised:
        estimate("some-org/not-a-model-anyone-has")

    assert HINT in str(raised.value)
    assert no_network == []


def test_bundled_and_local_configs_need_no_network(
    no_network: list[object], empty_hub_cache: Path, saved: dict[str, Path]
) -> None:
    estimate("Qwen/Qwen2.5-7B", quantization="4bit", context=4096)
    estimate(str(saved["llama"]))

    assert no_network == []


_PLAN_A_QUANTIZED_SPLIT = """
import json, socket, sys
asked = []
def refuse(*args, **kwargs):
    asked.append(repr(args)[:80])
    raise OSError("blocked")
socket.socket.connect = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from vram_magic.estimator import estimate
found = estimate("Qwen/Qwen2.5-0.5B", quantization="4bit", device_map="auto", gpu_bytes=2**30, gpus=2)
import bitsandbytes.functional as functional
print(json.dumps({"asked": asked, "imported": "bitsandbytes" in sys.modules,
                  "asks_on_import": bool(getattr(functional, "has_avx512bf16", lambda: False)())}))
"""


@needs_bitsandbytes
def test_planning_a_quantized_split_sends_nothing_even_online(tmp_path: Path) -> None:
    """Planning where a 4-bit model goes imports bitsandbytes, which (0.50, on a CPU with AVX512-BF16)
    asks the Hub for a kernel as it is imported: online, with an empty cache, no connection is tried."""
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env["HF_HOME"] = str(tmp_path)
    ran = subprocess.run(
        [sys.executable, "-c", _PLAN_A_QUANTIZED_SPLIT], capture_output=True, text=True, env=env, check=False
    )
    assert ran.returncode == 0, ran.stderr
    found = json.loads(ran.stdout.strip().splitlines()[-1])
    if not found["asks_on_import"]:
        pytest.skip("bitsandbytes asks the Hub for nothing on this CPU")
    assert found["imported"] and found["asked"] == []


def test_the_hugging_face_cache_is_read_first(empty_hub_cache: Path, saved: dict[str, Path]) -> None:
    snapshot = empty_hub_cache / "models--meta-llama--Llama-3.1-8B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((saved["llama"] / "config.json").read_text())
    (empty_hub_cache / "models--meta-llama--Llama-3.1-8B" / "refs").mkdir()
    (empty_hub_cache / "models--meta-llama--Llama-3.1-8B" / "refs" / "main").write_text("abc123")

    found = estimate("meta-llama/Llama-3.1-8B")  # the cached (tiny) config wins over the bundled one

    assert found.params == estimate(str(saved["llama"])).params
    assert "cache" in str(found.notes[0])


def test_online_but_unreachable_is_a_value_error(
    monkeypatch: pytest.MonkeyPatch, no_network: list[object], empty_hub_cache: Path
) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    with pytest.raises(ValueError, match="Could not reach the Hugging Face Hub") as raised:
        estimate("some-org/not-a-model-anyone-has")

    assert "some-org/not-a-model-anyone-has" in str(raised.value) and HINT in str(raised.value)
    assert len(no_network) == 1  # it tried once (online is allowed when not offline), without retrying


def test_load_config_returns_the_transformers_config(saved: dict[str, Path]) -> None:
    config = load_config(str(saved["gpt2"]))

    assert config.model_type == "gpt2"
    assert load_config(config) is config
    assert load_config(str(saved["gpt2"] / "config.json")).model_type == "gpt2"


@pytest.mark.parametrize(
    ("model", "kwargs", "message"),
    [
        ("", {}, "empty"),
        (42, {}, "not int"),
        ("./no/such/folder", {}, "No such folder"),
        ("~no-such-user-xyz/model", {}, "No such folder"),  # Path.expanduser raises RuntimeError
        ("a" * 300, {}, "No config for"),  # a file name too long for a path (OSError)
        ("not a model id!", {}, "neither a folder nor a Hub model id"),
        ("gpt2", {"dtype": "int3"}, "bfloat16, float16, float32"),
        ("gpt2", {"quantization": "3bit"}, "'8bit' or '4bit'"),
        ("gpt2", {"training": "rlhf"}, "'lora', 'qlora'"),
        ("gpt2", {"training": "full", "quantization": "4bit"}, "QLoRA"),
        ("gpt2", {"training": "qlora", "quantization": "8bit"}, "LoRA on a 4-bit model"),
        ("gpt2", {"batch_size": 0}, "batch_size must be a whole number of at least 1"),
        ("gpt2", {"context": -5}, "context must be"),
        ("gpt2", {"device_map": "tpu"}, "device_map 'tpu'"),
        ("gpt2", {"gpu_bytes": -1}, "gpu_bytes must be a number of bytes"),
        ("gpt2", {"training": "lora", "device_map": "cpu"}, "nothing on the GPU"),
        ("gpt2", {"gpu_bytes": 2**30}, "device_map='auto'"),
    ],
)
def test_bad_inputs_say_what_is_wrong(
    empty_hub_cache: Path, model: Any, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        estimate(model, **kwargs)


def test_a_folder_without_config_json_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"has no config\.json"):
        estimate(str(tmp_path))


def test_a_config_transformers_cannot_read_is_a_value_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')

    with pytest.raises(ValueError, match="transformers cannot read"):
        estimate(str(tmp_path))


# --- loading peaks, offload, KV cache, training ------------------------------------------------------------


def llama_085b() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**LLAMA_085B)


@pytest.mark.xfail(
    strict=True,
    reason="issue 12, open: priced in the bfloat16 it ran in, the estimate (2.46 GiB) is 31 % under this "
    "row; what the GPU holds beyond it needs the GPU calibration of benchmarks/train_accuracy.py",
)
def test_the_one_measured_qlora_step_is_not_underestimated() -> None:
    """An H100 (torch 2.11, transformers 5.17; shared/DESIGN.md): a QLoRA Trainer step of this Llama (LoRA
    r=16 on q/k/v/o, AdamW, batch 2 x 512, no checkpointing, not prepared for k-bit) peaked at 3.59 GiB. One
    row is not a calibration (issue 12 asks for many, on a GPU); it guards the direction: never more than 10 %
    under, and not wildly over. The checkpoint was saved in bfloat16 and loaded without a dtype, so it ran in
    bfloat16; an earlier version of this test priced float32 (this config names no dtype) and passed by it."""
    found = estimate(
        llama_085b(), dtype="bfloat16", training="qlora", prepare_kbit=False, batch_size=2, context=512
    )
    measured = 3.59 * GiB
    assert 0.9 * measured <= found.peak_bytes <= 1.25 * measured


def test_the_h100_facts_under_a_1_5_gib_cap() -> None:
    """bf16 (1.59 GiB) does not fit; 8-bit peaked at 0.955 GiB and 4-bit NF4 at 0.654 GiB; offload loads."""
    rows = {
        plan.key: plan for plan in load_plans(llama_085b(), free_bytes=round(1.5 * GiB), dtype="bfloat16")
    }

    assert [key for key in rows] == ["bf16", "8bit", "4bit", "offload"]
    # scenarios.BF16_BYTES plus the float32 RoPE buffers (inv_freq), reserved in one warm-up allocation: two
    # from transformers 5 on, one per layer and the model's before
    buffers = 2 if TRANSFORMERS_MAJOR >= 5 else LLAMA_085B["num_hidden_layers"] + 1
    assert rows["bf16"].need_bytes == 1_705_119_744 + buffers * 64 * 4
    assert rows["bf16"].fits is False
    assert rows["8bit"].fits and rows["4bit"].fits and rows["offload"].fits
    # Conservative, and within 1% of what the H100 measured:
    assert 0.955 * GiB <= rows["8bit"].need_bytes <= 0.955 * GiB * 1.01
    assert 0.654 * GiB <= rows["4bit"].need_bytes <= 0.654 * GiB * 1.01
    offload = rows["offload"].estimate
    assert 0 < offload.weights_bytes < 1.5 * GiB - 512 * MiB < offload.weights_bytes + offload.offloaded_bytes


def test_offload_places_what_fits_and_the_rest_in_cpu_ram() -> None:
    whole = estimate(llama_085b(), dtype="bfloat16")
    split = estimate(llama_085b(), dtype="bfloat16", device_map="auto", gpu_bytes=GiB)

    assert split.weights_bytes + split.offloaded_bytes == whole.weights_bytes
    assert 0 < split.weights_bytes <= GiB
    assert split.load_peak_bytes == split.weights_bytes
    assert "+ offload" in split.label
    with_room = estimate(llama_085b(), dtype="bfloat16", device_map="auto", gpu_bytes=4 * GiB)
    assert with_room.offloaded_bytes == 0
    on_cpu = estimate(llama_085b(), dtype="bfloat16", device_map="cpu")
    assert on_cpu.weights_bytes == on_cpu.peak_bytes == 0


def test_kv_cache_is_two_times_layers_heads_size_tokens_batch_bytes(empty_hub_cache: Path) -> None:
    found = estimate("meta-llama/Llama-3.1-8B", context=8192, batch_size=2, **AS_CONFIGURED)

    assert found.kv_cache_bytes == 2 * 32 * 8 * 128 * 8192 * 2 * 2  # 2 GiB
    assert found.activations_bytes is not None
    assert found.peak_bytes == found.weights_bytes + found.kv_cache_bytes + found.activations_bytes
    four_bit = estimate(
        "meta-llama/Llama-3.1-8B", quantization="4bit", context=8192, batch_size=2, **AS_CONFIGURED
    )
    assert four_bit.kv_cache_bytes == found.kv_cache_bytes  # the cache stays in the compute dtype


def test_sliding_window_layers_keep_only_their_window(empty_hub_cache: Path) -> None:
    found = estimate("google/gemma-2-2b", dtype="bfloat16", context=8192)

    full, sliding = 13, 13  # gemma 2 alternates sliding (4096) and full attention over 26 layers
    assert found.kv_cache_bytes == 2 * 4 * 256 * (full * 8192 + sliding * 4096) * 2


def test_an_encoder_has_no_kv_cache(empty_hub_cache: Path) -> None:
    found = estimate("bert-base-uncased", context=512)

    assert found.kv_cache_bytes == 0
    assert any("No KV cache" in str(note) for note in found.notes)


def test_training_adds_optimizer_states_and_activations(empty_hub_cache: Path) -> None:
    full = estimate("meta-llama/Llama-3.2-1B", training="full", context=512, **AS_CONFIGURED)
    lora = estimate("meta-llama/Llama-3.2-1B", training="lora", context=512, **AS_CONFIGURED)
    qlora = estimate("meta-llama/Llama-3.2-1B", training="qlora", context=512, **AS_CONFIGURED)

    # Trainer trains a bf16 model in bf16: a bf16 gradient and two bf16 AdamW states, no float32 master copy
    # (measured with a real Trainer in test_optimizer_states_are_what_trainer_keeps).
    assert full.training_bytes == 6 * full.params
    assert full.trainable_params == full.params
    assert lora.trainable_params is not None and lora.trainable_params < full.params // 100
    assert qlora.quantization == "4bit" and qlora.weights_bytes < lora.weights_bytes
    assert full.peak_bytes > lora.peak_bytes > qlora.peak_bytes
    assert full.kv_cache_bytes is None  # training keeps activations, not a cache


def test_activations_grow_with_the_batch_and_shrink_with_checkpointing(empty_hub_cache: Path) -> None:
    def activations(**kwargs: Any) -> int:
        # TinyLlama's 32k vocabulary keeps the logits small (Qwen's 152k would dominate either way)
        found = estimate("TinyLlama/TinyLlama-1.1B-Chat-v1.0", training="lora", context=1024, **kwargs)
        assert found.activations_bytes is not None
        return found.activations_bytes

    assert activations(batch_size=4) == 4 * activations(batch_size=1)
    assert activations(gradient_checkpointing=True) < activations() / 2


def test_fp32_full_training_has_no_master_copy(empty_hub_cache: Path) -> None:
    found = estimate("gpt2", dtype="float32", training="full")

    assert found.training_bytes == 12 * found.params


# --- plans and the table -----------------------------------------------------------------------------------


def test_plans_without_room_do_not_guess() -> None:
    rows = load_plans(llama_085b(), free_bytes=None)

    assert all(plan.fits is None and plan.room_bytes is None for plan in rows)
    assert "?" in render_estimate_table(rows)


def test_the_cap_limits_the_room() -> None:
    rows = load_plans(llama_085b(), free_bytes=70 * GiB, cap_bytes=GiB)

    assert {plan.room_bytes for plan in rows} == {GiB}


def test_training_plans_leave_out_what_cannot_train(empty_hub_cache: Path) -> None:
    # gpt2 names no dtype: it loads in float32, its checkpoint's own (only the unquantized row trains fully)
    assert [plan.key for plan in load_plans("gpt2", free_bytes=GiB, training="full")] == ["fp32"]
    assert [plan.key for plan in load_plans("gpt2", free_bytes=GiB, training="lora")] == [
        "fp32",
        "8bit",
        "4bit",
    ]
    assert [plan.key for plan in load_plans("gpt2", free_bytes=GiB, training="qlora")] == [
        "4bit"
    ]  # QLoRA is 4-bit


def test_a_folder_this_user_may_not_read_is_a_value_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(path: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(_configs, "_from_path", refused)  # root here reads everything: refuse by hand
    with pytest.raises(ValueError, match=r"Cannot read .*: Permission denied"):
        estimate(str(tmp_path))


def test_the_table_shows_every_row_and_each_note_once() -> None:
    rows = load_plans(llama_085b(), free_bytes=round(1.5 * GiB), dtype="bfloat16")
    text = render_estimate_table(rows)

    for label in ("bfloat16", "8-bit", "4-bit NF4", "offload", "1.59 GiB", "1.50 GiB"):
        assert label in text
    assert [line.split()[-1] for line in text.splitlines()[2:6]] == ["no", "yes", "yes", "yes"]
    assert text.count("caching_allocator_warmup") == 1
    assert str(rows[0].estimate).startswith("llama (852.56 M parameters, LlamaForCausalLM)")
    assert isinstance(rows[0], LoadPlan) and isinstance(rows[0].estimate, Estimate)


def test_importing_the_module_imports_no_torch() -> None:
    code = (
        "import sys, vram_magic.estimator; "
        "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'huggingface_hub', 'IPython') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    assert out.strip() == "[]"


def test_a_second_estimate_reuses_the_build(monkeypatch: pytest.MonkeyPatch, empty_hub_cache: Path) -> None:
    estimate("Qwen/Qwen2.5-1.5B", **AS_CONFIGURED)
    monkeypatch.setattr(_counting, "_build", lambda *args: pytest.fail("built again"))

    estimate("Qwen/Qwen2.5-1.5B", quantization="8bit", context=2048, **AS_CONFIGURED)
    load_plans("Qwen/Qwen2.5-1.5B", free_bytes=4 * GiB, **AS_CONFIGURED)


# --- what transformers 5 really loads: the checkpoint's dtype, a checkpoint saved quantized -----------------


def test_without_a_dtype_in_the_config_the_weights_say_which_dtype_loads(tmp_path: Path) -> None:
    from tests.tiny_models import save_float32_without_dtype, save_tiny_llama

    fp32 = save_float32_without_dtype(tmp_path / "fp32")
    bf16 = save_tiny_llama(tmp_path / "bf16")
    config = json.loads((bf16 / "config.json").read_text())
    config.pop("dtype", None)
    (bf16 / "config.json").write_text(json.dumps(config))  # only the safetensors header says bfloat16
    if TRANSFORMERS_MAJOR < 5:  # transformers 4 loads float32 all the same
        for folder in (fp32, bf16):
            assert estimate(str(folder)).dtype == "float32"
            assert any("before transformers 5" in str(note) for note in estimate(str(folder)).notes)
        return
    assert estimate(str(fp32)).dtype == "float32"
    found = estimate(str(bf16))
    assert found.dtype == "bfloat16"
    assert any("from the checkpoint's weights" in str(note) for note in found.notes)
    # twice the bytes of the bfloat16 weights (the rotary buffer stays float32 in both)
    assert estimate(str(fp32)).weights_bytes == pytest.approx(2 * found.weights_bytes, rel=0.001)


@pytest.mark.parametrize(
    ("saved", "bits"),
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "4bit"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "8bit"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "4bit"),
        ({"quant_method": "awq", "bits": 4}, "4bit"),
    ],
)
def test_a_checkpoint_saved_quantized_is_estimated_as_saved(
    tmp_path: Path, saved: dict[str, Any], bits: str
) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(**LLAMA_085B, **{DTYPE: "float16"}).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": saved}))
    found = estimate(str(tmp_path))
    assert found.quantization == bits
    assert found.weights_bytes == estimate(llama_085b(), dtype="float16", quantization=bits).weights_bytes
    assert estimate(str(tmp_path), quantization="8bit" if bits == "4bit" else "4bit").quantization == bits
    assert [plan.key for plan in load_plans(str(tmp_path), free_bytes=GiB)] == ["fp16", "offload"]


# --- notes are data, worded by the renderer; options are checked once --------------------------------------

SELECTORS = {"origin", "quantization", "double_quant", "sliding"}  # facts that choose the words, not shown


def shown(name: str, value: Any) -> str:
    """How a note's figure reads in its text."""
    if name.endswith("_bytes"):
        return " + ".join(map(format_bytes, value)) if isinstance(value, tuple) else format_bytes(value)
    if name == "params":
        return f"{value / 10**6:.2f} M parameters"
    return str(value)


def every_kind_of_note(
    monkeypatch: pytest.MonkeyPatch, hub_cache: Path, saved: dict[str, Path], tmp_path: Path
) -> list[Note]:
    """The notes of estimates chosen so that together they give every key and every origin."""
    from tests.tiny_models import save_tiny_llama

    cached = hub_cache / "models--some-org--cached" / "snapshots" / "abc123"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text((saved["gpt2"] / "config.json").read_text())
    (hub_cache / "models--some-org--cached" / "refs").mkdir()
    (hub_cache / "models--some-org--cached" / "refs" / "main").write_text("abc123")
    unnamed = save_tiny_llama(tmp_path / "unnamed")  # only its safetensors header names its dtype
    config = json.loads((unnamed / "config.json").read_text())
    config.pop("dtype", None)
    (unnamed / "config.json").write_text(json.dumps(config))
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    values = {**llama_085b().to_dict(), "quantization_config": {"quant_method": "gptq", "bits": 4}}
    (gptq / "config.json").write_text(json.dumps(values))

    found = [
        estimate("Qwen/Qwen2.5-0.5B", quantization="4bit", context=1024),
        estimate("Qwen/Qwen2.5-0.5B", quantization="4bit", double_quant=False),
        estimate("Qwen/Qwen2.5-0.5B", dtype="float16", quantization="8bit", device_map="auto", gpu_bytes=MiB),
        estimate(llama_085b(), dtype="bfloat16", device_map="auto", gpu_bytes=GiB, context=512),
        estimate(llama_085b(), device_map="auto"),
        estimate(llama_085b(), device_map="cpu"),
        estimate("bert-base-uncased", context=128),
        estimate("gpt2", dtype="float32", training="full"),
        estimate("meta-llama/Llama-3.2-1B", training="full", context=256, gradient_checkpointing=True),
        estimate("Qwen/Qwen2.5-0.5B", training="qlora", context=128, optimizer="paged_adamw_8bit"),
        estimate("Qwen/Qwen2.5-0.5B", device_map="auto", gpu_bytes=300 * MiB, gpus=2),
        estimate(
            "meta-llama/Llama-3.2-1B",
            training="lora",
            context=256,
            lora_r=8,
            device_map="auto",
            gpu_bytes=MiB,
        ),
        estimate("google/gemma-2-2b", context=8192),
        estimate("meta-llama/Llama-3.1-8B-Instruct"),
        estimate(str(gptq), quantization="8bit"),
        estimate(str(saved["llama"])),
        estimate(str(unnamed)),
        estimate("some-org/cached"),
    ]
    monkeypatch.setattr(_configs, "_offline", lambda: False)
    monkeypatch.setattr(_configs, "_download", lambda repo_id: saved["gpt2"] / "config.json")
    found.append(estimate("some-org/only-on-the-hub"))
    monkeypatch.setattr(_configs, "transformers_major", lambda: 4)
    found.append(estimate("Qwen/Qwen2.5-0.5B"))
    found.append(estimate("Qwen/Qwen2.5-0.5B", quantization="8bit"))
    found.append(estimate("Qwen/Qwen2.5-0.5B", training="qlora", context=128))  # float16: k-bit casts
    return [note for each in found for note in each.notes]


def test_every_note_the_estimator_writes_is_worded_with_its_figures(
    monkeypatch: pytest.MonkeyPatch, empty_hub_cache: Path, saved: dict[str, Path], tmp_path: Path
) -> None:
    from vram_magic.render._estimate import _NOTES

    notes = every_kind_of_note(monkeypatch, empty_hub_cache, saved, tmp_path)

    assert {note.key for note in notes} == set(_NOTES)  # every key, and each key has its words
    origins = {(note.key, note.fact("origin")) for note in notes if note.fact("origin")}
    assert origins == {
        *(("source", origin) for origin in ("object", "path", "cache", "bundled", "hub")),
        *(("dtype", origin) for origin in ("asked", "transformers-4", "transformers-4-quantized")),
        # what transformers 5 loads untold: the config's dtype, the weights', or float32 assumed
        *(("dtype", origin) for origin in ("config", "weights", "assumed") if TRANSFORMERS_MAJOR >= 5),
    }
    for note in notes:
        text = str(note)
        assert text and text != note.key and text.endswith("."), note
        assert text == note_text(note)
        for name, value in note.facts:
            if name in SELECTORS or value is None or isinstance(value, bool):
                continue
            if (note.key, name) == ("full-training", "width"):  # float32 or mixed precision
                continue
            assert shown(name, value) in text, (note, name)


def test_notes_read_as_before(empty_hub_cache: Path) -> None:
    found = estimate("meta-llama/Llama-3.1-8B", context=8192, batch_size=2, **AS_CONFIGURED)

    assert [str(note) for note in found.notes] == [
        "Config: vram_magic's bundled copy of meta-llama/Llama-3.1-8B's config.json (nothing downloaded).",
        "dtype bfloat16, from the config (what from_pretrained loads when given no dtype)."
        if TRANSFORMERS_MAJOR >= 5
        else "dtype bfloat16, as asked.",
        "Loading reserves the GPU's share in one allocation before copying (transformers' "
        "caching_allocator_warmup): all of it must be free at once.",
        "KV cache for 2 x 8192 tokens: 2 x layers x KV heads x head size x tokens x 2 bytes = 2.00 GiB.",
        "Running the prompt needs about 9*hidden + 6*intermediate bytes per token for one layer at a time "
        "(measured on CPU with SDPA attention; the CUDA context and cuBLAS workspaces are not counted).",
    ]
    assert found.notes[3] == Note(
        "kv-cache", facts(batch_size=2, context=8192, width=2, kv_bytes=2 * GiB, sliding=False)
    )
    assert "1.00 GiB" in str(estimate("meta-llama/Llama-3.1-8B", context=8192, batch_size=1, **AS_CONFIGURED))


def test_labels_are_worded_from_the_data() -> None:
    rows = load_plans(llama_085b(), free_bytes=GiB, dtype="float16")

    assert [plan.label for plan in rows] == ["float16", "8-bit", "4-bit NF4", "offload"]
    assert [plan.estimate.label for plan in rows] == ["float16", "8-bit", "4-bit NF4", "float16 + offload"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "int3"}, "bfloat16, float16, float32"),
        ({"quantization": "3bit"}, "'8bit' or '4bit'"),
        ({"training": "rlhf"}, "'lora', 'qlora'"),
        ({"training": "full", "quantization": "4bit"}, "QLoRA"),
        ({"training": "qlora", "quantization": "8bit"}, "LoRA on a 4-bit model"),
        ({"batch_size": 0}, "batch_size must be a whole number of at least 1"),
        ({"lora_r": True}, "lora_r must be a whole number of at least 1"),
        ({"context": -5}, "context must be"),
        ({"device_map": "tpu"}, "device_map 'tpu'"),
        ({"device_map": {"": 0}}, "for a dict device_map"),
        ({"gpu_bytes": -1}, "gpu_bytes must be a number of bytes"),
        ({"gpu_bytes": 1.5, "device_map": "auto"}, "gpu_bytes must be a number of bytes"),
        ({"training": "lora", "device_map": "cpu"}, "nothing on the GPU"),
        ({"training": "lora", "optimizer": "adam_fancy"}, "TrainingArguments' optim names"),
        ({"training": "lora", "lora_targets": []}, "'all-linear' or a list of module names"),
        ({"training": "lora", "prepare_kbit": True}, "LoRA on a quantized model"),
        ({"gpu_bytes": 2**30}, "device_map='auto'"),
    ],
)
def test_options_refuse_what_estimate_refuses_with_the_same_message(
    empty_hub_cache: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message) as checked:
        options(**kwargs)
    with pytest.raises(ValueError) as estimated:
        estimate("gpt2", **kwargs)

    assert str(checked.value) == str(estimated.value)


def test_options_are_frozen_and_canonical() -> None:
    assert options(dtype="torch.bf16", quantization="NF4", device_map=0) == Options(
        dtype="bfloat16", quantization="4bit", device_map="cuda"
    )
    # QLoRA is prepared as its notebooks prepare it: prepare_model_for_kbit_training, checkpointing on.
    assert options(training="qlora", device_map="cuda:1") == Options(
        quantization="4bit",
        training="lora",
        device_map="cuda",
        gradient_checkpointing=True,
        prepare_kbit=True,
    )
    assert options(training="qlora", prepare_kbit=False).gradient_checkpointing is False
    assert options(training="lora", lora_targets=["q_proj", "v_proj"]).lora_targets == ("q_proj", "v_proj")
    assert options(training="lora", optimizer="PAGED_ADAMW_8BIT").optimizer == "paged_adamw_8bit"
    assert options(device_map="Auto", gpu_bytes=GiB).device_map == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        options().dtype = "float16"  # type: ignore[misc]


def test_a_checkpoint_saved_quantized_is_sized_as_saved_and_trained_only_through_adapters(
    tmp_path: Path,
) -> None:
    """Found in review: no conversion buffer for weights that load quantized, no full fine-tune of them, a
    QLoRA plan for one saved in bitsandbytes 4-bit, and no offload row that puts nothing on the GPU."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, vocab_size=8000
    ).to_dict()
    for method, settings in (
        ("gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128}),
        ("bnb4", {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}),
    ):
        folder = tmp_path / method
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, "quantization_config": settings}))
        found = estimate(str(folder))
        assert found.load_peak_bytes == found.weights_bytes  # loaded as saved: nothing converted
        with pytest.raises(ValueError, match=r"saved quantized .* cannot be fully fine-tuned"):
            estimate(str(folder), training="full")
    # the one row: the checkpoint as saved (its config names no dtype: float32 from transformers 5 on, the
    # float16 transformers 4's quantizers impose before)
    assert [plan.key for plan in load_plans(str(tmp_path / "bnb4"), free_bytes=GiB, training="qlora")] == [
        "fp32" if TRANSFORMERS_MAJOR >= 5 else "fp16"
    ]
    with pytest.raises(ValueError, match="not in bitsandbytes 4-bit"):
        load_plans(str(tmp_path / "gptq"), free_bytes=GiB, training="qlora")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps(config))
    keys = [plan.key for plan in load_plans(str(plain), free_bytes=100 * 2**20)]
    assert "offload" not in keys  # 100 MiB leaves no room for a layer after the headroom


# --- the disk cache: a model counted once is estimated in a new kernel without transformers' model code ----


def _forget_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """As a new kernel: nothing counted in memory, only what is on disk."""
    monkeypatch.setattr(_counting, "_entries", {})
    monkeypatch.setattr(_counting, "_cache", type(_counting._cache)())


def _every_kind_of_estimate(saved: dict[str, Path], prequantized_folder: Path) -> list[Any]:
    return [
        load_plans("meta-llama/Llama-3.1-8B", free_bytes=6 * GiB),  # an offload row that splits
        load_plans("google/gemma-2-2b", free_bytes=40 * GiB, context=8192),  # sliding-window layers
        estimate("openai-community/gpt2", training="full", batch_size=4),
        estimate("google-bert/bert-base-uncased", context=512),
        estimate("Qwen/Qwen2.5-7B", quantization="4bit", training="qlora", gradient_checkpointing=True),
        *(load_plans(str(folder), free_bytes=GiB, context=128) for folder in saved.values()),
        load_plans(str(prequantized_folder), free_bytes=GiB),
        estimate(llama_085b(), dtype="float16", device_map="auto", gpu_bytes=GiB),
    ]


def test_a_cached_estimate_equals_a_fresh_count(
    monkeypatch: pytest.MonkeyPatch,
    empty_hub_cache: Path,
    saved: dict[str, Path],
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    prequantized_folder = tmp_path / "bnb4"
    prequantized_folder.mkdir()
    values = {
        **llama_085b().to_dict(),
        "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True},
    }
    (prequantized_folder / "config.json").write_text(json.dumps(values))
    _forget_this_process(monkeypatch)
    fresh = _every_kind_of_estimate(saved, prequantized_folder)
    assert len(list((tmp_path / "cache" / "vram_magic" / "estimates").glob("*.json"))) >= 8

    _forget_this_process(monkeypatch)
    built_again: list[int] = []
    build = _counting._build

    def recorded(config: Any, dtype_name: str) -> Any:
        built_again.append(config.num_hidden_layers)
        return build(config, dtype_name)

    monkeypatch.setattr(_counting, "_build", recorded)
    cached = _every_kind_of_estimate(saved, prequantized_folder)
    assert cached == fresh
    # Every figure came from the disk; only placing an offload that does not fit builds the model (the 8B
    # under 6 GiB, 32 layers; the 0.85 B in float16 under 1 GiB, 16 layers).
    assert sorted(built_again) == [16, 32]


def test_a_cache_file_that_cannot_be_read_is_counted_again(
    monkeypatch: pytest.MonkeyPatch, empty_hub_cache: Path, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _forget_this_process(monkeypatch)
    fresh = estimate("Qwen/Qwen2.5-0.5B", quantization="8bit", **AS_CONFIGURED)
    (entry,) = (tmp_path / "cache" / "vram_magic" / "estimates").glob("*.json")
    entry.write_text('{"census": {"bfloat16": {"params": ')  # cut off mid-write by a crash
    _forget_this_process(monkeypatch)
    assert estimate("Qwen/Qwen2.5-0.5B", quantization="8bit", **AS_CONFIGURED) == fresh
    assert json.loads(entry.read_text())["census"]["bfloat16"]["params"] == fresh.params  # and saved whole


def test_a_new_kernel_estimates_a_counted_model_without_transformers_and_says_when_it_counts(
    tmp_path: Path,
) -> None:
    script = (
        "import sys\n"
        "from vram_magic.estimator import load_plans\n"
        "told = lambda line: print('told:', line)\n"
        "load_plans('meta-llama/Llama-3.2-1B', free_bytes=2**34, progress=told)\n"
        "print('loaded:', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    runs = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
        for _ in range(2)
    ]
    first, second = (run.stdout.splitlines() for run in runs)
    assert first == [
        "told: Counting meta-llama/Llama-3.2-1B (the first time takes a few seconds)…",
        "loaded: ['torch', 'transformers']",
    ]
    assert second == ["loaded: []"]


def test_two_gpus_hold_what_one_cannot_placed_as_transformers_places_it(empty_hub_cache: Path) -> None:
    t4 = round(14.75 * GiB)
    one = {
        plan.key: plan
        for plan in load_plans("meta-llama/Llama-3.1-8B", free_bytes=None, cap_bytes=t4, **AS_CONFIGURED)
    }
    two = {
        plan.key: plan
        for plan in load_plans(
            "meta-llama/Llama-3.1-8B", free_bytes=None, cap_bytes=t4, gpus=2, **AS_CONFIGURED
        )
    }
    assert one["bf16"].fits is False and two["bf16"].fits is True  # 14.96 GiB of weights: Kaggle's 2 x T4
    assert "offload" not in two  # device_map="auto" over both GPUs is every row already
    split = two["bf16"].estimate
    (note,) = [note for note in split.notes if note.key == "gpu-split"]
    shares = note.fact("per_gpu_bytes")
    assert len(shares) == 2 and min(shares) > 0.4 * max(shares)  # balanced, not GPU 0 first
    assert sum(shares) == split.weights_bytes and split.offloaded_bytes == 0
    assert split.peak_bytes == max(shares) < split.weights_bytes  # each GPU holds its share
    qwen = {
        plan.key: plan
        for plan in load_plans("Qwen/Qwen2.5-14B", free_bytes=None, cap_bytes=t4, gpus=2, **AS_CONFIGURED)
    }
    assert qwen["bf16"].fits is False and qwen["bf16"].estimate.offloaded_bytes > 0  # 27.5 GiB
    assert qwen["8bit"].fits is True


def test_several_gpus_need_their_size_and_do_not_train(empty_hub_cache: Path) -> None:
    with pytest.raises(ValueError, match="pass gpu_bytes"):
        estimate("gpt2", gpus=2)
    with pytest.raises(ValueError, match="Training spread over several GPUs"):
        estimate("gpt2", gpus=2, device_map="auto", gpu_bytes=GiB, training="lora")
