"""Relative-index streams with fillers (DC §2) and the EIE interleaved CSC layout (EIE §III-B)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dc_lightning.dcz.relative_index import (
    decode_gaps,
    eie_layout,
    encode_gaps,
    positions_from_mask,
    positions_to_rows_cols,
)


def test_eie_paper_example_gaps():
    pos = np.array([2, 3, 22])  # [0,0,1,2,0*18,3]
    gaps = encode_gaps(pos, 4)
    assert gaps.tolist() == [2, 0, 15, 3]  # 15 = filler: skip 15 zeros, no weight
    assert decode_gaps(gaps, 4, 3, 23).tolist() == [2, 3, 22]


def test_gap_exactly_at_filler_boundary():
    m = 7  # index_bits=3
    pos = np.array([m - 1, m - 1 + m + 1, 100])  # gaps m-1 (fits), m (needs one filler + 0)
    gaps = encode_gaps(pos, 3)
    assert gaps.tolist()[:3] == [6, 7, 0]
    assert np.array_equal(decode_gaps(gaps, 3, 3, 101), pos)


def test_scan_order_is_row_major():
    mask = np.zeros((3, 4), bool)
    mask[2, 0] = mask[0, 1] = mask[1, 3] = True
    pos = positions_from_mask(mask)
    assert pos.tolist() == [1, 7, 8]
    r, c = positions_to_rows_cols(pos, 4)
    assert r.tolist() == [0, 1, 2] and c.tolist() == [1, 3, 0]


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.floats(0, 1), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_gap_round_trip(rows, cols, density, bits, seed):
    mask = np.random.default_rng(seed).random((rows, cols)) < density
    pos = positions_from_mask(mask)
    gaps = encode_gaps(pos, bits)
    assert gaps.max(initial=0) <= 2**bits - 1
    assert int((gaps != 2**bits - 1).sum()) == pos.size
    assert np.array_equal(decode_gaps(gaps, bits, pos.size, mask.size), pos)


def test_decode_rejects_inconsistent_streams():
    gaps = encode_gaps(np.array([1, 40]), 3)
    with pytest.raises(ValueError, match="nnz"):
        decode_gaps(gaps, 3, 3, 100)
    with pytest.raises(ValueError, match="past"):
        decode_gaps(gaps, 3, 2, 20)
    with pytest.raises(ValueError, match="filler"):
        decode_gaps(np.r_[gaps, 7], 3, 2, 100)
    with pytest.raises(ValueError, match="index_bits"):
        encode_gaps(np.array([1]), 0)


def _naive_eie(mask, codes, num_pe, bits):
    """Straight transcription of EIE §III-B: per PE, per column, z = zeros before, pad when z > 2**bits - 1."""
    rows, cols = mask.shape
    out = []
    for k in range(num_pe):
        v, z, ptr = [], [], [0]
        local_rows = list(range(k, rows, num_pe))
        for j in range(cols):
            zeros = 0
            for i in local_rows:
                if not mask[i, j]:
                    zeros += 1
                    continue
                while zeros > 2**bits - 1:
                    v.append(0), z.append(2**bits - 1)
                    zeros -= 2**bits
                v.append(int(codes[i, j])), z.append(zeros)
                zeros = 0
            ptr.append(len(v))
        out.append((v, z, ptr))
    return out


class _Layer:
    def __init__(self, mask, codes):
        pos = positions_from_mask(mask)
        self.rows, self.cols = positions_to_rows_cols(pos, mask.reshape(mask.shape[0], -1).shape[1])
        self.codes = codes.reshape(mask.shape[0], -1)[self.rows, self.cols]
        self.shape = mask.shape
        self.codebook = None


def test_eie_worked_example_single_pe():
    mask = np.zeros((23, 1), bool)
    mask[[2, 3, 22], 0] = True
    codes = np.zeros((23, 1), np.uint8)
    codes[[2, 3, 22], 0] = [1, 2, 3]
    lay = eie_layout(_Layer(mask, codes), num_pe=1, index_bits=4)
    assert lay.v.tolist() == [1, 2, 0, 3] and lay.z.tolist() == [2, 0, 15, 2]  # EIE §III-B
    assert lay.pad.tolist() == [False, False, True, False]
    assert lay.col_ptr.tolist() == [[0, 4]]


@pytest.mark.parametrize("num_pe,bits,density", [(1, 4, 0.1), (4, 2, 0.2), (64, 4, 0.05), (3, 1, 0.5)])
def test_eie_layout_matches_naive_and_round_trips(num_pe, bits, density):
    rng = np.random.default_rng(num_pe * 10 + bits)
    mask = rng.random((150, 37)) < density
    codes = rng.integers(0, 16, mask.shape).astype(np.uint8)
    lay = eie_layout(_Layer(mask, codes), num_pe=num_pe, index_bits=bits)
    naive = _naive_eie(mask, codes, num_pe, bits)
    for k, (v, z, ptr) in enumerate(naive):
        lo, hi = lay.pe_ptr[k], lay.pe_ptr[k + 1]
        assert lay.v[lo:hi].tolist() == v
        assert lay.z[lo:hi].tolist() == z
        assert lay.col_ptr[k].tolist() == ptr
    m2, c2 = lay.to_dense_codes()
    assert np.array_equal(m2, mask)
    assert np.array_equal(c2[mask], codes[mask])


def test_eie_layout_from_module_buffers():
    lin = nn.Linear(20, 30)
    mask = torch.rand(30, 20, generator=torch.Generator().manual_seed(0)) < 0.2
    lin.register_buffer("weight_mask", mask)
    lin.register_buffer("weight_codebook", torch.linspace(-1, 1, 16))
    lin.register_buffer("weight_assign", torch.randint(0, 16, (30, 20), dtype=torch.uint8))
    lay = eie_layout(lin, num_pe=4, index_bits=4)
    m2, c2 = lay.to_dense_codes()
    assert np.array_equal(m2, mask.numpy())
    assert np.array_equal(c2[m2], lin.weight_assign.numpy()[m2])
    assert np.allclose(lay.codebook, np.linspace(-1, 1, 16))
    with pytest.raises(ValueError, match="quantized"):
        eie_layout(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="num_pe"):
        eie_layout(lin, num_pe=0)
