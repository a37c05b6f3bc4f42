"""The model loads a cell makes, read from its text with ``ast`` (nothing runs).

A load is ``X.from_pretrained(MODEL, ...)`` of a model class, where MODEL is a string, a name the notebook
binds to one, or a name the cell itself binds once to a string literal. Preflight stops a cell from running,
so ``loads_in`` returns only loads that surely run and surely go to the GPU:

- surely run: in the cell's top-level statements and ``with`` blocks, not in functions, branches, loops,
  ``try`` blocks (often the user's own fallback), lambdas, conditional expressions, the later operands of
  ``and``/``or``, or comprehensions;
- go to the GPU: a cuda ``device_map`` (or a GPU index, or an auto map), a bitsandbytes quantized load,
  ``.to("cuda")``/``.cuda()`` on the load or later on the name it is bound to, or
  ``with torch.device("cuda")``. Without one of these transformers loads into CPU RAM.

A load whose model, quantization, placement or config is only known when the cell runs (a ``device_map``
held in a variable, another quantization method, ``config=`` or config fields such as
``num_hidden_layers=``) is left out: it runs, and an OOM it causes is rescued as any other.
``load_at`` finds the load on a given line, whichever statement it is in: the load that failed, after an OOM.
"""

from __future__ import annotations

import ast
from collections import ChainMap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

from vram_magic._estimate import DTYPE_NAMES

# Classes whose from_pretrained loads no weights onto the GPU (or an adapter on an already-loaded base).
_NOT_MODELS = ("Tokenizer", "Processor", "Config", "FeatureExtractor", "ImageProcessor", "PeftModel")
AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
# from_pretrained keywords that change neither the model's size nor where it goes (beyond those read here).
_HARMLESS_KEYWORDS = frozenset(
    {
        "pretrained_model_name_or_path",
        "revision",
        "cache_dir",
        "token",
        "use_auth_token",
        "trust_remote_code",
        "code_revision",
        "local_files_only",
        "force_download",
        "proxies",
        "subfolder",
        "variant",
        "use_safetensors",
        "weights_only",
        "low_cpu_mem_usage",
        "attn_implementation",
        "max_memory",
        "offload_folder",
        "offload_state_dict",
        "offload_buffers",
        "output_loading_info",
        "ignore_mismatched_sizes",
        "num_labels",
        "id2label",
        "label2id",
        "problem_type",
        "use_cache",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "pad_token_id",
    }
)
_READ_KEYWORDS = frozenset(
    {"dtype", "torch_dtype", "device_map", "quantization_config", "load_in_4bit", "load_in_8bit"}
)
# Methods that keep a model where it is (a cast, a mode): ``load(...).half().cuda()`` still moves the load.
_IN_PLACE_METHODS = frozenset({"half", "float", "bfloat16", "eval", "train", "requires_grad_"})
_UNKNOWN = object()  # a name the cell binds to something only known when it runs
_NAMED = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.ExceptHandler, ast.MatchAs, ast.MatchStar)


@dataclass(frozen=True)
class Load:
    """One model load a cell makes, as far as its text and the notebook's names tell."""

    model: str
    dtype: str | None = None
    quantization: str | None = None
    device_map: str | None = None
    offload_allowed: bool = False  # llm_int8_enable_fp32_cpu_offload: accelerate may put layers on the CPU
    lines: tuple[int, int] = field(default=(0, 0), compare=False)  # the call's first and last line
    step: int = field(default=0, compare=False)  # the top-level statement it is in (0 = the first)
    released_at: int | None = field(default=None, compare=False)  # the statement that drops its name

    def alive_at(self, step: int) -> bool:
        """Whether what this load made is still held when top-level statement ``step`` runs."""
        return self.released_at is None or self.released_at >= step


@dataclass(frozen=True)
class _Statement:
    node: ast.stmt
    surely: bool  # runs whenever the cell runs (not a branch, loop, try, def...)
    on_gpu: bool  # inside ``with torch.device("cuda")``
    binds: frozenset[str]  # the names it binds or deletes


