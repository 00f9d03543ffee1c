"""The static half of the conversion's safety check, on the source (``ast``) of the ``forward`` of every enclosing
user class and the methods it calls on ``self``: which attributes of a layer it reads (``self.emb.weight``), and to
which other functions it hands the layer (``output_logits(x, self.wte)``); a module-level function's source is
followed to see whether it reads the layer's weights (``emb.weight``), and one whose source is unavailable may."""

from __future__ import annotations

import ast
import builtins
import functools
import inspect
import os
import sys
import textwrap
from typing import Any, NamedTuple

from torch import nn

__all__ = ["MAX_DEPTH", "Reader", "forward_passes", "forward_reads", "is_torch_class", "param_reads", "weight_reader"]

#: how many calls deep a layer handed to a function is followed (``f(m)`` calling ``g(m)`` is depth 2)
MAX_DEPTH = 4


class Reader(NamedTuple):
    """Why a layer may not be replaced (:func:`weight_reader`).

    ``kind`` is ``"reads"`` (a ``forward`` reads one of the attributes the replacement lacks), ``"unavailable"`` (a
    user class's source cannot be read) or ``"passed"`` (``forward`` hands the layer to a function that reads, or may
    read, its weights: whether that call runs is something only example inputs can show).
    """

    kind: str
    why: str


