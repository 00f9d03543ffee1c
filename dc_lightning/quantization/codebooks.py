"""Trained quantization / weight sharing [DC §3]: per-layer codebooks, codebook gradients, quantizing a model.

Plain PyTorch, no Lightning import: usable from any training loop. The Lightning driver is
:class:`dc_lightning.callbacks.trained_quantization.TrainedQuantization`.

A quantized layer carries two buffers (see docs/DESIGN.md): ``weight_codebook`` (float32 ``[2**bits]``, the shared
weights) and ``weight_assign`` (uint8, ``weight.shape``, the index of every weight into the codebook). Together with
the pruning mask ``weight_mask`` (bool, optional) the weight is ``where(mask, codebook[assign], 0)`` bit for bit.

Clustering [DC §3.1] is 1-D k-means minimising the within-cluster sum of squares (WCSS) of the *surviving* weights of
one layer. Because the data are 1-D, the values are sorted once; after that a Lloyd iteration costs O(k log n): a
cluster is a contiguous run of the sorted values between the midpoints of neighbouring centroids (found with
``searchsorted``) and its mean comes from float64 prefix sums. Fine-tuning [DC §3.3, eq. 3] moves each centroid by the
sum of the gradients of its member weights, :func:`codebook_grad`.

Example::

    from dc_lightning.quantization.codebooks import quantize_model, decode_weight
    summary = quantize_model(model)                # paper default: 8 bits conv, 5 bits fc
    w = decode_weight(model.classifier[0])         # == model.classifier[0].weight
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from dc_lightning import buffers
from dc_lightning.buffers import MAX_CODES, get_codebook, get_mask
from dc_lightning.kinds import DEFAULT_TARGET_TYPES
from dc_lightning.quantization.bits import ZeroCode, bits_for_layers, check_bits, check_zero_code, zero_code_for_layers
from dc_lightning.quantization.kmeans import INITS, acc_dtype, kmeans_1d, wcss
from dc_lightning.targets import select_targets

log = logging.getLogger(__name__)


def attach_codebook(module: nn.Module, codebook: Tensor, assign: Tensor, param: str = buffers.WEIGHT) -> None:
    """Store ``codebook`` (→ float32 ``<param>_codebook``) and ``assign`` (→ uint8 ``<param>_assign``) on ``module``.

    Existing buffers of the same shape are overwritten in place. The weight itself is not touched; call
    ``module.weight.data.copy_(decode_weight(module))`` to apply the codebook.

    Raises:
        ValueError: the module has no tensor ``param``, the codebook is not 1-D with a power-of-two length in
            2..256, ``assign`` does not have the weight's shape, or an index is outside the codebook.
    """
    w = getattr(module, param, None)
    if not isinstance(w, Tensor):
        raise ValueError(f"attach_codebook: {type(module).__name__} has no {param} tensor")
    codebook = codebook.detach().reshape(-1)
    k = codebook.numel()
    if k < 2 or k > MAX_CODES or k & (k - 1):
        raise ValueError(f"attach_codebook: codebook length must be 2**bits with bits in 1..8, got {k}")
    if tuple(assign.shape) != tuple(w.shape):
        raise ValueError(f"attach_codebook: assign shape {tuple(assign.shape)} != weight shape {tuple(w.shape)}")
    if assign.numel() and (int(assign.min()) < 0 or int(assign.max()) >= k):
        raise ValueError(
            f"attach_codebook: assignments must lie in [0, {k}), got [{int(assign.min())}, {int(assign.max())}]"
        )
    buffers.set_codebook(module, codebook, assign.detach(), param)


def decode_weight(module: nn.Module, param: str = buffers.WEIGHT) -> Tensor:
    """The shared-weight tensor ``where(mask, codebook[assign], 0)`` of ``module.<param>`` in its dtype [DC §3, Fig. 3].

    Raises:
        ValueError: the parameter carries no codebook.
    """
    got = get_codebook(module, param)
    if got is None:
        raise ValueError(
            f"decode_weight: {type(module).__name__}.{param} has no {buffers.buffer_name('codebook', param)}/"
            f"{buffers.buffer_name('assign', param)} buffers"
        )
    cb, assign = got
    w = cb[assign.long()]
    mask = get_mask(module, param)
    if mask is not None:
        w = torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))
    return w.to(getattr(module, param).dtype)


def codebook_segments(assign: Tensor, mask: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """Group the member positions of a layer by centroid, for repeated :func:`codebook_grad` calls.

    Returns:
        ``(order, offsets)``: flat indices of the member weights sorted by cluster (stable), int64 ``[members]``; and
        ``offsets`` int64 ``[k + 1]`` so that cluster ``j``'s members are ``order[offsets[j]:offsets[j+1]]``.
    """
    a = assign.reshape(-1).long()
    if mask is not None:
        a = torch.where(mask.reshape(-1), a, torch.full_like(a, k))  # non-members go to bucket k
    order = torch.argsort(a, stable=True)
    counts = torch.bincount(a, minlength=k + 1)[: k + 1]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=a.device), counts.cumsum(0)])[: k + 1]
    return order[: int(offsets[-1])], offsets


def codebook_grad(
    grad: Tensor,
    assign: Tensor,
    mask: Tensor | None,
    k: int,
    segments: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Gradient of the loss w.r.t. the shared weights, [DC eq. 3]: ∂L/∂C_k = Σ_ij ∂L/∂W_ij · 1(I_ij = k).

    Only members (``mask`` True, or every entry without a mask) contribute. The sum is taken over the members of
    each cluster in a fixed order with float64 prefix sums, so it is deterministic on every device (no atomics),
    which keeps DDP ranks bit-identical.

    Args:
        grad: ``∂L/∂W``, the weight's shape.
        assign: cluster index per weight, the weight's shape.
        mask: bool, the weight's shape, or None.
        k: codebook size.
        segments: cached :func:`codebook_segments` of ``(assign, mask, k)``.

    Returns:
        float32 ``[k]`` on ``grad``'s device.
    """
    order, offsets = segments if segments is not None else codebook_segments(assign, mask, k)
    acc = acc_dtype(grad.device)
    g = grad.reshape(-1).index_select(0, order).to(acc)
    cs = torch.cat([torch.zeros(1, dtype=acc, device=g.device), g.cumsum(0)])
    return (cs[offsets[1:]] - cs[offsets[:-1]]).float()


