"""One compressed matrix at a time: its codes on the device (:func:`param_codes`), a ``CompressedLinear`` over it
(:func:`compressed_matrix`), and the small helpers the per-kind modules share."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dc_lightning import buffers
from dc_lightning.inference.linear import CompressedLinear
from dc_lightning.kernels.runtime import MAX_CODEBOOK as MAX_CODES

# ------------------------------------------------------------------------------------------- one matrix at a time


@torch.no_grad()
def param_codes(module: nn.Module, param: str, rows: slice | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(mask, codes, codebook)`` of a compressed parameter (optionally a row slice of it), on the parameter's device.

    ``mask`` is bool (True = kept; all True without a mask buffer), ``codes`` int64 codebook indices (0 where pruned),
    ``codebook`` float32. A quantized parameter gives its buffers; a pruned-only one gets a codebook of its distinct
    kept values (exact) when there are at most 256 of them.

    Raises:
        ValueError: the parameter carries no compression buffer, or it is pruned only and keeps more than 256 distinct
            values (the compressed path stores codebook indices, not floats).
    """
    weight = getattr(module, param)
    sl = slice(None) if rows is None else rows
    mask = buffers.get_mask(module, param)
    got = buffers.get_codebook(module, param)
    if mask is None and got is None:
        raise ValueError(f"{type(module).__name__}.{param} carries no mask or codebook: it is not compressed")
    mask = (torch.ones_like(weight, dtype=torch.bool) if mask is None else mask.to(torch.bool))[sl]
    if got is not None:
        codebook, assign = got
        codes = torch.where(mask, assign[sl].to(torch.int64), 0)
        return mask, codes, codebook.detach().reshape(-1).to(torch.float32)
    values = weight.detach()[sl]
    centroids, inverse = torch.unique(values[mask].to(torch.float32), return_inverse=True)
    if centroids.numel() > MAX_CODES:
        raise ValueError(
            f"{type(module).__name__}.{param} is pruned but not quantized and keeps {centroids.numel()} distinct "
            f"values; the compressed path needs at most {MAX_CODES} (quantize it first, e.g. quantize_model)"
        )
    if centroids.numel() == 0:
        centroids = torch.zeros(1, device=weight.device)
    codes = torch.zeros(mask.shape, dtype=torch.int64, device=weight.device)
    codes[mask] = inverse
    return mask, codes, centroids


def compressed_matrix(
    module: nn.Module, param: str, bias: Tensor | None = None, rows: slice | None = None
) -> CompressedLinear:
    """A :class:`CompressedLinear` computing ``x @ W[rows].T + bias`` for the 2-D parameter ``module.<param>``.

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
    return CompressedLinear.from_linear(shell)


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
