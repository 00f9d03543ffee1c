"""The dense packed-code (LUT) layout: every weight position holds a 2-, 4- or 8-bit codebook index.

For layers that were quantized but barely pruned (transformer layers look like that) a sparse layout spends more
bytes on positions than on codes; here every position stores its code, in ``cbits``-bit fields packed into int32
words, and the kernel (``jit.py``) decodes a tile once per program and multiplies it on tensor cores with the
batch tile. Pruned positions are encoded in one of two ways, whichever needs fewer bits per position:

* a **zero code**: the codebook gets one more entry, 0.0 (4-bit codebooks with at most 15 centroids, 3-bit ones ...);
* a **bitmap**: one bit per position (1 = kept) beside the codes (16-centroid 4-bit layers: 4 + 1 bits instead of 8).

Word layout (``G = 32 * PW`` columns per group, ``PW = 32 // cbits`` codes per word, ``K`` padded to a multiple of
``G``): word ``codes[n, g * 32 + j]`` holds, at bits ``[s * cbits, (s + 1) * cbits)``, the code of column
``g * G + s * 32 + j``. So one row's 32 words of a group decode, slice ``s`` by slice, into 32 consecutive columns
each: a slice is one ``[rows, 32]`` operand of ``tl.dot`` with no interleaving shuffle. The bitmap is the plain
row-major bit matrix: ``mask[n, c // 32]`` bit ``c % 32`` (``c`` = column), i.e. word ``g * PW + s`` of a row covers
slice ``s`` of group ``g``.

This module owns the layout (:class:`LUTPacked` with its checks of a call, :meth:`LUTPacked.check`,
:func:`pack_lut`, :func:`decode_dense_lut`, the row lookup :func:`lut_rows`) and :func:`lut_linear_reference`, the
pure-PyTorch product that is both the tests' oracle and the CPU fallback of ``torch.ops.dc_lightning.lut_linear``.
For that product a large layer of 2- or 4-bit codes is decoded in *word order* (:func:`word_order_columns`: every
code byte gathers its codes' values at once, ``x`` is permuted instead of the weight).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from dc_lightning.buffers import MAX_CODES

from .. import native
from ..runtime import PackedLayer, blocked_product, decoded_linear, finish_linear, sorted_coordinates

__all__ = [
    "LUTPacked",
    "CONTAINER_BITS",
    "WORDS_PER_GROUP",
    "lut_encoding",
    "bytes_per_position",
    "pack_lut",
    "decode_dense_lut",
    "lut_rows",
    "lut_linear_reference",
    "word_order_columns",
    "WORD_ORDER_MIN",
    "BLOCKED_MIN",
    "NATIVE_CBITS",
]

CONTAINER_BITS = (2, 4, 8)
WORDS_PER_GROUP = 32  # words of one row per column group: one slice = 32 columns = one int32 of the bitmap
# positions (out x padded in) from which the CPU product decodes 2- and 4-bit codes in word order (measured crossover
# ~2**17.6 on the 2-core CPU: below it the extra ops of the bitmap fold cost more than the shifts they save)
WORD_ORDER_MIN = 1 << 18


def _container(n_values: int) -> int | None:
    for b in CONTAINER_BITS:
        if n_values <= 1 << b:
            return b
    return None


def lut_encoding(n_centroids: int, dense: bool) -> tuple[int, bool]:
    """``(cbits, bitmap)`` for a codebook of ``n_centroids`` values: the cheapest of zero code and bitmap.

    A fully dense layer needs neither; otherwise a zero code costs ``container(n + 1)`` bits per position and a
    bitmap ``container(n) + 1``; ties go to the zero code (one load less per slice).

    Raises:
        ValueError: if ``n_centroids`` is not in ``[1, MAX_CODES]`` (256).
    """
    if not 1 <= n_centroids <= MAX_CODES:
        raise ValueError(f"codebook must have 1..{MAX_CODES} centroids, got {n_centroids}")
    plain = _container(n_centroids)
    if dense:
        return plain, False
    zero = _container(n_centroids + 1)
    if zero is not None and zero <= plain + 1:
        return zero, False
    return plain, True


@dataclass
class LUTPacked(PackedLayer):
    """A layer in the dense packed-code layout (see the module docstring).

    Attributes:
        codes: int32 ``[out_features, n_groups * 32]`` packed codes.
        mask: int32 ``[out_features, n_groups * PW]`` bitmap of kept positions, or ``None`` (every position holds its
            code; pruned ones the zero code).
        codebook: float32 ``[2**cbits]`` (unused slots and the zero code hold 0.0).
        out_features: rows of ``W``.
        in_features: columns of ``W``.
        cbits: bits per code, 2, 4 or 8.
        nnz: kept weights (-1 when unknown).
    """

    codes: Tensor
    mask: Tensor | None
    codebook: Tensor
    out_features: int
    in_features: int
    cbits: int
    nnz: int = -1

    @property
    def codes_per_word(self) -> int:
        return 32 // self.cbits

    @property
    def group_cols(self) -> int:
        """Columns per group (``32 * codes_per_word``)."""
        return WORDS_PER_GROUP * self.codes_per_word

    @property
    def n_groups(self) -> int:
        return -(-self.in_features // self.group_cols)

    @property
    def bits_per_position(self) -> int:
        return self.cbits + (1 if self.mask is not None else 0)

    def op_args(self, x: Tensor, bias: Tensor | None = None, relu: bool = False) -> tuple:
        """The positional arguments of the registered op ``torch.ops.dc_lightning.lut_linear`` for ``x``."""
        return (x, self.codes, self.mask, self.codebook, bias, self.out_features, self.in_features, self.cbits, relu)

    def check(self) -> None:
        """Validate codes, bitmap, codebook and ``cbits`` for a call (no data reads: no host sync).

        Raises:
            ValueError: on any mismatch, naming the field, the bad value and what is valid.
        """
        if self.cbits not in CONTAINER_BITS:
            raise ValueError(f"cbits must be one of {CONTAINER_BITS}, got {self.cbits}")
        codes, mask, codebook, n_out = self.codes, self.mask, self.codebook, self.out_features
        n_words = self.n_groups * WORDS_PER_GROUP
        if codes.dtype != torch.int32 or tuple(codes.shape) != (n_out, n_words) or not codes.is_contiguous():
            raise ValueError(
                f"codes must be a contiguous int32 [out_features, n_groups*32] = [{n_out}, {n_words}] tensor, "
                f"got {codes.dtype} shape {tuple(codes.shape)}"
            )
        n_mask = self.n_groups * self.codes_per_word
        if mask is not None and (
            mask.dtype != torch.int32 or tuple(mask.shape) != (n_out, n_mask) or not mask.is_contiguous()
        ):
            raise ValueError(
                f"mask must be None or a contiguous int32 [out_features, in_padded/32] = [{n_out}, {n_mask}] "
                f"tensor, got {mask.dtype} shape {tuple(mask.shape)}"
            )
        if codebook.dtype != torch.float32 or codebook.dim() != 1 or codebook.numel() != 1 << self.cbits:
            raise ValueError(
                f"codebook must be float32 [2**cbits] = [{1 << self.cbits}], got {codebook.dtype} "
                f"shape {tuple(codebook.shape)}"
            )


def _to_int32(words: Tensor) -> Tensor:
    """int64 holding 32-bit patterns (possibly offset by multiples of 2**32) -> int32 with the same low 32 bits."""
    low = words & 0xFFFFFFFF
    return torch.where(low >= 2**31, low - 2**32, low).to(torch.int32)


def pack_lut(
    out_features: int,
    in_features: int,
    rows: Tensor,
    cols: Tensor,
    codes: Tensor,
    codebook: Tensor,
    *,
    cbits: int | None = None,
    bitmap: bool | None = None,
    device: torch.device | str | None = None,
) -> LUTPacked:
    """Build the dense packed-code layout of a weight-shared layer (done once, at load time).

    Args:
        out_features, in_features: shape of ``W``.
        rows, cols, codes: integer ``[nnz]`` coordinates and codebook indices of the kept weights (unique pairs).
        codebook: float ``[n_centroids]``, ``1 <= n_centroids <= MAX_CODES`` (256).
        cbits: bits per code (2, 4 or 8); ``None`` picks it with ``bitmap`` by :func:`lut_encoding`.
        bitmap: store a bitmap of kept positions (``None``: :func:`lut_encoding` decides).
        device: where the packed tensors go (default: the device of ``rows``).

    Raises:
        ValueError: on a bad shape, an out-of-range index or code, duplicate pairs, or codes that do not fit
            ``cbits`` (with the zero code when there is no bitmap and positions are pruned).
    """
    n_out, n_in, rows, cols, codes, codebook = sorted_coordinates(
        out_features, in_features, rows, cols, codes, codebook
    )
    device = torch.device(device) if device is not None else rows.device
    # built where the layer goes: a 4096 x 11008 layer is 45M positions, seconds on a CPU core, milliseconds on a GPU
    rows, cols, codes = rows.to(device), cols.to(device), codes.to(device)
    ncb, nnz = codebook.numel(), rows.numel()
    dense = nnz == n_out * n_in
    auto_bits, auto_bitmap = lut_encoding(ncb, dense)
    bitmap = auto_bitmap if bitmap is None else bool(bitmap)
    need = ncb if (bitmap or dense) else ncb + 1  # + the zero code
    if cbits is None:
        cbits = auto_bits if bitmap == auto_bitmap else _container(need)
    if cbits not in CONTAINER_BITS or need > 1 << cbits:
        raise ValueError(
            f"cbits={cbits} cannot hold {need} codes ({ncb} centroids{'' if bitmap or dense else ' + the zero code'});"
            f" valid: one of {CONTAINER_BITS} with 2**cbits >= {need}"
        )
    pw = 32 // cbits
    g_cols = WORDS_PER_GROUP * pw
    k_pad = -(-n_in // g_cols) * g_cols
    fill = 0 if bitmap or dense else ncb  # pruned and padding positions: a 0.0 (zero code), or any code (bitmap)
    # Scatter straight into the words (no [out, in] code matrix): every word starts as `fill` in all its slots and
    # each kept weight adds (code - fill) << (slice * cbits) to its word; the fields are disjoint, so the int64 sums
    # are the final bit patterns, truncated to int32 at the end.
    n_words = k_pad // pw
    pattern = sum(fill << (s * cbits) for s in range(pw))
    words = torch.full((n_out * n_words,), pattern, dtype=torch.int64, device=device)
    word = rows * n_words + (cols // g_cols) * WORDS_PER_GROUP + cols % WORDS_PER_GROUP
    shift = ((cols % g_cols) // WORDS_PER_GROUP) * cbits
    words.index_put_((word,), (codes - fill) << shift, accumulate=True)
    mask = None
    if bitmap:
        bits = torch.zeros(n_out * (k_pad // 32), dtype=torch.int64, device=device)
        bits.index_put_((rows * (k_pad // 32) + cols // 32,), torch.ones_like(cols) << (cols % 32), accumulate=True)
        mask = _to_int32(bits.view(n_out, -1))
    words = _to_int32(words.view(n_out, n_words))
    cb = torch.zeros(1 << cbits, dtype=torch.float32, device=device)
    cb[:ncb] = codebook.detach().to(device=device, dtype=torch.float32)
    return LUTPacked(words, mask, cb, n_out, n_in, int(cbits), nnz)


@functools.lru_cache(maxsize=16)
def _lane_tables(cbits: int, device: torch.device) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Constant tables of the bitmap fold (they depend on ``cbits`` only; a few KiB, built once per device):
    ``spread`` ``[256]`` int64 whose byte ``t`` of entry ``v`` is bit ``t`` of ``v``, and per octet ``o`` of slices
    a ``[256]`` int64 of 4 int16 lanes: lane ``b`` holds, at bits ``8..8+cpb``, the bits ``8o..8o+7`` of the entry
    that are the slices of byte ``b`` (``b * cpb .. b * cpb + cpb - 1``)."""
    cpb, pw = 8 // cbits, 32 // cbits
    v = torch.arange(256, device=device).view(-1, 1)
    spread = ((v >> torch.arange(8, device=device)) & 1).to(torch.uint8).view(torch.int64).view(256)
    lanes = []
    for octet in range(-(-pw // 8)):
        r0 = torch.arange(4, device=device) * cpb - 8 * octet  # byte b's first slice, relative to the octet
        field = ((v >> r0.clamp(0, 7)) & ((1 << cpb) - 1)) * ((r0 >= 0) & (r0 < 8))
        lanes.append((field << 8).to(torch.int16).contiguous().view(torch.int64).view(256))
    return spread, tuple(lanes)


def _mask_lanes(p: LUTPacked, n: int) -> Tensor:
    """int64 ``[n * n_words]``: for every code word, its 4 bytes' kept bits as 4 int16 lanes (bits 8.. of lane ``b``:
    the bits of the ``cpb`` codes of byte ``b``), ready to be ORed into the word's bytes widened to int16.

    Code word ``j`` of group ``g`` holds slices ``s = 0..PW-1``, whose kept bits are bit ``j`` of the ``PW`` bitmap
    words of the group: a bit-matrix transpose, done on bytes. Every bitmap byte (word ``s``, byte ``q``: columns
    ``j = 8q..8q+7``) is spread to one byte per bit, and a tree of ORs with shifts folds the words ``s`` of each
    octet of slices into bit ``s % 8`` of those bytes: byte ``j`` of the result holds the kept bits of word ``j``'s
    slices. A 256-entry table per octet then moves each byte's ``cpb`` bits to their lanes."""
    pw = p.codes_per_word
    spread, lane_tables = _lane_tables(p.cbits, p.mask.device)
    bits = torch.index_select(spread, 0, p.mask.view(torch.uint8).reshape(-1).to(torch.int32))
    bits = bits.view(n, -1, pw, 4)  # [n, g, s, q]: byte t = kept bit of column j = 8q + t of slice s
    lanes = None
    for octet, table in enumerate(lane_tables):
        part = bits[:, :, 8 * octet : 8 * octet + 8]
        while part.shape[2] > 1:  # in place (no allocation); then bit s % 8 of byte j = word j's slice s
            half = part.shape[2] // 2
            part = part[:, :, :half].bitwise_or_(part[:, :, half:].bitwise_left_shift_(half))
        got = torch.index_select(table, 0, part.contiguous().view(torch.uint8).reshape(-1).to(torch.int32))
        lanes = got if lanes is None else lanes.bitwise_or_(got)
    return lanes


def _unit_table(codebook: Tensor, cbits: int, bitmap: bool) -> Tensor:
    """The values of every code byte, one element per byte: entry ``byte | kept << 8`` (``kept``: the byte's codes'
    bitmap bits, with a bitmap) holds its ``cpb = 8 // cbits`` codes' values, a pruned one times 0.0 (so -0.0 for a
    negative code, as a product with the bitmap gives), as float32 (1 code), int64 (2) or complex128 (4) bit patterns:
    one 1-D gather per byte decodes them all."""
    cpb, dev = 8 // cbits, codebook.device
    idx = torch.arange(256 << (cpb if bitmap else 0), device=dev).view(-1, 1)
    u = torch.arange(cpb, device=dev)
    vals = codebook.to(torch.float32)[((idx & 255) >> (u * cbits)) & ((1 << cbits) - 1)]  # [T, cpb]
    if bitmap:
        vals = vals * ((idx >> 8 >> u) & 1).to(torch.float32)
    return vals.contiguous().view({1: torch.float32, 2: torch.int64, 4: torch.complex128}[cpb]).view(-1)


def _decode_word_order(p: LUTPacked, n: int) -> Tensor:
    """float32 ``[n, n_groups * G]`` in *word order*: the ``n`` rows held, each word's bytes in memory order, each
    byte's codes low first (position ``((g * 32 + j) * 4 + b) * cpb + u`` is column ``g * G + (b * cpb + u) * 32 +
    j``: :func:`word_order_columns`). No shifts and no transpose: one int32 index per code byte (the byte, ORed with
    its bitmap bits by :func:`_mask_lanes`) and one gather from :func:`_unit_table`."""
    byte = p.codes.view(torch.uint8).reshape(-1)  # little-endian: byte b of a word is its slices b*cpb.. in memory
    if p.mask is None:
        idx = byte.to(torch.int32)
    else:
        wide = byte.to(torch.int16)
        wide.view(torch.int64).bitwise_or_(_mask_lanes(p, n))
        idx = wide.to(torch.int32)
    table = _unit_table(p.codebook, p.cbits, p.mask is not None)
    return torch.index_select(table, 0, idx).view(torch.float32).view(n, -1)


def word_order_columns(cbits: int, n_groups: int, device: torch.device | str | None = None) -> Tensor:
    """int64 ``[n_groups * G]``: the column of each word-order position (see :func:`_decode_word_order`)."""
    cpb = 8 // cbits
    q = torch.arange(n_groups * WORDS_PER_GROUP * 4 * cpb, device=device)
    u, b, j = q % cpb, (q // cpb) % 4, (q // (4 * cpb)) % WORDS_PER_GROUP
    return (q // (4 * cpb * WORDS_PER_GROUP)) * (4 * cpb * WORDS_PER_GROUP) + (b * cpb + u) * WORDS_PER_GROUP + j


def decode_dense_lut(packed: LUTPacked) -> Tensor:
    """The dense float32 ``[out, in]`` weight of a packed layer."""
    # Word j of group g holds the code of column g * G + s * 32 + j at bits [s * cbits, (s + 1) * cbits): shifting
    # the [n, g, 1, 32] words by the [pw, 1] slice shifts gives the codes already in column order [n, g, s, j], then
    # one int32 gather from the codebook. A bitmap folds into that gather: bit c % 32 of word c // 32 (column c, the
    # same [n, g * pw, 32] order) lands on bit cbits of the code, by a [256, 8] table of the bitmap's bytes (the
    # words' bytes in memory order: little-endian, as on every CPU and GPU PyTorch runs on), and the codebook gets a
    # copy times 0.0 below it: a pruned position reads codebook * 0.0 (so -0.0 for a negative code, as a product
    # with the bitmap gives).
    p = packed
    n, cbits, dev = p.codes.shape[0], p.cbits, p.codes.device  # rows held (lut_rows hands a row subset)
    if cbits in NATIVE_CBITS and _native(p):  # the same values (signed zeros included), by SIMD table lookups
        return native.decode_lut_rows(p.codes, p.mask, 0, n, cbits, _table16(p))[:, : p.in_features]
    shifts = torch.arange(p.codes_per_word, device=dev, dtype=torch.int32).view(-1, 1) * cbits
    codes = p.codes.view(n, -1, 1, WORDS_PER_GROUP) >> shifts  # [n, g, s, j]
    codes &= (1 << cbits) - 1
    table = p.codebook.to(torch.float32)
    if p.mask is not None:
        byte = torch.arange(256, device=dev, dtype=torch.int32)
        kept = ((byte.view(-1, 1) >> torch.arange(8, device=dev, dtype=torch.int32)) & 1) << cbits  # [256, 8]
        codes.view(-1, 8).bitwise_or_(torch.index_select(kept, 0, p.mask.view(torch.uint8).view(-1).to(torch.int32)))
        table = torch.cat([table * 0.0, table])
    return torch.index_select(table, 0, codes.view(-1)).view(n, -1)[:, : p.in_features]


def lut_rows(packed: LUTPacked, idx: Tensor) -> Tensor:
    """The decoded rows ``idx`` (1-D) of a packed layer, float32 ``[len(idx), in_features]``: the rows' code (and
    bitmap) words gathered, then decoded like the whole matrix. An embedding lookup on the weight of a tied output
    layer reads its rows here (``CompressedLinear`` and ``TiedEmbedding`` share the packed tensors)."""
    p = packed
    mask = p.mask[idx] if p.mask is not None else None
    return decode_dense_lut(LUTPacked(p.codes[idx], mask, p.codebook, idx.shape[0], p.in_features, p.cbits))


def lut_linear_reference(x: Tensor, packed: LUTPacked, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """``act(x @ W.T + bias)`` with fp32 accumulation, output in ``x.dtype``: ``W`` decoded once, then ``F.linear``.

    A layer of 2- or 4-bit codes with at least ``WORD_ORDER_MIN`` positions is decoded in word order
    (:func:`_decode_word_order`: one gather per code byte, no shifts, no transpose) and ``x`` permuted to match
    (padded columns meet zeros), as the ``tc`` reference does; smaller layers (where the op count wins) and 8-bit
    codes (one code per byte: nothing to pair) decode in column order (:func:`decode_dense_lut`). Measured on the
    2-core CPU, 1 thread, batch 1 (bench/RESULTS.md "CPU path vs dense"): 1024 x 1024 4-bit with a bitmap ~2.2 ->
    ~1.5 ms, without ~1.35 -> ~0.85 ms; 64 x 768 0.11 vs 0.18 ms (so, column order there).
    """
    p = packed
    k_pad = p.n_groups * p.group_cols
    if p.cbits in NATIVE_CBITS and p.out_features * p.in_features >= BLOCKED_MIN and _native(p, x):
        return finish_linear(_row_block_product(x.to(torch.float32), p), bias, relu, x.dtype)
    if p.cbits == 8 or p.out_features * k_pad < WORD_ORDER_MIN:
        return decoded_linear(x, decode_dense_lut(p), bias, relu)
    w = _decode_word_order(p, p.out_features)
    xp = torch.nn.functional.pad(x, (0, k_pad - p.in_features)) if k_pad != p.in_features else x
    return decoded_linear(torch.index_select(xp, 1, _columns(p.cbits, p.n_groups, x.device)), w, bias, relu)


#: code widths the native decode handles (a table of at most 16 values; 8-bit codes take the PyTorch gathers)
NATIVE_CBITS = (2, 4)
#: with the native decode, a layer of at least this many positions multiplies a block of rows at a time
#: (:func:`_row_block_product`); a smaller one is decoded whole and ``F.linear`` runs once (bit for bit the dense
#: layer's result)
BLOCKED_MIN = 1 << 16


def _native(p: LUTPacked, *more: Tensor) -> bool:
    tensors = [p.codes, p.codebook, *more] + ([p.mask] if p.mask is not None else [])
    return native.usable(*tensors)


def _table16(p: LUTPacked) -> Tensor:
    """The codebook as the native decode's 16-entry table (zeros past ``2**cbits``)."""
    cb = p.codebook.to(torch.float32).contiguous()
    return torch.nn.functional.pad(cb, (0, 16 - cb.numel())) if cb.numel() < 16 else cb


def _row_block_product(x: Tensor, p: LUTPacked) -> Tensor:
    """``x @ W.T``, fp32 ``[B, out_features]``, with the native decode: a block of rows at a time decoded in column
    order and multiplied (:func:`~dc_lightning.kernels.runtime.blocked_product`)."""
    lib, table = native.library(), _table16(p)
    mask = 0 if p.mask is None else p.mask.data_ptr()  # shapes checked by the caller's check_call

    def decode(row0: int, n: int, out: Tensor) -> None:
        lib.dc_decode_lut_rows(p.codes.data_ptr(), mask, row0, n, p.n_groups, p.cbits, table.data_ptr(), out.data_ptr())

    return blocked_product(x, p.out_features, p.n_groups * p.group_cols, decode)


@functools.lru_cache(maxsize=64)
def _columns(cbits: int, n_groups: int, device: torch.device) -> Tensor:
    """:func:`word_order_columns`, kept per shape (a few KiB; its 10 small ops cost ~0.04 ms a call)."""
    return word_order_columns(cbits, n_groups, device)


def bytes_per_position(n_centroids: int, density: float) -> float:
    """Bytes per weight position of this layout for a codebook size and density (for the layout choice)."""
    cbits, bitmap = lut_encoding(n_centroids, density >= 1.0)
    return (cbits + (1 if bitmap else 0)) / 8.0