def loads_in(cell: str, namespace: Mapping[str, object]) -> tuple[Load, ...]:
    """The model loads ``cell`` surely makes onto the GPU whose model is known without running it, in order
    (see the module's doc)."""
    tree = _parse(cell)
    if tree is None:
        return ()
    names = _names_in(tree, namespace)
    statements = list(_flattened(tree.body, names, on_gpu=False))
    loads = []
    for step, statement in enumerate(statements):
        if not statement.surely:
            continue
        for call in _unconditional_calls(statement.node):
            load = _load_of(call, names)
            if load is None or load.device_map == "cpu":
                continue
            bound_to = _bound_name(statement.node, call)
            moved = (
                statement.on_gpu
                or _moved_in(statement.node, call, names)
                or (bound_to is not None and _moved_later(bound_to, statements[step + 1 :], names))
            )
            if load.device_map is None and load.quantization is None and not moved:
                continue  # loaded into CPU RAM
            released = step if bound_to is None else _released_at(bound_to, statements, step)
            loads.append(replace(load, step=step, released_at=released))
    return tuple(loads)


def load_at(cell: str, namespace: Mapping[str, object], line: int) -> Load | None:
    """The model load of ``cell`` on ``line`` (1 = the cell's first line), if its model is known: the
    innermost load whose call spans the line, else the only load of the statement that does."""
    tree = _parse(cell)
    if tree is None:
        return None
    names = _names_in(tree, namespace)
    spanning = [
        load
        for call in _all_calls(tree)
        if (load := _load_of(call, names)) is not None and load.lines[0] <= line <= load.lines[1]
    ]
    if spanning:
        return min(spanning, key=lambda load: (load.lines[1] - load.lines[0], -load.lines[0]))
    for statement in tree.body:
        if statement.lineno <= line <= (statement.end_lineno or statement.lineno):
            inside = [load for call in _all_calls(statement) if (load := _load_of(call, names)) is not None]
            return inside[0] if len(inside) == 1 else None
    return None


def placed_by_accelerate(load: Load) -> bool:
    """An auto ``device_map`` that may offload: accelerate puts on the GPU what fits (bitsandbytes refuses
    to offload unless ``llm_int8_enable_fp32_cpu_offload`` is set), so the load does not run out."""
    return load.device_map in AUTO_MAPS and (load.quantization is None or load.offload_allowed)


def _parse(cell: str) -> ast.Module | None:
    if "from_pretrained" not in cell:
        return None
    try:
        return ast.parse(cell)
    except SyntaxError:
        return None


def _load_of(call: ast.Call, names: Mapping[str, object]) -> Load | None:
    """The load ``call`` makes, when it is a model's ``from_pretrained`` whose model, quantization and
    placement are known and whose keywords change nothing else about its size."""
    if not _is_model_load(call) or len(call.args) > 1:
        return None
    keywords = {k.arg: k.value for k in call.keywords}
    if None in keywords or not set(keywords) <= _HARMLESS_KEYWORDS | _READ_KEYWORDS:
        return None  # **kwargs, config=, or config fields such as num_hidden_layers=
    model = _text(call.args[0] if call.args else keywords.get("pretrained_model_name_or_path"), names)
    placement = keywords.get("device_map")
    device_map = _device_map(placement, names) if placement is not None else None
    quantization = _quantization(keywords, names)
    if model is None or (placement is not None and device_map is None) or quantization is _UNKNOWN:
        return None  # only known when the cell runs
    assert quantization is None or isinstance(quantization, tuple)
    return Load(
        model=model,
        dtype=_dtype(keywords.get("dtype") or keywords.get("torch_dtype"), names),
        quantization=quantization[0] if quantization else None,
        device_map=device_map,
        offload_allowed=bool(quantization and quantization[1]),
        lines=(call.lineno, call.end_lineno or call.lineno),
    )


def _flattened(body: list[ast.stmt], names: Mapping[str, object], *, on_gpu: bool) -> Iterator[_Statement]:
    """The cell's top-level statements in order, ``with`` blocks opened (their body runs)."""
    for node in body:
        if isinstance(node, (ast.With, ast.AsyncWith)):
            as_names = frozenset().union(*(_rebound_or_deleted(item) for item in node.items))
            yield _Statement(node, surely=False, on_gpu=on_gpu, binds=as_names)
            inner = on_gpu or any(_is_cuda_device(item.context_expr, names) for item in node.items)
            yield from _flattened(node.body, names, on_gpu=inner)
        else:
            simple = isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Expr, ast.Delete))
            yield _Statement(node, surely=simple, on_gpu=on_gpu, binds=frozenset(_rebound_or_deleted(node)))


