"""One enum for the GPU layouts of a weight-shared layer, the rule that picks one per layer, and dispatch.

Each layout is a sibling family of files (layout + reference, ``@triton.jit`` kernels, launcher + op):

* :attr:`Layout.SPARSE`: ``eie_layout`` / ``eie_kernels`` / ``eie_tuning`` / ``eie_spmv``: sliced-ELL
  ``(column, code)`` entries, 16 bits per non-zero plus ELL padding; gathers ``x`` per non-zero. Fewest bytes at
  low density; its kernels run on CUDA cores and re-read ``x`` per non-zero, so it wins at small batches.
* :attr:`Layout.LUT`: ``lut_layout`` / ``lut_kernels`` / ``lut_matmul``: every position holds a 2-8-bit code
  (plus a bitmap of kept positions, or a zero code); decodes a tile once per program and multiplies it on tensor
  cores with the batch tile.

:func:`choose_layout` says which one a layer gets and why (shown by ``CompressedLinear.extra_repr``). A sparse layer
may also keep a LUT copy for large batches (``CompressedLinear``'s ``batch_layout``). Adding a layout means a new
sibling family, a member here and one branch in each dispatch function below.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
from torch import Tensor

from .lut import op as lut_matmul
from .lut.layout import LUTPacked, decode_dense_lut, lut_encoding, lut_linear_reference, pack_lut
from .sparse import op as eie_spmv
from .sparse.layout import EIEPacked, pack

__all__ = [
    "Layout",
    "Packed",
    "SPARSE_BELOW",
    "lut_batch_min",
    "choose_layout",
    "layout_of",
    "pack_layer",
    "linear",
    "reference",
    "decode_dense",
    "autotune",
]

Packed = EIEPacked | LUTPacked

# H200, bench_eie_layouts.py 2026-12-02 (bench/RESULTS.md): at batch 1 the sparse kernel beat the LUT kernel on every
# layer up to 30 % density (VGG-8, 23 %: 7.3 vs 16.1 us; T-4096x4096 at 30 %: 15.0 vs 42 us), so it is the batch-1
# layout up to there; the LUT copy takes over at large batches (see lut_batch_min)
SPARSE_BELOW = 0.30
_ELL_BYTES_PER_NNZ = 2.3  # 16-bit entry x ~1.15 ELL padding (bench/RESULTS.md)


class Layout(str, Enum):
    """The GPU layouts of a compressed ``Linear`` (values are the names used in configs and ``extra_repr``)."""

    SPARSE = "sparse"
    LUT = "lut"


def choose_layout(
    out_features: int, in_features: int, nnz: int, n_centroids: int, sparse_below: float = SPARSE_BELOW
) -> tuple[Layout, str]:
    """The layout of a layer by density, and a one-line reason.

    Below ``sparse_below`` the sparse layout (its ~2.3 bytes per non-zero beat 0.25-1.1 bytes per position); from
    there on the dense packed codes, whose tensor-core kernel reuses each decoded weight across the batch.

    Raises:
        ValueError: if ``sparse_below`` is not in ``[0, 1]`` or the shape is empty.
    """
    if not 0.0 <= sparse_below <= 1.0:
        raise ValueError(f"sparse_below must lie in [0, 1], got {sparse_below}")
    positions = int(out_features) * int(in_features)
    if positions < 1:
        raise ValueError(f"out_features and in_features must be >= 1, got {out_features} and {in_features}")
    density = nnz / positions
    cbits, bitmap = lut_encoding(max(1, min(int(n_centroids), 256)), nnz == positions)
    lut_b = (cbits + bitmap) / 8.0
    ell_b = _ELL_BYTES_PER_NNZ * density
    code = f"{cbits}-bit codes{' + bitmap' if bitmap else ''}"
    if density < sparse_below:
        why = f"density {density:.1%} < {sparse_below:.0%}: sparse ~{ell_b:.2f} B/position vs lut {lut_b:.2f}"
        return Layout.SPARSE, why
    return Layout.LUT, f"density {density:.1%} >= {sparse_below:.0%}: {code}, {lut_b:.2f} B/position"


def lut_batch_min(density: float) -> int:
    """The smallest batch that runs a layer's LUT copy until :meth:`CompressedLinear.autotune` measures it.

    Measured on the H200 (bench/RESULTS.md, 2026-12-02): below 10 % density the sparse kernel still won at batch 16
    (VGG-6 46 us vs the LUT's 150+) and lost at 64 (Alex-6 56 vs 117 us); from 10 % on the LUT won from batch 16
    (Alex-8 9.4 vs 15.2 us, NT-LSTM 8.6 vs 9.1 us).
    """
    return 64 if density < 0.10 else 16


def layout_of(packed: Packed) -> Layout:
    """The :class:`Layout` of a packed layer.

    Raises:
        TypeError: if ``packed`` is not a packed layer.
    """
    if isinstance(packed, EIEPacked):
        return Layout.SPARSE
    if isinstance(packed, LUTPacked):
        return Layout.LUT
    raise TypeError(f"expected an EIEPacked or LUTPacked layer, got {type(packed).__name__}")


def pack_layer(
    out_features: int,
    in_features: int,
    rows: Tensor,
    cols: Tensor,
    codes: Tensor,
    codebook: Tensor,
    layout: Layout | str = "auto",
    *,
    device: torch.device | str | None = None,
    sparse_below: float = SPARSE_BELOW,
    sparse_options: dict[str, Any] | None = None,
    lut_options: dict[str, Any] | None = None,
) -> tuple[Packed, str]:
    """Pack a layer in ``layout`` (``"auto"``: :func:`choose_layout`); returns ``(packed, reason)``.

    ``sparse_options`` go to ``eie_layout.pack`` (``row_tile``, ``chunk``), ``lut_options`` to
    ``lut_layout.pack_lut`` (``cbits``, ``bitmap``), whichever layout the layer gets.

    Raises:
        ValueError: on an unknown layout name, or what the packer raises.
    """
    if layout == "auto":
        layout, why = choose_layout(out_features, in_features, int(torch.as_tensor(rows).numel()),
                                    int(torch.as_tensor(codebook).numel()), sparse_below)  # fmt: skip
    else:
        try:
            layout = Layout(layout)
        except ValueError:
            valid = ["auto"] + [m.value for m in Layout]
            raise ValueError(f"layout must be one of {valid}, got {layout!r}") from None
        why = "requested"
    if layout is Layout.SPARSE:
        opts = sparse_options or {}
        return pack(out_features, in_features, rows, cols, codes, codebook, device=device, **opts), why
    opts = lut_options or {}
    return pack_lut(out_features, in_features, rows, cols, codes, codebook, device=device, **opts), why


def linear(x: Tensor, packed: Packed, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """``act(x @ W.T + bias)`` through the layout's registered op (Triton on CUDA, PyTorch reference on CPU)."""
    if isinstance(packed, LUTPacked):
        return lut_matmul.lut_linear(x, packed, bias, relu)
    return eie_spmv.eie_linear(x, packed, bias, relu)


def reference(x: Tensor, packed: Packed, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """The layout's pure-PyTorch product (the CPU fallback)."""
    if isinstance(packed, LUTPacked):
        return lut_linear_reference(x, packed, bias, relu)
    return eie_spmv.eie_linear_reference(x, packed, bias, relu)


def decode_dense(packed: Packed) -> Tensor:
    """The dense float32 ``[out, in]`` weight of a packed layer of any layout."""
    if isinstance(packed, LUTPacked):
        return decode_dense_lut(packed)
    return eie_spmv.decode_dense(packed)


def autotune(
    packed: Packed,
    batch_sizes: tuple[int, ...] = (1,),
    dtype: torch.dtype = torch.float32,
    bias: Tensor | None = None,
    relu: bool = False,
    rep_ms: int = 20,
) -> dict[int, dict[str, Any]]:
    """Time the layout's launch configurations once per batch size and record the fastest (CUDA only)."""
    if isinstance(packed, LUTPacked):
        return lut_matmul.autotune_lut(packed, batch_sizes, dtype, bias, relu, rep_ms)
    return eie_spmv.autotune(packed, batch_sizes, dtype, bias, relu, rep_ms)
