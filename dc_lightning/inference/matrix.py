"""One compressed matrix at a time: its codes on the device (:func:`param_codes`), a ``CompressedLinear`` over it
(:func:`compressed_matrix`), and the small helpers the per-kind modules share."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dc_lightning import buffers
from dc_lightning.buffers import Codes
from dc_lightning.inference.linear import CompressedLinear

__all__ = ["compressed_matrix", "float_mask", "linear_numel", "param_codes", "projection"]


# ------------------------------------------------------------------------------------------- one matrix at a time


def param_codes(module: nn.Module, param: str, rows: slice | None = None) -> Codes:
    """``(mask, codes, codebook)`` of a *compressed* parameter (optionally a row slice of it), on its device:
    :func:`dc_lightning.buffers.codes_of` (the one derivation and its rule), refusing a parameter that carries no
    compression buffer (a replacement must not pack a weight the user left dense).

    Raises:
        ValueError: the parameter carries no mask or codebook, or as :func:`~dc_lightning.buffers.codes_of`.
    """
    if buffers.get_mask(module, param) is None and buffers.get_codebook(module, param) is None:
        raise ValueError(f"{type(module).__name__}.{param} carries no mask or codebook: it is not compressed")
    return buffers.codes_of(module, param, rows)


def compressed_matrix(
    module: nn.Module, param: str, bias: Tensor | None = None, rows: slice | None = None, relu: bool = False,
    lookup: bool = False,
) -> CompressedLinear:
    """A :class:`CompressedLinear` computing ``act(x @ W[rows].T + bias)`` for the 2-D parameter ``module.<param>``
    (``act`` = ReLU with ``relu``; ``lookup``: it must hold a layout with a row lookup, for a tied embedding).

    Every matrix goes through :meth:`CompressedLinear.from_linear` (one packing path, whatever layout it picks): the
    parameter's codes are handed to it on a temporary ``nn.Linear`` that shares the weight (never copied) and
    carries the mask/codebook buffers of :mod:`dc_lightning.buffers`.

    Raises:
        ValueError: as :func:`param_codes`.
    """
    weight = getattr(module, param)
    mask, codes, codebook = param_codes(module, param, rows)
    w = weight.detach()[slice(None) if rows is None else rows]
    shell = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    shell.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        shell.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    buffers.set_mask(shell, mask)
    buffers.set_codebook(shell, codebook, codes.to(torch.uint8))
    return CompressedLinear.from_linear(shell, relu=relu, lookup=lookup)


def projection(
    module: nn.Module, param: str, bias: Tensor | None = None, rows: slice | None = None, dense: bool = False
) -> nn.Module:
    """The compressed matrix of ``module.<param>`` when it carries compression buffers (and ``dense`` is False),
    else a dense ``nn.Linear`` holding a copy of the rows."""
    if buffers.has_compression(module, param) and not dense:
        return compressed_matrix(module, param, bias, rows)
    w = getattr(module, param).detach()[slice(None) if rows is None else rows]
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias.detach())
    return lin.requires_grad_(False)


def linear_numel(m: nn.Module) -> int:
    if isinstance(m, CompressedLinear):
        return m.in_features * m.out_features + (m.out_features if getattr(m, "bias", None) is not None else 0)
    return sum(p.numel() for p in m.parameters())


def float_mask(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """A bool mask (True = not allowed) as an additive float mask; float masks pass through (torch's convention)."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool or floating-point tensor, got dtype {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
