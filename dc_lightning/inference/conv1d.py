"""``CompressedConv1D``: Hugging Face's ``Conv1D`` (GPT-2's ``c_attn``/``c_proj``/``c_fc``) from its compressed codes.

``transformers.pytorch_utils.Conv1D`` is a Linear with its weight transposed: ``W`` is ``[in, out]`` (``nx``, ``nf``)
and ``y = x @ W + b``. Since ``x @ W = x (W^T)^T``, the layer is a :class:`CompressedLinear` of ``W^T`` (``[out,
in]``): the codes and the mask of ``W`` are transposed once, at conversion, and handed to
:meth:`CompressedLinear.from_linear` on a temporary ``nn.Linear`` (the one packing path, whatever layout it picks).
Nothing here imports transformers (the registry recognises the layer by name, :data:`dc_lightning.kinds.HF_CONV1D`);
:meth:`CompressedConv1D.from_module` checks ``Conv1D``'s own contract: ``nf``, ``nx`` and a weight ``[nx, nf]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dc_lightning import buffers
from dc_lightning.buffers import WEIGHT
from dc_lightning.inference.linear import CompressedLinear
from dc_lightning.inference.matrix import param_codes

__all__ = ["CompressedConv1D"]


class CompressedConv1D(nn.Module):
    """``y = x @ W + b`` for a Hugging Face ``Conv1D`` weight ``W`` ``[nx, nf]`` held as a :class:`CompressedLinear`
    of ``W^T`` (never a dense weight). ``nf``, ``nx`` and ``bias`` read as on ``Conv1D``.

    Args:
        matrix: the compressed ``W^T`` (``out_features = nf``, ``in_features = nx``), with ``Conv1D``'s bias.
    """

    def __init__(self, matrix: CompressedLinear) -> None:
        super().__init__()
        self.matrix = matrix
        self.nf = matrix.out_features
        self.nx = matrix.in_features

    @classmethod
    def from_module(cls, conv: nn.Module) -> CompressedConv1D:
        """Build from a ``Conv1D`` whose weight carries a mask and/or a codebook (:mod:`dc_lightning.buffers`).

        Raises:
            TypeError: ``conv`` is not ``Conv1D``-shaped (attributes ``nf``, ``nx`` and a weight ``[nx, nf]``; an
                ``nn.Linear``'s weight is ``[out, in]``).
            ValueError: its weight is not compressed, or as :func:`dc_lightning.inference.matrix.param_codes`.
        """
        weight = getattr(conv, WEIGHT, None)
        nx, nf = getattr(conv, "nx", None), getattr(conv, "nf", None)
        if not isinstance(weight, Tensor) or tuple(weight.shape) != (nx, nf):
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else None
            raise TypeError(
                f"from_module expects a transformers Conv1D (weight [nx, nf]), got {type(conv).__name__} with nx={nx}, "
                f"nf={nf}, weight shape {shape}"
            )
        mask, codes, codebook = param_codes(conv, WEIGHT)  # [nx, nf]
        weight = weight.detach()
        shell = nn.Linear(nx, nf, bias=conv.bias is not None, device="meta")
        shell.weight = nn.Parameter(weight.t(), requires_grad=False)  # a view: W^T [nf, nx], never copied
        if conv.bias is not None:
            shell.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        buffers.set_mask(shell, mask.t().contiguous())
        buffers.set_codebook(shell, codebook, codes.t().contiguous().to(torch.uint8))
        return cls(CompressedLinear.from_linear(shell))

    def forward(self, x: Tensor) -> Tensor:
        return self.matrix(x)

    @property
    def bias(self) -> Tensor | None:
        return self.matrix.bias

    def dense_weight(self) -> Tensor:
        """The decoded float32 ``[nx, nf]`` weight in ``Conv1D``'s orientation (for checks)."""
        return self.matrix.dense_weight().t()

    def dense_numel(self) -> int:
        """Parameters of the dense ``Conv1D`` this replaced (weight and bias)."""
        return self.nx * self.nf + (self.nf if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx} (x @ W + b with W^T held compressed)"
