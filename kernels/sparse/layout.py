"""The EIE sparse layout: a pruned, weight-shared layer as sliced-ELL blocks of ``(column, code)`` entries.

``W`` is a pruned and weight-shared layer (Deep Compression [DC] §2-3, EIE [EIE] §III): every kept weight is an
index into a small codebook (up to ``dc_lightning.buffers.MAX_CODES`` = 256 centroids). The stored interchange stream
(relative indices + Huffman, ``dc_lightning.io``) is not what the GPU reads: :func:`pack` re-encodes a layer ONCE, at
load time, into a *sliced-ELL* layout that the kernels (``jit.py``) read with coalesced loads:

* rows are grouped into row tiles of ``row_tile`` rows, columns into chunks of ``chunk`` columns;
* every (row tile, chunk) block is an ELL block of ``width`` entries per row (``width`` = the longest row of the
  block inside that chunk; shorter rows are padded), stored column-major so that one step ``k`` of the block is
  ``row_tile`` consecutive entries;
* an entry is one 16-bit word ``(local_column << code_shift) | code`` when it fits (4-bit codebooks with chunks up to
  2048 columns), else a 32-bit word. ``code == 2**bits`` is the padding code; the packed codebook carries a 0.0 in
  that slot so padding needs no mask;
* ``block_ptr[t * n_chunks + c]`` is the first entry of block (t, c) (int32, ``n_tiles * n_chunks + 1`` values).

This module owns the layout: :class:`EIEPacked` (with its checks of a call, :meth:`EIEPacked.check`), :func:`pack` /
:func:`unpack` / :func:`decode_dense`, and :func:`eie_linear_reference`, the
pure-PyTorch product that is both the tests' oracle and the CPU fallback of ``torch.ops.dc_lightning.eie_linear``
(small batches multiply straight from the entries, :func:`sparse_product`; larger ones decode ``W`` once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import native
from ..runtime import PackedLayer, decoded_linear, finish_linear, sorted_coordinates

__all__ = [
    "EIEPacked",
    "auto_row_tile",
    "auto_chunk",
    "pack",
    "unpack",
    "decode_dense",
    "eie_linear_reference",
    "sparse_product",
    "use_product",
]


@dataclass
class EIEPacked(PackedLayer):
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
        nnz: real (unpadded) non-zeros (-1 when unknown: a layer rebuilt from the op's arguments).
    """

    entries: Tensor
    block_ptr: Tensor
    codebook: Tensor
    out_features: int
    in_features: int
    row_tile: int
    chunk: int
    code_shift: int
    nnz: int = -1

    @property
    def n_tiles(self) -> int:
        return -(-self.out_features // self.row_tile)

    @property
    def n_chunks(self) -> int:
        return (self.block_ptr.numel() - 1) // max(self.n_tiles, 1)

    @property
    def padding(self) -> float:
        """Padding entries per real non-zero (0.15 = 15% more entries than non-zeros)."""
        return self.entries.numel() / max(self.nnz, 1) - 1.0

    def op_args(self, x: Tensor, bias: Tensor | None = None, relu: bool = False) -> tuple:
        """The positional arguments of the registered op ``torch.ops.dc_lightning.eie_linear`` for ``x``.

        The op's schema is the only place where the layer travels as a flat argument list; every Python function
        takes the :class:`EIEPacked` itself.
        """
        return (
            x,
            self.entries,
            self.block_ptr,
            self.codebook,
            bias,
            self.out_features,
            self.in_features,
            self.row_tile,
            self.chunk,
            self.code_shift,
            relu,
        )

    @classmethod
    def from_op_args(
        cls,
        entries: Tensor,
        block_ptr: Tensor,
        codebook: Tensor,
        out_features: int,
        in_features: int,
        row_tile: int,
        chunk: int,
        code_shift: int,
    ) -> EIEPacked:
        """Inverse of :meth:`op_args` (the layer part): used inside the registered op."""
        return cls(
            entries,
            block_ptr,
            codebook,
            int(out_features),
            int(in_features),
            int(row_tile),
            int(chunk),
            int(code_shift),
        )

    def check(self) -> None:
        """Validate entries, block pointers, codebook and the integers for a call (no data reads: no host sync).

        Raises:
            ValueError: on any mismatch, naming the field, the bad value and what is valid.
        """
        entries, block_ptr, codebook = self.entries, self.block_ptr, self.codebook
        if entries.dim() != 1 or entries.dtype not in (torch.int16, torch.int32) or not entries.is_contiguous():
            raise ValueError(
                f"entries must be a contiguous 1-D int16 or int32 tensor, got {entries.dtype} "
                f"shape {tuple(entries.shape)}"
            )
        row_tile, chunk, code_shift = self.row_tile, self.chunk, self.code_shift
        if chunk < 1 or chunk & (chunk - 1):
            raise ValueError(f"chunk must be a power of two >= 1, got {chunk}")
        if code_shift + int(math.log2(chunk)) > (16 if entries.dtype == torch.int16 else 31):
            raise ValueError(f"code_shift={code_shift} and chunk={chunk} do not fit {entries.dtype} entries")
        if row_tile < 1 or row_tile & (row_tile - 1):
            raise ValueError(f"row_tile must be a power of two >= 1, got {row_tile}")
        n_tiles = -(-self.out_features // row_tile)
        n_chunks = -(-self.in_features // chunk)
        if block_ptr.dtype != torch.int32 or block_ptr.dim() != 1 or block_ptr.numel() != n_tiles * n_chunks + 1:
            raise ValueError(
                f"block_ptr must be int32 with n_tiles*n_chunks+1 = {n_tiles * n_chunks + 1} values, "
                f"got {block_ptr.dtype} shape {tuple(block_ptr.shape)}"
            )
        n_codebook = (1 << (code_shift - 1)) + 1
        if codebook.dtype != torch.float32 or codebook.dim() != 1 or codebook.numel() != n_codebook:
            raise ValueError(
                f"codebook must be float32 [2**(code_shift-1) + 1] = [{n_codebook}], "
                f"got {codebook.dtype} shape {tuple(codebook.shape)}"
            )


def auto_row_tile(out_features: int) -> int:
    # At least ~128 row tiles so that small-output layers (NT-We: 600 rows) still spread over the 132 SMs.
    rt = 1 << max(0, int(math.log2(max(out_features // 128, 1))))
    return int(min(max(rt, 8), 32))


def auto_chunk(nnz: int, out_features: int, in_features: int, row_tile: int) -> int:
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
        codebook: float ``[n_centroids]`` shared weights, ``1 <= n_centroids <= MAX_CODES`` (256).
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
    if row_tile is not None and (row_tile < 1 or row_tile > 128 or row_tile & (row_tile - 1)):
        raise ValueError(f"row_tile must be a power of two in [1, 128], got {row_tile}")
    n_out, n_in, rows, cols, codes, codebook = sorted_coordinates(
        out_features, in_features, rows, cols, codes, codebook
    )
    if row_tile is None:
        row_tile = auto_row_tile(n_out)
    device = torch.device(device) if device is not None else rows.device
    rows, cols, codes = rows.cpu(), cols.cpu(), codes.cpu()
    nnz = rows.numel()
    if chunk is None:
        chunk = auto_chunk(nnz, n_out, n_in, row_tile)
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
    # group = (row, chunk): the coordinates are row-major, so they are sorted by group and, inside a group (the
    # entries of a row inside a chunk), by column
    group = rows * n_chunks + chunk_id
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
    k = torch.arange(nnz, dtype=torch.int64) - group_start[group]  # position inside (row, chunk)
    blk = tile * n_chunks + chunk_id
    dest = block_ptr[blk] + k * row_tile + r_in_tile
    words = torch.full((total,), 1 << bits, dtype=torch.int64)  # padding: local col 0, code 2**bits
    words[dest] = ((cols % chunk) << code_shift) | codes
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


def _unpack_tensors(p: EIEPacked) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, cols, codes) of every stored entry, padding included (padding has code ``2**(code_shift-1)``)."""
    n_tiles = -(-p.out_features // p.row_tile)
    n_blocks = p.block_ptr.numel() - 1
    n_chunks = max(n_blocks // max(n_tiles, 1), 1)
    bp = p.block_ptr.to(torch.int64)
    sizes = bp[1:] - bp[:-1]
    entries = p.entries
    dev = entries.device
    blk = torch.arange(n_blocks, device=dev)
    # Block sizes are multiples of row_tile, so entry e sits in row e % row_tile of its tile: no per-entry lookup of
    # its block's start, only its tile's first row and its chunk's first column, repeated over the block's entries.
    rows = torch.repeat_interleave((blk // n_chunks) * p.row_tile, sizes, output_size=entries.numel())
    rows += torch.arange(entries.numel(), device=dev) & (p.row_tile - 1)
    words = entries.to(torch.int64) & 0xFFFF if entries.dtype == torch.int16 else entries.to(torch.int64)
    cols = torch.repeat_interleave((blk % n_chunks) * p.chunk, sizes, output_size=entries.numel())
    cols += words >> p.code_shift
    codes = words & ((1 << p.code_shift) - 1)
    return rows, cols, codes


def unpack(packed: EIEPacked) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`pack`: ``(rows, cols, codes)`` of the real non-zeros (padding dropped), int64."""
    rows, cols, codes = _unpack_tensors(packed)
    keep = codes != (1 << (packed.code_shift - 1))
    return rows[keep], cols[keep], codes[keep]


def decode_dense(packed: EIEPacked) -> Tensor:
    """The dense float32 ``[out, in]`` weight of a packed layer (contiguous)."""
    # Every entry, padding included, is index_add_-ed into zeros: padding adds 0.0 (its codebook slot) at column 0 of
    # its chunk, which is inside the matrix, so only the rows of the last tile are padded (rows past out_features
    # hold padding alone and are cropped; the crop of trailing rows stays contiguous). Every position gets at most one
    # non-zero, so the sums are exact in any order (and -0.0 comes out +0.0, as 0.0 + -0.0). No boolean indexing:
    # fixed shapes for torch.compile. The flat position of entry e of block (tile t, chunk c) is
    #   (t * row_tile + e % row_tile) * in + c * chunk + local_col,
    # a per-block base (repeated over the block's ELL steps of row_tile entries) + a per-lane row offset + the
    # word's column field: int32 arithmetic whenever the padded matrix has fewer than 2**31 positions.
    p = packed
    n, k, rt, dev = p.out_features, p.in_features, p.row_tile, p.entries.device
    n_tiles = -(-n // rt)
    n_blocks = p.block_ptr.numel() - 1
    n_chunks = max(n_blocks // max(n_tiles, 1), 1)
    n_pos = n_tiles * rt * k
    it = torch.int32 if n_pos < 2**31 else torch.int64
    blk = torch.arange(n_blocks, device=dev, dtype=it)
    base = (blk // n_chunks) * (rt * k) + (blk % n_chunks) * p.chunk  # [n_blocks]
    steps = (p.block_ptr[1:] - p.block_ptr[:-1]) // rt  # ELL steps (of row_tile entries) per block
    words = p.entries.view(torch.uint16).to(it) if p.entries.dtype == torch.int16 else p.entries.to(it)
    codes = words & ((1 << p.code_shift) - 1)
    pos = (words >> p.code_shift).view(-1, rt)  # [steps, row_tile]: local column
    pos += torch.repeat_interleave(base, steps, output_size=pos.shape[0]).view(-1, 1)
    pos += torch.arange(rt, device=dev, dtype=it) * k
    w = torch.zeros(n_pos, dtype=torch.float32, device=dev)
    w.index_add_(0, pos.view(-1), torch.index_select(p.codebook.to(torch.float32), 0, codes))
    return w.view(-1, k)[:n]


# --------------------------------------------------------------------------------------------------------------
# Reference (pure PyTorch): the oracle of the tests and the CPU fallback
# --------------------------------------------------------------------------------------------------------------

# On the CPU a product of up to PRODUCT_BUDGET * out * in / n_entries rows multiplies straight from the entries
# (``sparse_product``); a larger one decodes W once and calls F.linear. Measured crossover on the 2-core dev box, 1
# thread (bench/RESULTS.md "CPU path vs dense"): 1024x1024 at density 0.1 (1.2 entries per non-zero) the product
# wins up to ~400 rows, at 0.5 up to ~150; a budget of 32 keeps it below both (~270 and ~58 rows).
PRODUCT_BUDGET = 32
# Up to this many (rows x codebook slots) the product gathers from a table of x[b, k] * codebook[c] (one gather per
# entry, its index is the entry's word plus its chunk's first column); above, from x with the codebook value as a
# per-entry weight (a gather of the codebook first). Measured: the table wins at batch <= 4 with 4-bit codebooks.
TABLE_MAX = 128


def use_product(packed: EIEPacked, batch: int) -> bool:
    """Whether :func:`eie_linear_reference` multiplies ``batch`` rows from the entries (else it decodes ``W``)."""
    return batch * packed.entries.numel() <= PRODUCT_BUDGET * packed.out_features * packed.in_features


def _lane_major(p: EIEPacked) -> tuple[Tensor, Tensor]:
    """The entries as ``embedding_bag`` bags: ``(words, offsets)``, in few ops (at batch 1 their count is a visible
    share of the product's time).

    ``words`` int32 ``[row_tile, n_steps]``: lane ``r`` holds, in order, the entries of row ``r`` of every tile (an ELL
    step is ``row_tile`` consecutive entries, one per lane), each plus the first column of its chunk shifted left by
    ``code_shift``: ``(column << code_shift) | code`` with the column in the whole row. ``offsets`` int32 ``[row_tile *
    n_tiles]``: bag ``lane * n_tiles + tile`` (row ``tile * row_tile + lane``) starts there.
    """
    rt = p.row_tile
    lg = rt.bit_length() - 1
    n_tiles = -(-p.out_features // rt)
    n_steps = p.entries.numel() >> lg
    n_chunks = max((p.block_ptr.numel() - 1) // max(n_tiles, 1), 1)
    dev = p.entries.device
    steps_at = p.block_ptr >> lg  # [n_blocks + 1]: block starts, in ELL steps
    words = torch.empty(rt, n_steps, dtype=torch.int32, device=dev)
    words.copy_((p.entries.view(torch.uint16) if p.entries.dtype == torch.int16 else p.entries).view(-1, rt).t())
    if n_chunks > 1:  # block t * n_chunks + c starts chunk c: its steps add (c * chunk) << code_shift
        width = p.chunk << p.code_shift
        base = torch.arange(0, n_chunks * width, width, dtype=torch.int32, device=dev).expand(n_tiles, -1)
        words += torch.repeat_interleave(base.reshape(-1), steps_at.diff(), output_size=n_steps)
    lanes = torch.arange(0, rt * n_steps, n_steps, dtype=torch.int32, device=dev)  # each lane's run (n_steps > 0)
    offsets = torch.add(lanes.view(-1, 1), steps_at[:-1:n_chunks]).view(-1)
    return words, offsets


def sparse_product(x: Tensor, packed: EIEPacked) -> Tensor:
    """``x @ W.T`` (float32 ``[B, out_features]``) straight from the entries, no dense weight: the CPU product of
    small batches (:func:`use_product`).

    Every stored entry is one member of the bag of its row (``torch.embedding_bag``, sum mode, which gathers and adds
    in one pass): the bag of row ``tile * row_tile + lane`` is lane ``lane``'s run of that tile's ELL steps. Padding
    entries point at column 0 of their chunk with the codebook's 0.0 slot, so they add ``x * 0.0`` and need no mask.
    Either the bag members index a table ``x[:, k] * codebook[c]`` at ``(k << code_shift) | c`` (the entry's word
    plus its chunk's first column; batches of few rows), or they index ``x^T`` by column with ``codebook[c]`` as the
    per-member weight. Products are float32 ``x * w``, as ``F.linear`` of the decoded weight forms them; only the
    order of the sums differs.
    """
    p = packed
    B, K, sh, rt = x.shape[0], p.in_features, p.code_shift, p.row_tile
    n_tiles = -(-p.out_features // rt)
    if p.entries.numel() == 0:  # an all-pruned layer: zeros, joined to x's graph when x requires a gradient
        if x.requires_grad and torch.is_grad_enabled():
            return torch.nn.functional.linear(x.to(torch.float32), x.new_zeros(p.out_features, K, dtype=torch.float32))
        return x.new_zeros(B, p.out_features, dtype=torch.float32)
    xf = x.to(torch.float32)
    cb = p.codebook.to(torch.float32)
    words, offsets = _lane_major(p)  # (column << code_shift) | code
    if B << sh <= TABLE_MAX:
        table = torch.zeros(K, 1 << sh, B, dtype=torch.float32, device=x.device)
        table[:, : cb.numel()] = xf.t().unsqueeze(1) * cb.view(1, -1, 1)  # no out=: x may require grad
        y = torch.embedding_bag(table.view(-1, B), words.view(-1), offsets, False, 0)[0]  # mode 0: sum
    else:
        weights = cb.index_select(0, (words & ((1 << sh) - 1)).view(-1))
        cols = words.bitwise_right_shift_(sh).view(-1)
        y = torch.embedding_bag(xf.t().contiguous(), cols, offsets, False, 0, False, weights)[0]
    # bags are lane-major: [row_tile, n_tiles, B] -> rows tile * row_tile + lane
    y = y.view(rt, n_tiles, B).permute(2, 1, 0).reshape(B, n_tiles * rt)
    return y[:, : p.out_features] if y.shape[1] != p.out_features else y


def eie_linear_reference(x: Tensor, packed: EIEPacked, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """``act(x @ W.T + bias)`` with fp32 accumulation, output in ``x.dtype``: small batches on the CPU straight from the
    entries (:func:`sparse_product`, :func:`use_product`; one row, without autograd, by the native pass over them,
    :func:`~dc_lightning.kernels.native.sparse_product`), larger ones (and any on another device, where this is only
    an oracle) ``W`` decoded once, then ``F.linear``."""
    if x.shape[0] == 0 or x.device.type != "cpu" or not use_product(packed, x.shape[0]):
        return decoded_linear(x, decode_dense(packed), bias, relu)
    p = packed
    if (
        x.shape[0] == 1 and not (x.requires_grad and torch.is_grad_enabled()) and p.codebook.dtype == torch.float32
        and p.entries.is_contiguous() and p.block_ptr.is_contiguous() and p.codebook.is_contiguous()
        and native.usable(x, p.entries, p.block_ptr, p.codebook)
    ):  # fmt: skip  # one native pass over the entries at batch 1 (sampling; from 4 rows embedding_bag's vector
        # loop over the batch wins, bench/RESULTS.md "CPU path vs dense, third run"); not differentiable: the PyTorch
        # product keeps autograd
        xf = x.to(torch.float32).contiguous()
        y = native.sparse_product(xf, p.entries, p.block_ptr, p.n_chunks, p.row_tile, p.chunk, p.code_shift,
                                  p.codebook, p.out_features, checked=False)  # fmt: skip
    else:
        y = sparse_product(x, packed)
    return finish_linear(y, bias, relu, x.dtype)
