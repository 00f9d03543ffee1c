"""The package's shape, checked from the source (nothing is imported): no import cycles, no private names imported
across modules, the per-layer buffer names spelled in ``dc_lightning/buffers.py`` only, torch's weight-layer types
named in ``dc_lightning/kinds.py`` only (the weight-kind registry), subcommands only in ``dc_lightning/cli/``, and the
editor view of the public API (``TYPE_CHECKING`` block) equal to the lazy map.

The import graph covers ``dc_lightning/**/*.py`` and ``kernels/*.py`` (installed as ``dc_lightning.kernels``) and
counts every import statement, also those inside functions (a lazy import still ties two modules together), but not
those under ``if TYPE_CHECKING:`` (never executed) and not the implicit import of a parent package.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "dc_lightning"
BUFFERS = f"{PKG}.buffers"
#: the buffer names of docs/DESIGN.md; only dc_lightning/buffers.py may spell them in code
BUFFER_NAME = re.compile(r"weight_(mask|codebook|assign)")
#: a string that *is* a buffer name or a state-dict key of one ("weight_mask", "fc1.weight_mask", ".weight_assign")
BUFFER_KEY = re.compile(r"[\w.]*(?<![A-Za-z0-9])weight_(mask|codebook|assign)")
#: modules that hold algorithms, the file format or inference: no argparse, no Hydra, no dc_lightning.pipeline.config
LIBRARY = (
    "buffers",
    "pruning",
    "quantization",
    "dcz",
    "io",
    "report",
    "inference",
    "kernels",
)
FRAMEWORK_IMPORTS = ("argparse", "hydra", "omegaconf", f"{PKG}.pipeline.config")
KINDS = f"{PKG}.kinds"
#: torch's weight-layer classes (those dc_lightning/kinds.py registers, and their relatives). Using one as a value
#: (isinstance/issubclass, a type table, a class attribute; not constructing one, not a type hint) is weight-kind
#: knowledge, which belongs in the registry
TORCH_LAYER = re.compile(
    r"(Lazy)?(Linear|Bilinear|NonDynamicallyQuantizableLinear|Conv(Transpose)?[123]d|_Conv(Transpose)?Nd|"
    r"Embedding(Bag)?|MultiheadAttention|RNNBase|RNNCellBase|(LSTM|GRU|RNN)(Cell)?)"
)
#: the modules besides kinds.py and the model definitions (dc_lightning/models/) that may name torch layer types, with
#: the reason; at most 2, so that kinds.py and they make at most 3
TORCH_TYPE_USERS = {
    f"{PKG}.module": "ClassifierModule reads the class count from the model's last nn.Linear (a model convention)",
    f"{PKG}.pruning.dropout": "[NIPS] §3.2 lowers the rate of the nn.Dropout right before a pruned nn.Linear, by "
    "that layer type and position (an fc-family Embedding or LSTM after a Dropout is not what the rule is about)",
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":  # kernels/ ships as dc_lightning.kernels (pyproject package-dir)
        parts = [PKG, *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, tuple[Path, ast.Module]]:
    files = [p for p in (ROOT / PKG).rglob("*.py") if "kernels" not in p.relative_to(ROOT / PKG).parts]
    files += sorted((ROOT / "kernels").rglob("*.py"))
    return {_module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(files)}


SOURCES = _sources()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _walk_runtime(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _resolve_from(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = SOURCES[module][0].name == "__init__.py"
    base = module.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, tree: ast.Module | None = None) -> list[tuple[str, list[ast.alias], int]]:
    """``(imported module, names taken from it, line)`` for every runtime import statement of ``module``."""
    out = []
    for node in _walk_runtime(SOURCES[module][1] if tree is None else tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((_resolve_from(module, node), node.names, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    """Internal import edges: ``from pkg import sub`` names the submodule ``pkg.sub`` when that is a module."""
    graph: dict[str, set[str]] = {m: set() for m in SOURCES}
    for module in SOURCES:
        for target, names, _ in _imports(module):
            subs = [f"{target}.{a.name}" for a in names if f"{target}.{a.name}" in SOURCES]
            graph[module].update(subs)
            if target in SOURCES and (not names or len(subs) < len(names)):
                graph[module].add(target)
        graph[module].discard(module)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _torch_layer_uses(tree: ast.Module) -> list[tuple[int, str]]:
    """``(line, class name)`` of every use of a torch weight-layer class as a value: ``nn.Linear``,
    ``torch.nn.Conv2d``, ``nn.modules.conv._ConvNd`` or a name imported from ``torch.nn``, except as the callee of a
    call (constructing one) and inside annotations."""
    modules, classes = set(), {}  # local names bound to torch / torch.nn modules, to torch.nn classes
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch" or a.name.startswith("torch."):
                    modules.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch" and not node.level:
            for a in node.names:
                (classes.__setitem__(a.asname or a.name, a.name) if TORCH_LAYER.fullmatch(a.name)
                 else modules.add(a.asname or a.name))
    skip: set[int] = set()
    for node in ast.walk(tree):
        parts = []
        if isinstance(node, ast.Call):
            parts.append(node.func)
        elif isinstance(node, ast.AnnAssign):
            parts.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            every = args.posonlyargs + args.args + args.kwonlyargs + [a for a in (args.vararg, args.kwarg) if a]
            parts += [a.annotation for a in every if a.annotation is not None]
            parts += [node.returns] if node.returns is not None else []
        skip.update(id(n) for part in parts for n in ast.walk(part))
    hits = []
    for node in ast.walk(tree):
        if id(node) in skip or isinstance(node, ast.ImportFrom):
            continue
        if isinstance(node, ast.Attribute) and TORCH_LAYER.fullmatch(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in modules:
                hits.append((node.lineno, node.attr))
        elif isinstance(node, ast.Name) and node.id in classes:
            hits.append((node.lineno, classes[node.id]))
    return hits


def _in(module: str, group: str) -> bool:
    return module == f"{PKG}.{group}" or module.startswith(f"{PKG}.{group}.")


# ------------------------------------------------------------------------------------------------------ tests


def test_the_scan_sees_the_package() -> None:
    seen = {f"{PKG}.buffers", f"{PKG}.io", f"{PKG}.dcz.encode", f"{PKG}.cli", f"{PKG}.kernels.sparse.op"}
    assert seen <= set(SOURCES)
    graph = _graph()
    assert f"{PKG}.buffers" in graph[f"{PKG}.pruning.masks"]  # `from dc_lightning import buffers` is an edge
    assert f"{PKG}.dcz.container" in graph[f"{PKG}.dcz.encode"]


def test_the_checks_catch_what_they_look_for() -> None:
    """The detectors themselves, on small graphs and snippets (so a green run means something)."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    for text, hit in [
        ('x = "weight_mask"', True),
        ('k = f"{name}.weight_assign"', True),
        ("getattr(m, 'weight_codebook', None)", True),
        ("m.weight_mask.sum()", True),
        ('raise ValueError("weights outside the mask")', False),
        ('hp["codebook_weight_decay"] = 0', False),
    ]:
        assert bool(_buffer_name_uses(ast.parse(text))) is hit, text
    for text, hit in [
        ("from dc_lightning.io import _read_header", True),
        ("from dc_lightning import io\nio._stream(1)", True),
        ("from dc_lightning.kernels.sparse import op as E\nE._auto_chunk(1)", True),
        ("import dc_lightning.io as dio\ndio._MASK", True),
        ("from dc_lightning import __version__, io\nio.save_compressed", False),
        ("import numpy as np\nnp._private", False),
    ]:
        assert bool(_private_uses(f"{PKG}.probe", ast.parse(text))) is hit, text
    for text, hit in [
        ("from torch import nn\nisinstance(m, nn.Linear)", True),
        ("import torch\nissubclass(t, torch.nn.Conv2d)", True),
        ("from torch import nn\nFC_LIKE = (nn.Embedding, nn.LSTM)", True),
        ("from torch import nn\nTYPES = {nn.GRU: 1}", True),
        ("from torch import nn\nconv = nn.modules.conv._ConvNd", True),
        ("from torch.nn import MultiheadAttention as MHA\nisinstance(m, MHA)", True),
        ("from torch import nn\nclass C:\n    torch_type = nn.RNN", True),
        ("from torch import nn\nsame = type(m).forward is nn.Linear.forward", True),
        ("from torch import nn\nlin = nn.Linear(3, 2)", False),
        ("from torch import nn\ndef f(m: nn.Linear, *a: nn.GRU) -> type[nn.Embedding]: ...", False),
        ("from torch import nn\nt: type[nn.RNNBase]", False),
        ("from torch import nn\nisinstance(m, (nn.Sequential, nn.ReLU, nn.TransformerEncoderLayer))", False),
        ("nn = object()\nnn.Linear", False),
    ]:
        assert bool(_torch_layer_uses(ast.parse(text))) is hit, text


