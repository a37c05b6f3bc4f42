"""Reading a cell: its kind, the statement that failed, the names it binds."""

from __future__ import annotations

from vram_magic.cell import analyse_source as analyse_cell

CELL = """
import torch
from transformers import AutoModelForCausalLM as Model
def helper():
    local_only = 1
model = Model.from_pretrained(
    "meta-llama/Llama-3.1-8B",
    device_map="cuda",
)
merged = model.merge_and_unload()
for step, batch in enumerate(loader):
    pass
"""


def test_the_failed_statement_is_the_whole_multi_line_statement() -> None:
    analysis = analyse_cell(CELL, 7)
    assert analysis.kind == "load"
    assert analysis.failed_statement == (
        'model = Model.from_pretrained(\n    "meta-llama/Llama-3.1-8B",\n    device_map="cuda",\n)'
    )


def test_the_failed_statement_decides_the_kind_before_the_rest_of_the_cell() -> None:
    assert analyse_cell(CELL, 10).kind == "merge"
    assert analyse_cell(CELL, None).kind == "merge"  # strongest kind in the cell
    assert analyse_cell(CELL, 11).kind == "merge"  # a plain loop line falls back to the cell


def test_names_bound_at_top_level_only() -> None:
    analysis = analyse_cell(CELL)
    assert analysis.assigned_names == ("torch", "Model", "helper", "model", "merged", "step", "batch")
    assert "local_only" not in analysis.assigned_names
    assert {"Model", "model", "enumerate", "loader"} <= set(analysis.used_names)


def test_unparsable_code_is_other_without_a_statement() -> None:
    analysis = analyse_cell("model = (\n", 1)
    assert analysis.kind == "other" and analysis.failed_statement is None


def test_a_cell_that_sets_batch_sizes_or_calls_a_train_function_is_training() -> None:
    assert analyse_cell("batch_size = 8\nrun(batch_size)\n", 2).kind == "training"
    assert analyse_cell("loader = DataLoader(data, batch_size=8)\n", 1).kind == "training"
    assert analyse_cell("loss = train_step(model, data)\n", 1).kind == "training"
    assert analyse_cell("size = 8\nrun(size)\n", 2).kind == "other"


def test_a_subclass_of_a_transformers_model_from_the_users_own_module_loads_as_transformers_does() -> None:
    """A class of the user's (in their utils.py, say) that subclasses a transformers model is read as a
    transformers load, so its fixes apply; another library's loader is still left alone."""
    from transformers import LlamaForCausalLM

    from vram_magic.cell import read_cell
    from vram_magic.fixes import apply_fix

    class CustomLlamaForCausalLM(LlamaForCausalLM):
        pass

    class OtherLoader:
        @classmethod
        def from_pretrained(cls, path: str) -> None:
            return None

    CustomLlamaForCausalLM.__module__ = OtherLoader.__module__ = "my_utils"
    cell = 'model = CustomLlamaForCausalLM.from_pretrained("m", device_map="cuda")\n'
    fixed = apply_fix(read_cell(cell, {"CustomLlamaForCausalLM": CustomLlamaForCausalLM}), "4bit").code
    assert "quantization_config=BitsAndBytesConfig(" in fixed
    other = read_cell(cell.replace("CustomLlamaForCausalLM", "OtherLoader"), {"OtherLoader": OtherLoader})
    assert [load.library for load in other.loads] in ([], ["my_utils"])
