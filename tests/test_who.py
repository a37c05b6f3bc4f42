"""Which names hold memory: run on CPU with device="cpu", the same code path as for CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.stack import BITSANDBYTES_QUANTIZES_HERE, NO_BITSANDBYTES_HERE
from vram_magic._types import Holder
from vram_magic._who import bytes_only_in, find_holders, tensors_in

REPO = Path(__file__).resolve().parents[1]


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(module: nn.Module) -> int:
    return nbytes(*module.parameters(), *module.buffers())


def by_name(holders: tuple[Holder, ...]) -> dict[str, Holder]:
    return {h.name: h for h in holders}


def tiny_llama(tie: bool = True) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config)


def adamw_after_one_step(model: nn.Module) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = sum(p.sum() for p in model.parameters())
    assert isinstance(loss, torch.Tensor)
    loss.backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    return opt


def test_a_tensor() -> None:
    t = torch.zeros(10, 20)
    assert find_holders({"t": t}, "cpu") == (Holder("t", "Tensor", 800),)


def test_a_module_counts_its_parameters_and_buffers() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    (holder,) = find_holders({"model": model}, "cpu")
    assert holder.type_name == "Sequential"
    # weight 32 + bias 8 + bn weight/bias 16 floats, running_mean/var 16 floats, num_batches_tracked int64
    assert holder.total_bytes == (32 + 8 + 16 + 16) * 4 + 8 == module_bytes(model)


def test_tiny_llama_counts_tied_embeddings_once() -> None:
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    (holder,) = find_holders({"model": model}, "cpu")
    assert holder.type_name == "LlamaForCausalLM"
    assert holder.total_bytes == module_bytes(model)
    # The tied matrix is reachable twice; the report must count it once.
    with_duplicates = nbytes(
        *(p for _, p in model.named_parameters(remove_duplicate=False)), *model.buffers()
    )
    assert holder.total_bytes == with_duplicates - nbytes(model.lm_head.weight)


def test_untied_llama_counts_both_matrices() -> None:
    tied = find_holders({"m": tiny_llama(tie=True)}, "cpu")[0].total_bytes
    untied = find_holders({"m": tiny_llama(tie=False)}, "cpu")[0].total_bytes
    assert untied - tied == 256 * 64 * 4


def test_optimizer_state_counted_and_params_shared_with_model() -> None:
    model = nn.Linear(16, 16)
    opt = adamw_after_one_step(model)
    state = [v for s in opt.state.values() for v in s.values()]
    assert len(state) == 6  # step, exp_avg, exp_avg_sq for weight and bias
    params = module_bytes(model)

    holders = find_holders({"model": model, "opt": opt}, "cpu")
    assert [h.name for h in holders] == ["opt", "model"]
    opt_h, model_h = holders
    assert opt_h == Holder("opt", "AdamW", params + nbytes(*state), params, ("model",))
    assert model_h == Holder("model", "Linear", params, params, ("opt",))
    ns = {"model": model, "opt": opt}
    assert bytes_only_in(ns, ["model", "opt"], "cpu") == params + nbytes(*state)
    assert bytes_only_in(ns, ["opt"], "cpu") == nbytes(*state)  # the model's weights stay, with `model`
    assert bytes_only_in(ns, ["model"], "cpu") == 0


def test_nested_containers() -> None:
    a, b, c, d = torch.ones(3), torch.ones(5), torch.ones(7), torch.ones(11)
    batch = {"inputs": [a, (b, {c})], "meta": {"deep": {"deeper": [d]}}, "n": 3, "s": "text"}
    assert find_holders({"batch": batch}, "cpu") == (Holder("batch", "dict", nbytes(a, b, c, d)),)


class Box:
    """An ordinary object that holds a model and an optimizer, like a Trainer."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        self.config = {"lr": 1e-3}
        self.callbacks = [object()]


def test_object_holding_a_model_and_optimizer() -> None:
    model = nn.Linear(8, 8)
    opt = adamw_after_one_step(model)
    state = [v for s in opt.state.values() for v in s.values()]
    box = Box(model, opt)
    h = by_name(find_holders({"box": box, "model": model}, "cpu"))
    assert h["box"] == Holder(
        "box", "Box", module_bytes(model) + nbytes(*state), module_bytes(model), ("model",)
    )
    assert h["model"].shared_with == ("box",)


def test_attributes_deeper_than_the_limit_are_not_walked() -> None:
    t = torch.ones(4)
    leaf: object = t
    for _ in range(10):
        leaf = [leaf]
    assert find_holders({"deep": leaf}, "cpu") == ()
    assert find_holders({"shallow": [[t]]}, "cpu") == (Holder("shallow", "list", 16),)


