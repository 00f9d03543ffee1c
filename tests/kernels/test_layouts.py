"""The layout registry (``dc_lightning.kernels.layouts``): every entry against a float64 reference, the modules that
are generic over it, and the rule that only ``kernels/layouts.py`` tests the class of a packed layer."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from dc_lightning.inference.embedding import CompressedEmbedding
from dc_lightning.inference.linear import CompressedLinear
from dc_lightning.kernels import layouts, runtime
from dc_lightning.kernels.layouts import REGISTRY
from dc_lightning.kernels.sparse import layout as sparse_layout

ROOT = Path(__file__).resolve().parents[2]
NAMES = list(REGISTRY)
# (out, in, density, bits): a single weight, an all-pruned layer, odd shapes, 8-bit codes, a dense 2-bit layer
SHAPES = [(1, 1, 1.0, 1), (7, 13, 0.0, 3), (19, 77, 0.3, 4), (33, 300, 0.05, 8), (40, 70, 1.0, 2)]


def _layer(n: int, k: int, density: float, bits: int, seed: int = 0):
    """Random kept weights ``(rows, cols, codes, codebook)`` (shuffled coordinates) and their float64 dense matrix."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, k, generator=g) < density
    rows, cols = mask.nonzero(as_tuple=True)
    perm = torch.randperm(rows.numel(), generator=g)  # packers must not rely on the input order
    rows, cols = rows[perm], cols[perm]
    codes = torch.randint(0, 2**bits, (rows.numel(),), generator=g)
    codebook = torch.randn(2**bits, generator=g)
    dense = torch.zeros(n, k, dtype=torch.float64)
    dense[rows, cols] = codebook.double()[codes]
    return rows, cols, codes, codebook, dense


def _pack(name: str, n: int, k: int, density: float, bits: int, seed: int = 0):
    rows, cols, codes, codebook, dense = _layer(n, k, density, bits, seed)
    if name == "codes" and bits == 8 and density < 1.0:  # 256 centroids leave no code for the pruned zeros
        with pytest.raises(ValueError, match="needs a free code for pruned weights; the codebook has 256"):
            REGISTRY[name].pack(n, k, rows, cols, codes, codebook)
        pytest.skip("the codes layout cannot hold a pruned table with 256 centroids (checked above)")
    if name == "tc" and codebook.numel() + (rows.numel() < n * k) > 16:  # 16 entries, the zero code included
        with pytest.raises(ValueError, match=r"the tc layout holds 16 table entries .* has \d+ centroids"):
            REGISTRY[name].pack(n, k, rows, cols, codes, codebook)
        keep = 16 - (rows.numel() < n * k)  # the same layer on a codebook that fits
        codes, codebook = codes % keep, codebook[:keep]
        dense = torch.zeros(n, k, dtype=torch.float64)
        dense[rows, cols] = codebook.double()[codes]
    packed = REGISTRY[name].pack(n, k, rows, cols, codes, codebook)
    assert packed.nnz == rows.numel()
    return packed, dense


