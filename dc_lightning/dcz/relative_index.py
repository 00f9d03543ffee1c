"""Relative-index sparse storage with fillers (Deep Compression §2, Fig. 2) and the EIE layout (EIE §III).

**Matrix view and scan order.** A layer's weight of shape ``(out, *rest)`` is viewed as the matrix
``W = weight.reshape(out, -1)`` of shape ``(R, C)`` (a 1-D weight is ``(n, 1)``): rows are output units, columns
are inputs (for a conv, ``in_channels * kh * kw`` fan-in positions). Non-zeros are scanned **row-major** (CSR
order: row ``i`` left to right, then row ``i + 1``), i.e. the linear position of ``W[i, j]`` is ``p = i * C + j``:
Caffe's weight-blob order, the one Deep Compression coded. Measured on the trained LeNet-300-100 recipe (ip1 at 8%),
row-major gaps have an entropy of 3.9 bits against 4.9 bits column-major (an output unit keeps spatially clustered
input pixels), which is worth ~1 bit per non-zero after Huffman coding ([DC] Table 2 reports 3.7). EIE's
column-major, row-interleaved layout (§III-B) is a re-grouping of the decoded positions (:func:`eie_layout`) and
never needs re-clustering.

**Relative index (gap) stream.** With ``b = index_bits`` and ``M = 2**b - 1``, each non-zero stores the number
of zeros since the previous non-zero (the first counts from position -1): ``z = p_k - p_{k-1} - 1``, exactly
EIE's "z". Gaps ``0 .. M-1`` are real entries. The top symbol ``M`` is a **filler**: "skip ``M`` zero positions,
no weight here". A gap ``z >= M`` is written as ``z // M`` fillers followed by the entry ``z % M``.

Why this filler design: DC Fig. 2 / EIE pad with an entry that carries a *zero weight*, which needs either a
codebook symbol reserved for zero (codebook index 0 may be a real centroid) or a separate bitmap. Reserving the
top gap symbol instead costs one gap value, keeps the weight stream at exactly ``nnz`` codebook indices, and
makes a filler cost ``b`` index bits instead of ``b`` index bits plus a weight -- never more storage than the
paper's scheme. Fillers are distinguishable from entries by their gap symbol alone.

Example::

    import numpy as np
    from dc_lightning.dcz.relative_index import encode_gaps, decode_gaps

    pos = np.array([2, 3, 22])              # EIE §III-B example row: [0,0,1,2,0*18,3]
    gaps = encode_gaps(pos, index_bits=4)   # [2, 0, 15(filler), 3]
    assert (decode_gaps(gaps, 4, nnz=3, numel=23) == pos).all()
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import nn

from dc_lightning import buffers
from dc_lightning.buffers import matrix_shape

__all__ = [
    "MAX_INDEX_BITS",
    "EIELayout",
    "SparseFormatError",
    "decode_gaps",
    "eie_layout",
    "encode_gaps",
    "positions_from_mask",
    "positions_to_rows_cols",
]

MAX_INDEX_BITS = 12


class SparseFormatError(ValueError):
    """A gap stream is inconsistent with its layer (wrong count, runs past the end, bad symbol)."""


def _check_index_bits(index_bits: int) -> int:
    if (
        isinstance(index_bits, bool)
        or not isinstance(index_bits, (int, np.integer))
        or not (1 <= int(index_bits) <= MAX_INDEX_BITS)
    ):
        raise ValueError(f"index_bits={index_bits!r} is invalid; valid: an int in 1..{MAX_INDEX_BITS}")
    return int(index_bits)


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Row-major linear positions (int64, ascending) of the True entries of ``mask`` (any shape)."""
    r, c = matrix_shape(mask.shape)
    return np.flatnonzero(np.asarray(mask, dtype=bool).reshape(r, c)).astype(np.int64)