def is_torch_class(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "torch" or cls in (object, nn.Module)


@functools.cache
def _methods(cls: type) -> dict[str, list[tuple[ast.AST, str]]] | None:
    """Every method definition along the MRO of ``cls`` (``super()`` calls reach them), with its class's module;
    ``None`` when a user class's source is unavailable."""
    methods: dict[str, list[tuple[ast.AST, str]]] = {}
    for klass in cls.__mro__:
        if is_torch_class(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            return None
        for node in tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                methods.setdefault(node.name, []).append((node, klass.__module__))
    return methods


def _forward_nodes(cls: type) -> list[tuple[ast.AST, str]] | None:
    """Every AST node of ``cls.forward`` and of the ``self.<method>()`` calls it makes (transitively), with the module
    of the class defining it; ``None`` when a user class's source is unavailable."""
    methods = _methods(cls)
    if methods is None:
        return None
    nodes: list[tuple[ast.AST, str]] = []
    todo, done = ["forward"], set()
    while todo:
        name = todo.pop()
        if name in done or name not in methods:
            continue
        done.add(name)
        for fn, module in methods[name]:
            for node in ast.walk(fn):
                nodes.append((node, module))
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                    todo.append(node.attr)  # a method called (or an attribute read) on self: follow if a method
    return nodes


@functools.cache
def forward_reads(cls: type) -> frozenset[tuple[str, str]] | None:
    """``(owner, attribute)`` pairs read in ``cls.forward`` and the ``self.<method>()`` calls it makes (transitively).

    ``owner`` is the name of the attribute the value comes from (``self.emb.weight`` -> ``("emb", "weight")``),
    ``"<parent>[]"`` for an indexed container (``self.layers[0].weight`` -> ``("layers[]", "weight")``) and ``"?"``
    for a local variable. ``None`` when a user class's source is unavailable.
    """
    nodes = _forward_nodes(cls)
    if nodes is None:
        return None
    reads: set[tuple[str, str]] = set()
    for node, _ in nodes:
        if isinstance(node, ast.Attribute):
            if not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                reads.add((_owner(node.value), node.attr))
        elif _getattr_call(node) is not None:
            reads.add((_owner(node.args[0]), node.args[1].value))
    return frozenset(reads)


@functools.cache
def forward_passes(cls: type) -> tuple[tuple[str, str, Any, int | str], ...] | None:
    """``(owner, callee, function, argument)`` of every call in ``cls.forward`` (and the methods it calls on
    ``self``) that hands ``self.<...>.<owner>`` (or ``self.<owner>[i]``: owner ``"<owner>[]"``) to a function that is
    not a method of ``self``: ``callee`` is the call's text (``output_logits``), ``function`` the object it resolves
    to in the defining class's module (``None`` when it does not resolve), ``argument`` the position or keyword.
    ``None`` when a user class's source is unavailable."""
    nodes = _forward_nodes(cls)
    if nodes is None:
        return None
    out = []
    for node, module in nodes:
        if not isinstance(node, ast.Call) or _on_self(node.func) or _getattr_call(node) is not None:
            continue
        args = [(i, a) for i, a in enumerate(node.args)] + [(k.arg, k.value) for k in node.keywords if k.arg]
        for where, arg in args:
            if isinstance(arg, ast.Starred) or not (_on_self(arg) or isinstance(arg, ast.Name) and arg.id == "self"):
                continue
            fn = _resolve(node.func, vars(sys.modules[module]) if module in sys.modules else {})
            out.append((_owner(arg), ast.unparse(node.func), fn, where))
    return tuple(out)


def _on_self(node: ast.AST) -> bool:
    """Whether ``node`` is ``self.<attr>``, ``self.<a>.<b>`` or ``self.<a>[i]`` (an attribute chain from ``self``)."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
        if isinstance(node, ast.Name):
            return node.id == "self"
    return False


def _getattr_call(node: ast.AST) -> ast.Call | None:
    """``node`` when it is ``getattr(x, "name"...)`` / ``hasattr(x, "name")`` with a constant name."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "hasattr")
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
    ):
        return node
    return None


def _owner(value: ast.AST) -> str:
    if isinstance(value, ast.Attribute):
        return value.attr
    if isinstance(value, ast.Subscript) and isinstance(value.value, ast.Attribute):
        return value.value.attr + "[]"
    if isinstance(value, ast.Name) and value.id == "self":
        return "self"
    return "?"


def _resolve(func: ast.AST, namespace: dict[str, Any]) -> Any:
    """The object a call's ``func`` (``name`` or ``pkg.mod.name``) names in ``namespace`` (then builtins), or None."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    obj = namespace.get(func.id, getattr(builtins, func.id, None))
    for part in reversed(parts):
        obj = getattr(obj, part, None)
    return obj


def param_reads(fn: Any, argument: int | str, depth: int = 1) -> frozenset[tuple[str | None, str]] | None:
    """The attributes function ``fn`` reads on its argument ``argument`` (a position or a keyword), as ``(owner,
    attribute)``: ``m.weight`` -> ``(None, "weight")``, ``m.out_proj.weight`` -> ``("out_proj", "weight")``,
    ``getattr(m, "weight")`` too, following the functions it hands ``m`` to up to :data:`MAX_DEPTH` calls deep.

    A Python builtin other than ``vars`` (``len``, ``isinstance``, ``enumerate``) reads nothing; ``None`` (unknown:
    treat as a reader) for a function whose source is unavailable (a C function, a class, a callable object), an
    argument it takes through ``*args``/``**kwargs``, or a chain of calls deeper than :data:`MAX_DEPTH`.
    """
    if getattr(fn, "__module__", None) == "builtins" and fn is not vars:
        return frozenset()
    try:
        fn = inspect.unwrap(fn)
    except ValueError:  # a cycle of __wrapped__
        return None
    if depth > MAX_DEPTH or not inspect.isfunction(fn):
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    fdef = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))),
                None)  # fmt: skip
    if fdef is None:
        return None
    positional = [a.arg for a in fdef.args.posonlyargs + fdef.args.args]
    if isinstance(argument, int):
        name = positional[argument] if argument < len(positional) else None
    else:
        name = argument if argument in positional + [a.arg for a in fdef.args.kwonlyargs] else None
    if name is None:
        return None  # through *args / **kwargs: not followed
    reads: set[tuple[str | None, str]] = set()
    for node in ast.walk(fdef):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == name:
            reads.add((None, node.attr))
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == name
        ):
            reads.add((node.value.attr, node.attr))
        elif _getattr_call(node) is not None and isinstance(node.args[0], ast.Name) and node.args[0].id == name:
            reads.add((None, node.args[1].value))
        elif isinstance(node, ast.Call) and _getattr_call(node) is None:
            args = [(i, a) for i, a in enumerate(node.args)] + [(k.arg, k.value) for k in node.keywords if k.arg]
            for where, arg in args:
                if isinstance(arg, ast.Name) and arg.id == name:
                    deeper = param_reads(_resolve(node.func, fn.__globals__), where, depth + 1)
                    if deeper is None:
                        return None
                    reads |= deeper
    return frozenset(reads)


def _source_file(fn: Any) -> str:
    """Where ``fn`` is defined, relative to the working directory when below it."""
    try:
        path = inspect.getsourcefile(fn) or "?"
    except TypeError:
        return getattr(fn, "__module__", None) or "?"
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


def weight_reader(model: nn.Module, name: str, removed: set[tuple[str | None, str]]) -> Reader | None:
    """Why an enclosing user class may read one of the ``removed`` ``(owner, attribute)`` of the layer at ``name``
    (owner ``None`` = the layer itself), or ``None``: its ``forward`` reads one (:func:`forward_reads`), its source
    is unavailable, or it hands the layer to a function that reads one or may (:func:`forward_passes`,
    :func:`param_reads`)."""
    parts = name.split(".")
    chain = [model] + [model.get_submodule(".".join(parts[: i + 1])) for i in range(len(parts) - 1)]
    local = parts[-1]
    owners = {local}
    if local.isdigit() and len(parts) >= 2:
        owners.add(parts[-2] + "[]")
    for ancestor in chain:
        if is_torch_class(type(ancestor)):
            continue
        cls = type(ancestor).__qualname__
        reads = forward_reads(type(ancestor))
        if reads is None:
            return Reader("unavailable", f"the source of {cls} is unavailable")
        for owner, attr in reads:
            for sub, removed_attr in removed:
                if attr == removed_attr and (owner in owners | {"?"} if sub is None else owner == sub):
                    via = f"{owner}.{attr}" if sub is None else f"{sub}.{attr}"
                    return Reader("reads", f"{cls}.forward reads `{via}`")
        for owner, callee, fn, argument in forward_passes(type(ancestor)) or ():
            if owner not in owners and owner != "self":
                continue
            got = param_reads(fn, argument) if fn is not None else None
            if owner == "self":  # the model itself handed over: reads of `<arg>.<layer>.<attribute>` count
                if got is None:
                    continue  # not followed: a user function taking the model reads whatever it reads by name
                got = frozenset((None, attr) for sub, attr in got if sub in owners)
            handed = f"{cls}.forward passes self{'.' + owner.removesuffix('[]') if owner != 'self' else ''} to {callee}"
            if got is None:
                where = f" ({_source_file(fn)})" if fn is not None else ""
                return Reader("passed", f"{handed}{where}, whose source cannot be followed: it may read its weights")
            hit = sorted(f"{sub}.{attr}" if sub else attr for sub, attr in got & removed)
            if hit:
                return Reader("passed", f"{handed} ({_source_file(fn)}), which reads its `{hit[0]}`")
    return None
