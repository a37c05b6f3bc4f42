"""Tests for vram_magic._rewrite: each fix on realistic cells, compared with the exact text expected."""

from __future__ import annotations

import importlib.metadata
import io
import subprocess
import sys
import tokenize

import pytest

from tests.stack import DTYPE
from vram_magic.fixes import FIXES, NotApplicable, diff, rewrite

# The 4-bit config the "4bit" fix writes, for building expectations that are not spelled out in full.
NF4 = (
    'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, '
    "bnb_4bit_compute_dtype=torch.bfloat16)"
)


def comments(text: str) -> list[str]:
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    return [token.string for token in tokens if token.type == tokenize.COMMENT]


# --------------------------------------------------------------------------------------------------
# Cells

LOAD = """\
from transformers import AutoModelForCausalLM as AMC, AutoTokenizer

model_id = "meta-llama/Llama-3.1-8B"  # the base model
tokenizer = AutoTokenizer.from_pretrained(model_id)
model = AMC.from_pretrained(
    model_id,
    torch_dtype=torch.float16,  # half precision
    device_map="cuda",
)
# move it to the GPU
model.to("cuda")
inputs = tokenizer("Hello", return_tensors="pt").to("cuda")
out = model.generate(**inputs, max_new_tokens=20)
"""

# The same load in float32, where bfloat16 halves the weights.
LOAD_FP32 = LOAD.replace("torch.float16,  # half precision", "torch.float32,  # full precision")

LOAD_8BIT_KEYWORD = """\
model = AutoModelForCausalLM.from_pretrained(
    model_id,
    load_in_8bit=True,  # save memory
    trust_remote_code=True
)
"""

EXISTING_CONFIG = """\
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

bnb_config = BitsAndBytesConfig(load_in_8bit=True)
model = AutoModelForCausalLM.from_pretrained("gpt2", quantization_config=bnb_config, device_map="auto")
"""

CHAINED = """\
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("gpt2").to("cuda")
"""

PIPE = """\
from transformers import pipeline

pipe = pipeline("text-generation", model="Qwen/Qwen2.5-7B-Instruct", device=0)
print(pipe("Hi")[0]["generated_text"])
"""

PEFT = """\
from transformers import AutoModelForCausalLM
from peft import PeftModel

base = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B")
model = PeftModel.from_pretrained(base, "./lora-adapter")
model = model.to("cuda")
model.eval()
"""

ADAPTER_ONLY = """\
from peft import PeftModel

model = PeftModel.from_pretrained(base, "./lora-adapter")
"""

MAGIC = """\
get_ipython().run_line_magic('pip', 'install -q bitsandbytes')
import torch
from transformers import AutoModelForCausalLM
device = "cuda" if torch.cuda.is_available() else "cpu"
model = AutoModelForCausalLM.from_pretrained("gpt2").to(device)
x = torch.zeros(3, device="cuda")
"""

CPU = """\
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

tok = AutoTokenizer.from_pretrained("gpt2")
model = AutoModelForCausalLM.from_pretrained("gpt2", device_map="auto")
model.cuda()  # to the GPU
inputs = tok("Hello", return_tensors="pt").to('cuda:0')
mask = torch.ones(1, 5, device="cuda")
pipe = pipeline("text-generation", model="gpt2", device=0)
"""

MERGE = """\
from peft import PeftModel

# merge the LoRA weights into the base
merged = model.merge_and_unload().to("cuda")
merged.save_pretrained("merged")  # for vLLM
"""

TRAIN = """\
from transformers import Trainer, TrainingArguments

args = TrainingArguments(
    output_dir="out",
    per_device_train_batch_size=8,  # fits a 24 GB card
    per_device_eval_batch_size=16,
    num_train_epochs=1,
)
trainer = Trainer(model=model, args=args, train_dataset=train_ds)
trainer.train()
"""

SFT = """\
from trl import SFTConfig, SFTTrainer

config = SFTConfig(output_dir="sft", per_device_train_batch_size=4, gradient_accumulation_steps=2)
trainer = SFTTrainer(model=model, args=config, train_dataset=ds)
trainer.train()
"""

LOADER = """\
from torch.utils.data import DataLoader

loader = DataLoader(train_ds, batch_size=32, shuffle=True)
accelerator = Accelerator(gradient_accumulation_steps=1)
"""

SCRIPT = """\
batch_size = 8
GRADIENT_ACCUMULATION_STEPS = 2
loader = DataLoader(ds, batch_size=batch_size, shuffle=True)
for step, batch in enumerate(loader):
    loss = model(**batch).loss / GRADIENT_ACCUMULATION_STEPS
"""

NOTHING = """\
import numpy as np

x = np.arange(10)  # just numbers
print(x.sum())
"""

ONLY_IN_TEXT = """\
# we used to call AutoModelForCausalLM.from_pretrained("gpt2").to("cuda") here
note = 'model = AutoModelForCausalLM.from_pretrained("gpt2", device_map="cuda")'
merge_note = "merged = model.merge_and_unload()"
print(note, "batch_size=8")
"""


# --------------------------------------------------------------------------------------------------
# 4bit / 8bit


def test_4bit_quantizes_an_aliased_multiline_load_and_drops_the_later_move() -> None:
    expected = """\
from transformers import AutoModelForCausalLM as AMC, AutoTokenizer
import torch
from transformers import BitsAndBytesConfig

model_id = "meta-llama/Llama-3.1-8B"  # the base model
tokenizer = AutoTokenizer.from_pretrained(model_id)
model = AMC.from_pretrained(
    model_id,
    torch_dtype=torch.float16,  # half precision
    device_map="auto",
    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float16),
)
# move it to the GPU
inputs = tokenizer("Hello", return_tensors="pt").to("cuda")
out = model.generate(**inputs, max_new_tokens=20)
"""  # noqa: E501
    # The 4-bit layers compute in the 16-bit dtype the user chose (float16 here: a T4 has no bfloat16).
    assert rewrite(LOAD, "4bit") == expected


def test_8bit_quantizes_the_same_load_without_importing_torch() -> None:
    expected = """\
from transformers import AutoModelForCausalLM as AMC, AutoTokenizer
from transformers import BitsAndBytesConfig

model_id = "meta-llama/Llama-3.1-8B"  # the base model
tokenizer = AutoTokenizer.from_pretrained(model_id)
model = AMC.from_pretrained(
    model_id,
    torch_dtype=torch.float16,  # half precision
    device_map="auto",
    quantization_config=BitsAndBytesConfig(load_in_8bit=True),
)
# move it to the GPU
inputs = tokenizer("Hello", return_tensors="pt").to("cuda")
out = model.generate(**inputs, max_new_tokens=20)
"""
    assert rewrite(LOAD, "8bit") == expected


def test_4bit_replaces_a_load_in_8bit_keyword_in_place() -> None:
    expected = """\
import torch
from transformers import BitsAndBytesConfig
model = AutoModelForCausalLM.from_pretrained(
    model_id,
    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16),  # save memory
    trust_remote_code=True,
    device_map="auto"
)
"""  # noqa: E501
    assert rewrite(LOAD_8BIT_KEYWORD, "4bit") == expected


def test_4bit_removes_load_in_4bit_when_a_config_is_already_there() -> None:
    cell = (
        'm = AutoModel.from_pretrained("x", quantization_config=BitsAndBytesConfig(load_in_8bit=True), '
        "load_in_4bit=True)\n"
    )
    assert rewrite(cell, "4bit") == (
        "import torch\n"
        "from transformers import BitsAndBytesConfig\n"
        f'm = AutoModel.from_pretrained("x", quantization_config={NF4}, device_map="auto")\n'
    )


def test_4bit_replaces_an_existing_8bit_quantization_config() -> None:
    expected = """\
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

bnb_config = BitsAndBytesConfig(load_in_8bit=True)
model = AutoModelForCausalLM.from_pretrained("gpt2", quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16), device_map="auto")
"""  # noqa: E501
    assert rewrite(EXISTING_CONFIG, "4bit") == expected