def _unconditional_calls(statement: ast.AST) -> list[ast.Call]:
    """The calls in a simple statement that run whenever it runs, in source order."""
    calls: list[ast.Call] = []
    pending: list[ast.AST] = [statement]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Lambda, ast.IfExp, *_COMPREHENSIONS)):
            continue
        if isinstance(node, ast.BoolOp):
            pending.append(node.values[0])  # the others may not run
            continue
        if isinstance(node, ast.Call):
            calls.append(node)
        pending.extend(ast.iter_child_nodes(node))
    return sorted(calls, key=lambda call: (call.lineno, call.col_offset))


def _all_calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _bound_name(statement: ast.stmt, call: ast.Call) -> str | None:
    """The name ``statement`` binds the load's model to: ``model = X.from_pretrained(...)`` (maybe with a
    cast or a move chained on), else None."""
    if not isinstance(statement, (ast.Assign, ast.AnnAssign)) or statement.value is None:
        return None
    targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
    if len(targets) != 1 or not isinstance(targets[0], ast.Name):
        return None
    return targets[0].id if _through_chain(statement.value) is call else None


def _moved_in(statement: ast.stmt, load: ast.Call, names: Mapping[str, object]) -> bool:
    """``X.from_pretrained(...).to("cuda")`` / ``.half().cuda()``."""
    return any(
        _is_move(call, names) and _through_chain(call.func.value) is load  # type: ignore[attr-defined]
        for call in _unconditional_calls(statement)
    )


def _moved_later(name: str, later: list[_Statement], names: Mapping[str, object]) -> bool:
    """``name`` moved to the GPU by a later statement that surely runs (``model.to("cuda")``,
    ``model = model.cuda()``) before anything binds or deletes ``name`` again."""
    for statement in later:
        if statement.surely and any(
            _is_move(call, names) and _is_name(_through_chain(call.func.value), name)  # type: ignore[attr-defined]
            for call in _unconditional_calls(statement.node)
        ):
            return True
        if name in statement.binds:
            return False
    return False


def _released_at(name: str, statements: list[_Statement], step: int) -> int | None:
    """The first statement after ``step`` that binds or deletes ``name`` (what the load made is dropped
    once it has run), else None: still held at the end of the cell."""
    for later in range(step + 1, len(statements)):
        if name in statements[later].binds:
            return later
    return None


def _rebound_or_deleted(statement: ast.AST) -> set[str]:
    """Every name ``statement`` binds or deletes, wherever in it (conservatively: also inside functions)."""
    found: set[str | None] = set()
    for node in ast.walk(statement):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            found.add(node.id)
        elif isinstance(node, ast.alias):
            found.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, _NAMED):  # def f, class C, except E as e, case x / *rest
            found.add(node.name)
        elif isinstance(node, ast.MatchMapping):
            found.add(node.rest)
    return {name for name in found if name}


def _through_chain(node: ast.expr) -> ast.expr:
    """``node`` without the casts and modes chained on it: ``load(...).half().eval()`` -> ``load(...)``."""
    while (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and (node.func.attr in _IN_PLACE_METHODS or (node.func.attr == "to" and not _moves_somewhere(node)))
    ):
        node = node.func.value
    return node


def _moves_somewhere(call: ast.Call) -> bool:
    """``x.to(device)`` rather than ``x.to(dtype)``: a device argument (an unknown name counts as one)."""
    device = _device_argument(call)
    return device is not None and not (isinstance(device, ast.Attribute) and device.attr in DTYPE_NAMES)


def _is_move(call: ast.Call, names: Mapping[str, object]) -> bool:
    """``x.cuda()`` or ``x.to(<a cuda device>)``."""
    func = call.func
    if not isinstance(func, ast.Attribute):
        return False
    if func.attr == "cuda":
        return True
    device = _device_argument(call)
    return func.attr == "to" and device is not None and _is_cuda_device(device, names)


def _device_argument(call: ast.Call) -> ast.expr | None:
    """The first argument of ``x.to(...)``, or its ``device=``."""
    return call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "device"), None)


