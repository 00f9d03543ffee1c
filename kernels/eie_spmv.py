"""EIE-style sparse, weight-shared matrix-vector / matrix-matrix products: ``y = act(W @ x + b)``.

``W`` is a pruned and weight-shared layer (Deep Compression [DC] §2-3, EIE [EIE] §III): every kept weight is an
index into a small codebook (up to 256 centroids). The stored interchange stream (relative indices + Huffman,
``dc_lightning.io``) is not what the GPU reads: :func:`pack` re-encodes a layer ONCE, at load time, into a
*sliced-ELL* layout that the kernel reads with coalesced loads:

* rows are grouped into row tiles of ``row_tile`` rows, columns into chunks of ``chunk`` columns;
* every (row tile, chunk) block is an ELL block of ``width`` entries per row (``width`` = the longest row of the
  block inside that chunk; shorter rows are padded), stored column-major so that one step ``k`` of the block is
  ``row_tile`` consecutive entries;
* an entry is one 16-bit word ``(local_column << code_shift) | code`` when it fits (4-bit codebooks with chunks up to
  2048 columns), else a 32-bit word. ``code == 2**bits`` is the padding code; the packed codebook carries a 0.0 in
  that slot so padding needs no mask;
* ``block_ptr[t * n_chunks + c]`` is the first entry of block (t, c) (int32, ``n_tiles * n_chunks + 1`` values).

The kernel is "pull" style (EIE §VII-A distributes rows, not columns, across PEs for the same reason: no cross-PE
reduction of outputs). A program owns one row tile and ``chunks_per_prog`` consecutive chunks; it gathers ``x`` and
the codebook with ``tl.load`` and accumulates in fp32 registers. Programs of the same row tile write their partial
sums into a ``[groups, B, out]`` fp32 buffer with plain stores (no memset, no atomics, deterministic); a second
tiny kernel sums the groups and applies bias, ReLU and the cast to the activation dtype. When one group covers all
chunks the first kernel applies the epilogue itself and the second launch is skipped.

Since round 2 the default at batch 1-16 is ONE launch per layer (``_eie_flat_kernel``): a program walks a row
tile's blocks as one flat list of ELL steps (the chunk of a step comes from the tile's block pointers held in
registers, so no dependent block-pointer load per chunk), prefetches the next step block's entries while the
current gathers are in flight, and ``split`` programs per row tile combine their fp32 partials with relaxed atomics
in a per-device workspace; a per-tile arrival counter lets the last program apply bias/ReLU/cast and re-zero the
workspace and counter, so no memset and no second kernel are needed (CUDA-graph safe; calls must not run
concurrently on several streams; the fp32 sum order varies run to run by about 1e-7 relative). Under
``torch.compile`` and when the workspace would have to be allocated during CUDA-graph capture it runs with
``split=1`` (no workspace). The same layout serves both kernels.

Activation sparsity (EIE §III-C skips every zero ``a_j``): at batch 1 a pull kernel cannot skip single columns
without serialising, so the kernel can skip whole column chunks whose activations are all zero
(``skip_zero_chunks``). See ``bench/RESULTS.md`` for what that measured.

Public API: :func:`pack`, :class:`EIEPacked`, :func:`unpack`, :func:`eie_linear` (the ``torch.library`` op
``torch.ops.dc_lightning.eie_linear``), :func:`eie_linear_triton` (launcher with tunable config),
:func:`eie_linear_reference` (pure PyTorch; also the CPU fallback).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dc_lightning.buffers import sparse_coordinates

try:  # Triton is optional: without it (macOS, Windows, minimal CI) only the reference path runs.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "EIEPacked",
    "pack",
    "pack_from_layer_buffers",
    "unpack",
    "decode_dense",
    "eie_linear",
    "eie_linear_triton",
    "eie_linear_reference",
    "choose_config",
    "autotune",
    "interpret_mode",
]

log = logging.getLogger(__name__)

_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_CODEBOOK = 256


def interpret_mode() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1`` set before ``import triton``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------------------------
# Packing: (rows, cols, codes, codebook) -> sliced-ELL layout
# --------------------------------------------------------------------------------------------------------------


@dataclass
class EIEPacked:
    """A layer in the kernel's sliced-ELL layout (see the module docstring).

    Attributes:
        entries: int16 or int32 ``[n_entries]``, ``(local_col << code_shift) | code``; padding uses code ``2**bits``.
        block_ptr: int32 ``[n_tiles * n_chunks + 1]``, start of block (tile, chunk) at ``tile * n_chunks + chunk``.
        codebook: float32 ``[2**bits + 1]``; the last slot is 0.0 (the padding code).
        out_features: rows of ``W``.
        in_features: columns of ``W``.
        row_tile: rows per tile.
        chunk: columns per chunk.
        code_shift: bits of the code field (``bits + 1``).
        nnz: real (unpadded) non-zeros.
    """

    entries: Tensor
    block_ptr: Tensor
    codebook: Tensor
    out_features: int
    in_features: int
    row_tile: int
    chunk: int
    code_shift: int
    nnz: int

    @property
    def n_tiles(self) -> int:
        return -(-self.out_features // self.row_tile)

    @property
    def n_chunks(self) -> int:
        return (self.block_ptr.numel() - 1) // max(self.n_tiles, 1)

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads for the weights (entries + block pointers + codebook)."""
        return sum(t.numel() * t.element_size() for t in (self.entries, self.block_ptr, self.codebook))

    @property
    def padding(self) -> float:
        """Padding entries per real non-zero (0.15 = 15% more entries than non-zeros)."""
        return self.entries.numel() / max(self.nnz, 1) - 1.0

    def op_args(self, x: Tensor, bias: Tensor | None = None, relu: bool = False) -> tuple:
        """The positional arguments of ``eie_linear`` / ``eie_linear_triton`` / ``eie_linear_reference`` for ``x``."""
        return (x, self.entries, self.block_ptr, self.codebook, bias, self.out_features, self.in_features,
                self.row_tile, self.chunk, self.code_shift, relu)

    def to(self, device: torch.device | str) -> EIEPacked:
        return EIEPacked(
            self.entries.to(device),
            self.block_ptr.to(device),
            self.codebook.to(device),
            self.out_features,
            self.in_features,
            self.row_tile,
            self.chunk,
            self.code_shift,
            self.nnz,
        )