def test_4bit_keeps_a_4bit_config_the_user_wrote() -> None:
    cell = EXISTING_CONFIG.replace("load_in_8bit", "load_in_4bit")
    with pytest.raises(NotApplicable, match="already loaded in 4-bit"):
        rewrite(cell, "4bit")
    with pytest.raises(NotApplicable, match="4-bit, which needs less memory than 8-bit") as info:
        rewrite(cell, "8bit")  # 8-bit needs more memory than the 4-bit load it would replace
    assert info.value.already


def test_8bit_drops_a_move_chained_on_the_load() -> None:
    expected = """\
import torch
from transformers import AutoModelForCausalLM
from transformers import BitsAndBytesConfig

model = AutoModelForCausalLM.from_pretrained("gpt2", quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="auto")
"""  # noqa: E501
    assert rewrite(CHAINED, "8bit") == expected


def test_4bit_compute_dtype_follows_the_option() -> None:
    fixed = rewrite(CHAINED, "4bit", compute_dtype="float16")
    assert "bnb_4bit_compute_dtype=torch.float16)" in fixed
    assert "bfloat16" not in fixed


@pytest.mark.parametrize(
    ("device_map", "expected"),
    [
        ('"cuda"', '"auto"'),
        ("'cuda:0'", "'auto'"),
        ("0", '"auto"'),
        ('torch.device("cuda")', '"auto"'),
        ("device", '"auto"'),  # the cell sets device = "cuda"
        ('"auto"', '"auto"'),
        ('"balanced"', '"balanced"'),
        ('{"": 0}', '{"": 0}'),
        ("my_map", "my_map"),  # comes from an earlier cell: left alone
    ],
)
def test_4bit_device_map_becomes_auto_only_when_it_names_one_device(device_map: str, expected: str) -> None:
    cell = f'device = "cuda"\nm = AutoModelForCausalLM.from_pretrained("x", device_map={device_map})\n'
    fixed = rewrite(cell, "4bit")
    assert (
        f'm = AutoModelForCausalLM.from_pretrained("x", device_map={expected}, quantization_config={NF4})\n'
        in fixed
    )


def test_4bit_pipeline_gets_model_kwargs_and_device_map_instead_of_device() -> None:
    expected = """\
from transformers import pipeline
import torch
from transformers import BitsAndBytesConfig

pipe = pipeline("text-generation", model="Qwen/Qwen2.5-7B-Instruct", model_kwargs={"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float16)}, device_map="auto")
print(pipe("Hi")[0]["generated_text"])
"""  # noqa: E501
    assert rewrite(PIPE, "4bit", compute_dtype="float16") == expected


def test_8bit_pipeline_adds_to_existing_model_kwargs() -> None:
    cell = 'pipe = pipeline("text-generation", model="gpt2", model_kwargs={"attn_implementation": "sdpa"})\n'
    assert rewrite(cell, "8bit") == (
        "from transformers import BitsAndBytesConfig\n"
        'pipe = pipeline("text-generation", model="gpt2", model_kwargs={"attn_implementation": "sdpa", '
        '"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}, device_map="auto")\n'
    )


def test_4bit_pipeline_of_a_loaded_model_quantizes_the_load_and_drops_device() -> None:
    cell = """\
model = AutoModel.from_pretrained("gpt2")
pipe = pipeline("text-generation", model=model, device=0)
"""
    fixed = rewrite(cell, "4bit")
    assert fixed.endswith(
        f'model = AutoModel.from_pretrained("gpt2", quantization_config={NF4}, device_map="auto")\n'
        'pipe = pipeline("text-generation", model=model)\n'
    )


def test_4bit_quantizes_the_base_not_the_peft_adapter() -> None:
    expected = """\
from transformers import AutoModelForCausalLM
from peft import PeftModel
import torch
from transformers import BitsAndBytesConfig

base = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B", quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16), device_map="auto")
model = PeftModel.from_pretrained(base, "./lora-adapter")
model.eval()
"""  # noqa: E501
    assert rewrite(PEFT, "4bit") == expected


def test_a_cell_that_only_loads_an_adapter_says_to_fix_the_base_load() -> None:
    for fix in ("4bit", "8bit", "bf16", "offload"):
        with pytest.raises(NotApplicable, match="only loads a LoRA adapter"):
            rewrite(ADAPTER_ONLY, fix)


def test_tokenizers_processors_and_configs_are_not_quantized() -> None:
    cell = """\
from transformers import AutoTokenizer, AutoProcessor, AutoConfig, LlamaTokenizerFast
tok = AutoTokenizer.from_pretrained("x")
proc = AutoProcessor.from_pretrained("x")
cfg = AutoConfig.from_pretrained("x")
fast = LlamaTokenizerFast.from_pretrained("x")
"""
    with pytest.raises(NotApplicable, match="no from_pretrained"):
        rewrite(cell, "4bit")


def test_model_classes_from_other_libraries_are_left_alone() -> None:
    cell = 'from diffusers import UNet2DConditionModel\nunet = UNet2DConditionModel.from_pretrained("x")\n'
    with pytest.raises(NotApplicable):
        rewrite(cell, "4bit")


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        # a later assignment, a bare call, .cuda(), and through .eval()
        ("model = model.to(device)\n", ""),
        ("model.cuda()\n", ""),
        ("model = model.eval().to('cuda')\n", "model = model.eval()\n"),
        ("model.to(torch.bfloat16)\n", ""),  # transformers refuses to cast a bitsandbytes model
        ("other.to('cuda')\n", "other.to('cuda')\n"),  # not the loaded model
        ("x = 1; model.to('cuda'); y = 2\n", "x = 1; y = 2\n"),
        ("if ready:\n    model.cuda()\n", "if ready:\n    pass\n"),
        ("# to the GPU\nmodel.to('cuda')\nprint(model)\n", "# to the GPU\nprint(model)\n"),
        ("model\n", "model\n"),  # showing the model is kept
    ],
)
def test_4bit_removes_later_moves_of_the_loaded_model(cell: str, expected: str) -> None:
    load = 'model = AutoModel.from_pretrained("x", device_map="auto")\n'
    fixed = rewrite(load + cell, "4bit")
    assert fixed.endswith(
        f'model = AutoModel.from_pretrained("x", device_map="auto", quantization_config={NF4})\n' + expected
    )


def test_imports_go_after_the_last_import_even_after_a_magic_line() -> None:
    fixed = rewrite(MAGIC, "4bit")
    assert fixed.startswith(
        "get_ipython().run_line_magic('pip', 'install -q bitsandbytes')\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from transformers import BitsAndBytesConfig\n"
        'device = "cuda" if torch.cuda.is_available() else "cpu"\n'
    )


def test_imports_go_to_the_top_when_the_cell_has_none_and_are_not_repeated() -> None:
    cell = 'model = AutoModelForCausalLM.from_pretrained("x", device_map="cuda")\n'
    assert rewrite(cell, "4bit").startswith(
        "import torch\nfrom transformers import BitsAndBytesConfig\nmodel ="
    )
    star = "from transformers import *\nimport torch\n" + cell
    assert rewrite(star, "4bit").startswith("from transformers import *\nimport torch\nmodel =")


def test_imports_go_before_the_first_use_when_imports_come_later() -> None:
    cell = 'model = AutoModelForCausalLM.from_pretrained("x", device_map="cuda")\nimport os\n'
    fixed = rewrite(cell, "8bit")
    assert fixed.startswith("from transformers import BitsAndBytesConfig\nmodel =")


# --------------------------------------------------------------------------------------------------
# bf16


