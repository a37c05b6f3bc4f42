"""Tiny real models saved locally (there is no model hub here): a Llama with a word-level tokenizer, the same
saved in float32 with no dtype in its config (as older checkpoints are), and a LoRA adapter for it."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def save_tiny_llama(path: Path, vocab_size: int = 256, *, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Hidden 64, 2 layers, untied embeddings, saved in ``dtype`` (bfloat16, as hub checkpoints are)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(dtype).save_pretrained(path)  # type: ignore[arg-type]
    return path


def save_tokenizer(path: Path, vocab_size: int = 256) -> None:
    """A word-level tokenizer: "w5 w6" -> [5, 6]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(
        models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab_size)}}, unk_token="[UNK]")
    )
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=words,
        unk_token="[UNK]",
        pad_token="[UNK]",
        # a Llama tokenizer's inputs: transformers 4 otherwise adds token_type_ids, which Llama does not take
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.save_pretrained(path)


def save_float32_without_dtype(path: Path) -> Path:
    """The tiny Llama in float32, no dtype in config.json: transformers 5 then loads its weights' dtype."""
    save_tiny_llama(path, dtype=torch.float32)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
    config_file.write_text(json.dumps(config, indent=2))
    return path


def save_adapter(base_path: Path, path: Path) -> Path:
    """A LoRA adapter (r=4 on q_proj and v_proj, non-zero) for the tiny Llama at ``base_path``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, device_map="cpu")
    torch.manual_seed(1)
    lora = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    get_peft_model(base, lora).save_pretrained(path)
    return path
