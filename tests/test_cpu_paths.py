"""The CPU reference paths that avoid a dense decode (issue 22): the sparse layout's product straight from its entries
(``kernels/sparse/layout.sparse_product``) against a float64 reference on every branch, and the ``ell`` row lookup
bit for bit against the dense table on the rows that trip a padding mask (empty rows, a kept column 0)."""

from __future__ import annotations

import compressed_zoo as zoo
import pytest
import torch
from torch import nn

from dc_lightning.kernels.rows import layout as rows_layout
from dc_lightning.kernels.sparse import layout as sparse_layout

# (out, in, density, centroids, chunk, row_tile): one weight, an all-pruned layer, a partial last row tile, 8-bit
# codes (32-bit entries), several chunks, 16-bit words with the top bit set (chunk 2048, 4-bit codes), row_tile 1 / 128
SHAPES = [
    (1, 1, 1.0, 1, None, None),
    (7, 13, 0.0, 8, None, None),
    (19, 77, 0.3, 16, None, None),
    (33, 300, 0.05, 256, None, None),
    (37, 4100, 0.2, 16, 4096, 8),
    (100, 5000, 0.1, 16, 2048, None),
    (50, 3000, 0.3, 16, 16, 1),
    (64, 64, 0.5, 2, 16, 128),
]
# batches on the table branch (batch << code_shift <= TABLE_MAX with 4-bit codes), past it, and a large one
BATCHES = (1, 2, 4, 5, 17, 64)


def _layer(n: int, k: int, density: float, centroids: int, chunk: int | None, row_tile: int | None, seed: int):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, k, generator=g) < density
    rows, cols = mask.nonzero(as_tuple=True)
    codes = torch.randint(0, centroids, (rows.numel(),), generator=g)
    codebook = torch.randn(centroids, generator=g)
    dense = torch.zeros(n, k, dtype=torch.float64)
    dense[rows, cols] = codebook.double()[codes]
    packed = sparse_layout.pack(n, k, rows, cols, codes, codebook, chunk=chunk, row_tile=row_tile)
    return packed, dense


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    diff, scale = (y.double() - ref).norm().item(), ref.norm().item()
    return diff / scale if scale else diff


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}x{s[1]}_d{s[2]}_c{s[3]}" for s in SHAPES])
def test_sparse_product_matches_float64_on_every_branch(shape: tuple) -> None:
    packed, dense = _layer(*shape, seed=shape[0] * shape[1])
    assert torch.equal(sparse_layout.decode_dense(packed).double(), dense)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(packed.out_features, generator=g)
    for batch in BATCHES:
        x = torch.randn(batch, packed.in_features, generator=g)
        y = sparse_layout.sparse_product(x, packed)
        assert y.dtype == torch.float32 and tuple(y.shape) == (batch, packed.out_features)
        assert _rel(y, x.double() @ dense.T) <= 1e-5, batch
        got = sparse_layout.eie_linear_reference(x, packed, bias, relu=True)
        assert got.is_contiguous() and _rel(got, torch.relu(x.double() @ dense.T + bias.double())) <= 1e-5, batch
    # a strided bf16 input: products formed in fp32, the output in the input's dtype
    x = torch.randn(packed.in_features, 3, generator=g).to(torch.bfloat16).t()
    got = sparse_layout.eie_linear_reference(x, packed)
    assert got.dtype == torch.bfloat16 and _rel(got, x.double() @ dense.T) <= 1e-2


def test_reference_multiplies_small_batches_from_the_entries_and_decodes_large_ones(monkeypatch) -> None:
    packed, dense = _layer(40, 200, 0.1, 16, None, None, seed=3)
    decodes = []
    real = sparse_layout.decode_dense
    monkeypatch.setattr(sparse_layout, "decode_dense", lambda p: decodes.append(p) or real(p))
    # the crossover: batch * entries <= PRODUCT_BUDGET * out * in
    limit = sparse_layout.PRODUCT_BUDGET * 40 * 200 // packed.entries.numel()
    assert limit > 1
    for batch, decoded in ((1, False), (limit, False), (limit + 1, True)):
        decodes.clear()
        x = torch.randn(batch, 200)
        assert _rel(sparse_layout.eie_linear_reference(x, packed), x.double() @ dense.T) <= 1e-5
        assert sparse_layout.use_product(packed, batch) is not decoded
        assert len(decodes) == int(decoded), batch
    assert sparse_layout.eie_linear_reference(torch.randn(0, 200), packed).shape == (0, 40)