def test_bf16_renames_torch_dtype_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "5.2.0")
    expected = """\
from transformers import AutoModelForCausalLM as AMC, AutoTokenizer
import torch

model_id = "meta-llama/Llama-3.1-8B"  # the base model
tokenizer = AutoTokenizer.from_pretrained(model_id)
model = AMC.from_pretrained(
    model_id,
    dtype=torch.bfloat16,  # full precision
    device_map="cuda",
)
# move it to the GPU
model.to("cuda")
inputs = tokenizer("Hello", return_tensors="pt").to("cuda")
out = model.generate(**inputs, max_new_tokens=20)
"""
    assert rewrite(LOAD_FP32, "bf16") == expected


def test_bf16_is_no_fix_for_a_load_already_in_16_bit() -> None:
    with pytest.raises(NotApplicable, match="already loaded in float16") as info:
        rewrite(LOAD, "bf16")  # float16 to bfloat16 saves nothing
    assert info.value.already


def test_bf16_keyword_follows_the_installed_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    cell = 'import torch\nm = AutoModelForCausalLM.from_pretrained("x", dtype="auto")\n'
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "4.46.3")
    assert rewrite(cell, "bf16").endswith(
        'm = AutoModelForCausalLM.from_pretrained("x", torch_dtype=torch.bfloat16)\n'
    )
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "5.0.0")
    assert rewrite(cell, "bf16").endswith(
        'm = AutoModelForCausalLM.from_pretrained("x", dtype=torch.bfloat16)\n'
    )
    assert rewrite(cell, "bf16", dtype_keyword="torch_dtype").endswith("torch_dtype=torch.bfloat16)\n")


def test_bf16_on_a_pipeline_and_when_already_bf16() -> None:
    assert rewrite(PIPE, "bf16", dtype_keyword="dtype") == PIPE.replace(
        "from transformers import pipeline\n", "from transformers import pipeline\nimport torch\n"
    ).replace("device=0)", "device=0, dtype=torch.bfloat16)")
    cell = 'import torch\nm = AutoModel.from_pretrained("x", dtype=torch.bfloat16)\n'
    with pytest.raises(NotApplicable, match="already loaded in bfloat16"):
        rewrite(cell, "bf16", dtype_keyword="dtype")


# --------------------------------------------------------------------------------------------------
# offload


def test_offload_sets_auto_device_map_and_max_memory_in_gib_rounded_down() -> None:
    expected = """\
from transformers import AutoModelForCausalLM as AMC, AutoTokenizer

model_id = "meta-llama/Llama-3.1-8B"  # the base model
tokenizer = AutoTokenizer.from_pretrained(model_id)
model = AMC.from_pretrained(
    model_id,
    torch_dtype=torch.float16,  # half precision
    device_map="auto",
    max_memory={0: "10.4GiB", 1: "0.5GiB", "cpu": "64.0GiB"},
    offload_folder="offload",
)
# move it to the GPU
inputs = tokenizer("Hello", return_tensors="pt").to("cuda")
out = model.generate(**inputs, max_new_tokens=20)
"""
    max_memory: dict[int | str, int] = {"cpu": 64 * 2**30, 1: 2**29, 0: 10 * 2**30 + 2**29 - 1}
    assert rewrite(LOAD, "offload", max_memory=max_memory, offload_folder="offload") == expected


def test_offload_replaces_max_memory_and_keeps_a_strategy() -> None:
    cell = "m = AutoModel.from_pretrained('x', device_map='sequential', max_memory={0: '20GiB'})\n"
    assert rewrite(cell, "offload", max_memory={0: 3 * 2**30}) == (
        "m = AutoModel.from_pretrained('x', device_map='sequential', max_memory={0: \"3.0GiB\"})\n"
    )


def test_offload_on_a_pipeline_uses_model_kwargs() -> None:
    cell = 'pipe = pipeline("text-generation", model="gpt2", device="cuda")\n'
    assert rewrite(cell, "offload", max_memory={0: 3 * 2**30, "cpu": 16 * 2**30}) == (
        'pipe = pipeline("text-generation", model="gpt2", device_map="auto", '
        'model_kwargs={"max_memory": {0: "3.0GiB", "cpu": "16.0GiB"}})\n'
    )


def test_offload_without_max_memory_only_sets_device_map() -> None:
    assert rewrite(CHAINED, "offload").endswith(
        'model = AutoModelForCausalLM.from_pretrained("gpt2", device_map="auto")\n'
    )


@pytest.mark.parametrize("max_memory", [{}, {0: -1}, {-1: 5}, {0: 1.5}, [1, 2], {True: 5}])
def test_offload_rejects_bad_max_memory(max_memory: object) -> None:
    with pytest.raises(ValueError, match="max_memory"):
        rewrite(CHAINED, "offload", max_memory=max_memory)


# --------------------------------------------------------------------------------------------------
# cpu


def test_cpu_moves_the_model_its_inputs_and_the_pipeline() -> None:
    expected = """\
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

tok = AutoTokenizer.from_pretrained("gpt2")
model = AutoModelForCausalLM.from_pretrained("gpt2", device_map="cpu")
inputs = tok("Hello", return_tensors="pt").to('cpu')
mask = torch.ones(1, 5, device="cpu")
pipe = pipeline("text-generation", model="gpt2", device="cpu")
"""
    assert rewrite(CPU, "cpu") == expected


def test_cpu_rewrites_the_device_variable_instead_of_its_uses() -> None:
    expected = """\
get_ipython().run_line_magic('pip', 'install -q bitsandbytes')
import torch
from transformers import AutoModelForCausalLM
device = "cpu"
model = AutoModelForCausalLM.from_pretrained("gpt2", device_map="cpu").to(device)
x = torch.zeros(3, device="cpu")
"""
    assert rewrite(MAGIC, "cpu") == expected


def test_cpu_handles_torch_device_and_device_names_from_earlier_cells() -> None:
    cell = """\
DEVICE = torch.device("cuda")
t = torch.randn(2, 2).cuda()
u = t.to(0)
v = t.to(my_device)
w = t.to(DEVICE)
torch.set_default_device("cuda")
print("runs on cuda")  # .to("cuda")
"""
    expected = """\
DEVICE = torch.device("cpu")
t = torch.randn(2, 2)
u = t.to("cpu")
v = t.to("cpu")
w = t.to(DEVICE)
torch.set_default_device("cpu")
print("runs on cuda")  # .to("cuda")
"""
    assert rewrite(cell, "cpu") == expected


def test_cpu_adds_device_to_a_pipeline_that_has_none() -> None:
    assert rewrite('p = pipeline("fill-mask")\n', "cpu") == 'p = pipeline("fill-mask", device="cpu")\n'


# --------------------------------------------------------------------------------------------------
# merge-cpu


def test_merge_cpu_merges_on_the_cpu_and_lets_the_helper_move_it_back() -> None:
    expected = """\
from peft import PeftModel
import vram_magic

# merge the LoRA weights into the base
model = model.to("cpu")
merged = model.merge_and_unload()
merged = vram_magic.to_gpu_if_it_fits(merged)
merged.save_pretrained("merged")  # for vLLM
"""
    assert rewrite(MERGE, "merge-cpu") == expected


def test_merge_cpu_in_a_block_with_an_attribute_target_and_a_later_move() -> None:
    cell = """\
import vram_magic
with torch.no_grad():
    trainer.model = trainer.model.merge_and_unload(progressbar=True)
trainer.model.to("cuda")
"""
    expected = """\
import vram_magic
with torch.no_grad():
    trainer.model = trainer.model.to("cpu")
    trainer.model = trainer.model.merge_and_unload(progressbar=True)
    trainer.model = vram_magic.to_gpu_if_it_fits(trainer.model)
"""
    assert rewrite(cell, "merge-cpu") == expected


