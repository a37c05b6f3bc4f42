"""Reading batch sizes and gradient accumulation: keywords, dict entries, variables of the cell or an
earlier cell."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import libcst as cst
import libcst.matchers as m

from vram_magic.cell._base import ReaderBase
from vram_magic.cell._facts import (
    Accumulation,
    BatchSize,
    Role,
)
from vram_magic.cell._values import (
    Held,
    dotted,
)

ACCUMULATION_NAMES = frozenset(
    {
        "gradient_accumulation_steps",
        "grad_accum",
        "grad_accum_steps",
        "grad_accumulation_steps",
        "accumulation_steps",
        "accum_steps",
        "accum_iter",
    }
)

_NOT_GPU_BATCHES = frozenset({"map", "filter", "batch", "iter", "to_tf_dataset", "range"})


class BatchReading(ReaderBase):
    """Batch sizes and gradient accumulation."""

    def _batch_sizes(self, trains: bool, config_calls: set[int]) -> list[BatchSize]:
        found: list[BatchSize] = []
        inference = {id(site.call) for site in self.walk.calls if _is_inference_call(site.call)}
        for site in self.walk.calls:
            func = site.call.func
            method = func.attr.value if isinstance(func, cst.Attribute) else dotted(func) or ""
            if method in _NOT_GPU_BATCHES or "tokeniz" in (dotted(func) or "").lower():
                continue
            if method.endswith("Cache"):  # StaticCache(max_batch_size=...): sized for the batch, not a batch
                continue
            for arg in site.call.args:
                if arg.keyword is None or not is_batch_name(arg.keyword.value):
                    continue
                role = _role(arg.keyword.value, id(site.call) in config_calls, trains)
                if id(site.call) in inference:
                    role = "inference"
                found.append(
                    self._batch(arg, arg.keyword.value, arg.value, role, site.lines, site.step, site.surely)
                )
        for node, step, surely, lines in self.walk.dicts:
            if _is_deepspeed_config(node, self.names):
                continue  # its batch sizes must agree with TrainingArguments': left to DeepSpeed's "auto"
            for element in node.elements:
                key = self.names.text(element.key) if isinstance(element, cst.DictElement) else None
                if key is not None and is_batch_name(key):
                    assert isinstance(element, cst.DictElement)
                    role = _role(key, False, trains)
                    found.append(self._batch(element, key, element.value, role, lines, step, surely))
        generates = any(_is_inference_call(site.call) for site in self.walk.calls)
        for number, top in enumerate(self.walk.steps):  # def hf_infer(..., batch_size: int = 4)
            for param in m.findall(top.node, m.Param()):
                assert isinstance(param, cst.Param)
                if is_batch_name(param.name.value) and isinstance(param.default, cst.Integer):
                    feeds = (
                        "inference" if generates and not trains else _role(param.name.value, False, trains)
                    )
                    found.append(
                        self._batch(param, param.name.value, param.default, feeds, top.lines, number, False)
                    )
        for index, statement in enumerate(self.walk.steps):
            line = statement.node
            if not isinstance(line, cst.SimpleStatementLine):
                continue
            for small in line.body:
                if isinstance(small, cst.Assign) and len(small.targets) == 1:
                    target = small.targets[0].target
                    if isinstance(target, cst.Name) and is_batch_name(target.value):
                        role = _role(target.value, False, trains)
                        batch = self._batch(
                            small, target.value, small.value, role, statement.lines, index, True
                        )
                        found.append(replace(batch, variable=target.value, from_namespace=False))
        roles = {
            batch.variable: batch.role
            for batch in found
            if batch.variable and batch.role in ("train", "eval")
        }
        return [
            replace(batch, role=roles[batch.variable])
            if isinstance(batch.node, cst.Assign) and batch.variable in roles
            else batch
            for batch in found
        ]

    def _batch(
        self,
        node: cst.CSTNode,
        name: str,
        value: cst.BaseExpression,
        role: Role,
        lines: tuple[int, int],
        step: int,
        surely: bool,
    ) -> BatchSize:
        variable = value.value if isinstance(value, cst.Name) else None
        return BatchSize(
            lines=lines,
            step=step,
            surely=surely,
            node=node,
            name=name,
            role=role,
            values=self.names.integers(value),
            variable=variable,
            from_namespace=variable is not None and isinstance(self.names.resolve(variable), Held),
        )

    def _accumulations(self) -> list[Accumulation]:
        found: list[Accumulation] = []
        names = self.names
        for site in self.walk.calls:
            for arg in site.call.args:
                if arg.keyword is not None and arg.keyword.value.lower() in ACCUMULATION_NAMES:
                    variable = arg.value.value if isinstance(arg.value, cst.Name) else None
                    found.append(
                        Accumulation(
                            lines=site.lines,
                            step=site.step,
                            surely=site.surely,
                            node=arg,
                            name=arg.keyword.value,
                            value=names.integer(arg.value),
                            variable=variable,
                            from_namespace=variable is not None and isinstance(names.resolve(variable), Held),
                        )
                    )
        for node, step, surely, lines in self.walk.dicts:
            if _is_deepspeed_config(node, self.names):
                continue  # its batch sizes must agree with TrainingArguments': left to DeepSpeed's "auto"
            for element in node.elements:
                key = names.text(element.key) if isinstance(element, cst.DictElement) else None
                if key is not None and key.lower() in ACCUMULATION_NAMES:
                    assert isinstance(element, cst.DictElement)
                    found.append(
                        Accumulation(
                            lines=lines,
                            step=step,
                            surely=surely,
                            node=element,
                            name=key,
                            value=names.integer(element.value),
                        )
                    )
        for index, statement in enumerate(self.walk.steps):
            line = statement.node
            if isinstance(line, cst.SimpleStatementLine):
                for small in line.body:
                    if isinstance(small, cst.Assign) and len(small.targets) == 1:
                        target = small.targets[0].target
                        if isinstance(target, cst.Name) and target.value.lower() in ACCUMULATION_NAMES:
                            found.append(
                                Accumulation(
                                    lines=statement.lines,
                                    step=index,
                                    surely=True,
                                    node=small,
                                    name=target.value,
                                    value=names.integer(small.value),
                                    variable=target.value,
                                )
                            )
        bound = {a.variable for a in found if a.variable}
        for use in self.walk.uses:
            if (
                use.name.lower() in ACCUMULATION_NAMES
                and use.name not in bound
                and use.name not in names.bound
            ):
                held = names.resolve(use.name)
                if isinstance(held, Held):
                    bound.add(use.name)
                    found.append(
                        Accumulation(
                            lines=(0, 0),
                            step=use.step,
                            surely=True,
                            node=self.module,
                            name=use.name,
                            value=names.integer(cst.Name(use.name)),
                            variable=use.name,
                            from_namespace=True,
                        )
                    )
        return found


def _is_deepspeed_config(node: cst.Dict, names: Any) -> bool:
    keys = {names.text(e.key) for e in node.elements if isinstance(e, cst.DictElement)}
    return bool(keys & {"zero_optimization", "train_micro_batch_size_per_gpu"})


def is_batch_name(name: str) -> bool:
    lowered = name.lower()
    return lowered in ("batch_size", "bsz") or lowered.endswith("_batch_size")


def _role(name: str, in_config: bool, trains: bool) -> Role:
    lowered = name.lower()
    if "eval" in lowered or "test" in lowered or "valid" in lowered:
        return "eval"
    if in_config or trains or "train" in lowered:
        return "train"
    return "unknown"  # a DataLoader or a variable in a cell that does not say what it feeds


def _is_inference_call(call: cst.Call) -> bool:
    func = call.func
    name = func.attr.value if isinstance(func, cst.Attribute) else dotted(func) or ""
    return name in ("generate", "pipeline") or name.startswith("pipe")