def test_real_trainer_holds_model_and_optimizer(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    assert trainer.optimizer is not None
    opt = trainer.optimizer
    batch = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    state = [v for s in opt.state.values() for v in s.values()]
    assert state

    h = by_name(find_holders({"trainer": trainer, "model": model}, "cpu"))
    assert h["trainer"].type_name == "Trainer"
    assert h["trainer"].total_bytes == module_bytes(model) + nbytes(*state)
    assert h["trainer"].shared_with == ("model",)
    assert h["model"].total_bytes == h["trainer"].shared_bytes == module_bytes(model)


def test_model_output_holds_logits_and_kv_cache() -> None:
    model = tiny_llama()
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3]]), use_cache=True)
    cache = out.past_key_values  # transformers 4.45 hands back the legacy tuple of (keys, values) per layer
    pairs = [(layer.keys, layer.values) for layer in cache.layers] if hasattr(cache, "layers") else cache
    cache_tensors = [t for pair in pairs for t in pair]
    assert len(cache_tensors) == 4
    h = by_name(find_holders({"model": model, "out": out}, "cpu"))
    assert h["out"].total_bytes == nbytes(out.logits, *cache_tensors)
    assert h["out"].shared_with == ()


def test_views_and_slices_count_the_whole_storage_once() -> None:
    base = torch.zeros(1000)
    ns = {"view": base.view(10, 100), "part": base[10:20], "both": [base, base[::2], base[1:]]}
    h = by_name(find_holders(ns, "cpu"))
    assert {name: x.total_bytes for name, x in h.items()} == {"view": 4000, "part": 4000, "both": 4000}
    assert h["part"].shared_bytes == 4000
    assert h["part"].shared_with == ("both", "view")
    assert bytes_only_in(ns, ns, "cpu") == 4000
    assert bytes_only_in(ns, ["view", "part"], "cpu") == 0  # `both` keeps the storage


def test_two_names_for_one_tensor() -> None:
    x = y = torch.zeros(100)
    z = torch.zeros(10)
    ns = {"x": x, "y": y, "z": z}
    assert find_holders(ns, "cpu") == (
        Holder("x", "Tensor", 400, 400, ("y",)),
        Holder("y", "Tensor", 400, 400, ("x",)),
        Holder("z", "Tensor", 40),
    )
    assert bytes_only_in(ns, ns, "cpu") == 440
    assert bytes_only_in(ns, ["x", "y"], "cpu") == 400
    assert bytes_only_in(ns, ["x", "z"], "cpu") == 40


def test_biggest_first_and_empty_names_left_out() -> None:
    ns = {
        "small": torch.zeros(1),
        "big": torch.zeros(1000),
        "medium": nn.Linear(10, 10),
        "empty": torch.empty(0),
        "number": 3,
        "words": ["no", "tensors"],
    }
    assert [h.name for h in find_holders(ns, "cpu")] == ["big", "medium", "small"]


def test_ipython_names_private_names_and_skip() -> None:
    t = torch.zeros(4)
    ns = {
        "keep": t,
        "hidden": torch.zeros(8),
        "_": t,
        "_5": t,
        "In": ["x = 1"],
        "Out": {5: torch.zeros(16)},
        "torch": torch,
        "Linear": nn.Linear,
        "helper": lambda: t,
    }
    assert find_holders(ns, "cpu", skip=lambda name: name == "hidden") == (Holder("keep", "Tensor", 16),)


def test_device_filtering() -> None:
    on_cpu = torch.zeros(10)
    on_meta = torch.zeros(1000, device="meta")
    ns = {"mixed": [on_cpu, on_meta], "meta_only": on_meta}
    assert find_holders(ns, "cpu") == (Holder("mixed", "list", 40),)
    assert find_holders(ns, "cuda") == ()
    assert find_holders(ns, "cuda:1") == ()
    assert tensors_in(ns, "cuda") == []
    # Meta tensors hold no memory: they are never counted, even when asked for "meta".
    with torch.device("meta"):
        meta_model = nn.Linear(100, 100)
    assert find_holders({"meta_model": meta_model, **ns}, "meta") == ()