def test_merge_cpu_merges_a_bare_call_on_the_cpu() -> None:
    assert rewrite("model.merge_and_unload()\n", "merge-cpu") == (
        'import vram_magic\nmodel = model.to("cpu")\nmodel.merge_and_unload()\n'
        "model = vram_magic.to_gpu_if_it_fits(model)\n"
    )
    with pytest.raises(NotApplicable, match="merge_and_unload"):
        rewrite("model.eval()\n", "merge-cpu")


# --------------------------------------------------------------------------------------------------
# half-batch


def test_half_batch_halves_training_arguments_and_doubles_accumulation() -> None:
    expected = """\
from transformers import Trainer, TrainingArguments

args = TrainingArguments(
    output_dir="out",
    per_device_train_batch_size=4,  # fits a 24 GB card
    per_device_eval_batch_size=8,
    num_train_epochs=1,
    gradient_accumulation_steps=2,
)
trainer = Trainer(model=model, args=args, train_dataset=train_ds)
trainer.train()
"""
    assert rewrite(TRAIN, "half-batch") == expected


def test_half_batch_on_sft_config_doubles_the_existing_accumulation() -> None:
    assert rewrite(SFT, "half-batch") == SFT.replace(
        "batch_size=4, gradient_accumulation_steps=2", "batch_size=2, gradient_accumulation_steps=4"
    )


def test_half_batch_on_a_dataloader_and_an_accelerator() -> None:
    expected = """\
from torch.utils.data import DataLoader

loader = DataLoader(train_ds, batch_size=16, shuffle=True)
accelerator = Accelerator(gradient_accumulation_steps=2)
"""
    assert rewrite(LOADER, "half-batch") == expected


def test_half_batch_on_plain_variables() -> None:
    expected = """\
batch_size = 4
GRADIENT_ACCUMULATION_STEPS = 4
loader = DataLoader(ds, batch_size=batch_size, shuffle=True)
for step, batch in enumerate(loader):
    loss = model(**batch).loss / GRADIENT_ACCUMULATION_STEPS
"""
    assert rewrite(SCRIPT, "half-batch") == expected


def test_half_batch_follows_variables_named_in_training_arguments() -> None:
    cell = """\
bs = 16
eval_batch_size = 32
grad_accum = 1
ds = ds.map(tokenize, batched=True, batch_size=1000)
args = TrainingArguments("o", per_device_train_batch_size=bs, gradient_accumulation_steps=grad_accum)
"""
    expected = """\
bs = 8
eval_batch_size = 16
grad_accum = 2
ds = ds.map(tokenize, batched=True, batch_size=1000)
args = TrainingArguments("o", per_device_train_batch_size=bs, gradient_accumulation_steps=grad_accum)
"""
    assert rewrite(cell, "half-batch") == expected


def test_half_batch_multiplies_an_unknown_accumulation_name() -> None:
    cell = 'args = TrainingArguments("o", per_device_train_batch_size=8, gradient_accumulation_steps=steps)\n'
    assert rewrite(cell, "half-batch") == cell.replace("=8", "=4").replace("=steps", "=steps * 2")


def test_half_batch_eval_only_leaves_accumulation_alone() -> None:
    cell = 'args = TrainingArguments("o", per_device_eval_batch_size=8, per_device_train_batch_size=1)\n'
    assert rewrite(cell, "half-batch") == cell.replace("eval_batch_size=8", "eval_batch_size=4")


def test_half_batch_factor_option() -> None:
    assert rewrite("batch_size = 16\n", "half-batch", factor=4) == "batch_size = 4\n"
    assert rewrite("batch_size = 3\n", "half-batch", factor=4) == "batch_size = 1\n"


def test_half_batch_converges_to_batch_1_then_checkpointing_then_stops() -> None:
    cell = """\
from trl import SFTConfig
config = SFTConfig(
    output_dir="o",
    per_device_train_batch_size=4,
    optim='adamw_torch',  # default
)
"""
    assert rewrite(cell, "half-batch") == rewrite(cell, "half-batch")  # deterministic
    steps = []
    for _ in range(10):
        try:
            cell = rewrite(cell, "half-batch")
        except NotApplicable as exc:
            assert "already 1" in exc.reason
            break
        compile(cell, "<cell>", "exec")
        steps.append(cell)
    # At batch 1 halving stops; gradient checkpointing and the paged 8-bit optimizer are a fix of their own.
    steps.append(rewrite(cell, "checkpointing"))
    with pytest.raises(NotApplicable, match="already on"):
        rewrite(steps[-1], "checkpointing")
    assert len(steps) == 3
    assert "per_device_train_batch_size=2," in steps[0] and "gradient_accumulation_steps=2," in steps[0]
    assert "per_device_train_batch_size=1," in steps[1] and "gradient_accumulation_steps=4," in steps[1]
    assert (
        steps[2]
        == """\
from trl import SFTConfig
config = SFTConfig(
    output_dir="o",
    per_device_train_batch_size=1,
    optim='paged_adamw_8bit',  # default
    gradient_accumulation_steps=4,
    gradient_checkpointing=True,
)
"""
    )


def test_half_batch_at_batch_1_without_training_arguments_does_not_apply() -> None:
    cell = "BATCH_SIZE = 1\nloader = DataLoader(ds, batch_size=BATCH_SIZE)\n"
    with pytest.raises(NotApplicable, match="already 1"):
        rewrite(cell, "half-batch")
    with pytest.raises(NotApplicable, match="no TrainingArguments"):
        rewrite(cell, "checkpointing")


# --------------------------------------------------------------------------------------------------
# Every fix


CASES = [
    (LOAD, "4bit"),
    (LOAD, "8bit"),
    (LOAD_FP32, "bf16"),
    (LOAD, "offload"),
    (LOAD, "cpu"),
    (LOAD_8BIT_KEYWORD, "4bit"),
    (LOAD_8BIT_KEYWORD, "offload"),
    (EXISTING_CONFIG, "4bit"),
    (CHAINED, "4bit"),
    (CHAINED, "cpu"),
    (PIPE, "4bit"),
    (PIPE, "8bit"),
    (PIPE, "bf16"),
    (PIPE, "offload"),
    (PIPE, "cpu"),
    (PEFT, "4bit"),
    (PEFT, "offload"),
    (PEFT, "cpu"),
    (MAGIC, "4bit"),
    (MAGIC, "cpu"),
    (CPU, "cpu"),
    (CPU, "8bit"),
    (MERGE, "merge-cpu"),
    (MERGE, "cpu"),
    (TRAIN, "half-batch"),
    (SFT, "half-batch"),
    (LOADER, "half-batch"),
    (SCRIPT, "half-batch"),
]


@pytest.mark.parametrize(("cell", "fix"), CASES)
def test_results_compile_keep_comments_and_are_idempotent(cell: str, fix: str) -> None:
    fixed = rewrite(cell, fix)
    assert fixed != cell
    compile(fixed, "<cell>", "exec")
    lost = set(comments(cell)) - set(comments(fixed))
    assert lost <= {"# to the GPU"}  # the only comment on a line a fix removes (model.cuda() in CPU)
    if fix != "half-batch":
        with pytest.raises(NotApplicable, match="already"):
            rewrite(fixed, fix)


@pytest.mark.parametrize("fix", FIXES)
def test_nothing_to_rewrite(fix: str) -> None:
    with pytest.raises(NotApplicable):
        rewrite(NOTHING, fix)


def applicable_fixes(source: str) -> dict[str, str | None]:
    """Fix name -> None when it applies to ``source`` (default options), else why it does not."""
    reasons: dict[str, str | None] = {}
    for fix in FIXES:
        try:
            rewrite(source, fix)
        except NotApplicable as exc:
            reasons[fix] = exc.reason
        else:
            reasons[fix] = None
    return reasons


def test_text_in_strings_and_comments_is_never_a_target() -> None:
    reasons = applicable_fixes(ONLY_IN_TEXT)
    assert all(reason is not None for reason in reasons.values()), reasons
    assert (
        reasons["4bit"]
        == "this cell has no from_pretrained(...) or pipeline(...) call of a model to quantize"
    )


