"""Reading the work a cell does with its models: training, merges, generation, forward passes."""

from __future__ import annotations

from collections.abc import Mapping

import libcst as cst

from vram_magic.cell._base import _CALLED_MODEL, ReaderBase, _class_names
from vram_magic.cell._facts import (
    Forward,
    Generate,
    Merge,
    PipelineCall,
    TrainerRun,
    TrainingConfig,
)
from vram_magic.cell._loads import _moved_by
from vram_magic.cell._values import (
    Held,
    dotted,
    keyword_values,
)
from vram_magic.cell._walk import CallSite

_ADAPTER_WORDS = frozenset(
    {"get_peft_model", "prepare_model_for_kbit_training", "LoraConfig", "add_adapter", "load_adapter"}
)

_TRAINER_CONFIGS = frozenset(
    {
        "SFTConfig",
        "DPOConfig",
        "ORPOConfig",
        "KTOConfig",
        "CPOConfig",
        "GRPOConfig",
        "RewardConfig",
        "PPOConfig",
    }
)

# torch's tensor factories whose first size is the batch when a model is called on what they make.
_TENSOR_FACTORIES = frozenset({"randint", "ones", "zeros", "empty", "rand", "randn", "full"})
_SAVING = frozenset({"save_pretrained", "push_to_hub", "config", "generation_config", "save_model"})


