"""EIE inference path: drop-in modules that multiply straight from the compressed format.

:class:`CompressedLinear` replaces an ``nn.Linear`` that carries a codebook (docs/DESIGN.md buffers
``weight_mask`` / ``weight_codebook`` / ``weight_assign``). It holds only the packed sparse layout (16-bit
``(column, code)`` entries in sliced-ELL blocks, see ``dc_lightning.kernels.eie_spmv``), the codebook and the bias,
never a dense weight. On CUDA its forward is the Triton kernel; on the CPU it is the pure-PyTorch reference.

:func:`dc_lightning.conversion.to_compressed_inference` converts a whole model (or a ``.dcz`` file via
``dc_lightning.io.load_compressed``);
convolutions keep their decoded dense weights; attention, recurrent layers and embeddings get the modules of
:mod:`dc_lightning.compressed_modules`. EIE [EIE] §III computes ``b = ReLU(S[I] a)``: a ``Linear`` directly
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

from dc_lightning import buffers
from dc_lightning.kernels import eie_spmv
from dc_lightning.kernels.eie_spmv import EIEPacked, pack

__all__ = ["CompressedLinear"]

log = logging.getLogger(__name__)

_MAX_CENTROIDS = 256


class CompressedLinear(nn.Module):
    """``y = act(x W^T + b)`` with ``W`` kept in the EIE kernel layout (codebook + sparse indices).

    Buffers (saved in ``state_dict``): ``entries`` (int16/int32), ``block_ptr`` (int32), ``codebook`` (float32,
    ``2**bits + 1`` values, the last one 0.0 for padding) and ``bias`` (float32 or absent). The layout's integers
    travel as extra state.

    Args:
        packed: a layer packed by :func:`dc_lightning.kernels.eie_spmv.pack`.
        bias: optional ``[out_features]``.
        relu: apply ReLU in the kernel's epilogue.

    Example::

        >>> from dc_lightning.kernels.eie_spmv import pack
        >>> p = pack(3, 5, torch.tensor([0, 2]), torch.tensor([4, 1]), torch.tensor([0, 1]), torch.tensor([1., 2.]))
        >>> CompressedLinear(p)(torch.ones(1, 5))
        tensor([[1., 0., 2.]])
    """

    def __init__(self, packed: EIEPacked, bias: Tensor | None = None, relu: bool = False) -> None:
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.row_tile = packed.row_tile
        self.chunk = packed.chunk
        self.code_shift = packed.code_shift
        self.nnz = packed.nnz
        self.relu = bool(relu)
        self.register_buffer("entries", packed.entries)
        self.register_buffer("block_ptr", packed.block_ptr)
        self.register_buffer("codebook", packed.codebook)
        if bias is not None:
            if bias.numel() != packed.out_features:
                raise ValueError(f"bias has {bias.numel()} values, expected out_features={packed.out_features}")
            self.register_buffer("bias", bias.detach().reshape(-1).to(torch.float32).to(packed.entries.device))
        else:
            self.register_buffer("bias", None)

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, relu: bool = False, row_tile: int | None = None, chunk: int | None = None
    ) -> CompressedLinear:
        """Build from an ``nn.Linear``.

        A quantized layer (``weight_codebook`` + ``weight_assign``, optionally ``weight_mask``) is packed from its
        buffers. A pruned-only or plain layer gets a codebook of its distinct non-zero weight values when there are
        at most 256 of them (exact); otherwise it is rejected: this path stores codebook indices, not floats.

        Args:
            linear: the layer.
            relu: fuse a following ReLU into the kernel.
            row_tile: rows per tile of the packed layout (``None``: 8..32 from ``out_features``).
            chunk: columns per chunk (``None``: chosen from the density).

        Raises:
            TypeError: if ``linear`` is not an ``nn.Linear``.
            ValueError: if the layer has no codebook and more than 256 distinct non-zero values.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        bias = linear.bias.detach() if linear.bias is not None else None
        device = linear.weight.device
        if buffers.get_codebook(linear) is not None:
            rows, cols, codes, codebook, shape = buffers.layer_codes(linear)
            packed = pack(
                shape[0],
                shape[1],
                torch.from_numpy(rows),
                torch.from_numpy(cols),
                torch.from_numpy(codes),
                torch.from_numpy(codebook),
                row_tile=row_tile,
                chunk=chunk,
                device=device,
            )
        else:
            mask = buffers.get_mask(linear)
            w = linear.weight.detach().to(torch.float32)
            keep = mask.to(torch.bool) if mask is not None else w != 0
            rows, cols = torch.nonzero(keep.cpu(), as_tuple=True)
            values = w.cpu()[rows, cols]
            centroids, codes = torch.unique(values, return_inverse=True)
            if centroids.numel() > _MAX_CENTROIDS:
                raise ValueError(
                    f"layer {linear} has no {buffers.CODEBOOK} and {centroids.numel()} distinct non-zero weights; the "
                    f"EIE path needs at most {_MAX_CENTROIDS} (quantize it first, e.g. dc_lightning.quantize_model)"
                )
            if centroids.numel() == 0:
                centroids = torch.zeros(1)
            packed = pack(
                w.shape[0], w.shape[1], rows, cols, codes, centroids, row_tile=row_tile, chunk=chunk, device=device
            )
        return cls(packed, bias=bias, relu=relu)

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
        y = eie_spmv.eie_linear(x2, self.packed(), self.bias, self.relu)
        return y.reshape(*lead, self.out_features)

    def autotune(self, batch_sizes: Sequence[int] = (1,), dtype: torch.dtype = torch.float32) -> dict[int, dict]:
        """Time the kernel's launch configurations for these batch sizes once and remember the fastest (CUDA only).

        The choice is keyed by the layer's shapes and the activation dtype, so it also applies inside
        ``torch.compile`` and CUDA graphs captured later. Returns ``{batch: config}``.
        """
        return eie_spmv.autotune(self.packed(), tuple(int(b) for b in batch_sizes), dtype, self.bias, self.relu)

    def dense_weight(self) -> Tensor:
        """The decoded float32 ``[out, in]`` weight (for checks; forward never builds it on CUDA)."""
        return eie_spmv.decode_dense(self.packed())

    def packed(self) -> EIEPacked:
        return EIEPacked(
            self.entries,
            self.block_ptr,
            self.codebook,
            self.out_features,
            self.in_features,
            self.row_tile,
            self.chunk,
            self.code_shift,
            self.nnz,
        )

    def get_extra_state(self) -> dict[str, int]:
        return {
            k: int(getattr(self, k))
            for k in ("in_features", "out_features", "row_tile", "chunk", "code_shift", "nnz", "relu")
        }

    def set_extra_state(self, state: dict[str, int]) -> None:
        for k, v in state.items():
            setattr(self, k, bool(v) if k == "relu" else int(v))

    def extra_repr(self) -> str:
        bits = self.code_shift - 1
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
            f"codebook_bits={bits}, bias={self.bias is not None}, relu={self.relu}"
        )


# --------------------------------------------------------------------------------------------------------------
