"""Read a cell: what kind of work it does, which statement failed, which names it binds.

Pure Python (stdlib ``ast``): the code given is the cell after IPython's transforms, so line magics
have become plain calls. Rewriting the cell is ``_rewrite``'s job (libcst); this module only reads.
"""

from __future__ import annotations

import ast
import re

from vram_magic._types import CellAnalysis, CellKind

# Which calls mark which kind of cell, strongest first: a cell that loads and merges is a merge.
_KIND_BY_METHOD: tuple[tuple[CellKind, frozenset[str]], ...] = (
    ("merge", frozenset({"merge_and_unload", "merge_adapter"})),
    ("load", frozenset({"from_pretrained"})),
    ("training", frozenset({"train", "backward", "training_step"})),
    ("generation", frozenset({"generate"})),
)
_BATCH_NAME = re.compile(r"(^|_)batch_size$|^gradient_accumulation_steps$", re.IGNORECASE)
_KIND_BY_FUNCTION: dict[str, CellKind] = {
    "pipeline": "load",
    "Trainer": "training",
    "SFTTrainer": "training",
}


def analyse_cell(source: str, failed_line: int | None = None) -> CellAnalysis:
    """Classify ``source`` by the statement on ``failed_line`` (1-based), else by the whole cell."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return CellAnalysis(kind="other", failed_line=failed_line)
    failed = _statement_at(tree, failed_line)
    kind = _kind_of(failed) if failed is not None else "other"
    if kind == "other":
        kind = _kind_of(tree)
    statement = ast.get_source_segment(source, failed) if failed is not None else None
    return CellAnalysis(
        kind=kind,
        failed_line=failed_line,
        failed_statement=statement,
        assigned_names=assigned_names(tree),
        used_names=tuple(
            dict.fromkeys(
                n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
            )
        ),
    )


def _statement_at(tree: ast.Module, line: int | None) -> ast.stmt | None:
    if line is None:
        return None
    for statement in tree.body:
        end = statement.end_lineno or statement.lineno
        if statement.lineno <= line <= end:
            return statement
    return None


def _kind_of(node: ast.AST) -> CellKind:
    found: set[CellKind] = set()
    for each in ast.walk(node):
        if isinstance(each, ast.Name) and isinstance(each.ctx, ast.Store) and _BATCH_NAME.search(each.id):
            found.add("training")  # a cell that sets batch sizes trains (or at least batches)
        if not isinstance(each, ast.Call):
            continue
        if any(keyword.arg and _BATCH_NAME.search(keyword.arg) for keyword in each.keywords):
            found.add("training")
        if isinstance(each.func, ast.Attribute):
            found.update(kind for kind, methods in _KIND_BY_METHOD if each.func.attr in methods)
        elif isinstance(each.func, ast.Name):
            if each.func.id in _KIND_BY_FUNCTION:
                found.add(_KIND_BY_FUNCTION[each.func.id])
            elif each.func.id.lower().startswith("train"):
                found.add("training")
    for kind, _ in _KIND_BY_METHOD:
        if kind in found:
            return kind
    return "other"


def assigned_names(tree: ast.Module) -> tuple[str, ...]:
    """Names the cell binds at top level (assignments, for/with targets, imports, defs)."""
    names: list[str] = []
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
            continue  # their bodies are another scope
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.append(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.extend((alias.asname or alias.name).split(".")[0] for alias in node.names)
        pending.extend(ast.iter_child_nodes(node))
    return tuple(dict.fromkeys(names))