def test_ell_rows_are_the_dense_rows_bit_for_bit() -> None:
    """Rows with no kept weight, rows keeping column 0, negative and zero centroids: the padding (column 0, the zero
    code) must add nothing."""
    g = torch.Generator().manual_seed(5)
    n, d = 12, 9
    mask = torch.rand(n, d, generator=g) < 0.4
    mask[3] = False  # an empty row
    mask[4, 0] = mask[5, 0] = True  # column 0 kept
    mask[6] = True  # a full row: no padding
    rows, cols = mask.nonzero(as_tuple=True)
    codebook = torch.tensor([-1.5, 0.0, 0.25, -0.0, 3.0])
    codes = torch.randint(0, 5, (rows.numel(),), generator=g)
    dense = torch.zeros(n, d)
    dense[rows, cols] = codebook[codes]
    packed = rows_layout.pack_ell(n, d, rows, cols, codes, codebook)
    assert packed.entries.shape == (2, n, d)  # the full row sets the width: every other row is padded
    assert packed.codebook.numel() == 6 and float(packed.codebook[-1]) == 0.0  # the padding's zero code
    idx = torch.tensor([3, 4, 5, 6, 0, 11, 3, 7])
    assert torch.equal(rows_layout.ell_rows(packed, idx), dense[idx])
    assert torch.equal(rows_layout.decode_ell(packed), dense)


def test_reference_is_differentiable_in_x() -> None:
    """Eager CPU calls reach the reference without the op (``LayoutSpec.run``): a product of an input that requires
    grad (a dense layer before the converted one) runs and back-propagates like ``F.linear`` of the decoded weight."""
    packed, dense = _layer(20, 50, 0.3, 16, None, None, seed=9)
    for batch in (1, 7):  # the table branch and the per-entry-weight branch
        x = torch.randn(batch, 50, requires_grad=True)
        y = sparse_layout.eie_linear_reference(x, packed, relu=False)
        (g,) = torch.autograd.grad(y.square().sum(), x)
        xd = x.detach().double().requires_grad_()
        (want,) = torch.autograd.grad((xd @ dense.T).square().sum(), xd)
        assert _rel(g, want) <= 1e-5, batch


def test_embedding_reuses_its_packed_view_until_the_buffers_change() -> None:
    """The lookup's packed dataclass is built once; ``.half()``, a loaded state dict and a buffer replaced by
    assignment are all seen by the next lookup (no stale tensors, no old copy kept alive after ``.to()``)."""
    from dc_lightning.inference.embedding import CompressedEmbedding

    emb = zoo.compress_all(nn.Embedding(40, 24), density=0.3, bits=4, seed=3)
    ce = CompressedEmbedding.from_module(emb, layout="ell")
    ids = torch.tensor([3, 0, 39, 3])
    assert torch.equal(ce(ids), emb(ids)) and ce.packed() is ce.packed()
    ce.half()
    assert "_packed_cache" not in ce.__dict__  # dropped by _apply: the fp32 buffers are not kept alive
    assert ce(ids).dtype == torch.float16 and torch.equal(ce(ids), emb(ids).half())
    ce.float()
    y = ce(ids)  # the fp16-rounded table, back in fp32
    ce.codebook = ce.codebook * 2  # replaced by assignment: caught by the identity check
    assert torch.equal(ce(ids), 2 * y)
    fresh = CompressedEmbedding.from_module(emb, layout="ell")
    fresh(ids)
    fresh.load_state_dict(ce.state_dict())
    assert torch.equal(fresh(ids), 2 * y)
