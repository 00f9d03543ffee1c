"""The LUT layout's CPU product in word order (``kernels/lut/layout.lut_linear_reference`` for 2- and 4-bit codes):
its decode against the column-order decode bit for bit, its column map, and the product against float64.

The word-order decode gathers one table entry per code byte (the byte ORed with its bitmap bits, folded by a
bit-matrix transpose of the bitmap): every cbits, both encodings of pruned positions, odd shapes (padded groups),
codebooks holding -0.0, row subsets.
"""

from __future__ import annotations

import pytest
import torch

from dc_lightning.kernels.lut import layout as lut
from dc_lightning.kernels.lut.layout import WORDS_PER_GROUP, decode_dense_lut, lut_linear_reference, pack_lut


def layer(n: int, k: int, density: float, n_centroids: int, seed: int, **opts):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(n, k, generator=g) < density
    rows, cols = keep.nonzero(as_tuple=True)
    codes = torch.randint(0, n_centroids, (rows.numel(),), generator=g)
    codebook = torch.randn(n_centroids, generator=g)
    codebook[0] = -0.0 if n_centroids > 1 else codebook[0]
    dense = torch.zeros(n, k, dtype=torch.float64)
    dense[rows, cols] = codebook.double()[codes]
    return pack_lut(n, k, rows, cols, codes, codebook, **opts), dense


def word_order_as_columns(p) -> torch.Tensor:
    """The word-order decode scattered back to column order with the public column map."""
    w = lut._decode_word_order(p, p.codes.shape[0])
    cols = lut.word_order_columns(p.cbits, p.n_groups)
    out = torch.empty_like(w)
    out[:, cols] = w
    return out[:, : p.in_features]


ENCODINGS = [(4, {"bitmap": True}), (3, {"bitmap": False}), (4, {}), (16, {"bitmap": True}), (15, {}),
             (256, {"bitmap": True}), (200, {}), (100, {"bitmap": True})]  # fmt: skip


@pytest.mark.parametrize("n,k", [(1, 1), (3, 5), (37, 91), (64, 300), (129, 257), (20, 1030)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("n_centroids,opts", ENCODINGS)
def test_word_order_decode_is_the_column_decode_bit_for_bit(n, k, density, n_centroids, opts):
    if density >= 1.0 and opts.get("bitmap") is False:
        opts = {}
    p, dense = layer(n, k, density, n_centroids, seed=n * 31 + k + n_centroids, **opts)
    got = word_order_as_columns(p)
    want = decode_dense_lut(p)
    assert torch.equal(got.view(torch.int32), want.contiguous().view(torch.int32))  # sign of zero included
    assert torch.equal(got.double(), dense)


def test_word_order_columns_is_a_permutation_matching_the_word_layout():
    for cbits in (2, 4, 8):
        pw = 32 // cbits
        cols = lut.word_order_columns(cbits, 3)
        assert torch.equal(cols.sort().values, torch.arange(3 * WORDS_PER_GROUP * pw))
        # position ((g * 32 + j) * 4 + b) * cpb + u is column g * G + (b * cpb + u) * 32 + j
        cpb = 8 // cbits
        g, j, b, u = 2, 5, 3, cpb - 1
        assert cols[((g * 32 + j) * 4 + b) * cpb + u] == g * 32 * pw + (b * cpb + u) * 32 + j


@pytest.mark.parametrize("batch", [1, 3, 64])
@pytest.mark.parametrize("n_centroids,opts", [(4, {"bitmap": True}), (16, {"bitmap": True}), (15, {}), (3, {})])
@pytest.mark.parametrize("force", [False, True])
def test_word_order_product_matches_float64(batch, n_centroids, opts, force, monkeypatch):
    if force:  # small shapes, odd ones, through the word-order path
        monkeypatch.setattr(lut, "WORD_ORDER_MIN", 0)
        shapes = [(1, 1), (37, 91), (129, 257), (20, 1030)]
    else:  # above the size threshold: the default path takes word order
        shapes = [(300, 1030)]
    g = torch.Generator().manual_seed(batch + n_centroids)
    for n, k in shapes:
        p, dense = layer(n, k, 0.5, n_centroids, seed=n + k, **opts)
        assert p.cbits < 8 and (force or n * p.n_groups * p.group_cols >= lut.WORD_ORDER_MIN)
        x = torch.randn(batch, k, generator=g)
        bias = torch.randn(n, generator=g)
        got = lut_linear_reference(x, p, bias, relu=True)
        want = torch.relu(x.double() @ dense.T + bias.double())
        assert got.dtype == torch.float32 and got.shape == (batch, n)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * (1 + want.abs().max().item()))


def test_word_order_product_keeps_dtype_and_grad():
    p, dense = layer(300, 1030, 0.3, 16, seed=5, bitmap=True)
    x = torch.randn(2, 1030, dtype=torch.float64, requires_grad=True)
    y = lut_linear_reference(x, p)
    assert y.dtype == torch.float64
    y.sum().backward()
    assert torch.allclose(x.grad, dense.sum(0).expand(2, -1).to(x.grad.dtype), rtol=1e-5, atol=1e-5)