def _copy(packed):
    """A packed layer with its own copies of the tensors."""
    return dataclasses.replace(packed, **{k: t.clone() for k, t in packed.tensors().items()})


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    diff, scale = (y.double() - ref).norm().item(), ref.norm().item()
    return diff / scale if scale else diff


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}_d{d}_b{b}" for n, k, d, b in SHAPES])
@pytest.mark.parametrize("name", NAMES)
def test_every_layout_roundtrips_against_float64(name: str, shape: tuple) -> None:
    """pack -> decode is the dense matrix bit for bit; reference(x) and the layout's op equal x @ W.T in float64."""
    n, k, density, bits = shape
    spec = REGISTRY[name]
    p, dense = _pack(name, n, k, density, bits, seed=n * k)
    assert layouts.layout_of(p) == name and layouts.spec_of(p) is spec
    assert torch.equal(layouts.decode_dense(p).double(), dense)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, k, generator=g)
    bias = torch.randn(n, generator=g)
    ref = torch.relu(x.double() @ dense.T + bias.double())
    assert _rel(layouts.reference(x, p, bias, relu=True), ref) <= 1e-5
    assert _rel(layouts.linear(x, p, bias, relu=True), ref) <= 1e-5  # the registered op's CPU path
    assert _rel(layouts.linear(x, p), x.double() @ dense.T) <= 1e-5
    if spec.rows is not None:
        idx = torch.tensor([n - 1, 0, n // 2, 0])
        assert torch.equal(layouts.rows(p, idx).double(), dense[idx])
    else:
        with pytest.raises(ValueError, match="has no row lookup"):
            layouts.rows(p, torch.tensor([0]))


@pytest.mark.parametrize("name", NAMES)
def test_compressed_linear_is_generic_over_the_registry(name: str) -> None:
    """Any registered layout runs, reports, saves and loads in a CompressedLinear under its entry's buffer names."""
    spec = REGISTRY[name]
    p, dense = _pack(name, 19, 77, 0.3, 4)
    bias = torch.randn(19)
    layer = CompressedLinear(p, bias, relu=True)
    x = torch.randn(6, 77)
    assert _rel(layer(x), torch.relu(x.double() @ dense.T + bias.double())) <= 1e-5
    assert layer.layout == name and layer.layout_names == (name,)
    assert torch.equal(layer.dense_weight().double(), dense)
    held = [b for b, t in spec.tensors(p).items() if t is not None]
    assert list(layer.state_dict()) == [*held, "bias", "_extra_state"]
    assert f"layouts=[{spec.describe(p)}]" in repr(layer)
    clone = CompressedLinear(_copy(p), bias.clone(), relu=False)
    for t in clone.buffers():
        t.zero_()
    clone.load_state_dict(layer.state_dict())
    assert clone.relu and torch.equal(clone(x), layer(x))
    with pytest.raises(ValueError, match=f"holds no {'lut' if name != 'lut' else 'sparse'} layout"):
        layer.packed("lut" if name != "lut" else "sparse")


@pytest.mark.parametrize("name", layouts.row_layouts())
def test_compressed_embedding_is_generic_over_the_row_layouts(name: str) -> None:
    p, dense = _pack(name, 30, 13, 0.3, 3)
    emb = CompressedEmbedding(p, padding_idx=2)
    ids = torch.tensor([[2, 0, 29], [5, 2, 17]])
    assert torch.equal(emb(ids).double(), dense[ids])
    held = [b for b, t in REGISTRY[name].tensors(p).items() if t is not None]  # the LUT's bitmap may be absent
    assert emb.layout == name and list(emb.state_dict()) == [*held, "_extra_state"]


def test_row_layouts_and_embedding_reject_matrix_layouts() -> None:
    assert set(layouts.row_layouts()) == {"lut", "tc", "ell", "codes"}  # lut, tc: rows of a tied output layer
    p, _ = _pack("sparse", 9, 20, 0.3, 2)
    with pytest.raises(ValueError, match=r"must be one of the row layouts \['lut', 'tc', 'ell', 'codes'\], got .sp"):
        CompressedEmbedding(p)


def test_registry_lookups_reject_unknown_names_and_objects() -> None:
    with pytest.raises(ValueError, match=r"unknown layout 'bitmap'; registered layouts: \['sparse', 'lut'"):
        layouts.spec("bitmap")
    assert layouts.spec(layouts.Layout.LUT) is REGISTRY["lut"]
    with pytest.raises(TypeError, match="expected a packed layer of a registered layout .* got Tensor"):
        layouts.spec_of(torch.zeros(1))


@pytest.mark.parametrize("name", ["sparse", "lut"])
def test_cpu_path_decodes_once_then_f_linear(name: str, monkeypatch) -> None:
    """On the CPU a CompressedLinear call decodes its weight once and multiplies with torch's own ``F.linear``; a
    sparse layer multiplies small batches straight from its entries instead (``sparse.layout.use_product``)."""
    lin = nn.Linear(64, 32)
    layer = CompressedLinear.from_linear(_with_codebook(lin), layout=name, alternate=False)
    spec, calls = REGISTRY[name], []
    decode_module = __import__(spec.decode.__module__, fromlist=["_"])
    real_decode, real_linear = spec.decode, runtime.F.linear
    monkeypatch.setattr(decode_module, spec.decode.__name__, lambda p: calls.append("decode") or real_decode(p))
    monkeypatch.setattr(runtime.F, "linear", lambda *a: calls.append("F.linear") or real_linear(*a))
    from_entries = [name == "sparse" and sparse_layout.use_product(layer.packed(), b) for b in (4, 200)]
    assert from_entries == [name == "sparse", False]
    for batch, direct in zip((4, 200), from_entries, strict=True):
        calls.clear()
        x = torch.randn(batch, 64)
        assert _rel(layer(x), x.double() @ lin.weight.double().T + lin.bias.double()) <= 1e-5
        assert calls == ([] if direct else ["decode", "F.linear"]), batch


def _with_codebook(lin: nn.Linear) -> nn.Linear:
    from dc_lightning import buffers

    g = torch.Generator().manual_seed(0)
    mask = torch.rand(lin.weight.shape, generator=g) < 0.5
    cb = torch.linspace(-1, 1, 16)
    assign = torch.randint(0, 16, lin.weight.shape, generator=g, dtype=torch.uint8)
    buffers.set_mask(lin, mask)
    buffers.set_codebook(lin, cb, assign)
    with torch.no_grad():
        lin.weight.copy_(torch.where(mask, cb[assign.long()], 0.0))
    return lin


# ----------------------------------------------------------------------------------- one place tests packed classes


def _library_sources() -> dict[str, ast.Module]:
    files = [p for p in (ROOT / "dc_lightning").rglob("*.py") if "kernels" not in p.relative_to(ROOT).parts]
    files += list((ROOT / "kernels").rglob("*.py"))
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text(), str(p)) for p in sorted(files)}


