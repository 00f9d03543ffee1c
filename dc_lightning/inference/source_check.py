"""The static half of the conversion's safety check: which attributes of a layer the ``forward`` of an enclosing user
class (or a method it calls on ``self``) reads, found in its source with ``ast``."""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

from torch import nn


def is_torch_class(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "torch" or cls in (object, nn.Module)


@functools.cache
def forward_reads(cls: type) -> frozenset[tuple[str, str]] | None:
    """``(owner, attribute)`` pairs read in ``cls.forward`` and the ``self.<method>()`` calls it makes (transitively).

    ``owner`` is the name of the attribute the value comes from (``self.emb.weight`` -> ``("emb", "weight")``),
    ``"<parent>[]"`` for an indexed container (``self.layers[0].weight`` -> ``("layers[]", "weight")``) and ``"?"``
    for a local variable. ``None`` when a user class's source is unavailable.
    """
    methods: dict[str, list[ast.FunctionDef]] = {}  # every definition along the MRO (super() calls reach them)
    for klass in cls.__mro__:
        if is_torch_class(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            return None
        for node in tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                methods.setdefault(node.name, []).append(node)
    reads: set[tuple[str, str]] = set()
    todo, done = ["forward"], set()
    while todo:
        name = todo.pop()
        if name in done or name not in methods:
            continue
        done.add(name)
        for node in (n for fn in methods[name] for n in ast.walk(fn)):
            if isinstance(node, ast.Attribute):
                if isinstance(node.value, ast.Name) and node.value.id == "self":
                    todo.append(node.attr)  # a method called (or an attribute read) on self: follow if a method
                    continue
                reads.add((_owner(node.value), node.attr))
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
            ):
                reads.add((_owner(node.args[0]), node.args[1].value))
    return frozenset(reads)


def _owner(value: ast.AST) -> str:
    if isinstance(value, ast.Attribute):
        return value.attr
    if isinstance(value, ast.Subscript) and isinstance(value.value, ast.Attribute):
        return value.value.attr + "[]"
    if isinstance(value, ast.Name) and value.id == "self":
        return "self"
    return "?"


def weight_reader(model: nn.Module, name: str, removed: set[tuple[str | None, str]]) -> str | None:
    """Why an enclosing user class may read one of the ``removed`` ``(owner, attribute)`` of the layer at ``name``
    (owner ``None`` = the layer itself), or ``None``.

    Returns ``"unavailable:<class>"`` when a user class's source cannot be read."""
    parts = name.split(".")
    chain = [model] + [model.get_submodule(".".join(parts[: i + 1])) for i in range(len(parts) - 1)]
    for ancestor in chain:
        if is_torch_class(type(ancestor)):
            continue
        reads = forward_reads(type(ancestor))
        if reads is None:
            return f"unavailable:{type(ancestor).__qualname__}"
        local = parts[-1]
        owners = {local, "?"}
        if local.isdigit() and len(parts) >= 2:
            owners.add(parts[-2] + "[]")
        for owner, attr in reads:
            for sub, removed_attr in removed:
                if attr == removed_attr and (owner in owners if sub is None else owner == sub):
                    via = f"{owner}.{attr}" if sub is None else f"{sub}.{attr}"
                    return f"{type(ancestor).__qualname__}.forward reads `{via}`"
    return None