def positions_to_rows_cols(positions: np.ndarray, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Split row-major positions into (row, col) of the ``(R, C)`` view (``cols`` = C)."""
    positions = np.asarray(positions, dtype=np.int64)
    return positions // cols, positions % cols


def encode_gaps(positions: np.ndarray, index_bits: int) -> np.ndarray:
    """Relative-index symbols (uint16) for ascending ``positions``; ``2**index_bits - 1`` marks a filler.

    Raises:
        ValueError: bad ``index_bits`` or positions not strictly increasing / negative.
    """
    b = _check_index_bits(index_bits)
    m = (1 << b) - 1
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size == 0:
        return np.zeros(0, dtype=np.uint16)
    z = np.diff(positions, prepend=-1) - 1
    if (z < 0).any():
        raise ValueError("positions must be non-negative and strictly increasing")
    nfill, rem = np.divmod(z, m)
    counts = nfill + 1
    out = np.full(int(counts.sum()), m, dtype=np.uint16)
    out[np.cumsum(counts) - 1] = rem
    return out


def decode_gaps(gaps: np.ndarray, index_bits: int, nnz: int, numel: int) -> np.ndarray:
    """Inverse of :func:`encode_gaps`: the positions of the ``nnz`` entries.

    Raises:
        SparseFormatError: a symbol above the filler, an entry count other than ``nnz``, a trailing filler, or a
            position ``>= numel``.
    """
    b = _check_index_bits(index_bits)
    m = (1 << b) - 1
    gaps = np.asarray(gaps)
    if gaps.dtype not in (np.int32, np.int64):
        gaps = gaps.astype(np.int32)
    if gaps.size and (int(gaps.max()) > m or int(gaps.min()) < 0):
        raise SparseFormatError(f"gap symbol outside 0..{m}")
    is_entry = gaps != m
    if int(is_entry.sum()) != nnz:
        raise SparseFormatError(f"gap stream holds {int(is_entry.sum())} entries, header says nnz={nnz}")
    if gaps.size and not is_entry[-1]:
        raise SparseFormatError("gap stream ends with a filler")
    adv = np.where(is_entry, gaps + 1, m)
    pos = np.cumsum(adv, dtype=np.int64)[is_entry] - 1
    if pos.size and int(pos[-1]) >= numel:
        raise SparseFormatError(f"gap stream runs to position {int(pos[-1])}, past the layer's {numel} weights")
    return pos


@dataclass
class EIELayout:
    """EIE's interleaved, relative-indexed CSC (EIE §III-B) for ``num_pe`` processing elements.

    PE ``k`` owns the rows ``i`` with ``i % num_pe == k`` (local row ``i // num_pe``). For each PE and column,
    entries are sorted by local row; ``z`` is the number of zeros (of that PE's slice) before the entry, and when
    more than ``2**index_bits - 1`` zeros precede it, a padding entry (``pad=True``, ``v=0``) with
    ``z = 2**index_bits - 1`` is inserted that *occupies* a position (EIE's "padding zero").

    Attributes:
        v: codebook index of every entry (uint8; 0 for padding), all PEs concatenated, PE-major then column.
        z: relative index of every entry (uint8).
        pad: True for padding entries.
        col_ptr: int64 ``[num_pe, cols + 1]``; PE ``k``'s column ``j`` is ``v[pe_ptr[k] + col_ptr[k, j] :
            pe_ptr[k] + col_ptr[k, j + 1]]`` (EIE's pointer vector ``p``, per PE).
        pe_ptr: int64 ``[num_pe + 1]`` offset of each PE's entries.
        shape: ``(rows, cols)`` of the matrix view.
        codebook: the layer's shared weights (float32), if known.
    """

    v: np.ndarray
    z: np.ndarray
    pad: np.ndarray
    col_ptr: np.ndarray
    pe_ptr: np.ndarray
    num_pe: int
    index_bits: int
    shape: tuple[int, int]
    codebook: np.ndarray | None = field(default=None)

    def to_dense_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """Rebuild ``(mask, codes)`` of shape ``(rows, cols)`` by address accumulation (EIE §III-B)."""
        rows, cols = self.shape
        mask = np.zeros((rows, cols), dtype=bool)
        codes = np.zeros((rows, cols), dtype=np.uint8)
        for k in range(self.num_pe):
            lo, hi = int(self.pe_ptr[k]), int(self.pe_ptr[k + 1])
            z, v, pad = self.z[lo:hi].astype(np.int64), self.v[lo:hi], self.pad[lo:hi]
            ptr = self.col_ptr[k]
            col = np.repeat(np.arange(cols), np.diff(ptr))
            # local row = running sum of (z + 1) within each column, minus 1
            step = z + 1
            csum = np.cumsum(step)
            col_base = np.r_[0, csum][ptr[:-1]]
            local = csum - np.repeat(col_base, np.diff(ptr)) - 1
            keep = ~pad
            r = local[keep] * self.num_pe + k
            mask[r, col[keep]] = True
            codes[r, col[keep]] = v[keep]
        return mask, codes


def eie_layout(stream_or_layer, num_pe: int = 64, index_bits: int = 4) -> EIELayout:
    """Derive EIE's interleaved CSC layout from a stored stream or a quantized layer, without re-clustering.

    Args:
        stream_or_layer: a decoded layer from :func:`dc_lightning.dcz.read_compressed` (anything with ``rows``,
            ``cols``, ``codes``, ``shape`` and ``codebook`` attributes), or an ``nn.Module`` carrying the
            ``weight_codebook``/``weight_assign`` (and optionally ``weight_mask``) buffers of docs/DESIGN.md.
        num_pe: number of processing elements rows are interleaved over (EIE: 64).
        index_bits: bits of EIE's relative index (EIE: 4).

    Returns:
        The :class:`EIELayout`.

    Raises:
        ValueError: bad ``num_pe``/``index_bits``, or a layer that is not quantized (EIE needs codebook indices).

    Example::

        lay = eie_layout(read_compressed("model.dcz").layers["classifier.0"], num_pe=64, index_bits=4)
    """
    if isinstance(num_pe, bool) or not isinstance(num_pe, (int, np.integer)) or num_pe < 1:
        raise ValueError(f"num_pe={num_pe!r} is invalid; valid: a positive int (EIE uses 64)")
    b = _check_index_bits(index_bits)
    rows, cols, codes, shape, codebook = _layer_arrays(stream_or_layer)
    R, C = matrix_shape(shape)
    pe = rows % num_pe
    local = rows // num_pe
    order = np.lexsort((local, cols, pe))
    pe, local, col, v = pe[order], local[order], cols[order], codes[order]
    # zeros before each entry within its (PE, column) slice
    key = pe * C + col
    new_group = np.r_[True, key[1:] != key[:-1]] if key.size else np.zeros(0, bool)
    prev = np.r_[-1, local[:-1]] if key.size else np.zeros(0, np.int64)
    prev = np.where(new_group, -1, prev)
    z = local - prev - 1
    span = 1 << b  # a padding entry covers 2**b - 1 zeros plus its own position
    npad = z // span
    zrem = z - npad * span
    counts = npad + 1
    total = int(counts.sum())
    last = np.cumsum(counts) - 1
    out_v = np.zeros(total, dtype=np.uint8)
    out_z = np.full(total, span - 1, dtype=np.uint8)
    out_pad = np.ones(total, dtype=bool)
    out_v[last], out_z[last], out_pad[last] = v, zrem, False
    ent_key = np.repeat(key, counts)
    per = np.bincount(ent_key, minlength=num_pe * C).reshape(num_pe, C)
    col_ptr = np.zeros((num_pe, C + 1), dtype=np.int64)
    np.cumsum(per, axis=1, out=col_ptr[:, 1:])
    pe_ptr = np.r_[0, np.cumsum(col_ptr[:, -1])].astype(np.int64)
    return EIELayout(out_v, out_z, out_pad, col_ptr, pe_ptr, num_pe, b, (R, C), codebook)


def _layer_arrays(obj):
    """(rows, cols, codes, shape, codebook) of a decoded layer or a module with the DESIGN.md buffers."""
    if hasattr(obj, "codes") and hasattr(obj, "rows") and hasattr(obj, "cols"):
        if obj.codes is None:
            raise ValueError(f"layer {getattr(obj, 'name', '?')!r} is not quantized; EIE needs codebook indices")
        cb = None if getattr(obj, "codebook", None) is None else np.asarray(obj.codebook, dtype=np.float32)
        return (
            np.asarray(obj.rows, np.int64),
            np.asarray(obj.cols, np.int64),
            np.asarray(obj.codes, np.uint8),
            tuple(obj.shape),
            cb,
        )
    if not isinstance(obj, nn.Module):
        raise ValueError(f"expected a decoded layer (rows, cols, codes) or an nn.Module, got {type(obj).__name__}")
    rows, cols, codes, codebook, shape = buffers.layer_codes(obj)
    return rows, cols, codes, shape, codebook
