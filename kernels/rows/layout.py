"""Row layouts: a weight-shared table stored so that a lookup decodes only the rows it is asked for.

An embedding lookup reads a few rows of a large table, so these layouts keep every row addressable on its own (the
sparse and LUT layouts tile rows and columns for the matrix kernels instead). Two layouts, both pure PyTorch with
fixed shapes (they run under ``torch.compile(fullgraph=True)`` and in CUDA graphs):

* ``"ell"`` (:class:`RowELL`, sparse rows): ``entries`` [2, V, L], the columns (plane 0) and codes (plane 1) of the
  kept entries of every row in column order, padded to the longest row ``L`` by repeating the row's last entry (an
  empty row: column 0 and the zero code), so a scatter without accumulation is exact; uint8 when the columns and
  codes fit a byte (up to 256 columns and 255 centroids), else int16 up to 32767, else int32. The codebook holds the
  centroids and, last, the 0.0 of an empty row (the sparse layout's convention). A lookup is five tensor ops
  whatever its size (one gather of the rows' entries and one conversion, the codebook look-up, one scatter into
  zeros of shape [N, D]): a lookup of a few tokens is bound by its op count (bench/RESULTS.md "CPU path vs dense").
* ``"codes"`` (:class:`RowCodes`, dense codes): one code per weight, 4 bits (two per byte, the even column in the
  low nibble) when the codebook plus a 0.0 slot for pruned weights fits 16 entries, else 8 bits; a lookup is
  ``codebook[codes[rows]]``.

The codebook keeps the dtype it is packed with (``CompressedEmbedding`` packs it in the embedding's dtype); rows
and decodes come out in it. :func:`ell_bytes` / :func:`codes_bytes` give the index bytes of each, for the choice
(``layouts.choose_row_layout``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dc_lightning.buffers import MAX_CODES

from .. import native
from ..runtime import PackedLayer, decoded_linear, sorted_coordinates

__all__ = [
    "RowELL",
    "RowCodes",
    "ell_dtype",
    "ell_bytes",
    "codes_bits",
    "codes_bytes",
    "pack_ell",
    "pack_codes",
    "ell_rows",
    "codes_rows",
    "decode_ell",
    "decode_codes",
    "ell_reference",
    "codes_reference",
]


def ell_dtype(n_cols: int, n_centroids: int = 1) -> torch.dtype:
    """The ``entries`` dtype of the ``ell`` layout for rows of ``n_cols`` columns and ``n_centroids`` centroids
    (codes up to ``n_centroids``, the padding's zero code)."""
    top = max(int(n_cols) - 1, int(n_centroids))
    return torch.uint8 if top <= 255 else torch.int16 if top <= 32767 else torch.int32


def ell_bytes(lengths: Tensor, n_cols: int, n_centroids: int = 1) -> int:
    """Bytes of the ``ell`` index tensor (``entries``) for rows keeping ``lengths`` entries."""
    n_rows = lengths.numel()
    width = max(int(lengths.max()) if n_rows else 0, 1)
    return n_rows * width * 2 * ell_dtype(n_cols, n_centroids).itemsize


def codes_bits(n_codes: int) -> int:
    """Bits per code of the ``codes`` layout for ``n_codes`` codes (the codebook plus the zero slot)."""
    return 4 if n_codes <= 16 else 8


def codes_bytes(n_rows: int, n_cols: int, n_centroids: int, pruned: bool) -> int | None:
    """Bytes of the ``codes`` index tensor; ``None`` when a pruned table leaves no free code for its zeros."""
    n_codes = n_centroids + (1 if pruned else 0)
    if n_codes > MAX_CODES:
        return None
    return n_rows * -(-n_cols * codes_bits(n_codes) // 8)


@dataclass
class RowELL(PackedLayer):
    """A table in the ``ell`` row layout (see the module docstring).

    Attributes:
        entries: integer ``[2, out_features, L]``: per kept entry its column (plane 0) and its code (plane 1);
            padding repeats the row's last entry (an empty row: column 0 and the zero code ``n_centroids``).
        codebook: float ``[n_centroids + 1]``, the last value the padding's 0.0.
        out_features: rows (``num_embeddings``).
        in_features: columns (``embedding_dim``).
        nnz: kept weights (-1 when unknown).
    """

    entries: Tensor
    codebook: Tensor
    out_features: int
    in_features: int
    nnz: int = -1

    def check(self) -> None:
        """Validate the tensors' shapes and dtypes (no data reads).

        Raises:
            ValueError: naming the field, the bad value and what is valid.
        """
        n, e = self.out_features, self.entries
        if e.dim() != 3 or e.shape[0] != 2 or e.shape[1] != n or e.is_floating_point():
            raise ValueError(f"entries must be an integer [2, {n}, L] tensor (columns, codes), got {e.dtype} "
                             f"shape {tuple(e.shape)}")  # fmt: skip
        _check_codebook(self.codebook, MAX_CODES + 1)


@dataclass
class RowCodes(PackedLayer):
    """A table in the ``codes`` row layout (see the module docstring).

    Attributes:
        codes: uint8 ``[out_features, in_features]`` (8-bit) or ``[out_features, ceil(in_features / 2)]`` (4-bit).
        codebook: float ``[n_codes]``; when the table is pruned its last slot is the 0.0 of pruned weights.
        out_features: rows (``num_embeddings``).
        in_features: columns (``embedding_dim``).
        nnz: kept weights (-1 when unknown).
    """

    codes: Tensor
    codebook: Tensor
    out_features: int
    in_features: int
    nnz: int = -1

    def check(self) -> None:
        """Validate the tensors' shapes and dtypes (no data reads).

        Raises:
            ValueError: naming the field, the bad value and what is valid.
        """
        n, d = self.out_features, self.in_features
        if self.codes.dtype != torch.uint8 or self.codes.dim() != 2 or self.codes.shape[0] != n or (
            self.codes.shape[1] not in (d, -(-d // 2))
        ):  # fmt: skip
            raise ValueError(f"codes must be uint8 [{n}, {d}] or [{n}, {-(-d // 2)}], got {self.codes.dtype} "
                             f"shape {tuple(self.codes.shape)}")  # fmt: skip
        _check_codebook(self.codebook)


def _check_codebook(codebook: Tensor, most: int = MAX_CODES) -> None:
    if codebook.dim() != 1 or not codebook.is_floating_point() or not 1 <= codebook.numel() <= most:
        raise ValueError(f"codebook must be a 1-D float tensor of 1..{most} values, got {codebook.dtype} "
                         f"shape {tuple(codebook.shape)}")  # fmt: skip


def pack_ell(
    out_features: int,
    in_features: int,
    rows: Tensor,
    cols: Tensor,
    codes: Tensor,
    codebook: Tensor,
    *,
    device: torch.device | str | None = None,
) -> RowELL:
    """Pack a table's kept weights (coordinates + codes, as every layout's packer) in the ``ell`` row layout.

    Raises:
        ValueError: as ``runtime.sorted_coordinates`` (bad shape, out-of-range index or code, duplicate pairs).
    """
    n, d, rows, cols, codes, codebook = sorted_coordinates(out_features, in_features, rows, cols, codes, codebook)
    device = torch.device(device) if device is not None else rows.device
    rows, cols, codes = rows.to(device), cols.to(device), codes.to(device)
    lengths = torch.bincount(rows, minlength=n)
    width = max(int(lengths.max()), 1)
    ncb = codebook.numel()
    # rows are row-major: entry i of row r sits at slot i - (first entry of r), kept columns in column order
    k = torch.arange(rows.numel(), device=device) - (torch.cumsum(lengths, 0) - lengths)[rows]
    dt = ell_dtype(d, ncb)
    entries = torch.zeros(2, n, width, dtype=dt, device=device)
    entries[1] = ncb  # an empty row: column 0, the zero code
    entries[0, rows, k] = cols.to(dt)
    entries[1, rows, k] = codes.to(dt)
    # a row's padding repeats its last entry, so the lookup's scatter writes the same value again (no accumulate)
    slot = torch.arange(width, device=device)
    src = torch.minimum(slot[None, :], (lengths - 1).clamp(min=0)[:, None])
    entries = entries.gather(2, src.expand(2, n, width)).contiguous()
    zero = torch.zeros(1, dtype=codebook.dtype, device=device)
    return RowELL(entries, torch.cat([codebook.detach().to(device), zero]), n, d, rows.numel())


def pack_codes(
    out_features: int,
    in_features: int,
    rows: Tensor,
    cols: Tensor,
    codes: Tensor,
    codebook: Tensor,
    *,
    device: torch.device | str | None = None,
) -> RowCodes:
    """Pack a table's kept weights in the ``codes`` row layout (pruned weights get a 0.0 code of their own).

    Raises:
        ValueError: as ``runtime.sorted_coordinates``, or when a pruned table's codebook already holds
            ``MAX_CODES`` values (no free code for the zeros).
    """
    n, d, rows, cols, codes, codebook = sorted_coordinates(out_features, in_features, rows, cols, codes, codebook)
    device = torch.device(device) if device is not None else rows.device
    pruned = rows.numel() < n * d
    if codes_bytes(n, d, codebook.numel(), pruned) is None:
        raise ValueError(
            f"the 'codes' layout needs a free code for pruned weights; the codebook has {codebook.numel()}"
        )
    full = codebook.detach().to(device)
    full = torch.cat([full, full.new_zeros(1)]) if pruned else full  # slot n-1 = 0.0 for pruned weights
    c = torch.full((n, d), full.numel() - 1, dtype=torch.uint8, device=device)
    c[rows.to(device), cols.to(device)] = codes.to(device=device, dtype=torch.uint8)
    if codes_bits(full.numel()) == 4:
        c = F.pad(c, (0, d % 2)).view(n, -1, 2)
        c = c[..., 0] | (c[..., 1] << 4)  # two codes per byte, the even column in the low nibble
    return RowCodes(c.contiguous(), full, n, d, rows.numel())


_NATIVE_ENTRIES = (torch.uint8, torch.int16, torch.int32)  # entries dtypes the native lookup reads


def ell_rows(packed: RowELL, idx: Tensor) -> Tensor:
    """The decoded rows ``idx`` (1-D) of the table: ``[len(idx), in_features]`` in the codebook's dtype."""
    # five ops: a lookup of a handful of tokens is bound by their count, not by their size (bench/RESULTS.md); the
    # padding (repeated entries) needs no mask, and no op promotes a dtype (each hidden conversion is another op)
    p = packed
    if (
        p.entries.dtype in _NATIVE_ENTRIES and p.codebook.dtype == torch.float32 and idx.dtype == torch.int64
        and idx.dim() == 1 and idx.is_contiguous() and p.entries.is_contiguous() and p.codebook.is_contiguous()
        and native.usable(p.entries, p.codebook, idx)
    ):  # fmt: skip
        return native.ell_rows(p.entries, p.codebook, idx, p.in_features, checked=False)  # the same values, one call
    cols, codes = p.entries.index_select(1, idx).long().unbind(0)  # one conversion serves the scatter and the take
    vals = torch.take(p.codebook, codes)
    return torch.zeros(idx.shape[0], p.in_features, dtype=vals.dtype, device=vals.device).scatter_(1, cols, vals)


def codes_rows(packed: RowCodes, idx: Tensor) -> Tensor:
    """The decoded rows ``idx`` (1-D) of the table: ``[len(idx), in_features]`` in the codebook's dtype."""
    d = packed.in_features
    c = packed.codes[idx]  # [N, bytes per row]
    if c.shape[1] != d:  # 4-bit: low nibble = even column
        c = torch.stack([c & 15, c >> 4], dim=-1).reshape(c.shape[0], -1)[:, :d]
    return packed.codebook[c.long()]


def decode_ell(packed: RowELL) -> Tensor:
    """The dense ``[out, in]`` table (every row decoded)."""
    return ell_rows(packed, torch.arange(packed.out_features, device=packed.entries.device))


def decode_codes(packed: RowCodes) -> Tensor:
    """The dense ``[out, in]`` table (every row decoded)."""
    return codes_rows(packed, torch.arange(packed.out_features, device=packed.codes.device))


def ell_reference(x: Tensor, packed: RowELL, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """``act(x @ W.T + bias)`` with fp32 accumulation, output in ``x.dtype``: ``W`` decoded once, then ``F.linear``."""
    return decoded_linear(x, decode_ell(packed), bias, relu)


def codes_reference(x: Tensor, packed: RowCodes, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """``act(x @ W.T + bias)`` with fp32 accumulation, output in ``x.dtype``: ``W`` decoded once, then ``F.linear``."""
    return decoded_linear(x, decode_codes(packed), bias, relu)