def test_applicable_fixes_reports_each_fix() -> None:
    reasons = applicable_fixes(LOAD)
    assert list(reasons) == list(FIXES)
    assert reasons["4bit"] is None and reasons["cpu"] is None
    assert reasons["bf16"] == "already loaded in float16"
    assert reasons["half-batch"] is not None and "batch size" in reasons["half-batch"]
    assert reasons["merge-cpu"] is not None


def test_not_applicable_is_a_value_error_with_a_reason() -> None:
    with pytest.raises(ValueError, match="no from_pretrained") as info:
        rewrite(NOTHING, "4bit")
    assert isinstance(info.value, NotApplicable)
    assert info.value.reason == str(info.value)


def test_a_cell_that_does_not_parse_is_not_applicable() -> None:
    with pytest.raises(NotApplicable, match="not valid Python"):
        rewrite("model = AutoModel.from_pretrained(\n", "4bit")


def test_unknown_fix_and_options_name_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="4bit, 8bit, bf16, offload, cpu, merge-cpu, half-batch") as info:
        rewrite(LOAD, "3bit")
    assert not isinstance(info.value, NotApplicable)
    with pytest.raises(ValueError, match=r"unknown option\(s\) for 4bit: factor; valid: compute_dtype"):
        rewrite(LOAD, "4bit", factor=2)
    with pytest.raises(ValueError, match="compute_dtype"):
        rewrite(LOAD, "4bit", compute_dtype="float32")
    with pytest.raises(ValueError, match="dtype_keyword"):
        rewrite(LOAD, "bf16", dtype_keyword="torch.dtype")
    with pytest.raises(ValueError, match="factor"):
        rewrite(SCRIPT, "half-batch", factor=1)


def test_diff_is_labelled_and_shows_the_change() -> None:
    text = diff(CHAINED, rewrite(CHAINED, "8bit"))
    assert text.startswith("--- cell\n+++ fixed cell\n@@ ")
    assert '-model = AutoModelForCausalLM.from_pretrained("gpt2").to("cuda")\n' in text
    assert "+from transformers import BitsAndBytesConfig\n" in text
    assert diff("x = 1", "x = 2").endswith("-x = 1\n+x = 2\n")
    assert diff(LOAD, LOAD) == ""


def test_importing_the_module_imports_neither_torch_nor_ipython() -> None:
    code = (
        "import sys, vram_magic.fixes\n"
        "heavy = {'torch', 'transformers', 'IPython', 'peft'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------------
# Cells as people write them (tests/fixtures/real_cells): keywords in **kwargs, chained casts, old flags


def _fixed(cell: str, fix: str, namespace: dict[str, object] | None = None, **options: object) -> str:
    """The fix made on a cell read with the notebook's names (what the rescue does)."""
    from vram_magic.cell import read_cell
    from vram_magic.fixes import apply_fix, check_options

    return apply_fix(read_cell(cell, namespace), fix, check_options(options)).code


def test_a_keyword_held_in_a_kwargs_dict_of_the_cell_is_changed_there_never_passed_twice() -> None:
    cell = (
        'kw = dict(device_map="cuda", torch_dtype=torch.bfloat16)\n'
        "model = AutoModelForCausalLM.from_pretrained(name, **kw)\n"
    )
    fixed = rewrite(cell, "8bit")
    assert 'kw = dict(device_map="auto", torch_dtype=torch.bfloat16)\n' in fixed
    assert "from_pretrained(name, **kw, quantization_config=BitsAndBytesConfig(load_in_8bit=True))" in fixed
    compile(fixed, "<cell>", "exec")


def test_a_kwargs_dict_of_an_earlier_cell_is_overridden_at_the_call() -> None:
    cell = "model = AutoModelForCausalLM.from_pretrained(name, **kw)\n"
    fixed = _fixed(cell, "offload", {"kw": {"device_map": "cuda"}}, max_memory={0: 2**30, "cpu": 4 * 2**30})
    assert (
        'from_pretrained(name, **{**kw, "device_map": "auto"}, max_memory={0: "1.0GiB", "cpu": "4.0GiB"})'
        in fixed
    )
    unknown = rewrite(cell, "offload", max_memory={0: 2**30})
    assert '**{**kw, "device_map": "auto", "max_memory": {0: "1.0GiB"}}' in unknown  # keys unknown: override


def test_a_keyword_set_by_key_on_a_kwargs_dict_is_read_and_changed_there() -> None:
    cell = (
        'model_kwargs = dict(torch_dtype=torch.bfloat16, device_map="auto")\n'
        'model_kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True)\n'
        "model = AutoModelForCausalLM.from_pretrained(model_id, **model_kwargs)\n"
    )
    with pytest.raises(NotApplicable, match="already loaded in 4-bit"):
        rewrite(cell, "4bit")
    fixed = rewrite(cell, "offload", max_memory={0: 2**30})
    assert "BitsAndBytesConfig(load_in_4bit=True, llm_int8_enable_fp32_cpu_offload=True)" in fixed


def test_half_and_cuda_chained_on_a_load_become_its_dtype_and_bitsandbytes_places_it() -> None:
    cell = "model = AutoModelForCausalLM.from_pretrained(name).half().cuda()\n"
    assert rewrite(cell, "8bit").endswith(  # the dtype as the installed transformers names it
        "model = AutoModelForCausalLM.from_pretrained(name, quantization_config=BitsAndBytesConfig("
        f'load_in_8bit=True), {DTYPE}=torch.float16, device_map="auto")\n'
    )
    assert "bnb_4bit_compute_dtype=torch.float16" in rewrite(cell, "4bit")  # the dtype the user chose
    assert rewrite(cell, "offload").endswith(
        f'model = AutoModelForCausalLM.from_pretrained(name, {DTYPE}=torch.float16, device_map="auto")\n'
    )


@pytest.mark.parametrize(
    "device_map", ['{"": 0}', "0", '"cuda:0"', 'torch.device("cuda")', '{"": PartialState().process_index}']
)
def test_every_way_to_name_one_gpu_is_a_gpu_load(device_map: str) -> None:
    from vram_magic.cell import read_cell

    load = read_cell(f"m = AutoModelForCausalLM.from_pretrained(name, device_map={device_map})\n").loads[0]
    assert load.device_map == "cuda" and load.where == "gpu"


def test_a_config_of_an_earlier_cell_is_allowed_to_offload_where_the_load_is() -> None:
    from transformers import BitsAndBytesConfig

    cell = "model = AutoModelForCausalLM.from_pretrained(name, quantization_config=bnb_config)\n"
    fixed = _fixed(cell, "offload", {"bnb_config": BitsAndBytesConfig(load_in_4bit=True)})
    assert fixed.startswith("bnb_config.llm_int8_enable_fp32_cpu_offload = True\nmodel = ")
    with pytest.raises(NotApplicable, match="already loaded in 4-bit"):
        _fixed(cell, "8bit", {"bnb_config": BitsAndBytesConfig(load_in_4bit=True)})


def test_old_load_in_8bit_keywords_become_a_quantization_config_when_the_load_moves() -> None:
    cell = 'model = AutoModelForCausalLM.from_pretrained(name, load_in_8bit=True, device_map="auto")\n'
    for fix in ("offload", "cpu"):
        fixed = rewrite(cell, fix)
        assert "load_in_8bit=True," not in fixed.replace("BitsAndBytesConfig(load_in_8bit=True", "")
        assert "quantization_config=BitsAndBytesConfig(load_in_8bit=True" in fixed


def test_a_load_on_the_cpu_on_purpose_is_not_quantized_offloaded_or_moved() -> None:
    cell = (
        'base = AutoModelForCausalLM.from_pretrained(name, device_map="cpu")\n'
        'model = PeftModel.from_pretrained(base, "adapter")\n'
        "merged = model.merge_and_unload()\n"
        'merged.save_pretrained("out")\n'
    )
    for fix in ("4bit", "8bit", "offload"):
        with pytest.raises(NotApplicable):
            rewrite(cell, fix)
    with pytest.raises(NotApplicable, match="already merges on the CPU"):
        rewrite(cell, "merge-cpu")


def test_a_full_fine_tune_is_not_quantized() -> None:
    cell = (
        'model = AutoModelForCausalLM.from_pretrained(name, device_map="cuda")\n'
        "trainer = Trainer(model=model, args=args, train_dataset=ds)\ntrainer.train()\n"
    )
    with pytest.raises(NotApplicable, match="cannot be trained without adapters"):
        rewrite(cell, "4bit")
    with_lora = cell.replace(
        "trainer = Trainer(model=model", "model = get_peft_model(model, lora)\ntrainer = Trainer(model=model"
    )
    assert "BitsAndBytesConfig(load_in_4bit=True" in rewrite(with_lora, "4bit")


def test_another_librarys_loader_is_left_alone() -> None:
    cell = (
        "from auto_gptq import AutoGPTQForCausalLM\n"
        'model = AutoGPTQForCausalLM.from_quantized(name, device="cuda:0")\n'
        'other = AutoGPTQForCausalLM.from_pretrained(name, device_map="cuda")\n'
    )
    for fix in ("4bit", "8bit", "bf16", "offload"):
        with pytest.raises(NotApplicable):
            rewrite(cell, fix)


def test_a_pipeline_object_called_on_prompts_is_not_a_pipeline_load() -> None:
    cell = 'pipe = pipeline("text-generation", model="gpt2")\nout = pipe(prompts, batch_size=16)\n'
    fixed = rewrite(cell, "4bit")
    assert fixed.count("BitsAndBytesConfig(") == 1  # the one load, not the call of pipe
    assert "pipe(prompts, batch_size=16)" in fixed
    assert "pipe(prompts, batch_size=8)" in rewrite(cell, "half-batch")


def test_a_variable_named_like_a_device_is_not_taken_for_one() -> None:
    cell = "per_device_train_batch_size = 8\ndevice = 'cuda'\nx = t.to(device)\n"
    fixed = rewrite(cell, "cpu")
    assert fixed == "per_device_train_batch_size = 8\ndevice = 'cpu'\nx = t.to(device)\n"


# --------------------------------------------------------------------------------------------------
# Batches as people set them


def test_an_odd_batch_keeps_its_effective_batch() -> None:
    cell = "args = TrainingArguments('o', per_device_train_batch_size=3, gradient_accumulation_steps=2)\n"
    assert rewrite(cell, "half-batch") == cell.replace("=3", "=1").replace("=2)", "=6)")


def test_a_conditional_batch_size_halves_each_branch() -> None:
    cell = "args = TrainingArguments('o', per_device_train_batch_size=6 if big else 4)\n"
    assert "per_device_train_batch_size=3 if big else 2, gradient_accumulation_steps=2" in rewrite(
        cell, "half-batch"
    )


def test_a_batch_size_of_an_earlier_cell_is_set_again_before_its_first_use() -> None:
    cell = "loader = DataLoader(ds, batch_size=batch_size)\nfor batch in loader:\n    pass\n"
    assert _fixed(cell, "half-batch", {"batch_size": 32}) == "batch_size = 16\n" + cell
    with pytest.raises(NotApplicable, match="only known when the cell runs") as info:
        rewrite(cell, "half-batch")
    assert info.value.elsewhere


def test_training_arguments_built_from_a_dict_are_halved_in_the_dict() -> None:
    inline = "args = TrainingArguments(**{'output_dir': 'o', 'per_device_train_batch_size': 8})\n"
    assert "'per_device_train_batch_size': 4" in rewrite(inline, "half-batch")
    earlier = "args = TrainingArguments(**config)\n"
    fixed = _fixed(
        earlier,
        "half-batch",
        {"config": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2}},
    )
    assert fixed == (
        'args = TrainingArguments(**{**config, "per_device_train_batch_size": 4, '
        '"gradient_accumulation_steps": 4})\n'
    )