def quantize_layer(
    module: nn.Module,
    bits: int,
    init: str = "linear",
    max_iter: int = 300,
    seed: int = 0,
    name: str = "layer",
    refine: bool = False,
    param: str = buffers.WEIGHT,
    zero_code: bool | None = None,
) -> dict[str, Any]:
    """Cluster one layer's weights into ``2**bits`` shared weights, attach the codebook and rewrite the weight.

    Members are the surviving weights: ``weight[weight_mask]`` for a pruned layer (pruned weights stay exactly 0.0
    and do not pull a centroid towards zero), every entry otherwise (an unpruned layer's zeros are ordinary weights).
    The parameter is rewritten in place (an RNN's flattened weights stay valid).

    Args:
        module: a layer with a tensor ``param``.
        bits: codebook size ``2**bits``, 1..8.
        init: centroid initialisation, see :func:`kmeans_init`.
        max_iter: Lloyd iterations at most.
        seed: seed for ``init="random"``.
        name: the layer's name, for error messages.
        refine: split/merge refinement, see :func:`kmeans_1d`. Default False: the paper's procedure (Lloyd from
            ``init``), which keeps centroids on the rare large weights and leaves a more skewed code distribution
            for Huffman coding (trained LeNet-300-100 recipe: 37.0x vs 35.6x with refinement, top-1 within 0.2 pt).
        param: the parameter to quantize (``weight``; ``in_proj_weight``, ``weight_hh_l0`` ... for attention and
            recurrent modules, see :mod:`dc_lightning.targets`).
        zero_code: for a pruned layer, cluster the kept weights into ``2**bits - 1`` centroids and make the last
            codebook entry exactly 0.0, used by no kept weight (EIE's 4-bit table: 15 shared values + the zero of
            the pruned positions [EIE §III]). Its gradient is then always 0, so fine-tuning keeps it 0.0. The
            ``2**bits`` codes then cover the pruned positions too, so a 4-bit pruned layer converts to the ``tc``
            tensor-core layout (0.5 bytes per weight, no bitmap) instead of ``lut`` + bitmap (0.625). An unpruned
            layer keeps ``2**bits`` centroids. ``None`` (default): True at 4 bits (EIE's table, the tensor-core
            layout's), False at other widths (the paper's ``2**bits`` centroids [DC §3]).

    Returns:
        ``{"bits", "weights", "members", "centroids_used", "wcss"}`` for reports.

    Raises:
        ValueError: ``bits`` outside 1..8 (the message names ``name``), or bad ``init``.
        TypeError: ``zero_code`` is not True, False or None.
    """
    check_bits(bits, f"bits for layer {name!r}")
    if zero_code is not None and not isinstance(zero_code, bool):
        raise TypeError(f"zero_code for layer {name!r} must be True, False or None (True at 4 bits), got {zero_code!r}")
    k = 2**bits
    w = getattr(module, param)
    mask = get_mask(module, param)
    reserve = (bits == 4 if zero_code is None else zero_code) and mask is not None and not bool(mask.all())
    with torch.no_grad():
        members = w.detach()[mask] if mask is not None else w.detach().reshape(-1).clone()  # not a view: w changes
        c, a = kmeans_1d(members, k - 1 if reserve else k, init=init, max_iter=max_iter, seed=seed, refine=refine)
        if reserve:  # the last entry: the pruned positions' 0.0, no member assigned to it
            c = torch.cat([c, torch.zeros(1, dtype=c.dtype, device=c.device)])
        assign = torch.zeros(w.shape, dtype=torch.uint8, device=w.device)
        if mask is not None:
            assign[mask] = a.to(torch.uint8)
        else:
            assign.view(-1).copy_(a.to(torch.uint8))
        attach_codebook(module, c, assign, param)
        w.copy_(decode_weight(module, param))
    return {
        "bits": bits,
        "weights": w.numel(),
        "members": members.numel(),
        "centroids_used": int(torch.unique(a).numel()) if a.numel() else 0,
        "wcss": wcss(members, c, a),
    }