def test_no_import_cycle() -> None:
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_name_crosses_a_module() -> None:
    """``from dc_lightning.x import _name`` and ``x._name`` on an imported dc_lightning module are both refused."""
    bad = [f"{path.name}:{where}" for module, (path, tree) in SOURCES.items() for where in _private_uses(module, tree)]
    assert not bad, bad


def _private_uses(module: str, tree: ast.Module) -> list[str]:
    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    bad = []
    aliases: set[str] = set()  # local names bound to dc_lightning modules
    for target, names, line in _imports(module, tree):
        if not target.startswith(PKG):
            continue
        for a in names:
            if f"{target}.{a.name}" in SOURCES:
                aliases.add(a.asname or a.name)
            elif private(a.name):
                bad.append(f"{line} imports {a.name} from {target}")
    for node in _walk_runtime(tree):
        if isinstance(node, ast.Import):
            aliases.update(a.asname for a in node.names if a.asname and a.name.startswith(PKG))
    for node in _walk_runtime(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if private(node.attr):
                bad.append(f"{node.lineno} uses {node.value.id}.{node.attr}")
    return bad


def _buffer_name_uses(tree: ast.AST) -> list[tuple[int, str]]:
    docs = _docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if BUFFER_KEY.fullmatch(node.value.strip()):
                hits.append((node.lineno, repr(node.value)))
        elif isinstance(node, ast.Attribute) and BUFFER_NAME.fullmatch(node.attr):
            hits.append((node.lineno, "." + node.attr))
    return hits


def test_buffer_names_are_spelled_in_buffers_only() -> None:
    """Code outside dc_lightning/buffers.py neither writes a buffer name as a string nor reads one as an attribute
    (messages and docstrings may mention them)."""
    bad = [
        f"{path.name}:{line} {what}"
        for module, (path, tree) in SOURCES.items()
        if module != BUFFERS
        for line, what in _buffer_name_uses(tree)
    ]
    assert not bad, bad


def test_torch_layer_types_are_named_in_kinds_only() -> None:
    """Only dc_lightning/kinds.py uses torch's weight-layer classes as values; besides it, the model definitions
    (dc_lightning/models/) and the modules of :data:`TORCH_TYPE_USERS` (at most 3 modules in all), which must still
    need their entry. The inference modules check a direct call by the torch type's contract, not its class."""
    assert len(TORCH_TYPE_USERS) <= 2, "the weight-kind registry is the place for this knowledge"
    bad, used = [], set()
    for module, (path, tree) in SOURCES.items():
        if module == KINDS or _in(module, "models"):
            continue
        hits = _torch_layer_uses(tree)
        if module in TORCH_TYPE_USERS:
            used.update([module] if hits else [])
            continue
        bad += [f"{path.relative_to(ROOT)}:{line} uses {name}" for line, name in hits]
    assert not bad, bad
    assert used == set(TORCH_TYPE_USERS), f"stale TORCH_TYPE_USERS entries: {set(TORCH_TYPE_USERS) - used}"


def test_subcommands_live_in_the_cli_package() -> None:
    bad = []
    for module, (path, tree) in SOURCES.items():
        if _in(module, "cli"):
            continue
        bad += [
            f"{path.name}:{n.lineno} defines {n.name}"
            for n in tree.body
            if isinstance(n, ast.FunctionDef) and n.name.startswith("cli_")
        ]
        if any(_in(module, group) for group in LIBRARY):
            bad += [
                f"{path.name}:{line} imports {target}"
                for target, _, line in _imports(module)
                if any(target == f or target.startswith(f + ".") for f in FRAMEWORK_IMPORTS)
            ]
    assert not bad, bad


@pytest.mark.parametrize("module", [f"{PKG}.cli.{m}" for m in ("export", "inspect", "predict", "sensitivity")])
def test_each_subcommand_module_exists(module: str) -> None:
    assert module in SOURCES


def test_type_checking_block_matches_the_lazy_map() -> None:
    """Editors see (``if TYPE_CHECKING:``) exactly the names ``__getattr__`` serves, from the same modules."""
    _, tree = SOURCES[PKG]
    exports = next(
        ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.target.id == "_EXPORTS"
    )
    block = next(n for n in tree.body if isinstance(n, ast.If) and _is_type_checking(n))
    seen = {a.asname or a.name: n.module for n in block.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert seen == exports


def test_every_package_folder_is_installed() -> None:
    """A folder with an ``__init__.py`` that pyproject's ``packages`` list lacks is missing from a wheel install."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_module_name(p) for p in (ROOT / PKG).rglob("__init__.py") if "kernels" not in p.relative_to(ROOT).parts}
    found |= {_module_name(p) for p in (ROOT / "kernels").rglob("__init__.py")}
    assert found == listed, f"not listed: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"