def test_without_gradient_accumulation_the_title_says_the_effective_batch_shrinks() -> None:
    from vram_magic import Fix
    from vram_magic.cell import read_cell
    from vram_magic.fixes import apply_fix

    loop = "loader = DataLoader(ds, batch_size=8)\nfor batch in loader:\n    model(**batch).loss.backward()\n"

    def title(source: str) -> str:
        return Fix("half-batch", "", change=apply_fix(read_cell(source), "half-batch").change).title

    assert (
        title(loop)
        == "Halve the batch (8 → 4); the effective batch shrinks too (this code has no gradient accumulation)"
    )
    prompts = "for i in range(0, len(prompts), 16):\n    out = model.generate(**tok(prompts[i:i+16]))\n"
    assert "batch_size" not in prompts  # a literal step: no batch size to halve here
    generating = "batch_size = 16\n" + prompts.replace("16", "batch_size")
    assert title(generating).startswith("Halve the batch (16 → 8)")


# --------------------------------------------------------------------------------------------------
# Generation and inference


def test_a_batched_generate_runs_in_chunks_and_more_chunks_each_time() -> None:
    cell = (
        "inputs = tok(['a', 'b', 'c', 'd'], return_tensors='pt', padding=True)\n"
        "out = model.generate(**inputs, max_new_tokens=8)\n"
    )
    fixed = rewrite(cell, "chunk")
    assert "out = vram_magic.chunked(model.generate, chunks=2)(**inputs, max_new_tokens=8)\n" in fixed
    assert "chunks=4)" in rewrite(fixed, "chunk")
    single = "inputs = tok('one prompt', return_tensors='pt')\nout = model.generate(**inputs)\n"
    with pytest.raises(NotApplicable):
        rewrite(single, "chunk")


@pytest.mark.parametrize(
    "made",
    [
        "torch.randint(0, config.vocab_size, (64, 2048), device=device)",
        "torch.randint(32000, (64, 2048))",
        "torch.ones(64, 2048, dtype=torch.long)",
        "torch.zeros(size=(64, 2048), dtype=torch.long)",
    ],
)
def test_a_forward_on_a_batch_made_by_a_tensor_factory_runs_in_chunks(made: str) -> None:
    cell = f"big_batch = {made}\nwith torch.no_grad():\n    logits = model(big_batch).logits\n"
    assert "    logits = vram_magic.chunked(model, chunks=2)(big_batch).logits\n" in rewrite(cell, "chunk")
    one_row = cell.replace("64", "1")
    with pytest.raises(NotApplicable, match="no batched"):
        rewrite(one_row, "chunk")


def test_a_forward_pass_with_gradients_on_runs_under_inference_mode() -> None:
    cell = "# score the prompts\noutputs = model(**inputs)\nscores = outputs.logits.softmax(-1)\n"
    assert rewrite(cell, "inference-mode") == (
        "# score the prompts\nimport torch\nwith torch.inference_mode():\n    outputs = model(**inputs)\n"
        "scores = outputs.logits.softmax(-1)\n"
    )
    with pytest.raises(NotApplicable, match="already"):
        rewrite("with torch.no_grad():\n    outputs = model(**inputs)\n", "inference-mode")


def test_generate_keeps_its_kv_cache_in_cpu_ram_but_not_another_librarys_engine() -> None:
    cell = "out = model.generate(**inputs, max_new_tokens=2048)\n"
    assert 'max_new_tokens=2048, cache_implementation="offloaded")' in rewrite(cell, "offload-cache")
    vllm = "llm = LLM(model='facebook/opt-125m')\nout = llm.generate(prompts, params)\n"
    with pytest.raises(NotApplicable):
        rewrite(vllm, "offload-cache")


