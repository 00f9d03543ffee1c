"""The public API: every exported name resolves, imports stay lazy, the console script answers."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dc_lightning
from dc_lightning.cli import SUBCOMMANDS, main


def test_every_public_name_resolves():
    names = [n for n in dc_lightning.__all__ if n != "__version__"]
    assert {"MagnitudePruning", "TrainedQuantization", "CompressedCheckpoint", "save_compressed", "load_compressed",
            "to_compressed_inference", "CompressedLinear", "kmeans_1d", "compression_report"} <= set(names)
    for name in names:
        assert getattr(dc_lightning, name) is not None, name


def test_import_is_lazy():
    code = "import sys, dc_lightning; print('lightning' in sys.modules, 'triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_console_script_help(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in SUBCOMMANDS)
    assert main(["nonsense"]) == 2
    assert "valid commands" in capsys.readouterr().err
    for name, (module, _) in SUBCOMMANDS.items():  # every subcommand's handler exists
        mod = __import__(module, fromlist=["_"])
        assert callable(getattr(mod, f"cli_{name}")), name


# ------------------------------------------------------------- one home per name: __all__ lists what a module defines

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":  # kernels/ ships as dc_lightning.kernels
        parts = ["dc_lightning", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    files = [p for p in (ROOT / "dc_lightning").rglob("*.py") if "kernels" not in p.relative_to(ROOT).parts[1:2]]
    files += (ROOT / "kernels").rglob("*.py")
    return {_module_name(p): p for p in sorted(files)}


def _top_level(body: list[ast.stmt]):
    """The module-level statements, those under ``if``/``try``/``with`` included (not those inside functions)."""
    for node in body:
        yield node
        for field in ("body", "orelse", "finalbody"):
            if isinstance(node, (ast.If, ast.Try, ast.With)):
                yield from _top_level(getattr(node, field, []))
        for handler in getattr(node, "handlers", []):
            yield from _top_level(handler.body)


def undefined_in_all(module: str, source: str, is_package: bool) -> list[str]:
    """The names ``__all__`` lists that ``module`` does not define: a def, class or assignment of its own; for a
    package, also a name imported from one of its own submodules (a package's ``__init__`` is its public face)."""
    defined, listed = set(), []
    for node in _top_level(ast.parse(source).body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        defined.add(name.id)
                        if name.id == "__all__" and isinstance(node.value, (ast.List, ast.Tuple)):
                            listed = [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
        elif isinstance(node, ast.ImportFrom) and is_package:
            origin = node.module or ""
            if node.level == 1 or origin.startswith(module + "."):
                defined.update(a.asname or a.name for a in node.names)
    return [name for name in listed if name not in defined]


def test_the_all_check_catches_a_reexport():
    src = "from dc_lightning.buffers import get_mask\nfrom .x import y\ndef f(): pass\n"
    src += "__all__ = ['f', 'get_mask', 'y']\n"
    assert undefined_in_all("dc_lightning.pkg", src, is_package=False) == ["get_mask", "y"]
    assert undefined_in_all("dc_lightning.pkg", src, is_package=True) == ["get_mask"]
    assert undefined_in_all("dc_lightning.pkg", "try:\n    A = 1\nexcept ImportError:\n    A = 0\n__all__ = ['A']\n",
                            is_package=False) == []


@pytest.mark.parametrize("module", list(_modules()))
def test_all_lists_only_names_the_module_defines(module):
    path = _modules()[module]
    assert undefined_in_all(module, path.read_text(), path.name == "__init__.py") == []