def _names(node: ast.AST) -> set[str]:
    """Class names an isinstance/type-test argument mentions (``EIEPacked``, ``layout.EIEPacked``, tuples of them)."""
    found = (n for n in ast.walk(node) if isinstance(n, ast.Name | ast.Attribute))
    return {n.id if isinstance(n, ast.Name) else n.attr for n in found}


def _type_tests(tree: ast.AST, classes: set[str]) -> list[int]:
    """Lines of ``isinstance``/``issubclass`` calls, ``type(x) is/== C`` comparisons and ``case C():`` patterns
    against any of ``classes``."""
    def call_of(node: ast.AST, *funcs: str) -> bool:
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in funcs

    lines = []
    for node in ast.walk(tree):
        if call_of(node, "isinstance", "issubclass") and len(node.args) == 2 and _names(node.args[1]) & classes:
            lines.append(node.lineno)
        elif isinstance(node, ast.Compare) and any(call_of(s, "type") for s in [node.left, *node.comparators]):
            if any(_names(c) & classes for c in [node.left, *node.comparators] if not call_of(c, "type")):
                lines.append(node.lineno)
        elif isinstance(node, ast.MatchClass) and _names(node.cls) & classes:
            lines.append(node.lineno)
    return lines


def _packed_classes(sources: dict[str, ast.Module]) -> set[str]:
    """Every class of the library deriving (directly) from ``PackedLayer``."""
    return {
        node.name
        for tree in sources.values()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and any("PackedLayer" in _names(b) for b in node.bases)
    }


def test_type_tests_find_what_they_should() -> None:
    classes = {"EIEPacked", "RowELL"}
    code = "isinstance(p, (int, layout.EIEPacked))\ntype(p) is RowELL\nmatch p:\n    case EIEPacked():\n        pass\n"
    assert _type_tests(ast.parse(code), classes) == [1, 2, 4]
    fine = "isinstance(p, spec.packed)\ntype(p) is int\nisinstance(p, EIEPackedX)"
    assert _type_tests(ast.parse(fine), classes) == []


def test_every_packed_class_is_registered_and_type_tested_in_layouts_only() -> None:
    sources = _library_sources()
    classes = _packed_classes(sources)
    assert classes == {s.packed.__name__ for s in REGISTRY.values()}, "a PackedLayer subclass outside the registry"
    found = {path: lines for path, tree in sources.items() if (lines := _type_tests(tree, classes | {"PackedLayer"}))}
    outside = {path: lines for path, lines in found.items() if path != "kernels/layouts.py"}
    assert not outside, f"test the class of a packed layer through kernels/layouts.py (spec_of), not in {outside}"