# --------------------------------------------------------------------------------------------------
# Found by running every fix on other people's cells (tests/fixtures/real_cells/README.md, December 2026)


def test_cpu_moves_a_pipeline_given_a_model_object_and_reads_f_string_devices() -> None:
    gptj = (  # ruxiliang/AIGC-evaluation gpt-j/gptj.py: a pipeline would move the model back to GPU 0
        'model = AutoModelForCausalLM.from_pretrained("EleutherAI/gpt-j-6B")\n'
        'gen = pipeline("text-generation",model=model,tokenizer=tokenizer,device=0)\n'
    )
    fixed = rewrite(gptj, "cpu")
    assert 'from_pretrained("EleutherAI/gpt-j-6B", device_map="cpu")' in fixed and 'device="cpu"' in fixed
    fstring = 'model = AutoModelForCausalLM.from_pretrained(MODEL).to(device=f"cuda", non_blocking=True)\n'
    assert '.to(device="cpu", non_blocking=True)' in rewrite(fstring, "cpu")
    indexed = 'DEV = f"cuda:{rank}"\nmodel = AutoModelForCausalLM.from_pretrained(MODEL).to(DEV)\n'
    assert 'DEV = "cpu"' in rewrite(indexed, "cpu")


def test_cpu_trades_flash_attention_for_sdpa() -> None:
    cell = (  # Failure-Tech/presai video/reason.py: FlashAttention runs on CUDA only
        'model = Qwen2VLForConditionalGeneration.from_pretrained("Qwen/Qwen2-VL-7B-Instruct", '
        'torch_dtype="auto", device_map="auto", attn_implementation="flash_attention_2")\n'
    )
    fixed = rewrite(cell, "cpu")
    assert 'device_map="cpu"' in fixed and 'attn_implementation="sdpa"' in fixed


def test_quantizing_is_refused_where_the_model_runs_in_cpu_ram_or_for_loftq() -> None:
    t5 = (  # kid2001git/trm t5_enc_dec2.py: model and inputs on the CPU
        'model = T5ForConditionalGeneration.from_pretrained("../t5-base")\n'
        'inputs = tokenizer(sentences, return_tensors="pt", padding=True)\n'
        'out = model.generate(input_ids=inputs["input_ids"])\n'
    )
    for bits in ("4bit", "8bit"):
        with pytest.raises(NotApplicable, match="runs in CPU RAM here"):
            rewrite(t5, bits)
    trained = "model = AutoModelForCausalLM.from_pretrained(p)\nmodel = get_peft_model(model, lora)\n"
    trained += "trainer.train()\n"  # the Trainer puts the model on the GPU
    assert "BitsAndBytesConfig(load_in_4bit=True" in rewrite(trained, "4bit")
    loftq = (  # hiyouga/LLaMA-Factory scripts/loftq_init.py: LoftQ quantizes the full weights itself
        'model = AutoModelForCausalLM.from_pretrained(path, torch_dtype="auto", device_map="cuda")\n'
        'lora_config = LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4))\n'
        "peft_model = get_peft_model(model, lora_config)\n"
    )
    with pytest.raises(NotApplicable, match="LoftQ"):
        rewrite(loftq, "4bit")


def test_merge_cpu_loads_an_auto_mapped_model_on_the_cpu_and_leaves_a_cpu_merge_alone() -> None:
    qwen = (  # EAG2014/Qwen lora_merge.py: accelerate refuses .to() on a model device_map="auto" offloaded
        'model = AutoPeftModelForCausalLM.from_pretrained(output_qwen, device_map="auto").eval()\n'
        "merged_model = model.merge_and_unload()\n"
        "merged_model.save_pretrained(path)\n"
    )
    fixed = rewrite(qwen, "merge-cpu")
    assert 'device_map="cpu"' in fixed and ".to(" not in fixed
    omni = (  # hiyouga/LLaMA-Factory scripts/qwen_omni_merge.py: already on the CPU, through a submodule
        "model = Qwen2_5OmniForConditionalGeneration.from_pretrained("
        'base, torch_dtype="auto", device_map="cpu")\n'
        "base_submodule = getattr(model, submodule_name)\n"
        "lora_model = PeftModel.from_pretrained(base_submodule, lora_checkpoint_path)\n"
        "merged_submodule = lora_model.merge_and_unload()\n"
        "setattr(model, submodule_name, merged_submodule)\n"
        "model.save_pretrained(save_path)\n"
    )
    with pytest.raises(NotApplicable, match="already merges on the CPU"):
        rewrite(omni, "merge-cpu")


def test_checkpointing_keeps_a_light_optimizer_and_leaves_inference_alone() -> None:
    from vram_magic import Fix
    from vram_magic.cell import read_cell
    from vram_magic.fixes import apply_fix

    tpu = (
        'args = TrainingArguments(output_dir="o", optim="adafactor")\ntrainer = Trainer(model=m, args=args)\n'
    )
    fixed = rewrite(tpu + "trainer.train()\n", "checkpointing")  # huggingface/blog gemma-peft.md
    assert 'optim="adafactor"' in fixed and "gradient_checkpointing=True" in fixed
    on = 'args = TrainingArguments(output_dir="o", gradient_checkpointing=True)\ntrainer.train()\n'
    made = apply_fix(read_cell(on), "checkpointing")
    title = Fix("checkpointing", "", change=made.change).title
    assert title == "Use the paged 8-bit AdamW optimizer (gradient checkpointing is already on)"
    infer = (  # hiyouga/LLaMA-Factory scripts/hf_infer.py: the arguments only feed a dataset loader
        'training_args = Seq2SeqTrainingArguments(output_dir="dummy_dir")\nout = model.generate(**batch)\n'
    )
    with pytest.raises(NotApplicable, match="nothing in it trains"):
        rewrite(infer, "checkpointing")


def test_half_batch_says_when_fewer_in_batch_negatives_change_the_loss() -> None:
    from vram_magic import Fix
    from vram_magic.cell import read_cell
    from vram_magic.fixes import apply_fix

    cell = (  # huggingface/blog train-sentence-transformers.md
        "loss = MultipleNegativesRankingLoss(model)\n"
        'args = SentenceTransformerTrainingArguments(output_dir="o", per_device_train_batch_size=16)\n'
        "trainer.train()\n"
    )
    fix = Fix("half-batch", "", change=apply_fix(read_cell(cell), "half-batch").change)
    assert "sees fewer in-batch negatives" in fix.title and "same effective batch" not in fix.title
    assert "CachedMultipleNegativesRankingLoss" in fix.why


def test_an_old_4bit_flag_keeps_its_scheme_when_offloading() -> None:
    cell = 'model = AutoModelForCausalLM.from_pretrained("facebook/opt-350m", load_in_4bit=True, '
    cell += 'device_map="auto")\n'
    fixed = rewrite(cell, "offload")  # huggingface/blog 4bit-transformers-bitsandbytes.md
    assert "BitsAndBytesConfig(load_in_4bit=True, llm_int8_enable_fp32_cpu_offload=True)" in fixed
    assert "nf4" not in fixed


# --------------------------------------------------------------------------------------------------
# Found in review (December 2026)