def _auto_row_tile(out_features: int) -> int:
    # At least ~128 row tiles so that small-output layers (NT-We: 600 rows) still spread over the 132 SMs.
    rt = 1 << max(0, int(math.log2(max(out_features // 128, 1))))
    return int(min(max(rt, 8), 32))


def _auto_chunk(nnz: int, out_features: int, in_features: int, row_tile: int) -> int:
    # Aim at blocks of about 48 entries per row: long enough that ELL padding (the max of ``row_tile`` roughly
    # Poisson row lengths) stays near 20%, short enough that a layer splits over thousands of programs.
    density = nnz / max(out_features * in_features, 1)
    target = 48.0 / max(density, 1e-6)
    chunk = 1 << max(0, round(math.log2(target)))
    return int(min(max(chunk, 256), 2048))


def pack(
    out_features: int,
    in_features: int,
    rows: Tensor,
    cols: Tensor,
    codes: Tensor,
    codebook: Tensor,
    *,
    row_tile: int | None = None,
    chunk: int | None = None,
    device: torch.device | str | None = None,
) -> EIEPacked:
    """Build the kernel layout of a pruned, weight-shared layer (done once, at load time).

    Args:
        out_features: rows of ``W`` (``N``).
        in_features: columns of ``W`` (``K``).
        rows: integer ``[nnz]`` row index of every kept weight.
        cols: integer ``[nnz]`` column index of every kept weight. ``(row, col)`` pairs must be unique.
        codes: integer ``[nnz]`` codebook index of every kept weight.
        codebook: float ``[n_centroids]`` shared weights, ``1 <= n_centroids <= 256``.
        row_tile: rows per tile, a power of two in [1, 128]; ``None`` picks 8..32 from ``out_features``.
        chunk: columns per chunk, a power of two in [16, 65536]; ``None`` picks one from the density.
        device: where the packed tensors go (default: the device of ``rows``).

    Returns:
        The packed layer.

    Raises:
        ValueError: on a bad shape, a bad size, an out-of-range index or code, or duplicate ``(row, col)`` pairs.

    Example::

        >>> packed = pack(2, 3, torch.tensor([0, 1]), torch.tensor([2, 0]), torch.tensor([1, 0]),
        ...               torch.tensor([-0.5, 0.25]))
        >>> decode_dense(packed)
        tensor([[ 0.0000,  0.0000,  0.2500],
                [-0.5000,  0.0000,  0.0000]])
    """
    if int(out_features) < 1 or int(in_features) < 1:
        raise ValueError(f"out_features and in_features must be >= 1, got {out_features} and {in_features}")
    if row_tile is None:
        row_tile = _auto_row_tile(int(out_features))
    if row_tile < 1 or row_tile > 128 or row_tile & (row_tile - 1):
        raise ValueError(f"row_tile must be a power of two in [1, 128], got {row_tile}")
    codebook = torch.as_tensor(codebook)
    if codebook.dim() != 1 or not 1 <= codebook.numel() <= _MAX_CODEBOOK:
        raise ValueError(f"codebook must be 1-D with 1..{_MAX_CODEBOOK} centroids, got shape {tuple(codebook.shape)}")
    if not codebook.is_floating_point():
        raise ValueError(f"codebook must be a floating-point tensor, got dtype {codebook.dtype}")
    rows, cols, codes = (torch.as_tensor(t).reshape(-1).to(torch.int64) for t in (rows, cols, codes))
    if not rows.numel() == cols.numel() == codes.numel():
        raise ValueError(
            f"rows, cols and codes must have one value per non-zero, got sizes "
            f"{rows.numel()}, {cols.numel()} and {codes.numel()}"
        )
    device = torch.device(device) if device is not None else rows.device
    rows, cols, codes = rows.cpu(), cols.cpu(), codes.cpu()
    nnz = rows.numel()
    n_out, n_in = int(out_features), int(in_features)
    if nnz:
        for name, t, hi in (("rows", rows, n_out), ("cols", cols, n_in), ("codes", codes, codebook.numel())):
            lo_v, hi_v = int(t.min()), int(t.max())
            if lo_v < 0 or hi_v >= hi:
                raise ValueError(f"{name} must lie in [0, {hi}), got values in [{lo_v}, {hi_v}]")
    if chunk is None:
        chunk = _auto_chunk(nnz, n_out, n_in, row_tile)
    if chunk < 16 or chunk > 65536 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two in [16, 65536], got {chunk}")

    bits = max(0, math.ceil(math.log2(codebook.numel()))) if codebook.numel() > 1 else 0
    code_shift = bits + 1  # one spare code (2**bits) marks padding
    use16 = code_shift + int(math.log2(chunk)) <= 16
    if not use16 and code_shift + int(math.log2(chunk)) > 31:
        raise ValueError(f"chunk={chunk} with a {codebook.numel()}-centroid codebook does not fit a 32-bit entry")
    n_tiles = -(-n_out // row_tile)
    n_chunks = -(-n_in // chunk)

    tile = rows // row_tile
    r_in_tile = rows % row_tile
    chunk_id = cols // chunk
    # group = (row, chunk); sort by (group, col) so entries of a row inside a chunk are in column order
    group = rows * n_chunks + chunk_id
    key = group * n_in + cols
    key_sorted, order = torch.sort(key)
    if nnz > 1 and bool((key_sorted[1:] == key_sorted[:-1]).any()):
        raise ValueError("duplicate (row, col) pairs: every kept weight must appear once")
    counts = torch.bincount(group, minlength=n_tiles * row_tile * n_chunks)  # padded row space
    width = counts.view(n_tiles, row_tile, n_chunks).amax(dim=1)  # [n_tiles, n_chunks]
    block_sizes = (width * row_tile).reshape(-1)
    block_ptr = torch.zeros(block_sizes.numel() + 1, dtype=torch.int64)
    torch.cumsum(block_sizes, 0, out=block_ptr[1:])
    total = int(block_ptr[-1])
    if total >= 2**31:
        raise ValueError(f"layer too large for int32 block pointers ({total} entries); use a larger row_tile")

    group_start = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=group_start[1:])
    g_sorted = group[order]
    k = torch.arange(nnz, dtype=torch.int64) - group_start[g_sorted]  # position inside (row, chunk)
    blk = tile[order] * n_chunks + chunk_id[order]
    dest = block_ptr[blk] + k * row_tile + r_in_tile[order]
    words = torch.full((total,), 1 << bits, dtype=torch.int64)  # padding: local col 0, code 2**bits
    words[dest] = ((cols[order] % chunk) << code_shift) | codes[order]
    if use16:
        words = torch.where(words >= 2**15, words - 2**16, words).to(torch.int16)  # two's complement wrap
    else:
        words = words.to(torch.int32)
    cb = torch.zeros((1 << bits) + 1, dtype=torch.float32)
    cb[: codebook.numel()] = codebook.detach().to(torch.float32).cpu()
    return EIEPacked(
        entries=words.to(device),
        block_ptr=block_ptr.to(torch.int32).to(device),
        codebook=cb.to(device),
        out_features=n_out,
        in_features=n_in,
        row_tile=row_tile,
        chunk=chunk,
        code_shift=code_shift,
        nnz=nnz,
    )


def pack_from_layer_buffers(
    mask: Tensor | None,
    assign: Tensor,
    codebook: Tensor,
    **kwargs: Any,
) -> EIEPacked:
    """Pack from the per-layer buffers of docs/DESIGN.md (``weight_mask``, ``weight_assign``, ``weight_codebook``).

    Args:
        mask: bool ``[out, in]`` (True = kept) or ``None`` (all kept).
        assign: uint8/int ``[out, in]`` codebook index of every weight.
        codebook: float32 ``[2**bits]``.
        **kwargs: forwarded to :func:`pack` (``row_tile``, ``chunk``, ``device``).

    Raises:
        ValueError: if ``assign`` is not 2-D or ``mask`` has another shape.
    """
    if assign.dim() != 2:
        raise ValueError(f"weight_assign must be 2-D [out, in], got shape {tuple(assign.shape)}")
    if mask is not None and mask.shape != assign.shape:
        raise ValueError(f"weight_mask shape {tuple(mask.shape)} differs from weight_assign {tuple(assign.shape)}")
    rows, cols = (torch.from_numpy(t) for t in sparse_coordinates(tuple(assign.shape), mask))
    codes = assign.cpu()[rows, cols].to(torch.int64)
    kwargs.setdefault("device", assign.device)
    return pack(assign.shape[0], assign.shape[1], rows, cols, codes, codebook, **kwargs)


def _unpack_tensors(
    entries: Tensor, block_ptr: Tensor, out_features: int, row_tile: int, chunk: int, code_shift: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, cols, codes) of every stored entry, padding included (padding has code ``2**(code_shift-1)``)."""
    n_tiles = -(-out_features // row_tile)
    n_blocks = block_ptr.numel() - 1
    n_chunks = n_blocks // max(n_tiles, 1)
    bp = block_ptr.to(torch.int64)
    sizes = bp[1:] - bp[:-1]
    dev = entries.device
    blk = torch.repeat_interleave(torch.arange(n_blocks, device=dev), sizes, output_size=entries.numel())
    off = torch.arange(entries.numel(), device=dev) - bp[:-1][blk]
    rows = (blk // max(n_chunks, 1)) * row_tile + off % row_tile
    words = entries.to(torch.int64) & 0xFFFF if entries.dtype == torch.int16 else entries.to(torch.int64)
    cols = (blk % max(n_chunks, 1)) * chunk + (words >> code_shift)
    codes = words & ((1 << code_shift) - 1)
    return rows, cols, codes


def unpack(packed: EIEPacked) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`pack`: ``(rows, cols, codes)`` of the real non-zeros (padding dropped), int64."""
    rows, cols, codes = _unpack_tensors(
        packed.entries, packed.block_ptr, packed.out_features, packed.row_tile, packed.chunk, packed.code_shift
    )
    keep = codes != (1 << (packed.code_shift - 1))
    return rows[keep], cols[keep], codes[keep]


def decode_dense(packed: EIEPacked) -> Tensor:
    """The dense float32 ``[out, in]`` weight of a packed layer."""
    return _decode_dense(
        packed.entries,
        packed.block_ptr,
        packed.codebook,
        packed.out_features,
        packed.in_features,
        packed.row_tile,
        packed.chunk,
        packed.code_shift,
    )


def _decode_dense(
    entries: Tensor,
    block_ptr: Tensor,
    codebook: Tensor,
    out_features: int,
    in_features: int,
    row_tile: int,
    chunk: int,
    code_shift: int,
) -> Tensor:
    # No boolean indexing (data-dependent shapes would break torch.compile tracing): padding entries scatter-add
    # 0.0 (their codebook slot) into the padded [n_tiles*row_tile, n_chunks*chunk] matrix, which is then cropped.
    rows, cols, codes = _unpack_tensors(entries, block_ptr, out_features, row_tile, chunk, code_shift)
    n_rows = -(-out_features // row_tile) * row_tile
    n_cols = -(-in_features // chunk) * chunk
    w = torch.zeros(n_rows, n_cols, dtype=torch.float32, device=entries.device)
    w.index_put_((rows, cols), codebook.to(torch.float32)[codes], accumulate=True)
    return w[:out_features, :in_features]


# --------------------------------------------------------------------------------------------------------------
# Reference (pure PyTorch): the oracle of the tests and the CPU fallback
# --------------------------------------------------------------------------------------------------------------


def eie_linear_reference(
    x: Tensor,
    entries: Tensor,
    block_ptr: Tensor,
    codebook: Tensor,
    bias: Tensor | None,
    out_features: int,
    in_features: int,
    row_tile: int,
    chunk: int,
    code_shift: int,
    relu: bool = False,
) -> Tensor:
    """``act(x @ W.T + bias)`` with fp32 accumulation, output in ``x.dtype``; decodes ``W`` densely."""
    w = _decode_dense(entries, block_ptr, codebook, out_features, in_features, row_tile, chunk, code_shift)
    y = F.linear(x.to(torch.float32), w, None if bias is None else bias.to(torch.float32))
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _eie_spmm_kernel(
        x_ptr,
        entries_ptr,
        block_ptr_ptr,
        codebook_ptr,
        bias_ptr,
        out_ptr,
        B,
        N,
        K,
        n_chunks,
        chunk_size,
        chunks_per_prog,
        stride_xb,
        stride_xk,
        stride_og,
        stride_ob,
        ROW_TILE: tl.constexpr,
        CODE_SHIFT: tl.constexpr,
        ENTRY16: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_B: tl.constexpr,
        FUSED: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        RELU: tl.constexpr,
        SKIP_ZERO: tl.constexpr,
        SKIP_BLOCK: tl.constexpr,
    ):
        """One program: a row tile x chunks_per_prog chunks x BLOCK_B batch columns.

        The chunk size and chunks per program are run-time values so that one compiled kernel serves every layout.
        """
        tile = tl.program_id(0)
        grp = tl.program_id(1)
        bgrp = tl.program_id(2)
        r = tl.arange(0, ROW_TILE)
        kk = tl.arange(0, BLOCK_K)
        bb = bgrp * BLOCK_B + tl.arange(0, BLOCK_B)
        b_ok = bb < B
        code_mask = (1 << CODE_SHIFT) - 1
        acc = tl.zeros([BLOCK_K, ROW_TILE, BLOCK_B], dtype=tl.float32)
        for c in range(chunks_per_prog):
            chunk = grp * chunks_per_prog + c
            valid = chunk < n_chunks
            blk = tile * n_chunks + chunk
            start = tl.load(block_ptr_ptr + blk, mask=valid, other=0)
            end = tl.load(block_ptr_ptr + blk + 1, mask=valid, other=0)
            width = (end - start) // ROW_TILE
            col0 = chunk * chunk_size
            if SKIP_ZERO:
                # EIE §III-C skips zero activations; a pull kernel can only afford to skip whole chunks.
                nz = tl.zeros([SKIP_BLOCK, BLOCK_B], dtype=tl.float32)
                for s0 in range(0, chunk_size, SKIP_BLOCK):
                    cc = col0 + s0 + tl.arange(0, SKIP_BLOCK)
                    xs = tl.load(
                        x_ptr + cc[:, None] * stride_xk + bb[None, :] * stride_xb,
                        mask=(cc[:, None] < K) & b_ok[None, :] & valid,
                        other=0.0,
                    )
                    nz = tl.maximum(nz, tl.abs(xs.to(tl.float32)))
                width = tl.where(tl.max(tl.max(nz, axis=1), axis=0) > 0, width, 0)
            for k0 in range(0, width, BLOCK_K):
                kidx = k0 + kk
                emask = kidx[:, None] < width  # [BLOCK_K, 1]
                e = tl.load(entries_ptr + start + kidx[:, None] * ROW_TILE + r[None, :], mask=emask, other=0)
                e = e.to(tl.int32)
                if ENTRY16:
                    e = e & 0xFFFF
                code = e & code_mask
                col = col0 + (e >> CODE_SHIFT)
                # padding entries point at a 0.0 codebook slot, masked lanes read slot 0 and are zeroed here
                w = tl.where(emask, tl.load(codebook_ptr + code), 0.0)
                xv = tl.load(
                    x_ptr + col[:, :, None] * stride_xk + bb[None, None, :] * stride_xb,
                    mask=emask[:, :, None] & b_ok[None, None, :],
                    other=0.0,
                )
                acc += w[:, :, None] * xv.to(tl.float32)
        res = tl.sum(acc, axis=0)  # [ROW_TILE, BLOCK_B]
        rows = tile * ROW_TILE + r
        omask = (rows[:, None] < N) & b_ok[None, :]
        if FUSED:
            if HAS_BIAS:
                res += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
            if RELU:
                res = tl.maximum(res, 0.0)
            tl.store(out_ptr + bb[None, :] * stride_ob + rows[:, None], res.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            tl.store(out_ptr + grp * stride_og + bb[None, :] * stride_ob + rows[:, None], res, mask=omask)

    @triton.jit
    def _eie_reduce_kernel(
        part_ptr,
        bias_ptr,
        y_ptr,
        G,
        N,
        stride_pg,
        stride_pb,
        stride_yb,
        HAS_BIAS: tl.constexpr,
        RELU: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_G: tl.constexpr,
    ):
        """y[b, n] = act(sum_g part[g, b, n] + bias[n]) cast to y's dtype."""
        pid = tl.program_id(0)
        b = tl.program_id(1)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        g = tl.arange(0, BLOCK_G)
        acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
        for g0 in range(0, G, BLOCK_G):
            gg = g0 + g
            acc += tl.load(
                part_ptr + gg[:, None] * stride_pg + b * stride_pb + n[None, :],
                mask=(gg[:, None] < G) & (n[None, :] < N),
                other=0.0,
            )
        res = tl.sum(acc, axis=0)
        if HAS_BIAS:
            res += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)
        if RELU:
            res = tl.maximum(res, 0.0)
        tl.store(y_ptr + b * stride_yb + n, res.to(y_ptr.dtype.element_ty), mask=n < N)

    @triton.jit
    def _eie_flat_kernel(
        x_ptr,
        entries_ptr,
        block_ptr_ptr,
        codebook_ptr,
        bias_ptr,
        y_ptr,
        ws_ptr,
        cnt_ptr,
        B,
        N,
        n_chunks,
        chunk_size,
        stride_xb,
        stride_xk,
        ROW_TILE: tl.constexpr,
        CODE_SHIFT: tl.constexpr,
        ENTRY16: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_B: tl.constexpr,
        MAXC: tl.constexpr,
        SPLIT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        RELU: tl.constexpr,
    ):
        """One launch per layer: a program walks a row tile's blocks as ONE flat list of ELL steps.

        The blocks of a row tile are contiguous in ``entries``, so the program loads the tile's block pointers once
        (a register vector) and finds the chunk of every step by comparing against it: no per-chunk dependent
        load of the block pointer, and the next step block's entries are prefetched while the current one's
        ``x``/codebook gathers are in flight (two-stage software pipeline by hand; the Triton pipeliner does not
        pipeline gathers). ``SPLIT`` programs share a row tile (split-K over the tile's steps): they add fp32
        partials into a zeroed workspace with relaxed atomics and bump a per-tile arrival counter; the last to
        arrive reads the sum back with an ``atomic_add(.., 0)``, re-zeroes the workspace and the counter for the
        next call, and applies bias/ReLU/cast. No memset node, no second kernel, CUDA-graph safe.
        """
        tile = tl.program_id(0)
        sp = tl.program_id(1)
        bgrp = tl.program_id(2)
        r = tl.arange(0, ROW_TILE)
        kk = tl.arange(0, BLOCK_K)
        ci = tl.arange(0, MAXC)
        bb = bgrp * BLOCK_B + tl.arange(0, BLOCK_B)
        b_ok = bb < B
        code_mask = (1 << CODE_SHIFT) - 1
        base = tile * n_chunks
        # chunk starts and the tile's end in one vector load; the two scalars hit the same lines, in parallel
        bp = tl.load(block_ptr_ptr + base + ci, mask=ci <= n_chunks, other=2147483647)
        start = tl.load(block_ptr_ptr + base)
        end = tl.load(block_ptr_ptr + base + n_chunks)
        n_steps = (end - start) // ROW_TILE
        per = tl.cdiv(tl.cdiv(n_steps, SPLIT), BLOCK_K) * BLOCK_K
        s_lo = sp * per
        s_hi = tl.minimum(n_steps, s_lo + per)
        acc = tl.zeros([BLOCK_K, ROW_TILE, BLOCK_B], dtype=tl.float32)
        s_cur = s_lo + kk
        m_cur = s_cur < s_hi
        e_cur = tl.load(entries_ptr + start + s_cur[:, None] * ROW_TILE + r[None, :], mask=m_cur[:, None], other=0)
        for s0 in range(s_lo, s_hi, BLOCK_K):
            s_nxt = s0 + BLOCK_K + kk
            m_nxt = s_nxt < s_hi
            e_nxt = tl.load(entries_ptr + start + s_nxt[:, None] * ROW_TILE + r[None, :], mask=m_nxt[:, None], other=0)
            pos = start + s_cur * ROW_TILE
            chunk = tl.sum((bp[None, :] <= pos[:, None]).to(tl.int32), axis=1) - 1  # [BLOCK_K]
            e = e_cur.to(tl.int32)
            if ENTRY16:
                e = e & 0xFFFF
            code = e & code_mask
            col = (chunk * chunk_size)[:, None] + (e >> CODE_SHIFT)
            emask = m_cur[:, None]
            w = tl.where(emask, tl.load(codebook_ptr + code), 0.0)
            xv = tl.load(
                x_ptr + col[:, :, None] * stride_xk + bb[None, None, :] * stride_xb,
                mask=emask[:, :, None] & b_ok[None, None, :],
                other=0.0,
            )
            acc += w[:, :, None] * xv.to(tl.float32)
            e_cur = e_nxt
            s_cur = s_nxt
            m_cur = m_nxt
        res = tl.sum(acc, axis=0)  # [ROW_TILE, BLOCK_B]
        rows = tile * ROW_TILE + r
        omask = (rows[:, None] < N) & b_ok[None, :]
        yoff = bb[None, :] * N + rows[:, None]
        if SPLIT > 1:
            tl.atomic_add(ws_ptr + yoff, res, mask=omask, sem="relaxed")
            tl.debug_barrier()  # every thread's partial is issued before the arrival is published (release)
            cidx = tile * tl.num_programs(2) + bgrp
            arrived = tl.atomic_add(cnt_ptr + cidx, 1, sem="acq_rel")
            if arrived == SPLIT - 1:
                # read the finished sum at the coherence point (an atomic, not a possibly stale L1 line), then
                # re-zero the workspace and the counter for the next call (visible at the kernel boundary)
                res = tl.atomic_add(ws_ptr + yoff, tl.zeros_like(res), mask=omask, sem="relaxed")
                tl.store(ws_ptr + yoff, tl.zeros_like(res), mask=omask)
                tl.store(cnt_ptr + cidx, 0)
                if HAS_BIAS:
                    res += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
                if RELU:
                    res = tl.maximum(res, 0.0)
                tl.store(y_ptr + yoff, res.to(y_ptr.dtype.element_ty), mask=omask)
        else:
            if HAS_BIAS:
                res += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
            if RELU:
                res = tl.maximum(res, 0.0)
            tl.store(y_ptr + yoff, res.to(y_ptr.dtype.element_ty), mask=omask)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


_TUNED: dict[tuple, dict[str, Any]] = {}
_MAX_FLAT_CHUNKS = 64  # block pointers of one row tile held in registers by the flat kernel
# Split-K workspaces of the flat kernel, per device: fp32 partial sums and int32 arrival counters. They are zero
# between calls (the last program of every row tile re-zeroes its part), so no memset is launched. Calls on ONE
# stream are safe (each call finishes before the next starts); concurrent calls on several streams are not, so
# ``eie_linear_triton`` falls back to split=1 when it cannot use the shared buffers (see _workspace).
_WS: dict[str, tuple[Tensor, Tensor]] = {}


def _can_use_workspace(x: Tensor) -> bool:
    """False while tracing (dynamo, or inductor lowering the triton_op with fake/functional tensors).

    The shared workspace is a real tensor outside the traced program; handing it to a traced kernel fails
    (measured on the H200: inductor raised "Please convert all Tensors to FakeTensors"), so traced calls use
    ``split=1``, which needs no workspace.
    """
    if type(x) is not torch.Tensor:  # FakeTensor, FunctionalTensor, other tracing subclasses
        return False
    if getattr(torch.compiler, "is_compiling", lambda: False)():
        return False
    from torch._guards import detect_fake_mode

    return detect_fake_mode((x,)) is None


def _workspace(device: torch.device, n_ws: int, n_cnt: int) -> tuple[Tensor, Tensor] | None:
    key = str(device)
    ws = _WS.get(key)
    if ws is not None and ws[0].numel() >= n_ws and ws[1].numel() >= n_cnt:
        return ws
    # Never allocate while a CUDA graph is being captured (the buffer would live in the graph's private pool).
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    old_ws, old_cnt = ws if ws is not None else (None, None)
    n_ws = max(n_ws, 0 if old_ws is None else old_ws.numel(), 1 << 16)
    n_cnt = max(n_cnt, 0 if old_cnt is None else old_cnt.numel(), 1 << 12)
    ws = (torch.zeros(n_ws, dtype=torch.float32, device=device), torch.zeros(n_cnt, dtype=torch.int32, device=device))
    _WS[key] = ws
    return ws


def _tune_key(
    batch: int, out_features: int, in_features: int, row_tile: int, chunk: int, n_entries: int, dtype: torch.dtype
) -> tuple:
    return (int(batch), int(out_features), int(in_features), int(row_tile), int(chunk), int(n_entries), str(dtype))


def choose_config(
    batch: int,
    out_features: int,
    n_chunks: int,
    row_tile: int,
    overrides: dict[str, Any] | None = None,
    n_entries: int | None = None,
    tuned_key: tuple | None = None,
) -> dict[str, Any]:
    """Launch configuration from shapes only (no data, so it is safe under ``torch.compile`` and CUDA graphs).

    Keys: ``block_b`` (batch columns per program), ``block_k`` (ELL steps per iteration), ``chunks_per_prog``
    (``n_chunks`` or more = one launch with the epilogue fused), ``num_warps``, ``transpose_x`` (gather from ``x.T``
    so that a column's batch values are adjacent), ``skip_zero_chunks`` (two-kernel design only), ``kernel``
    (``"flat"``: one launch per layer, see ``_eie_flat_kernel``; ``"split"``: partial sums + reduce kernel) and
    ``split`` (flat kernel: programs per row tile, combined with fp32 atomics). A configuration recorded by
    :func:`autotune` for ``tuned_key`` wins over the heuristic; ``overrides`` win over both.
    """
    n_tiles = -(-out_features // row_tile)
    n_blocks = max(n_tiles * n_chunks, 1)
    mean_width = (n_entries / (n_blocks * row_tile)) if n_entries else 32.0
    block_b = 1 if batch <= 1 else min(_next_pow2(batch), 16)
    # At batch 1 the kernel is latency bound: each loop iteration costs two dependent memory round trips (entries,
    # then the x/codebook gathers), so one iteration should cover a typical block (BLOCK_K >= mean width), within
    # a 4096-value accumulator. With a batch the accumulator is [BLOCK_K, ROW_TILE, BLOCK_B].
    budget = 4096 if batch <= 1 else 2048
    block_k = max(1, min(_next_pow2(int(math.ceil(mean_width))), budget // (row_tile * block_b)))
    cpp = n_chunks if n_chunks <= 1 else 1
    cfg = {
        "block_b": block_b,
        "block_k": block_k,
        "chunks_per_prog": cpp,
        "num_warps": 4 if row_tile * block_k * block_b <= 2048 else 8,
        "transpose_x": batch >= 4,
        "skip_zero_chunks": False,
    }
    # The one-launch flat kernel (see _eie_flat_kernel) wherever the tile's block pointers fit a register vector.
    # Split-K over a tile's steps so that the layer spreads over about 4 programs per SM (132 SMs on an H200).
    # Measured on the H200 (bench/RESULTS.md): the flat kernel wins at batch 1-16, the two-kernel design at 64.
    flat = n_chunks + 1 <= _MAX_FLAT_CHUNKS and batch <= 16
    if overrides and "kernel" not in overrides and {"chunks_per_prog", "skip_zero_chunks"} & set(overrides):
        flat = False  # options of the two-kernel design ask for it
    steps_per_tile = (n_entries or 0) / max(n_tiles * row_tile, 1)
    split = 1
    if flat:
        block_k = max(1, 2048 // (row_tile * block_b))
        cfg["block_k"] = block_k
        cfg["num_warps"] = 4
        want = max(1, -(-528 // max(n_tiles, 1)))
        split = int(max(1, min(want, 16, steps_per_tile // max(block_k, 1))))
    cfg["kernel"] = "flat" if flat else "split"
    cfg["split"] = split
    if tuned_key is not None and tuned_key in _TUNED:
        cfg.update(_TUNED[tuned_key])
    if overrides:
        unknown = set(overrides) - set(cfg)
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; valid keys: {sorted(cfg)}")
        cfg.update(overrides)
    return cfg


def _candidates(batch: int, n_chunks: int, row_tile: int) -> list[dict[str, Any]]:
    out = []
    if n_chunks + 1 <= _MAX_FLAT_CHUNKS:
        bb = 1 if batch <= 1 else min(_next_pow2(batch), 16)
        for acc in (1024, 2048, 4096):
            bk = max(1, acc // (row_tile * bb))
            for split in (1, 2, 4, 8, 16):
                out.append(
                    {
                        "kernel": "flat",
                        "split": split,
                        "block_b": bb,
                        "block_k": bk,
                        "num_warps": 4 if acc <= 2048 else 8,
                        "transpose_x": batch >= 4,
                    }
                )
    cpps = sorted({1, 2, 4, n_chunks}) if n_chunks > 1 else [1]
    if batch <= 1:
        for bk in (16, 32, 64, 128):
            if row_tile * bk > 4096:
                continue
            for cpp in cpps:
                out.append(
                    {
                        "block_b": 1,
                        "block_k": bk,
                        "chunks_per_prog": cpp,
                        "num_warps": 4 if row_tile * bk <= 2048 else 8,
                        "kernel": "split",
                    }
                )
        return out
    for bb in sorted({min(_next_pow2(batch), b) for b in (4, 8, 16, 32)}):
        for acc in (1024, 4096):
            bk = max(1, acc // (row_tile * bb))
            for cpp in sorted({1, 4, n_chunks}):
                out.append(
                    {
                        "block_b": bb,
                        "block_k": bk,
                        "chunks_per_prog": min(cpp, n_chunks),
                        "num_warps": 4 if acc <= 1024 else 8,
                        "transpose_x": True,
                        "kernel": "split",
                    }
                )
    return out


def autotune(
    packed: EIEPacked,
    batch_sizes: tuple[int, ...] = (1,),
    dtype: torch.dtype = torch.float32,
    bias: Tensor | None = None,
    relu: bool = False,
    rep_ms: int = 20,
) -> dict[int, dict[str, Any]]:
    """Time candidate launch configurations of one packed layer (CUDA graphs, L2 flushed) and record the fastest.

    Done once at load time, like a GEMM library's heuristics table; the choice is keyed by shapes and dtype only,
    so later calls (eager, ``torch.compile`` or CUDA-graph capture) just look it up. Returns ``{batch: config}``.

    Raises:
        RuntimeError: if the layer is not on a CUDA device or Triton is missing.
    """
    if not HAS_TRITON or packed.entries.device.type != "cuda":
        raise RuntimeError("autotune needs Triton and a packed layer on a CUDA device")
    from triton.testing import do_bench

    p = packed
    best_cfgs = {}
    for batch in batch_sizes:
        x = torch.randn(batch, p.in_features, device=p.entries.device).relu_().to(dtype)
        results = []
        for cfg in _candidates(batch, p.n_chunks, p.row_tile):

            def call(cfg=cfg, x=x):
                return eie_linear_triton(*p.op_args(x, bias, relu), config=cfg)

            try:
                call()  # compile outside the capture
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    call()
                results.append((float(do_bench(g.replay, warmup=5, rep=rep_ms, return_mode="median")), cfg))
            except Exception as err:  # noqa: BLE001 - a candidate that fails to compile or launch is skipped
                log.debug("autotune: candidate %s failed: %s", cfg, err)
        if not results:
            continue
        ms, cfg = min(results, key=lambda r: r[0])
        key = _tune_key(batch, p.out_features, p.in_features, p.row_tile, p.chunk, p.entries.numel(), dtype)
        _TUNED[key] = dict(cfg)
        best_cfgs[batch] = {**cfg, "us": ms * 1e3}
    return best_cfgs


def _check_args(
    x: Tensor,
    entries: Tensor,
    block_ptr: Tensor,
    codebook: Tensor,
    bias: Tensor | None,
    out_features: int,
    in_features: int,
    row_tile: int,
    chunk: int,
    code_shift: int,
) -> None:
    """Validate shapes, dtypes, devices and contiguity (no data reads: no host sync)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [batch, in_features], got shape {tuple(x.shape)}")
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"x dtype must be one of float32, float16, bfloat16, got {x.dtype}")
    if x.shape[1] != in_features:
        raise ValueError(f"x.shape[1] must equal in_features={in_features}, got x of shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(
            f"x must be contiguous, got strides {x.stride()} for shape {tuple(x.shape)}; call x.contiguous() first"
        )
    if entries.dim() != 1 or entries.dtype not in (torch.int16, torch.int32) or not entries.is_contiguous():
        raise ValueError(
            f"entries must be a contiguous 1-D int16 or int32 tensor, got {entries.dtype} shape {tuple(entries.shape)}"
        )
    if code_shift + int(math.log2(chunk)) > (16 if entries.dtype == torch.int16 else 31):
        raise ValueError(f"code_shift={code_shift} and chunk={chunk} do not fit {entries.dtype} entries")
    n_tiles = -(-out_features // row_tile) if row_tile > 0 else 0
    if row_tile < 1 or row_tile & (row_tile - 1):
        raise ValueError(f"row_tile must be a power of two >= 1, got {row_tile}")
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 1, got {chunk}")
    n_chunks = -(-in_features // chunk)
    if block_ptr.dtype != torch.int32 or block_ptr.dim() != 1 or block_ptr.numel() != n_tiles * n_chunks + 1:
        raise ValueError(
            f"block_ptr must be int32 with n_tiles*n_chunks+1 = {n_tiles * n_chunks + 1} values, "
            f"got {block_ptr.dtype} shape {tuple(block_ptr.shape)}"
        )
    if codebook.dtype != torch.float32 or codebook.dim() != 1 or codebook.numel() != (1 << (code_shift - 1)) + 1:
        raise ValueError(
            f"codebook must be float32 [2**(code_shift-1) + 1] = [{(1 << (code_shift - 1)) + 1}], "
            f"got {codebook.dtype} shape {tuple(codebook.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.numel() != out_features or not bias.is_floating_point()):
        raise ValueError(
            f"bias must be a floating-point [out_features]=[{out_features}] tensor, got "
            f"{bias.dtype} shape {tuple(bias.shape)}"
        )
    tensors = {"entries": entries, "block_ptr": block_ptr, "codebook": codebook}
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move the layer to x's device")


def eie_linear_triton(
    x: Tensor,
    entries: Tensor,
    block_ptr: Tensor,
    codebook: Tensor,
    bias: Tensor | None,
    out_features: int,
    in_features: int,
    row_tile: int,
    chunk: int,
    code_shift: int,
    relu: bool = False,
    config: dict[str, Any] | None = None,
    _wrap: Any = None,
) -> Tensor:
    """Launch the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

    Args:
        x: ``[B, in_features]`` float32/float16/bfloat16, contiguous.
        entries, block_ptr, codebook, out_features, in_features, row_tile, chunk, code_shift: an
            :class:`EIEPacked` layer's fields.
        bias: optional ``[out_features]``.
        relu: apply ReLU in the epilogue.
        config: overrides of :func:`choose_config`.

    Returns:
        ``[B, out_features]`` in ``x.dtype``.

    Raises:
        RuntimeError: if Triton is missing or the tensors are on the CPU without the interpreter.
        ValueError, TypeError: on bad arguments (see :func:`_check_args`).
    """
    _check_args(x, entries, block_ptr, codebook, bias, out_features, in_features, row_tile, chunk, code_shift)
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use eie_linear_reference or the eie_linear op")
    if x.device.type != "cuda" and not interpret_mode():
        raise RuntimeError(f"the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1), got x on {x.device}")
    launch = _wrap if _wrap is not None else (lambda k: k)
    B = x.shape[0]
    n_tiles = -(-out_features // row_tile)
    n_chunks = -(-in_features // chunk)
    y = torch.empty((B, out_features), dtype=x.dtype, device=x.device)
    if B == 0:
        return y
    key = _tune_key(B, out_features, in_features, row_tile, chunk, entries.numel(), x.dtype)
    cfg = choose_config(B, out_features, n_chunks, row_tile, config, n_entries=entries.numel(), tuned_key=key)
    bb, bk, cpp = int(cfg["block_b"]), int(cfg["block_k"]), int(cfg["chunks_per_prog"])
    n_groups = -(-n_chunks // cpp)
    n_bgroups = -(-B // bb)
    if cfg["transpose_x"] and B > 1:
        xs = x.t().contiguous()  # [K, B]: the batch values of one column are adjacent for the gather
        stride_xb, stride_xk = 1, B
    else:
        xs = x
        stride_xb, stride_xk = in_features, 1
    has_bias = bias is not None
    if cfg["kernel"] == "flat" and n_chunks + 1 <= _MAX_FLAT_CHUNKS and not cfg["skip_zero_chunks"]:
        split = max(1, int(cfg.get("split", 1)))
        ws = None
        if split > 1 and _can_use_workspace(x):
            ws = _workspace(x.device, B * out_features, n_tiles * n_bgroups)
        if ws is None:
            split = 1
            ws = (codebook, block_ptr)  # never touched when SPLIT == 1
        launch(_eie_flat_kernel)[(n_tiles, split, n_bgroups)](
            xs,
            entries,
            block_ptr,
            codebook,
            bias if has_bias else codebook,
            y,
            ws[0],
            ws[1],
            B,
            out_features,
            n_chunks,
            chunk,
            stride_xb,
            stride_xk,
            ROW_TILE=row_tile,
            CODE_SHIFT=code_shift,
            ENTRY16=entries.dtype == torch.int16,
            BLOCK_K=bk,
            BLOCK_B=bb,
            MAXC=_next_pow2(n_chunks + 1),
            SPLIT=split,
            HAS_BIAS=has_bias,
            RELU=bool(relu),
            num_warps=int(cfg["num_warps"]),
        )
        return y
    fused = n_groups == 1
    bias_arg = bias if has_bias else codebook  # any valid pointer; never read when HAS_BIAS is False
    if fused:
        out, stride_og, stride_ob = y, 0, out_features
    else:
        out = torch.empty((n_groups, B, out_features), dtype=torch.float32, device=x.device)
        stride_og, stride_ob = B * out_features, out_features
    launch(_eie_spmm_kernel)[(n_tiles, n_groups, n_bgroups)](
        xs,
        entries,
        block_ptr,
        codebook,
        bias_arg,
        out,
        B,
        out_features,
        in_features,
        n_chunks,
        chunk,
        cpp,
        stride_xb,
        stride_xk,
        stride_og,
        stride_ob,
        ROW_TILE=row_tile,
        CODE_SHIFT=code_shift,
        ENTRY16=entries.dtype == torch.int16,
        BLOCK_K=bk,
        BLOCK_B=bb,
        FUSED=fused,
        HAS_BIAS=has_bias,
        RELU=bool(relu),
        SKIP_ZERO=bool(cfg["skip_zero_chunks"]),
        SKIP_BLOCK=min(chunk, 256),
        num_warps=int(cfg["num_warps"]),
    )
    if not fused:
        block_n = 256
        launch(_eie_reduce_kernel)[(-(-out_features // block_n), B)](
            out,
            bias_arg,
            y,
            n_groups,
            out_features,
            stride_og,
            stride_ob,
            out_features,
            HAS_BIAS=has_bias,
            RELU=bool(relu),
            BLOCK_N=block_n,
            BLOCK_G=min(_next_pow2(n_groups), 8),
            num_warps=4,
        )
    return y


# --------------------------------------------------------------------------------------------------------------
# torch.library registration: works under torch.compile and inside CUDA graphs
# --------------------------------------------------------------------------------------------------------------


def _eie_linear_impl(
    x: Tensor,
    entries: Tensor,
    block_ptr: Tensor,
    codebook: Tensor,
    bias: Tensor | None,
    out_features: int,
    in_features: int,
    row_tile: int,
    chunk: int,
    code_shift: int,
    relu: bool,
) -> Tensor:
    _check_args(x, entries, block_ptr, codebook, bias, out_features, in_features, row_tile, chunk, code_shift)
    if HAS_TRITON and (x.device.type == "cuda" or (interpret_mode() and x.device.type == "cpu")):
        wrap = None
        if not interpret_mode():
            from torch.library import wrap_triton

            wrap = wrap_triton
        return eie_linear_triton(
            x,
            entries,
            block_ptr,
            codebook,
            bias,
            out_features,
            in_features,
            row_tile,
            chunk,
            code_shift,
            relu,
            _wrap=wrap,
        )
    return eie_linear_reference(
        x, entries, block_ptr, codebook, bias, out_features, in_features, row_tile, chunk, code_shift, relu
    )


_OP_NAME = "dc_lightning::eie_linear"


def _register() -> Any:
    lib = getattr(torch.library, "triton_op", None)
    if lib is not None and HAS_TRITON and not interpret_mode():
        return torch.library.triton_op(_OP_NAME, mutates_args=())(_eie_linear_impl)
    # Interpreter or no Triton: a custom_op whose fake impl gives the output's shape/dtype.
    op = torch.library.custom_op(_OP_NAME, mutates_args=())(_eie_linear_impl)

    @op.register_fake
    def _(x, entries, block_ptr, codebook, bias, out_features, in_features, row_tile, chunk, code_shift, relu):
        _check_args(x, entries, block_ptr, codebook, bias, out_features, in_features, row_tile, chunk, code_shift)
        return x.new_empty((x.shape[0], out_features))

    return op


try:
    _eie_linear_op = _register()
except RuntimeError as err:  # pragma: no cover - module reloaded in the same process: reuse the registered op
    if "already" not in str(err):
        raise
    _eie_linear_op = None


def eie_linear(
    x: Tensor,
    entries: Tensor,
    block_ptr: Tensor,
    codebook: Tensor,
    bias: Tensor | None,
    out_features: int,
    in_features: int,
    row_tile: int,
    chunk: int,
    code_shift: int,
    relu: bool = False,
) -> Tensor:
    """``act(x @ W.T + bias)`` through ``torch.ops.dc_lightning.eie_linear`` (Triton on CUDA, PyTorch on CPU).

    Example::

        >>> p = pack(4, 8, torch.tensor([0, 3]), torch.tensor([1, 7]), torch.tensor([1, 0]), torch.tensor([2., -1.]))
        >>> eie_linear(torch.ones(1, 8), p.entries, p.block_ptr, p.codebook, None, 4, 8, p.row_tile, p.chunk,
        ...            p.code_shift)
        tensor([[-1.,  0.,  0.,  2.]])
    """
    return torch.ops.dc_lightning.eie_linear(
        x,
        entries,
        block_ptr,
        codebook,
        bias,
        int(out_features),
        int(in_features),
        int(row_tile),
        int(chunk),
        int(code_shift),
        bool(relu),
    )
