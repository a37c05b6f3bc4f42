"""The helpers rewritten cells call: vram_magic.chunked (and to_gpu_if_it_fits, in test_fixes_end_to_end)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import vram_magic


@pytest.fixture(scope="module")
def model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
        pad_token_id=0,
        eos_token_id=5,
    )
    return LlamaForCausalLM(config).eval()


def _left_padded_batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(6, 256, (5, 7))
    mask = torch.ones_like(ids)
    ids[3, :2], mask[3, :2] = 0, 0  # one shorter prompt, padded on the left as for generation
    return {"input_ids": ids, "attention_mask": mask}


def test_generate_in_chunks_gives_the_same_sequences_as_one_batch(model: Any) -> None:
    batch = _left_padded_batch()
    whole = model.generate(**batch, max_new_tokens=10, do_sample=False)
    for chunks in (2, 3, 5, 8):
        parts = vram_magic.chunked(model.generate, chunks=chunks)(**batch, max_new_tokens=10, do_sample=False)
        assert torch.equal(parts, whole), chunks


def test_a_forward_pass_in_chunks_gives_the_same_logits(model: Any) -> None:
    batch = _left_padded_batch()
    with torch.no_grad():
        whole = model(**batch)
        parts = vram_magic.chunked(model, chunks=2)(**batch)
    assert type(parts) is type(whole)
    torch.testing.assert_close(parts.logits, whole.logits, atol=1e-5, rtol=1e-5)


def test_chunks_that_stop_early_are_padded_as_one_batch_pads_them() -> None:
    def generate(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
        # a stand-in whose first rows stop after one new token, the others after three
        longest = 1 if int(input_ids[0, 0]) < 2 else 3
        return torch.cat([input_ids, input_ids.new_full((input_ids.shape[0], longest), 9)], dim=1)

    ids = torch.arange(4).unsqueeze(1)
    joined = vram_magic.chunked(generate, chunks=2)(ids, pad_token_id=7)
    assert joined.tolist() == [[0, 9, 7, 7], [1, 9, 7, 7], [2, 9, 9, 9], [3, 9, 9, 9]]


def test_one_row_or_one_chunk_is_one_call() -> None:
    calls: list[int] = []

    def run(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x

    vram_magic.chunked(run, chunks=4)(torch.zeros(1, 3))
    vram_magic.chunked(run, chunks=1)(torch.zeros(6, 3))
    vram_magic.chunked(run, chunks=4)(torch.zeros(6, 3))
    assert calls == [1, 6, 2, 2, 2]  # at most `chunks` parts, as even as the rows allow
    with pytest.raises(ValueError, match="chunks must be a whole number"):
        vram_magic.chunked(run, chunks=0)


def test_settings_that_are_lists_go_whole_to_every_chunk(model: Any) -> None:
    batch = {key: value[:2] for key, value in _left_padded_batch().items()}
    stops = [5, 7]  # eos_token_id=[eos, eot]: two stop tokens, not one per row
    whole = model.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=stops)
    parts = vram_magic.chunked(model.generate, chunks=2)(
        **batch, max_new_tokens=8, do_sample=False, eos_token_id=stops
    )
    assert torch.equal(parts, whole)


def test_a_loss_is_weighted_by_the_rows_of_each_chunk() -> None:
    def loss(x: torch.Tensor) -> torch.Tensor:
        return x.float().mean()

    rows = torch.arange(3).unsqueeze(1)  # chunks of 2 and 1 rows
    assert float(vram_magic.chunked(loss, chunks=2)(rows)) == pytest.approx(float(loss(rows)))


def test_what_cannot_be_joined_is_left_out_with_a_warning() -> None:
    def generate(input_ids: torch.Tensor) -> dict[str, Any]:
        # a stand-in whose chunks stop after different numbers of steps, each step with its scores
        steps = 1 if int(input_ids[0, 0]) < 2 else 3
        return {"sequences": input_ids, "scores": tuple(torch.zeros(len(input_ids), 4) for _ in range(steps))}

    with pytest.warns(UserWarning, match="`scores` cannot be joined"):
        out = vram_magic.chunked(generate, chunks=2)(torch.arange(4).unsqueeze(1))
    assert out["sequences"].tolist() == [[0], [1], [2], [3]] and "scores" not in out