class WorkReading(ReaderBase):
    """Training, merges, ``generate()``, forward passes and pipeline calls, and their batches."""

    def _training(self) -> tuple[bool, tuple[tuple[int, int], ...]]:
        """Whether the cell trains (a trainer's ``train()``, ``backward()``), and the lines that do."""
        lines = []
        for site in self.walk.calls:
            func = site.call.func
            if not isinstance(func, cst.Attribute):
                continue
            method = func.attr.value
            if method == "backward" or (method == "train" and self._is_trainer(func.value, site.lines[0])):
                lines.append(site.lines)
        return bool(lines), tuple(lines)

    def _trainer_run(self, site: CallSite) -> TrainerRun | None:
        """``X.train()`` where ``X`` is a trainer this cell builds (directly, or bound to a name before) or
        one the notebook holds."""
        func = site.call.func
        if not isinstance(func, cst.Attribute) or func.attr.value != "train":
            return None

        def run(
            trainer: cst.Call | None, held: str | None, class_name: str, library: str | None
        ) -> TrainerRun:
            collator = None if trainer is None else self._collator_built(trainer, site.lines[0])
            return TrainerRun(
                lines=site.lines,
                step=site.step,
                surely=site.surely,
                call=site.call,
                trainer=trainer,
                held=held,
                class_name=class_name,
                library=library,
                collator=collator,
                collator_class=None if collator is None else self._class_name(collator.func),
            )

        built: cst.BaseExpression | None = func.value
        if isinstance(built, cst.Name):
            held = self.names.resolve(built.value)
            if isinstance(held, Held):
                names = _class_names(held.value)
                module = type(held.value).__module__.split(".")[0]
                return run(None, built.value, names[0], module) if "Trainer" in names else None
            built = self._value_before(built.value, site.lines[0])
        if not isinstance(built, cst.Call):
            return None
        name, library = self._class_name(built.func)
        return run(built, None, name, library) if name.endswith("Trainer") else None

    def _collator_built(self, trainer: cst.Call, line: int) -> cst.Call | None:
        """The collator the cell builds for ``trainer``: ``data_collator=`` (or the third positional
        argument) a call, or a name the cell bound to one before ``line``."""
        given = [arg.value for arg in trainer.args if arg.keyword and arg.keyword.value == "data_collator"]
        positional = [arg.value for arg in trainer.args if arg.keyword is None and not arg.star]
        expr = given[0] if given else positional[2] if len(positional) > 2 else None
        if isinstance(expr, cst.Name):
            expr = self._value_before(expr.value, line)
        return expr if isinstance(expr, cst.Call) else None

    def _is_trainer(self, expr: cst.BaseExpression, line: int) -> bool:
        if isinstance(expr, cst.Call):
            return self._class_name(expr.func)[0].endswith("Trainer")
        if isinstance(expr, cst.Name):
            value = self._value_before(expr.value, line)
            if value is not None:
                return isinstance(value, cst.Call) and self._class_name(value.func)[0].endswith("Trainer")
            held = self.names.resolve(expr.value)
            if isinstance(held, Held):
                return type(held.value).__name__.endswith("Trainer")
            return "trainer" in expr.value.lower()
        return "trainer" in (dotted(expr) or "").lower()

    def _uses_adapters(self) -> bool:
        for site in self.walk.calls:
            name = (dotted(site.call.func) or "").rsplit(".", 1)[-1]
            if name in _ADAPTER_WORDS or name.startswith(("PeftModel", "AutoPeftModel")):
                return True
            if any(arg.keyword is not None and arg.keyword.value == "peft_config" for arg in site.call.args):
                return True
        for use in self.walk.uses:
            held = self.names.resolve(use.name)
            if isinstance(held, Held) and _is_peft(held.value):
                return True
        return False

    def _training_config(self, site: CallSite) -> TrainingConfig | None:
        name, _ = self._class_name(site.call.func)
        if not (name.endswith("TrainingArguments") or name in _TRAINER_CONFIGS):
            return None
        _, known = keyword_values(site.call, self.names)
        return TrainingConfig(
            lines=site.lines,
            step=site.step,
            surely=site.surely,
            call=site.call,
            class_name=name,
            spread_known=known,
        )

    def _merge(self, site: CallSite) -> Merge | None:
        call = site.call
        func = call.func
        if not isinstance(func, cst.Attribute) or func.attr.value != "merge_and_unload":
            return None
        statement = site.statement
        if not isinstance(statement, cst.SimpleStatementLine):
            return None
        chain = self._chain(call)
        outermost = chain[-1] if chain else call
        target = None
        if len(statement.body) == 1 and isinstance(statement.body[0], cst.Assign):
            assign = statement.body[0]
            if len(assign.targets) == 1 and assign.value is outermost and dotted(assign.targets[0].target):
                target = dotted(assign.targets[0].target)
        receiver = func.value
        loaded = self._own_load(receiver, site.lines[0])
        kept = target or dotted(receiver)
        later = [
            use for use in self.walk.uses if kept and use.name == kept.split(".")[0] and use.step > site.step
        ]
        saved_after = any(use.attribute in _SAVING for use in later)
        saving_chained = (
            id(outermost) in self.walk.chained_on and _method(self.walk.chained_on[id(outermost)]) in _SAVING
        )
        return Merge(
            lines=site.lines,
            step=site.step,
            surely=site.surely,
            call=call,
            statement=statement,
            receiver=receiver,
            receiver_name=dotted(receiver),
            target=target,
            load=loaded if loaded is not None and loaded.kind in ("adapter", "peft") else None,
            moved_after=_moved_by(chain, self.names) == "cuda",
            used_after=any(use.attribute not in _SAVING for use in later),
            saved_after=saved_after or saving_chained,
        )

    def _generate(self, site: CallSite) -> Generate | None:
        func = site.call.func
        if not isinstance(func, cst.Attribute) or func.attr.value != "generate":
            return None
        keywords, _ = keyword_values(site.call, self.names)
        line = site.lines[0]
        source = self._source_load(func.value, line)
        return Generate(
            lines=site.lines,
            step=site.step,
            surely=site.surely,
            call=site.call,
            statement=site.statement,
            receiver_name=dotted(func.value),
            batched=self._batched(site.call, line),
            max_new_tokens=self.names.integer(keywords.get("max_new_tokens")),
            cache_implementation=self.names.text(keywords.get("cache_implementation")),
            of_model=self._of_model(func.value, line),
            on_cpu=source is not None and source.where in ("cpu", "ram"),
        )

    def _of_model(self, expr: cst.BaseExpression, line: int) -> bool | None:
        """Whether ``expr`` is a transformers model: True, False (something else the cell or notebook has),
        or None (unknown)."""
        if self.is_model(expr, line):
            return True
        if isinstance(expr, cst.Name):
            if self._value_before(expr.value, line) is not None:
                return False  # bound in this cell to something that is not a model load
            held = self.names.resolve(expr.value)
            if isinstance(held, Held):
                return False
        return None

    def _forward(self, site: CallSite, trains: bool) -> Forward | None:
        call = site.call
        if not call.args or not self.is_model(call.func, site.lines[0], by_name=_CALLED_MODEL):
            return None
        if isinstance(call.func, cst.Call):
            return None
        return Forward(
            lines=site.lines,
            step=site.step,
            surely=site.surely,
            call=call,
            statement=site.statement,
            receiver_name=dotted(call.func),
            grad="off" if site.grad_off else "on",
            batched=self._batched(call, site.lines[0]),
            in_training=trains,
        )

    def _pipeline_call(self, site: CallSite) -> PipelineCall | None:
        func = site.call.func
        if not isinstance(func, cst.Name):
            return None
        value = self._value_before(func.value, site.lines[0])
        if value is not None:
            is_pipe = (
                isinstance(value, cst.Call)
                and self.loads_by_call.get(id(value)) is not None
                and (self.loads_by_call[id(value)].kind == "pipeline")
            )
        else:
            held = self.names.resolve(func.value)
            is_pipe = isinstance(held, Held) and _is_pipeline(held.value)
        if not is_pipe:
            return None
        return PipelineCall(
            lines=site.lines, step=site.step, surely=site.surely, call=site.call, receiver_name=func.value
        )

    def _batched(self, call: cst.Call, line: int) -> bool | None:
        """Whether a generate/forward call gets several sequences at once (None: unknown)."""
        for arg in call.args:
            if arg.keyword is not None and arg.keyword.value not in ("input_ids", "inputs", "inputs_embeds"):
                continue
            size = self._rows(arg.value, line)
            if size is not None:
                return size > 1
        return None

    def _rows(self, expr: cst.BaseExpression, line: int, depth: int = 0) -> int | None:
        """How many sequences ``expr`` holds: a tensor or tokenizer output the notebook holds, a tokenizer
        call on a list, or a list."""
        if depth > 6:
            return None
        if isinstance(expr, cst.Name):
            value = self._value_before(expr.value, line)
            if value is not None:
                return self._rows(value, line, depth + 1)
            held = self.names.resolve(expr.value)
            return _held_rows(held.value) if isinstance(held, Held) else None
        if isinstance(expr, (cst.List, cst.Tuple)):
            return len(expr.elements)
        if isinstance(expr, cst.SimpleString):
            return 1  # one text
        if isinstance(expr, cst.Subscript) and isinstance(expr.value, cst.Name):
            return self._rows(expr.value, line, depth + 1)
        if isinstance(expr, cst.Call):
            func = expr.func
            if isinstance(func, cst.Attribute) and func.attr.value in ("to", "cuda"):
                return self._rows(func.value, line, depth + 1)
            callee = (dotted(func) or "").lower()
            if callee.removeprefix("torch.") in _TENSOR_FACTORIES:
                return self._first_dimension(expr, callee.removeprefix("torch."))
            if callee.endswith("apply_chat_template") and expr.args:
                return self._conversations(expr.args[0].value, line)
            if ("tok" in callee or "processor" in callee) and expr.args:
                return self._rows(expr.args[0].value, line, depth + 1)
        return None

    def _first_dimension(self, call: cst.Call, factory: str) -> int | None:
        """The first size of ``torch.randint(0, vocab, (8, 512))``, ``torch.ones(8, 512)`` or
        ``size=(8, 512)``: the batch, when a model is called on it."""
        keywords = {arg.keyword.value: arg.value for arg in call.args if arg.keyword is not None}
        positional = [arg.value for arg in call.args if arg.keyword is None and not arg.star]
        if "size" in keywords:
            size: cst.BaseExpression | None = keywords["size"]
        elif factory == "randint":  # randint(high, size) or randint(low, high, size)
            size = next((arg for arg in positional if isinstance(arg, cst.Tuple | cst.List)), None)
        else:
            size = positional[0] if positional else None
        if isinstance(size, cst.Tuple | cst.List):
            return self.names.integer(size.elements[0].value) if size.elements else None
        return self.names.integer(size) if size is not None else None

    def _conversations(self, expr: cst.BaseExpression, line: int) -> int | None:
        """How many chats ``apply_chat_template`` gets: a list of message dicts is one, of lists many."""
        if isinstance(expr, cst.Name):
            value = self._value_before(expr.value, line)
            if value is None:
                held = self.names.resolve(expr.value)
                if isinstance(held, Held) and isinstance(held.value, list):
                    items = held.value
                    return len(items) if items and all(isinstance(i, list) for i in items) else 1
                return None
            expr = value
        if isinstance(expr, (cst.List, cst.Tuple)):
            inner = [element.value for element in expr.elements]
            return len(inner) if inner and all(isinstance(i, (cst.List, cst.Tuple)) for i in inner) else 1
        return None


def _method(call: cst.Call) -> str | None:
    return call.func.attr.value if isinstance(call.func, cst.Attribute) else None


def _is_peft(value: object) -> bool:
    if any(name.startswith("PeftModel") for name in _class_names(value)):
        return True
    inner = getattr(value, "__dict__", {}).get("model") if hasattr(value, "__dict__") else None
    return inner is not None and any(name.startswith("PeftModel") for name in _class_names(inner))


def _is_pipeline(value: object) -> bool:
    return "Pipeline" in _class_names(value) and type(value).__module__.startswith("transformers")


def _held_rows(value: object) -> int | None:
    """The batch size of inputs the notebook holds: a tensor, a tokenizer's output, a list of texts."""
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, str):
        return 1
    if isinstance(value, Mapping) or hasattr(value, "keys"):
        try:
            tensor = value["input_ids"]  # type: ignore[index]
        except Exception:
            return None
        return _held_rows(tensor)
    shape = getattr(value, "shape", None)
    if shape is not None and len(shape) >= 1:
        return int(shape[0]) if len(shape) > 1 else 1
    return None
