"""The CPU dense decodes of the sparse and LUT layouts against the decodes they replaced (kept here as references).

The decodes were rewritten for speed (issue 22: the CPU path decodes every matrix once per call); these tests pin
them BIT-identical (same float32 bit patterns, sign of zero included) to the previous implementations over odd
shapes, densities 0.01..1.0, codebooks of 1..256 centroids (1..8 bits, fp32), forced chunks and row tiles, both
encodings of pruned LUT positions (zero code, bitmap), and codebooks holding -0.0; and exact against a float64
scatter of the coordinates.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from dc_lightning.kernels.lut.layout import WORDS_PER_GROUP, decode_dense_lut, pack_lut
from dc_lightning.kernels.sparse.layout import _unpack_tensors, decode_dense, pack


def sparse_decode_before(p) -> Tensor:
    """The sparse layout's decode before issue 22 (per-entry int64 rows/cols into a chunk-padded matrix)."""
    rows, cols, codes = _unpack_tensors(p)
    n_rows = -(-p.out_features // p.row_tile) * p.row_tile
    n_cols = -(-p.in_features // p.chunk) * p.chunk
    w = torch.zeros(n_rows * n_cols, dtype=torch.float32)
    w.index_add_(0, rows * n_cols + cols, p.codebook.to(torch.float32)[codes])
    return w.view(n_rows, n_cols)[: p.out_features, : p.in_features]


def lut_decode_before(p) -> Tensor:
    """The LUT layout's decode before issue 22 (byte lookup tables, a permute, a bitmap product)."""
    n, cpb = p.out_features, 8 // p.cbits
    byte = torch.arange(256)
    table = p.codebook.to(torch.float32)[(byte[:, None] >> torch.arange(cpb) * p.cbits) & ((1 << p.cbits) - 1)]
    w = torch.nn.functional.embedding(p.codes.view(torch.uint8).view(n, -1, WORDS_PER_GROUP, 4).long(), table)
    w = w.permute(0, 1, 3, 4, 2).reshape(n, -1)
    if p.mask is not None:
        kept = ((byte[:, None] >> torch.arange(8)) & 1).to(torch.float32)
        w = w * torch.nn.functional.embedding(p.mask.view(torch.uint8).view(n, -1).long(), kept).view(n, -1)
    return w[:, : p.in_features]


def layer(n: int, k: int, density: float, n_centroids: int, seed: int, negative_zero: bool = False):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(n, k, generator=g) < density
    if density >= 1.0:
        keep[:] = True
    rows, cols = keep.nonzero(as_tuple=True)
    codes = torch.randint(0, n_centroids, (rows.numel(),), generator=g)
    codebook = torch.randn(n_centroids, generator=g)
    if negative_zero:
        codebook[0] = -0.0
    dense = torch.zeros(n, k, dtype=torch.float64)
    dense[rows, cols] = codebook.double()[codes]
    return rows, cols, codes, codebook, dense


def same_bits(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.int32),
                                                                     b.contiguous().view(torch.int32))  # fmt: skip


SHAPES = [(1, 1), (3, 5), (37, 91), (64, 300), (129, 257), (300, 1030)]
DENSITIES = [0.01, 0.1, 0.5, 0.9, 1.0]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_sparse_decode_matches_previous_bit_for_bit(n, k, density, bits):
    rows, cols, codes, codebook, dense = layer(n, k, density, 1 << bits, seed=n * 1000 + k + bits, negative_zero=True)
    for opts in ({}, {"row_tile": 1, "chunk": 16}, {"row_tile": 32, "chunk": 2048}):
        p = pack(n, k, rows, cols, codes, codebook, **opts)
        got = decode_dense(p)
        assert same_bits(got, sparse_decode_before(p)), (n, k, density, bits, opts)
        assert got.is_contiguous()
        assert torch.equal(got.double(), dense)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("n_centroids", [1, 2, 3, 4, 7, 15, 16, 17, 100, 255, 256])
def test_lut_decode_matches_previous_bit_for_bit(n, k, density, n_centroids):
    rows, cols, codes, codebook, dense = layer(n, k, density, n_centroids, seed=n * 7 + k + n_centroids,
                                               negative_zero=n_centroids > 1)  # fmt: skip
    encodings = [{}]
    if density < 1.0:  # both ways of marking pruned positions, where the codes fit
        encodings += [{"bitmap": True}] + ([{"bitmap": False}] if n_centroids < 256 else [])
    for opts in encodings:
        p = pack_lut(n, k, rows, cols, codes, codebook, **opts)
        got = decode_dense_lut(p)
        assert same_bits(got, lut_decode_before(p)), (n, k, density, n_centroids, opts)
        assert torch.equal(got.double(), dense)


def test_lut_bitmap_keeps_the_sign_of_pruned_zeros():
    # bitmap layout: pruned positions hold code 0; a negative codebook[0] times the 0 bit is -0.0, as before
    codebook = torch.tensor([-1.5, 2.0, 3.0, 4.0])
    p = pack_lut(2, 40, torch.tensor([0, 1]), torch.tensor([3, 39]), torch.tensor([1, 2]), codebook, bitmap=True)
    w = decode_dense_lut(p)
    assert w[0, 3] == 2.0 and w[1, 39] == 3.0
    assert torch.signbit(w[0, 0]) and torch.equal(w.abs().sum(), torch.tensor(5.0))