@pytest.mark.parametrize(
    "cell",
    [
        'model = AutoModelForCausalLM.from_pretrained("m/x")\nmodel = model.half()\nmodel.cuda()\n',
        'model = AutoModelForCausalLM.from_pretrained("m/x")\nmodel = model.to("cuda")\n'
        "model = model.to(torch.float16)\n",
        'model = AutoModelForCausalLM.from_pretrained("m/x")\nmodel = get_peft_model(model, cfg)\n'
        'model.half()\nmodel.to("cuda")\n',
        'model, tok = AutoModelForCausalLM.from_pretrained("m/x"), AutoTokenizer.from_pretrained("m/x")\n'
        "model.half()\nmodel.cuda()\n",
        'a = b = AutoModelForCausalLM.from_pretrained("m/x")\nb.half().cuda()\n',
        'model, info = AutoModelForCausalLM.from_pretrained("m/x", output_loading_info=True)\n'
        'model = model.to("cuda", torch.float16)\n',
    ],
    ids=["rebound-cast", "second-move", "after-peft", "tuple", "two-names", "loading-info"],
)
def test_quantizing_drops_every_later_cast_and_move_of_the_model(cell: str) -> None:
    """transformers refuses .half(), .to(dtype) and (8-bit) .cuda() on a bitsandbytes model."""
    for bits in ("4bit", "8bit"):
        fixed = rewrite(cell, bits)
        assert ".half()" not in fixed and ".cuda()" not in fixed and "torch.float16)" not in fixed, fixed
        assert '.to("cuda"' not in fixed, fixed


def test_a_pipeline_says_each_setting_once_on_the_call_or_in_model_kwargs() -> None:
    """transformers refuses a device_map or dtype given both ways ("You cannot use both")."""
    cell = (
        'pipe = pipeline("text-generation", model="meta-llama/Llama-3.1-8B", '
        'model_kwargs={"device_map": "cuda", "torch_dtype": torch.float32})\n'
    )
    for fix in ("4bit", "offload", "cpu"):
        fixed = rewrite(cell, fix)
        assert fixed.count("device_map") == 1, (fix, fixed)
    bf16 = rewrite(cell, "bf16")  # once, with the keyword the installed transformers takes
    assert bf16.count("dtype") == 1 and ("torch_dtype" in bf16) == (DTYPE == "torch_dtype")
    assert 'device_map="cpu"' in rewrite(cell, "cpu")  # not left to load on the GPU first
    legacy = 'pipe = pipeline("text-generation", model="m/x", model_kwargs=dict(load_in_8bit=True), '
    legacy += 'device_map="auto")\n'
    assert "load_in_8bit" not in rewrite(legacy, "4bit").split("BitsAndBytesConfig(")[0]
    positional = 'model = AutoModelForCausalLM.from_pretrained("m/x")\n'
    positional += 'pipe = pipeline("text-generation", model, device=0)\n'
    assert "device=0" not in rewrite(positional, "4bit")  # a device_map'd model is not moved again


def test_half_batch_multiplies_an_accumulation_expression_as_a_whole_and_not_one_that_follows_the_batch() -> (
    None
):
    conditional = 'args = TrainingArguments("o", per_device_train_batch_size=8, '
    conditional += "gradient_accumulation_steps=4 if big else 2)\ntrainer.train()\n"
    assert "gradient_accumulation_steps=(4 if big else 2) * 2" in rewrite(conditional, "half-batch")
    computed = (
        "batch_size = 8\ngradient_accumulation_steps = 64 // batch_size\n"
        'args = TrainingArguments("o", per_device_train_batch_size=batch_size, '
        "gradient_accumulation_steps=gradient_accumulation_steps)\ntrainer.train()\n"
    )
    fixed = rewrite(computed, "half-batch")
    assert "batch_size = 4" in fixed and "64 // batch_size\n" in fixed and "* 2" not in fixed


def test_an_import_later_in_the_cell_does_not_cover_a_use_written_above_it() -> None:
    cell = (
        'model = AutoModelForCausalLM.from_pretrained("m/x", device_map="cuda")\n'
        "import torch\nwith torch.no_grad():\n    out = model(**inputs)\n"
    )
    fixed = rewrite(cell, "4bit")
    assert fixed.index("import torch") < fixed.index("torch.bfloat16")


def test_generation_fixes_leave_what_they_cannot_change_alone() -> None:
    own_cache = "out = model.generate(**inputs, past_key_values=prompt_cache, max_new_tokens=20)\n"
    with pytest.raises(NotApplicable):
        rewrite(own_cache, "offload-cache")  # transformers refuses a cache and cache_implementation together
    deferred = "f = lambda: model(**inputs)\nout = f()\n"
    with pytest.raises(NotApplicable):
        rewrite(deferred, "inference-mode")  # the lambda runs later, outside the with block


def test_merge_cpu_leaves_a_merge_in_a_comprehension_to_the_user() -> None:
    with pytest.raises(NotApplicable, match="comprehension"):
        rewrite("merged = [m.merge_and_unload() for m in peft_models]\n", "merge-cpu")


def test_a_loss_function_is_not_a_model_and_a_cache_size_is_not_a_batch() -> None:
    import torch

    from vram_magic.cell import read_cell
    from vram_magic.fixes import apply_fix

    cell = "loss = criterion(logits, labels)\n"
    namespace = {
        "criterion": torch.nn.CrossEntropyLoss(),
        "logits": torch.zeros(4, 3),
        "labels": torch.zeros(4),
    }
    for fix in ("chunk", "inference-mode"):
        with pytest.raises(NotApplicable):
            apply_fix(read_cell(cell, namespace), fix)
    static = "cache = StaticCache(config=model.config, max_batch_size=4, max_cache_len=1024)\n"
    with pytest.raises(NotApplicable):
        rewrite(static, "half-batch")
    deepspeed = (  # HF checks that DeepSpeed's micro batch matches per_device_train_batch_size
        'ds = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8, "zero_optimization": {}}\n'
        'args = TrainingArguments("o", per_device_train_batch_size=8, deepspeed=ds)\ntrainer.train()\n'
    )
    with pytest.raises(NotApplicable, match="DeepSpeed config sets its own batch sizes"):
        rewrite(deepspeed, "half-batch")
    automatic = deepspeed.replace(
        '"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8', '"train_batch_size": "auto"'
    )
    fixed = rewrite(automatic, "half-batch")
    assert '"train_batch_size": "auto"' in fixed and "per_device_train_batch_size=4" in fixed


def test_keys_deleted_or_added_by_index_are_read() -> None:
    from vram_magic.cell import read_cell

    load = 'model = AutoModelForCausalLM.from_pretrained("m/x", **kw)\n'
    deleted = 'kw = {"device_map": "cuda"}\ndel kw["device_map"]\n' + load
    assert read_cell(deleted).loads[0].where == "unknown"  # no longer read as going to the GPU
    added = 'kw = {"device_map": "cuda"}\nkw["load_in_8bit"] = True\n' + load
    fixed = rewrite(added, "4bit")
    assert 'if k not in ("load_in_8bit",)' in fixed  # taken out where the call spreads it


def test_on_a_gpu_without_bfloat16_training_fixes_train_in_float16() -> None:
    cell = (
        'args = TrainingArguments(output_dir="out", per_device_train_batch_size=8, bf16=True)\n'
        "trainer = Trainer(model=model, args=args, train_dataset=ds)\ntrainer.train()\n"
    )
    halved = rewrite(cell, "half-batch", compute_dtype="float16")
    assert "per_device_train_batch_size=4, fp16=True, gradient_accumulation_steps=2)" in halved
    assert "bf16" not in halved
    checkpointed = rewrite(cell, "checkpointing", compute_dtype="float16")
    assert "fp16=True, gradient_checkpointing=True" in checkpointed and "bf16" not in checkpointed
    assert "bf16=True" in rewrite(cell, "half-batch")  # where the GPU has bfloat16, it stays
    off = cell.replace("bf16=True", "bf16=False")
    assert "bf16=False" in rewrite(off, "half-batch", compute_dtype="float16")


def test_the_title_says_when_bf16_became_fp16() -> None:
    from vram_magic._types import Fix, facts

    change = facts(role="train", old=8, new=4, multiplier=2, accumulation=(1, 2), fp16=True)
    assert Fix("half-batch", "", change=change).title == (
        "Halve the batch (8 → 4) and double gradient accumulation (1 → 2): the same effective batch; "
        "bf16=True becomes fp16=True (this GPU has no bfloat16)"
    )