def _is_cuda_device(node: ast.expr, names: Mapping[str, object]) -> bool:
    """``"cuda"``, ``"cuda:1"``, a GPU index, ``torch.device("cuda")``, or a name bound to one of these."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "device":
        return bool(node.args) and _is_cuda_device(node.args[0], names)
    if isinstance(node, ast.Constant):
        return _is_gpu_index(node) or (isinstance(node.value, str) and node.value.startswith("cuda"))
    if isinstance(node, ast.Name):
        bound = names.get(node.id)
        return str(getattr(bound, "type", bound)).startswith("cuda")  # a string, or a torch.device
    return False


def _device_map(node: ast.expr, names: Mapping[str, object]) -> str | None:
    """A ``device_map`` as text (``"cuda"`` for a GPU index or device), or None when unknown (a dict...)."""
    if _is_gpu_index(node) or (isinstance(node, ast.Call) and _is_cuda_device(node, names)):
        return "cuda"
    return _text(node, names)


def _is_gpu_index(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int


def _is_name(node: ast.expr, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _is_model_load(call: ast.Call) -> bool:
    func = call.func
    if not (isinstance(func, ast.Attribute) and func.attr == "from_pretrained"):
        return False
    owner = func.value.id if isinstance(func.value, ast.Name) else getattr(func.value, "attr", "")
    return not any(part in owner for part in _NOT_MODELS)


def _names_in(tree: ast.Module, namespace: Mapping[str, object]) -> Mapping[str, object]:
    """The notebook's names as the cell sees them. A name the cell binds exactly once, in a top-level
    ``name = <string or call>``, has that value (the ``ast`` node of a call, e.g. a ``BitsAndBytesConfig``);
    any other name the cell binds is unknown (the notebook's old value would mislead)."""
    bindings: dict[str, int] = {}
    for statement in tree.body:
        for name in _rebound_or_deleted(statement):
            bindings[name] = bindings.get(name, 0) + 1
    in_cell: dict[str, object] = {}
    for statement in tree.body:
        if (
            isinstance(statement, ast.Assign)
            and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)
            and bindings.get(statement.targets[0].id) == 1
        ):
            value = statement.value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                in_cell[statement.targets[0].id] = value.value
            elif isinstance(value, ast.Call):
                in_cell[statement.targets[0].id] = value
    unknown = {name: _UNKNOWN for name in bindings if name not in in_cell}
    return ChainMap(in_cell, unknown, dict(namespace))


def _text(node: ast.expr | None, namespace: Mapping[str, object]) -> str | None:
    """A string literal, or a name bound to a string (or a path)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int)):
        return str(node.value)
    if isinstance(node, ast.Name):
        value = namespace.get(node.id)
        if isinstance(value, str) or type(value).__name__.endswith("Path"):
            return str(value)
    return None


def _dtype(node: ast.expr | None, namespace: Mapping[str, object]) -> str | None:
    if isinstance(node, ast.Attribute) and node.attr in DTYPE_NAMES:  # torch.bfloat16
        return node.attr
    text = _text(node, namespace)
    return text if text in DTYPE_NAMES else None


def _quantization(keywords: Mapping[str | None, ast.expr], names: Mapping[str, object]) -> object:
    """None (not quantized), ``(bits, offload_allowed)`` for bitsandbytes ``"4bit"``/``"8bit"``, or
    ``_UNKNOWN`` (a flag held in a variable, another quantization method, a config only known at run time)."""
    for flag, bits in (("load_in_4bit", "4bit"), ("load_in_8bit", "8bit")):
        value = keywords.get(flag)
        if value is None:
            continue
        if not isinstance(value, ast.Constant):
            return _UNKNOWN
        if value.value is True:
            return (bits, False)
    config = keywords.get("quantization_config")
    if config is None:
        return None
    if isinstance(config, ast.Name):
        bound = names.get(config.id, _UNKNOWN)
        if not isinstance(bound, ast.Call):  # a config object from an earlier cell
            return _bits(*(getattr(bound, flag, _UNKNOWN) for flag in _BNB_FLAGS))
        config = bound  # built earlier in this cell
    if isinstance(config, ast.Call) and _called_name(config).endswith("BitsAndBytesConfig"):
        settings = {k.arg: k.value for k in config.keywords}
        if None in settings:
            return _UNKNOWN  # BitsAndBytesConfig(**kwargs)
        literal = {key: getattr(value, "value", _UNKNOWN) for key, value in settings.items()}
        return _bits(*(literal.get(flag, False) for flag in _BNB_FLAGS))
    return _UNKNOWN


_BNB_FLAGS = ("load_in_4bit", "load_in_8bit", "llm_int8_enable_fp32_cpu_offload")


def _bits(four: object, eight: object, offload: object) -> object:
    """``(bits, offload_allowed)`` from a bitsandbytes config's flags, or unknown (neither, both, or a flag
    only known at run time)."""
    if four is True and eight is False:
        return ("4bit", offload is True)
    if eight is True and four is False:
        return ("8bit", offload is True)
    return _UNKNOWN


def _called_name(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
