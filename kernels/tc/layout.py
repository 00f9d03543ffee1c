"""The tensor-core LUT layout (``tc``): 4-bit codes, four per int16 word, decoded in registers by a byte-permute table.

EIE's weights are 4-bit indices into a 16-entry table [EIE §III]; a pruned layer spends one of the 16 entries on
0.0 (EIE's padding zero). Here every position of ``W`` holds its 4-bit code, so the layer is ``out x in / 2`` bytes
whatever its density, and the kernel (``jit.py``) decodes a tile straight into the tensor cores' left operand.

Word layout (``TILE_K = 256`` columns per K tile, ``in_features`` padded to a multiple of it; rows padded to a
multiple of ``ROW_PAD`` = 16): ``codes`` is int16 ``[rows_padded, k_tiles * 64]``. A GPU thread holds the operand's
positions in groups ``(r, k), (r, k+1), (r+8, k), (r+8, k+1)`` (``r % 16 < 8``, ``k`` even, ``k < 64``: the
tensor cores' fragment), and decodes quarter ``q`` (columns ``t * 256 + 64 q + k``) of a group from the word at
storage position ``(r + 8 * (q // 2), t * 64 + k + q % 2)``: that word's nibble ``m`` is the code of the group's
``m``-th position, ``(r + 8 * (m // 2), k + m % 2)``, in quarter ``q``. So each quarter's decode reads one aligned
16-bit field (``decode.py``), Triton loads the words with ``ldmatrix`` as it would fp16 operands, and nothing is
repacked. The CPU paths undo the permutation with one byte permute (:func:`_bytes_in_row_order`).

Table: ``codebook`` (float32 ``[16]``, on the layer's device, for the references and row lookups) and ``table``,
the same 16 values on the host, which the GPU decode bakes into its instructions (one compiled kernel per distinct
table and activation dtype). A pruned layer's positions and the padding hold the *zero code* (entry
``n_centroids``, 0.0); so a pruned layer needs at most 15 centroids, a dense one at most 16
(:func:`fits`). Layers that do not fit take the ``lut`` or ``sparse`` layout.

This module owns the layout (:class:`TCPacked`, :func:`pack_tc`, :func:`decode_dense_tc`, :func:`tc_rows`) and
:func:`tc_linear_reference`, the pure-PyTorch product (tests' oracle, CPU fallback of ``dc_lightning::tc_linear``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import native
from ..runtime import PackedLayer, blocked_product, decoded_linear, finish_linear, sorted_coordinates

__all__ = ["TCPacked", "TILE_K", "WORDS", "ROW_PAD", "TABLE", "fits", "pack_tc", "decode_dense_tc", "tc_rows",
           "tc_linear_reference", "bytes_per_position"]  # fmt: skip

TILE_K = 256  # columns per K tile: four 64-column quarters
WORDS = 64  # int16 code words per row and K tile (4 codes each)
ROW_PAD = 16  # rows padded to a multiple of the tensor-core fragment (and of the smallest row tile)
TABLE = 16  # entries of the 4-bit table


def fits(n_centroids: int, dense: bool) -> bool:
    """Whether a codebook of ``n_centroids`` values fits the 16-entry table (a pruned layer adds the zero code)."""
    return 1 <= int(n_centroids) + (0 if dense else 1) <= TABLE


def bytes_per_position(out_features: int, in_features: int) -> float:
    """Bytes per weight position, padding included (0.5 plus the row and column padding)."""
    rows = -(-int(out_features) // ROW_PAD) * ROW_PAD
    cols = -(-int(in_features) // TILE_K) * TILE_K
    return rows * cols / 2 / (int(out_features) * int(in_features))


@dataclass
class TCPacked(PackedLayer):
    """A layer in the tensor-core LUT layout (see the module docstring).

    Attributes:
        codes: int16 ``[rows_padded, k_tiles * 64]`` code words (see the module docstring; ``rows_padded`` =
            ``out_features`` rounded up to ``ROW_PAD``).
        codebook: float32 ``[16]``: the table on the layer's device.
        table: the same 16 values as host floats (baked into the GPU decode; never read from the device).
        out_features: rows of ``W``.
        in_features: columns of ``W``.
        nnz: kept weights (-1 when unknown).
    """

    codes: Tensor
    codebook: Tensor
    table: tuple[float, ...]
    out_features: int
    in_features: int
    nnz: int = -1

    @property
    def k_tiles(self) -> int:
        return -(-self.in_features // TILE_K)

    @property
    def rows_padded(self) -> int:
        return -(-self.out_features // ROW_PAD) * ROW_PAD

    def op_args(self, x: Tensor, bias: Tensor | None = None, relu: bool = False) -> tuple:
        """The positional arguments of the registered op ``torch.ops.dc_lightning.tc_linear`` for ``x``."""
        return (x, self.codes, self.codebook, bias, self.out_features, self.in_features, list(self.table), relu)

    def check(self) -> None:
        """Validate codes, codebook and table for a call (no data reads: no host sync).

        Raises:
            ValueError: on any mismatch, naming the field, the bad value and what is valid.
        """
        shape = (self.rows_padded, self.k_tiles * WORDS)
        if self.codes.dtype != torch.int16 or tuple(self.codes.shape) != shape or not self.codes.is_contiguous():
            raise ValueError(
                f"codes must be a contiguous int16 [rows_padded, k_tiles*64] = [{shape[0]}, {shape[1]}] tensor, got "
                f"{self.codes.dtype} shape {tuple(self.codes.shape)}"
            )
        cb = self.codebook
        if cb.dtype != torch.float32 or tuple(cb.shape) != (TABLE,):
            raise ValueError(f"codebook must be float32 [{TABLE}], got {cb.dtype} shape {tuple(cb.shape)}")
        if len(self.table) != TABLE:
            raise ValueError(f"table must hold {TABLE} host floats (the codebook's values), got {len(self.table)}")


def pack_tc(
    out_features: int,
    in_features: int,
    rows: Tensor,
    cols: Tensor,
    codes: Tensor,
    codebook: Tensor,
    *,
    device: torch.device | str | None = None,
) -> TCPacked:
    """Build the tensor-core LUT layout of a weight-shared layer (done once, at load time).

    Args:
        out_features, in_features: shape of ``W``.
        rows, cols, codes: integer ``[nnz]`` coordinates and codebook indices of the kept weights (unique pairs).
        codebook: float ``[n_centroids]``; at most 16 values, 15 if any position is pruned (:func:`fits`).
        device: where the packed tensors go (default: the device of ``rows``).

    Raises:
        ValueError: on a bad shape, an out-of-range index or code, duplicate pairs, or a codebook that does not fit
            the 16-entry table.
    """
    n_out, n_in, rows, cols, codes, codebook = sorted_coordinates(
        out_features, in_features, rows, cols, codes, codebook
    )
    ncb, nnz = codebook.numel(), rows.numel()
    dense = nnz == n_out * n_in
    if not fits(ncb, dense):
        raise ValueError(
            f"the tc layout holds {TABLE} table entries (4-bit codes) including the zero code of a pruned layer; "
            f"this {'dense' if dense else 'pruned'} layer has {ncb} centroids (valid: <= {TABLE - (0 if dense else 1)})"
            "; use layout 'lut' or 'sparse'"
        )
    device = torch.device(device) if device is not None else rows.device
    rows, cols, codes = rows.to(device), cols.to(device), codes.to(device)
    n_pad, k_tiles = -(-n_out // ROW_PAD) * ROW_PAD, -(-n_in // TILE_K)
    zero = ncb if not dense else 0  # pruned and padding positions: the zero code (any code when dense: x is 0 there)
    full = torch.full((n_pad, k_tiles * TILE_K), zero, dtype=torch.uint8, device=device)
    full[rows, cols] = codes.to(torch.uint8)
    # [G, b (row bit 3), rho (row % 8), t, qhi, qlo, kappa (k // 2), h (k % 2)] -> word (G, qhi, rho, t, kappa, qlo)
    # holding nibble m = 2 b + h
    g = full.view(n_pad // ROW_PAD, 2, 8, k_tiles, 2, 2, WORDS // 2, 2).permute(0, 4, 2, 3, 6, 5, 1, 7)
    g = g.to(torch.int32).reshape(n_pad, k_tiles * WORDS, 4)
    word = g[..., 0] | (g[..., 1] << 4) | (g[..., 2] << 8) | (g[..., 3] << 12)
    packed = torch.where(word >= 1 << 15, word - (1 << 16), word).to(torch.int16).contiguous()
    values = [float(v) for v in codebook.detach().to(torch.float32).cpu()] + [0.0] * (TABLE - ncb)
    cb = torch.tensor(values, dtype=torch.float32, device=device)
    return TCPacked(packed, cb, tuple(values), n_out, n_in, nnz)


def _pair_words(codebook: Tensor, table: tuple[float, ...] | None = None) -> Tensor:
    """``[256]`` int64: for every byte, the float32 bit patterns of its low code's value (low word) and its high
    code's value (high word), so one gather per byte decodes two weights. Given the layer's host ``table`` (the
    same values as ``codebook``), the words come from a per-process cache (one op less per call than eight)."""
    if table is not None and _real(codebook):
        return _pair_words_cached(tuple(table), codebook.device)
    byte = torch.arange(256, device=codebook.device)
    cb = codebook.to(torch.float32)
    return torch.stack([cb[byte & 15], cb[byte >> 4]], dim=1).contiguous().view(torch.int64).view(256)


@functools.lru_cache(maxsize=256)
def _pair_words_cached(table: tuple[float, ...], device: torch.device) -> Tensor:
    return _pair_words(torch.tensor(table, dtype=torch.float32, device=device))


_native = native.usable
_real = native.is_real


def _bytes_in_row_order(codes: Tensor) -> Tensor:
    """uint8 ``[rows_padded, k_tiles * 128]``: the code bytes (two codes, columns ``2i`` and ``2i + 1``) of ``W`` in
    row-major order, from the words' storage order (one permute of the bytes)."""
    n_pad, k_tiles = codes.shape[0], codes.shape[1] // WORDS
    b = codes.view(torch.uint8).view(n_pad // ROW_PAD, 2, 8, k_tiles, WORDS // 2, 2, 2)  # G, qhi, rho, t, kappa, qlo, b
    return b.permute(0, 6, 2, 3, 1, 5, 4).reshape(n_pad, k_tiles * TILE_K // 2)  # G, b, rho, t, qhi, qlo, kappa


def _decode_bytes(b: Tensor, codebook: Tensor, table: tuple[float, ...] | None = None) -> Tensor:
    """float32 ``[rows, 2 * bytes]``: each byte's low and high code values, side by side (``b``: uint8
    ``[rows, bytes]``, any strides)."""
    if _native(b, codebook):
        return native.decode(b.contiguous(), codebook.to(torch.float32).contiguous()).view(b.shape[0], -1)
    idx = b.to(torch.int32).view(-1)  # one copy, contiguous, whatever b's strides
    pairs = _pair_words(codebook, table if _real(b, codebook) else None)
    return torch.index_select(pairs, 0, idx).view(torch.float32).view(b.shape[0], -1)


def decode_dense_tc(packed: TCPacked) -> Tensor:
    """The dense float32 ``[out_features, in_features]`` weight of a packed layer."""
    p = packed
    if _native(p.codes, p.codebook):
        return native.decode_tc_rows(p.codes, 0, p.out_features, p.codebook.contiguous())[:, : p.in_features]
    return _decode_bytes(_bytes_in_row_order(p.codes)[: p.out_features], p.codebook, p.table)[:, : p.in_features]


def tc_rows(packed: TCPacked, idx: Tensor) -> Tensor:
    """The decoded rows ``idx`` (1-D) of a packed layer, float32 ``[len(idx), in_features]`` (the row lookup of a
    tied embedding that shares this layer): only the two storage rows that hold each row's codes are read."""
    p = packed
    idx = idx.to(device=p.codes.device, dtype=torch.int64)
    k_tiles = p.k_tiles
    base = idx - (idx % ROW_PAD) + idx % 8  # storage rows of quarters 0-1 and (+ 8) 2-3
    b = p.codes.view(torch.uint8).view(p.rows_padded, k_tiles, WORDS // 2, 2, 2)  # rows, t, kappa, qlo, b
    half = ((idx // 8) % 2).view(-1, 1, 1, 1, 1).expand(-1, k_tiles, WORDS // 2, 2, 1)
    q01 = torch.gather(b[base], 4, half).squeeze(4)  # [n, t, kappa, qlo]
    q23 = torch.gather(b[base + 8], 4, half).squeeze(4)
    rows = torch.stack([q01, q23], dim=2).permute(0, 1, 2, 4, 3).reshape(idx.numel(), -1)  # n, t, qhi, qlo, kappa
    return _decode_bytes(rows, p.codebook, p.table)[:, : p.in_features]


@functools.lru_cache(maxsize=64)
def _storage_columns_cached(k_tiles: int, in_features: int, device: torch.device) -> Tensor:
    return _storage_columns_of(k_tiles, in_features, device)


def _storage_columns_of(k_tiles: int, in_features: int, device: torch.device) -> Tensor:
    """int64 ``[2, 2, k_tiles * 256]``: for the storage rows of quarter pair ``qhi`` (``[qhi]``) and their code bytes
    ``b'`` (``[qhi, b']``), the column of ``x`` that multiplies each decoded value of a storage row, in its storage
    order ``(t, kappa, qlo, b, h)``; ``in_features`` (a zero appended to ``x``) where ``b != b'`` or the column is
    padding."""
    t, kappa, qlo, b, h = torch.meshgrid(torch.arange(k_tiles), torch.arange(WORDS // 2), torch.arange(2),
                                         torch.arange(2), torch.arange(2), indexing="ij")  # fmt: skip
    zero = torch.tensor(in_features)
    out = []
    for qhi in range(2):
        col = t * TILE_K + 64 * (2 * qhi + qlo) + 2 * kappa + h
        col = torch.where(col < in_features, col, zero)
        out.append(torch.stack([torch.where(b == b_, col, zero).reshape(-1) for b_ in range(2)]))
    return torch.stack(out).to(device)


#: a layer with fewer positions decodes whole and runs ``F.linear`` on its unpadded weight (the dense layer's result
#: bit for bit); a larger one multiplies block by block (the native decode's row blocks, or without it the storage
#: order up to ``STORAGE_ORDER_MAX_BATCH`` rows of ``x``: no byte permute of the weight), in a different summation
#: order than ``F.linear`` on the dense weight
BLOCKED_MIN = 1 << 16
#: without the native decode, at most this many rows of ``x`` multiply in storage order (faster than the row-order
#: decode at 16 rows in 4 of the 5 shapes of bench/RESULTS.md "CPU path vs dense, third run", at 32 in 2, at 64 in none)
STORAGE_ORDER_MAX_BATCH = 16


def tc_linear_reference(x: Tensor, packed: TCPacked, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """``act(x @ W.T + bias)`` with fp32 accumulation, output in ``x.dtype``: ``W`` decoded once, then torch's
    matrix product.

    A layer of fewer than ``BLOCKED_MIN`` positions is decoded whole and ``F.linear`` runs on its unpadded weight (as
    on the dense one). A larger one, with the native decode (:mod:`~dc_lightning.kernels.native`; real CPU tensors),
    decodes a cache-sized block of rows at a time in row order and multiplies it (:func:`_row_block_product`);
    without it, the codes are gathered with PyTorch ops (one gather per code byte): up to
    ``STORAGE_ORDER_MAX_BATCH`` rows multiply in the words' storage order (:func:`_storage_order_product`), more
    decode whole in row order.
    """
    p = packed
    k_pad = p.k_tiles * TILE_K
    small = p.out_features * p.in_features < BLOCKED_MIN
    if not small and _native(x, p.codes, p.codebook):
        y = _row_block_product(x.to(torch.float32), p)
    elif small or x.shape[0] > STORAGE_ORDER_MAX_BATCH:
        w = decode_dense_tc(p)
        w = w.contiguous() if k_pad != p.in_features else w  # F.linear as on the dense weight
        return decoded_linear(x, w, bias, relu)
    else:
        y = _storage_order_product(x.to(torch.float32), p)[:, : p.out_features]
    return finish_linear(y, bias, relu, x.dtype)


#: decoded bytes per block of :func:`_storage_order_product` (PyTorch gathers): the block's index, its values and its
#: product stay in a core's L2 (of 0.25-4 MiB, the fastest or within 2 % of it at batch 1-4 in every shape on the
#: 2-core dev box, 1 thread; 1-2 MiB wins by up to 21 % at 16: bench/RESULTS.md "CPU path vs dense, third run")
BLOCK_BYTES = 1 << 19


def _row_block_product(x: Tensor, p: TCPacked) -> Tensor:
    """``x @ W.T``, fp32 ``[B, out_features]`` (``x``: fp32 ``[B, in_features]``), with the native decode: a block of
    rows at a time decoded in row order and multiplied (:func:`~dc_lightning.kernels.runtime.blocked_product`)."""
    lib, codes, cb = native.library(), p.codes, p.codebook.contiguous()  # shapes checked by the caller's check_call

    def decode(row0: int, n: int, out: Tensor) -> None:
        lib.dc_decode_tc_rows(codes.data_ptr(), row0, n, p.k_tiles, cb.data_ptr(), out.data_ptr())

    return blocked_product(x, p.out_features, p.k_tiles * TILE_K, decode)


def _storage_order_product(x: Tensor, p: TCPacked) -> Tensor:
    """``x @ W.T``, fp32 ``[B, rows_padded]``, from the words in storage order (``x``: fp32 ``[B, in_features]``).

    Storage row ``(G, qhi, rho)`` holds, in byte ``b`` of its words, row ``16 G + 8 b + rho``'s codes of quarter pair
    ``qhi``. A block of groups ``G`` is converted to an int32 index with the quarter pair outermost (one copy whose
    inner runs are whole storage rows), decoded by one gather per code byte (two values), and each quarter pair's
    ``[rows, K]`` block is multiplied by two copies of ``x`` in its column order (:func:`_storage_columns_of`), each
    zero on the other byte's values: ``[2 B, rows]``, where copy ``b'`` gives output rows ``16 G + 8 b' + rho``.
    Half of those products multiply zeros, which costs little at small ``B`` (reading the block dominates), and
    nothing is permuted at the weight's size.
    """
    B, n_pad, k_pad = x.shape[0], p.rows_padded, p.k_tiles * TILE_K
    xz = torch.nn.functional.pad(x, (0, 1))
    real = _real(x, p.codes)
    columns = _storage_columns_cached if real else _storage_columns_of  # a cached constant cannot meet fake tensors
    cols = columns(p.k_tiles, p.in_features, x.device)
    xs = torch.index_select(xz, 1, cols.view(-1)).view(B, 2, 2, k_pad).permute(1, 2, 0, 3).reshape(2, 2 * B, k_pad)
    groups = n_pad // ROW_PAD
    step = max(1, BLOCK_BYTES // (ROW_PAD * k_pad * 4))
    kb = k_pad // 2  # code bytes of one storage row
    per_group = ROW_PAD * kb
    src = p.codes.view(torch.uint8).view(groups, 2, 8, kb).transpose(0, 1)  # qhi, G, rho, bytes
    pairs = _pair_words(p.codebook, p.table if real else None)
    idx = torch.empty(min(step, groups) * per_group, dtype=torch.int32, device=x.device)
    vals = torch.empty(idx.numel(), dtype=torch.int64, device=x.device)
    reuse = not (torch.is_grad_enabled() and x.requires_grad)  # autograd keeps each block for the backward
    outs = []
    for s in range(0, groups, step):
        g = min(step, groups - s)
        if not reuse and s:
            idx, vals = torch.empty_like(idx), torch.empty_like(vals)
        i = idx[: g * per_group]
        i.view(2, g, 8, kb).copy_(src[:, s : s + g])
        v = vals[: g * per_group]
        torch.index_select(pairs, 0, i, out=v)
        d = v.view(torch.float32).view(2, g * 8, k_pad)
        y = torch.mm(xs[0], d[0].t())
        outs.append(y.addmm_(xs[1], d[1].t()))  # [(b', B), (G, rho)]
    y = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
    return y.view(2, B, groups, 8).permute(1, 2, 0, 3).reshape(B, n_pad)
