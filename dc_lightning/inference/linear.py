"""EIE inference path: drop-in modules that multiply straight from the compressed format.

:class:`CompressedLinear` replaces an ``nn.Linear`` that carries a codebook (docs/DESIGN.md buffers
``weight_mask`` / ``weight_codebook`` / ``weight_assign``). It holds only a packed layout chosen by density
(sparse sliced-ELL ``(column, code)`` entries, or dense packed 2-8-bit codes; ``dc_lightning.kernels.layouts``),
the codebook and the bias, never a dense weight. On CUDA its forward is a Triton kernel; on the CPU it is the
layout's pure-PyTorch reference.

:func:`dc_lightning.inference.conversion.to_compressed_inference` converts a whole model (or a ``.dcz`` file via
``dc_lightning.io.load_compressed``);
convolutions keep their decoded dense weights; attention, recurrent layers and embeddings get the modules of
:mod:`dc_lightning.inference.attention`. EIE [EIE] §III computes ``b = ReLU(S[I] a)``: a ``Linear`` directly
followed by ``ReLU`` inside an ``nn.Sequential`` gets the ReLU fused into the kernel's epilogue.

Example::

    >>> import torch
    >>> from torch import nn
    >>> lin = nn.Linear(8, 4)
    >>> cb = torch.tensor([-0.5, 0.5])
    >>> assign = torch.randint(0, 2, (4, 8), dtype=torch.uint8)
    >>> lin.register_buffer("weight_codebook", cb)
    >>> lin.register_buffer("weight_assign", assign)
    >>> lin.weight.data = cb[assign.long()]
    >>> layer = CompressedLinear.from_linear(lin)
    >>> x = torch.randn(2, 8)
    >>> bool(torch.allclose(layer(x), lin(x), atol=1e-6))
    True
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dc_lightning.buffers import CODEBOOK, get_codebook, get_mask, layer_codes
from dc_lightning.kernels import layouts
from dc_lightning.kernels.layouts import Packed
from dc_lightning.kernels.lut.layout import LUTPacked, pack_lut
from dc_lightning.kernels.sparse.layout import EIEPacked

__all__ = ["CompressedLinear"]

log = logging.getLogger(__name__)

_MAX_CENTROIDS = 256


class CompressedLinear(nn.Module):
    """``y = act(x W^T + b)`` with ``W`` kept in a GPU layout of its codebook indices (never a dense weight).

    Two layouts (``dc_lightning.kernels.layouts``): ``sparse`` (sliced-ELL ``(column, code)`` entries,
    ``kernels/eie_*``: fewest bytes, CUDA-core gathers of ``x`` per non-zero) and ``lut`` (dense packed 2-8-bit
    codes plus a bitmap or a zero code, ``kernels/lut_*``: decodes each weight once and multiplies the batch tile on
    tensor cores). A layer holds one or both; with both, batches of ``batch_min`` rows or more run the LUT layout and
    smaller ones the sparse layout. :meth:`from_linear` chooses by density
    (:func:`dc_lightning.kernels.layouts.choose_layout`, thresholds measured on the H200): below 30 % sparse plus a
    LUT copy for large batches (from batch 64 below 10 % density, from 16 above); from 30 % to 60 % LUT plus a sparse
    copy for batches below 16; above, LUT only. :meth:`autotune` moves the switch to where it measures it.
    ``extra_repr`` says what the layer holds and why.

    Buffers (saved in ``state_dict``): sparse: ``entries`` (int16/int32), ``block_ptr`` (int32), ``codebook``
    (float32, ``2**bits + 1`` values, the last one 0.0 for padding); lut: ``lut_codes``, ``lut_mask`` (int32, or
    absent), ``lut_codebook`` (float32 ``[2**cbits]``); ``bias`` (float32 or absent). The layouts' integers travel
    as extra state.

    Args:
        packed: a layer packed by :func:`dc_lightning.kernels.layouts.pack_layer` (or ``eie_spmv.pack`` /
            ``lut_layout.pack_lut``).
        bias: optional ``[out_features]``.
        relu: apply ReLU in the kernel's epilogue.
        alternate: optional copy of the same weights in the other layout.
        batch_min: with both layouts, the smallest batch that runs the LUT layout.
        reason: why these layouts (shown by ``extra_repr``).

    Example::

        >>> from dc_lightning.kernels.sparse.op import pack
        >>> p = pack(3, 5, torch.tensor([0, 2]), torch.tensor([4, 1]), torch.tensor([0, 1]), torch.tensor([1., 2.]))
        >>> CompressedLinear(p)(torch.ones(1, 5))
        tensor([[1., 0., 2.]])
    """

    def __init__(
        self,
        packed: Packed,
        bias: Tensor | None = None,
        relu: bool = False,
        *,
        alternate: Packed | None = None,
        batch_min: int = 8,
        reason: str = "",
    ) -> None:
        super().__init__()
        kinds = [layouts.layout_of(p) for p in (packed, alternate) if p is not None]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"alternate must be in the other layout than packed, got two {kinds[0].value} layers")
        if alternate is not None and (alternate.out_features, alternate.in_features) != (
            packed.out_features, packed.in_features,
        ):  # fmt: skip
            raise ValueError(
                f"alternate is {alternate.out_features}x{alternate.in_features}, packed "
                f"{packed.out_features}x{packed.in_features}: they must hold the same weights"
            )
        if int(batch_min) < 1:
            raise ValueError(f"batch_min must be >= 1, got {batch_min}")
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.nnz = packed.nnz
        self.relu = bool(relu)
        self.batch_min = int(batch_min) if alternate is not None else 0
        self.reason = reason
        device = packed.codebook.device
        sparse = next((p for p in (packed, alternate) if isinstance(p, EIEPacked)), None)
        lut = next((p for p in (packed, alternate) if isinstance(p, LUTPacked)), None)
        self.code_shift = 0
        if sparse is not None:
            self.row_tile, self.chunk, self.code_shift = sparse.row_tile, sparse.chunk, sparse.code_shift
            self.register_buffer("entries", sparse.entries)
            self.register_buffer("block_ptr", sparse.block_ptr)
            self.register_buffer("codebook", sparse.codebook)
        self.lut_cbits = lut.cbits if lut is not None else 0
        if lut is not None:
            self.register_buffer("lut_codes", lut.codes)
            self.register_buffer("lut_mask", lut.mask)
            self.register_buffer("lut_codebook", lut.codebook)
        if bias is not None:
            if bias.numel() != packed.out_features:
                raise ValueError(f"bias has {bias.numel()} values, expected out_features={packed.out_features}")
            self.register_buffer("bias", bias.detach().reshape(-1).to(torch.float32).to(device))
        else:
            self.register_buffer("bias", None)

    # the kernels read fp32 codebooks and an fp32 bias whatever the activation dtype: ``model.half()`` / ``.to(bf16)``
    # must move these buffers, never narrow them
    _FP32_BUFFERS = ("codebook", "lut_codebook", "bias")

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        super()._apply(fn, recurse)
        for name in self._FP32_BUFFERS:
            t = self._buffers.get(name)
            if t is not None and t.is_floating_point() and t.dtype != torch.float32:
                self._buffers[name] = t.float()
        return self

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        relu: bool = False,
        row_tile: int | None = None,
        chunk: int | None = None,
        layout: str = "auto",
        alternate: bool = True,
        batch_min: int | None = None,
        sparse_below: float = layouts.SPARSE_BELOW,
        dual_below: float = 0.6,
    ) -> CompressedLinear:
        """Build from an ``nn.Linear``.

        A quantized layer (``weight_codebook`` + ``weight_assign``, optionally ``weight_mask``) is packed from its
        buffers. A pruned-only or plain layer gets a codebook of its distinct non-zero weight values when there are
        at most 256 of them (exact); otherwise it is rejected: this path stores codebook indices, not floats.

        Args:
            linear: the layer.
            relu: fuse a following ReLU into the kernel.
            row_tile: rows per tile of the sparse layout (``None``: 8..32 from ``out_features``).
            chunk: columns per chunk of the sparse layout (``None``: chosen from the density).
            layout: ``"auto"`` (by density, see :func:`dc_lightning.kernels.layouts.choose_layout`), ``"sparse"``
                or ``"lut"``: the layout of batch 1.
            alternate: also keep the other layout where it can win: a sparse layer a LUT copy for large batches,
                a LUT layer below ``dual_below`` density a sparse copy for small ones. ``False``: least memory.
            batch_min: with both layouts, the smallest batch on the LUT layout (``None``: by density,
                :func:`dc_lightning.kernels.layouts.lut_batch_min`, until :meth:`autotune` measures it).
            sparse_below: density below which ``"auto"`` picks the sparse layout.
            dual_below: density below which a LUT layer keeps a sparse copy (with ``alternate``).

        Raises:
            TypeError: if ``linear`` is not an ``nn.Linear``.
            ValueError: if the layer has no codebook and more than 256 distinct non-zero values, or on a bad
                ``layout``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        bias = linear.bias.detach() if linear.bias is not None else None
        device = linear.weight.device
        if get_codebook(linear) is not None:
            rows, cols, codes, centroids, _ = layer_codes(linear)
            rows, cols, codes, centroids = (torch.from_numpy(a) for a in (rows, cols, codes, centroids))
        else:
            w = linear.weight.detach().to(torch.float32)
            mask = get_mask(linear)
            keep = mask.to(torch.bool) if mask is not None else w != 0
            rows, cols = torch.nonzero(keep.cpu(), as_tuple=True)
            centroids, codes = torch.unique(w.cpu()[rows, cols], return_inverse=True)
            if centroids.numel() > _MAX_CENTROIDS:
                raise ValueError(
                    f"layer {linear} has no {CODEBOOK} and {centroids.numel()} distinct non-zero weights; the "
                    f"EIE path needs at most {_MAX_CENTROIDS} (quantize it first, e.g. dc_lightning.quantize_model)"
                )
            if centroids.numel() == 0:
                centroids = torch.zeros(1)
        n_out, n_in = linear.out_features, linear.in_features
        sparse_options = {"row_tile": row_tile, "chunk": chunk}
        packed, why = layouts.pack_layer(
            n_out, n_in, rows, cols, codes, centroids, layout, device=device, sparse_below=sparse_below,
            sparse_options=sparse_options,
        )  # fmt: skip
        other = None
        if alternate and isinstance(packed, EIEPacked):
            other = pack_lut(n_out, n_in, rows, cols, codes, centroids, device=device)
        elif alternate and rows.numel() < dual_below * n_out * n_in:
            other = layouts.pack_layer(
                n_out, n_in, rows, cols, codes, centroids, "sparse", device=device, sparse_options=sparse_options
            )[0]
        if batch_min is None:
            batch_min = layouts.lut_batch_min(rows.numel() / max(1, n_out * n_in))
        return cls(packed, bias=bias, relu=relu, alternate=other, batch_min=batch_min, reason=why)

    # ----------------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input's last dimension must be in_features={self.in_features}, got shape {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = layouts.linear(x2, self.path(x2.shape[0]), self.bias, self.relu)
        return y.reshape(*lead, self.out_features)

    def path(self, batch: int) -> Packed:
        """The packed layer a batch of ``batch`` rows runs on."""
        if self.code_shift and self.lut_cbits:
            return self.lut_packed() if batch >= self.batch_min else self.sparse_packed()
        return self.lut_packed() if self.lut_cbits else self.sparse_packed()

    @property
    def layout(self) -> str:
        """The layout batch 1 runs on (``"sparse"`` or ``"lut"``)."""
        return layouts.layout_of(self.path(1)).value

    def autotune(self, batch_sizes: Sequence[int] = (1,), dtype: torch.dtype = torch.float32) -> dict[int, dict]:
        """Time the kernel's launch configurations for these batch sizes once and remember the fastest (CUDA only).

        The choice is keyed by the layer's shapes and the activation dtype, so it also applies inside
        ``torch.compile`` and CUDA graphs captured later. A layer holding both layouts times both at every batch
        size and moves ``batch_min`` to the smallest tuned batch from which the LUT layout wins at every larger
        tuned batch. Returns ``{batch: config}`` (each with its median ``"us"`` and its ``"path"``).
        """
        both = bool(self.code_shift and self.lut_cbits)
        paths = [self.sparse_packed(), self.lut_packed()] if both else [self.path(1)]
        batches = sorted({int(b) for b in batch_sizes})
        out: dict[int, dict] = {}
        for b in batches:
            timed = []
            for p in paths:
                got = layouts.autotune(p, (b,), dtype, self.bias, self.relu).get(b)
                if got is not None:
                    timed.append({**got, "path": layouts.layout_of(p).value})
            if timed:
                out[b] = min(timed, key=lambda c: c["us"])
        if both and len(out) == len(batches) and batches:
            lut_wins = {b: out[b]["path"] == "lut" for b in batches}
            i = next((i for i in range(len(batches)) if all(lut_wins[c] for c in batches[i:])), len(batches))
            self.batch_min = batches[i] if i < len(batches) else batches[-1] + 1
        return out

    def dense_weight(self) -> Tensor:
        """The decoded float32 ``[out, in]`` weight (for checks; forward never builds it on CUDA)."""
        return layouts.decode_dense(self.path(1))

    @property
    def device(self) -> torch.device:
        return (self.lut_codebook if self.lut_cbits else self.codebook).device

    def packed(self) -> Packed:
        """The packed layer batch 1 runs on (views of this module's buffers)."""
        return self.path(1)

    def sparse_packed(self) -> EIEPacked:
        """The sparse layout.

        Raises:
            ValueError: if this layer holds no sparse layout.
        """
        if not self.code_shift:
            raise ValueError("this layer holds no sparse layout (built as lut without a sparse copy)")
        return EIEPacked(
            self.entries, self.block_ptr, self.codebook, self.out_features, self.in_features, self.row_tile,
            self.chunk, self.code_shift, self.nnz,
        )  # fmt: skip

    def lut_packed(self) -> LUTPacked:
        """The LUT layout.

        Raises:
            ValueError: if this layer holds no LUT layout.
        """
        if not self.lut_cbits:
            raise ValueError("this layer holds no lut layout (built as sparse with alternate=False)")
        return LUTPacked(
            self.lut_codes, self.lut_mask, self.lut_codebook, self.out_features, self.in_features, self.lut_cbits,
            self.nnz,
        )  # fmt: skip

    _STATE = ("in_features", "out_features", "row_tile", "chunk", "code_shift", "nnz", "relu", "lut_cbits",
              "batch_min")  # fmt: skip

    def get_extra_state(self) -> dict[str, int]:
        return {k: int(getattr(self, k)) for k in self._STATE if hasattr(self, k)}

    def set_extra_state(self, state: dict[str, int]) -> None:
        for k, v in state.items():
            if k in self._STATE:
                setattr(self, k, bool(v) if k == "relu" else int(v))

    def extra_repr(self) -> str:
        parts = []
        if self.code_shift:
            parts.append(f"sparse codebook_bits={self.code_shift - 1}")
        if self.lut_cbits:
            parts.append(f"lut code_bits={self.lut_cbits} bitmap={self.lut_mask is not None}")
        if len(parts) == 2:
            held = f"layouts=[{', '.join(parts)}], lut from batch {self.batch_min}"
        else:
            held = f"layouts=[{parts[0]}]"
        why = f", why='{self.reason}'" if self.reason else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
            f"layout={self.layout}, {held}, bias={self.bias is not None}, relu={self.relu}{why}"
        )


# --------------------------------------------------------------------------------------------------------------