def quantize_model(
    model: nn.Module,
    bits: int | dict[str, int] | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    init: str = "linear",
    max_iter: int = 300,
    seed: int = 0,
    types: tuple[type[nn.Module], ...] = DEFAULT_TARGET_TYPES,
    refine: bool = False,
    zero_code: ZeroCode = None,
) -> dict[str, dict[str, Any]]:
    """Quantize every selected layer in one call (no fine-tuning, no Lightning) [DC §3].

    Args:
        model: any ``nn.Module``; targets are named as in :mod:`dc_lightning.targets`.
        bits: None = paper default (8 bits conv, 5 bits fc-like [DC §5]), an int for all targets, or
            ``{fnmatch pattern: bits}`` (last match wins; unmatched targets keep the paper default).
        include: fnmatch patterns of targets to quantize (default: every weight matrix of ``types``).
        exclude: fnmatch patterns of targets to leave alone.
        init: centroid initialisation, see :func:`kmeans_init`.
        max_iter: Lloyd iterations at most.
        seed: seed for ``init="random"``.
        types: module types considered (default :data:`dc_lightning.kinds.DEFAULT_TARGET_TYPES`).
        refine: split/merge refinement of the clustering (see :func:`kmeans_1d`); False (default) = the paper's
            plain Lloyd from ``init``.
        zero_code: reserve a 0.0 codebook entry in every pruned layer (``2**bits - 1`` centroids; see
            :func:`quantize_layer`): EIE's 15 values + 0 at 4 bits, the ``tc`` layout's table. ``None`` (default):
            at 4 bits only. Per layer: ``{fnmatch pattern: True | False | None}`` (last match wins, as for
            ``bits``; unmatched targets get ``None``).

    Returns:
        ``{target: {"bits", "weights", "members", "centroids_used", "wcss"}}``.

    Raises:
        ValueError: a pattern (of ``bits`` or ``zero_code``) matches no layer, or a bit width is outside 1..8.
        TypeError: a ``zero_code`` that is not None, a bool or such a dict.

    Example::

        summary = quantize_model(model, bits={"features.*": 8, "classifier.*": 5})
    """
    if init not in INITS:
        raise ValueError(f"quantize_model: init must be one of {INITS}, got {init!r}")
    zero_code = check_zero_code(zero_code, "quantize_model")
    layers = select_targets(model, include, exclude, types=types, what="quantize_model")
    per_layer = bits_for_layers(layers, bits)
    zero = zero_code_for_layers(layers, zero_code, "quantize_model.zero_code")
    return {
        n: quantize_layer(
            t.module, per_layer[n], init=init, max_iter=max_iter, seed=seed, name=n, refine=refine, param=t.param,
            zero_code=zero[n],
        )
        for n, t in layers.items()
    }