@pytest.mark.skipif(not BITSANDBYTES_QUANTIZES_HERE, reason=NO_BITSANDBYTES_HERE)
def test_quantized_params_count_their_quant_state() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4", compress_statistics=True).to("cpu")
    qs = layer.weight.quant_state
    assert qs is not None and qs.state2 is not None
    quant_tensors = [qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
    expected = nbytes(layer.weight, layer.bias, *quant_tensors)
    assert find_holders({"layer": layer}, "cpu") == (Holder("layer", "Linear4bit", expected),)


def test_cycles_terminate() -> None:
    t = torch.zeros(25)
    loop: list[object] = [t]
    loop.append(loop)
    box = Box(nn.Linear(2, 2), torch.optim.SGD([torch.zeros(1, requires_grad=True)]))
    box.callbacks = [box, {"me": box}]
    d: dict[str, object] = {"t": t}
    d["d"] = d
    h = by_name(find_holders({"loop": loop, "box": box, "d": d}, "cpu"))
    assert h["loop"].total_bytes == h["d"].total_bytes == 100
    assert h["box"].total_bytes == module_bytes(box.model) + 4


def test_properties_and_getattr_are_not_called() -> None:
    calls = []

    class Lazy:
        def __init__(self) -> None:
            self.held = torch.zeros(3)

        @property
        def weights(self) -> torch.Tensor:
            calls.append("property")
            return torch.zeros(1000)

        def __getattr__(self, name: str) -> Any:
            calls.append(name)
            raise AttributeError(name)

    class SlottedProxy:
        __slots__ = ("target",)

        def __init__(self) -> None:
            self.target = "weights.safetensors"

        def __getattr__(self, name: str) -> Any:  # a lazy loader would load here
            calls.append(name)
            return torch.zeros(1000)

    ns = {"lazy": Lazy(), "proxy": SlottedProxy()}
    assert find_holders(ns, "cpu") == (Holder("lazy", "Lazy", 12),)
    assert calls == []


def test_a_name_bound_to_the_shell_does_not_hold_the_namespace() -> None:
    class Shell:  # like ``ip = get_ipython()``: the shell refers back to the user namespace
        def __init__(self, user_ns: dict[str, object]) -> None:
            self.user_ns = user_ns

    ns: dict[str, object] = {"model": nn.Linear(4, 4)}
    ns["ip"] = Shell(ns)
    assert [h.name for h in find_holders(ns, "cpu")] == ["model"]


def test_tensors_in_a_failed_frame() -> None:
    def cell() -> None:
        activations = torch.zeros(64)
        views = [activations[:8], activations[8:]]  # same storage as activations
        other = {"x": torch.zeros(2)}
        raise RuntimeError(f"out of memory ({len(views)} views, {len(other)} others)")

    with pytest.raises(RuntimeError) as info:
        cell()
    tb = info.value.__traceback__
    assert tb is not None and tb.tb_next is not None
    f_locals = tb.tb_next.tb_frame.f_locals
    found = tensors_in(f_locals, "cpu")
    assert sorted(t.untyped_storage().nbytes() for t in found) == [8, 256]
    assert any(t is f_locals["activations"] for t in found)
    assert tensors_in(f_locals, "cuda") == []


def test_without_torch_imported_nothing_holds_memory() -> None:
    code = (
        "import sys\n"
        "from vram_magic._who import bytes_only_in, find_holders, tensors_in\n"
        "ns = {'x': [1, 2], 'y': 'text'}\n"
        "print(find_holders(ns), tensors_in(ns), bytes_only_in(ns, ns), 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "() [] 0 False"


# --- a bounded walk: big Python data does not make `%vram who` or a rescue slow ---------------------------


def test_a_tokenized_dataset_in_python_lists_is_sampled_not_walked_item_by_item(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vram_magic import _who

    monkeypatch.setattr(_who, "MAX_VISITS", 500)  # far fewer objects than the dataset has
    ids = list(range(1000, 1064))
    dataset = [{"input_ids": list(ids), "labels": list(ids), "text": "a b c"} for _ in range(5000)]
    weights = torch.ones(256)
    walked = _who.walk_namespace({"dataset": dataset, "weights": weights}, "cpu")
    assert walked.unfinished == frozenset()  # sampled: no stop, no "not counted"
    assert walked.holders() == (Holder("weights", "Tensor", 1024),)


def test_a_list_of_tensors_is_walked_in_full_when_it_is_within_the_budget() -> None:
    rows = [{"pixel_values": torch.ones(8)} for _ in range(200)]  # a tensor in every row, past the sample
    assert find_holders({"rows": rows}, "cpu") == (Holder("rows", "list", 200 * 32),)


def test_a_walk_past_its_budget_stops_and_the_report_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from vram_magic import _who
    from vram_magic._units import format_bytes
    from vram_magic.render import render_holders

    monkeypatch.setattr(_who, "MAX_VISITS", 100)
    features = [torch.zeros(4) for _ in range(1000)]
    model = nn.Linear(64, 64)  # a model's parameters never count against the budget
    (first, second) = find_holders({"features": features, "model": model}, "cpu")
    assert (first.name, first.complete) == ("model", True)
    assert first.total_bytes == module_bytes(model)
    assert (second.name, second.complete) == ("features", False)
    assert 0 < second.total_bytes < 1000 * 16  # what it saw before it stopped: a lower bound
    text = render_holders((first, second), "cpu")
    assert f"≥ {format_bytes(second.total_bytes)}" in text.splitlines()[2]
    assert "`features` holds too many objects to look through quickly" in " ".join(text.split())
