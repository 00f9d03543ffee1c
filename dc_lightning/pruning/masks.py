"""Magnitude pruning: masks, thresholds, schedules and the dropout adjustment of [NIPS] (Han et al., NIPS 2015).

Plain PyTorch, no Lightning import, usable from any training loop. The procedure [NIPS §3] is: train, remove
every connection whose magnitude is below a threshold, retrain the survivors, and iterate ([NIPS §3.4]: iterating
raises AlexNet's pruning rate from 5x to 9x). Two ways to pick the threshold are offered:

* ``density``: keep exactly ``round(density * numel)`` weights of largest magnitude (the per-layer "W%" column of
  [DC] Tables 2-5 is this density).
* ``quality``: threshold = ``quality * std(weight)`` [NIPS §4] ("a quality parameter multiplied by the standard
  deviation of a layer's weights"). The standard deviation is the population std (``correction=0``) over *all* the
  layer's weights, pruned entries counting as zeros (``std_of="all"``, what Distiller's sensitivity pruner does),
  or over the surviving weights only (``std_of="kept"``).

A pruned layer carries a bool buffer ``weight_mask`` (True = kept; see docs/DESIGN.md). Pruned connections never
come back: a new mask is always intersected with the current one.

Example::

    from dc_lightning.pruning.masks import prune_model

    rows = prune_model(model, densities={"ip1": 0.08, "ip2": 0.09, "ip3": 0.26})  # [DC] Table 2
    # ... retrain with dc_lightning.MagnitudePruning (or call apply_masks(model) after every optimizer step)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dc_lightning import buffers
from dc_lightning.buffers import get_mask
from dc_lightning.kinds import DEFAULT_TARGET_TYPES
from dc_lightning.targets import Target, pattern_aliases, select_targets
from dc_lightning.utils import is_number, resolve_per_layer

_STD_OF = ("all", "kept")
_SKIP = object()  # resolve_per_layer default for layers that a {pattern: value} dict does not name


# --------------------------------------------------------------------------------------------- argument checks


def check_densities(value: Any, field: str = "densities") -> float | dict[str, float]:
    """Validate a density (fraction of weights kept) or a ``{pattern: density}`` mapping; values must lie in (0, 1].

    Raises:
        ValueError: a value is not a number in (0, 1], or the mapping is empty.
    """
    return _check_values(value, field, lambda v: 0.0 < v <= 1.0, "a number in (0, 1] (fraction of weights kept)")


def check_quality(value: Any, field: str = "quality") -> float | dict[str, float]:
    """Validate a quality parameter (threshold = quality * std, [NIPS §4]) or a ``{pattern: quality}`` mapping.

    Raises:
        ValueError: a value is not a finite number >= 0, or the mapping is empty.
    """
    return _check_values(value, field, lambda v: 0.0 <= v < math.inf, "a finite number >= 0")


def check_std_of(value: Any, field: str = "std_of") -> str:
    """Validate the quality mode's std basis: ``"all"`` weights (pruned ones count as 0) or the ``"kept"`` ones.

    Raises:
        ValueError: any other value.
    """
    if value not in _STD_OF:
        raise ValueError(f"{field}={value!r}; expected one of {list(_STD_OF)}")
    return value


def _check_values(value: Any, field: str, ok: Any, valid: str) -> float | dict[str, float]:
    if isinstance(value, Mapping):  # also accepts OmegaConf DictConfig
        if not value:
            raise ValueError(f"{field}: got an empty mapping; give a number or {{pattern: value}} with {valid}")
        out = {}
        for pat, v in value.items():
            if not is_number(v) or not ok(float(v)):
                raise ValueError(f"{field}[{pat!r}]: got {v!r}; expected {valid}")
            out[str(pat)] = float(v)
        return out
    if not is_number(value) or not ok(float(value)):
        raise ValueError(f"{field}: got {value!r}; expected {valid} or a {{pattern: value}} mapping")
    return float(value)


def check_rounds(rounds: Any, field: str = "rounds") -> int:
    if not isinstance(rounds, numbers.Integral) or isinstance(rounds, bool) or rounds < 1:
        raise ValueError(f"{field}: got {rounds!r}; expected an integer >= 1")
    return int(rounds)


# ------------------------------------------------------------------------------------------------ the masks


@torch.no_grad()
def magnitude_mask(
    weight: Tensor,
    density: float | None = None,
    quality: float | None = None,
    current_mask: Tensor | None = None,
    std_of: str = "all",
) -> tuple[Tensor, float]:
    """The mask that keeps the largest-magnitude weights of one layer, and the threshold it implies.

    Give exactly one of ``density`` or ``quality``.

    * ``density``: keep exactly ``k = max(1, round(density * weight.numel()))`` weights (at least one so a layer
      is never cut off entirely). Ties in ``|w|`` are broken deterministically: the lower flat index is kept.
      With ``current_mask``, already pruned weights rank last; if ``k`` exceeds the survivors, every survivor is
      kept (``density`` is a fraction of *all* the layer's weights, not of the survivors). The threshold returned
      is the smallest kept magnitude.
    * ``quality``: keep ``|w| >= quality * std`` [NIPS §4], std as described in the module docstring
      (``std_of="all"``: over all entries, pruned ones being zero; ``"kept"``: over the survivors).

    With ``current_mask`` the result is ``new & current_mask``: pruned connections never come back.

    Args:
        weight: the layer's weight, any shape.
        density: fraction of the layer's weights to keep, in (0, 1].
        quality: threshold in units of the weights' standard deviation, >= 0.
        current_mask: bool tensor of ``weight.shape`` (True = kept), or None for a dense layer.
        std_of: ``"all"`` or ``"kept"`` (quality mode only).

    Returns:
        ``(mask, threshold)``: a bool tensor on ``weight.device`` of ``weight.shape``, and a Python float.

    Raises:
        ValueError: neither or both of ``density``/``quality``, a value out of range, a bad ``std_of``, or a
            ``current_mask`` of the wrong shape or dtype.

    Example::

        mask, thr = magnitude_mask(layer.weight, density=0.09)
        assert mask.sum() == round(0.09 * layer.weight.numel())
    """
    if (density is None) == (quality is None):
        raise ValueError(f"magnitude_mask: give exactly one of density (got {density!r}) or quality (got {quality!r})")
    if current_mask is not None:
        if current_mask.dtype != torch.bool or tuple(current_mask.shape) != tuple(weight.shape):
            raise ValueError(
                f"magnitude_mask: current_mask must be a bool tensor of shape {tuple(weight.shape)}; "
                f"got {current_mask.dtype} {tuple(current_mask.shape)}"
            )
        current_mask = current_mask.to(weight.device)
    mag = weight.detach().abs().float()
    if density is not None:
        density = check_densities(density, "density")
        n = mag.numel()
        k = min(n, max(1, round(density * n)))
        score = mag.flatten()
        if current_mask is not None:
            score = torch.where(current_mask.flatten(), score, torch.full_like(score, -1.0))
        # stable descending sort: equal magnitudes keep index order, so the lower flat index wins a tie
        order = torch.sort(score, descending=True, stable=True).indices
        if current_mask is not None:
            k = min(k, int(current_mask.sum()))  # never revive: at most the survivors stay
        flat = torch.zeros(n, dtype=torch.bool, device=weight.device)
        flat[order[:k]] = True
        mask = flat.view(weight.shape)
        threshold = float(mag.flatten()[order[k - 1]]) if k > 0 else math.inf
    else:
        quality = check_quality(quality, "quality")
        check_std_of(std_of, "magnitude_mask: std_of")
        values = weight.detach().float()
        if std_of == "kept" and current_mask is not None:
            values = values[current_mask]
        std = float(values.std(correction=0)) if values.numel() > 0 else 0.0
        threshold = quality * std
        mask = mag >= threshold
    if current_mask is not None:
        mask = mask & current_mask
    return mask, threshold


@torch.no_grad()
def attach_mask(module: nn.Module, mask: Tensor, param: str = buffers.WEIGHT) -> Tensor:
    """Register (or update in place) the bool mask buffer of ``module.<param>``; the parameter is left untouched.

    Updating in place keeps the tensor that a DDP wrapper or an optimizer hook already references. The mask is read
    back with :func:`get_mask` (both are :mod:`dc_lightning.buffers` helpers; this one validates first).

    Raises:
        ValueError: the module has no tensor ``param``, or ``mask`` is not bool of its shape.
    """
    weight = getattr(module, param, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"attach_mask: {type(module).__name__} has no {param} tensor to mask")
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(
            f"attach_mask: mask must be a bool tensor of shape {tuple(weight.shape)}; "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    return buffers.set_mask(module, mask, param)


@torch.no_grad()
def apply_masks(model: nn.Module) -> int:
    """Zero every pruned weight of ``model`` (exactly +0.0) in place; returns how many parameters carry a mask.

    In place, so an RNN's flattened weights (``flatten_parameters`` views on CUDA) stay the tensors it runs with.
    """
    count = 0
    for module in model.modules():
        for param in buffers.compressed_params(module):
            mask = get_mask(module, param)
            if mask is not None:
                getattr(module, param).masked_fill_(~mask, 0.0)
                count += 1
    return count


def mask_summary(layers: Mapping[str, Target], thresholds: Mapping[str, float] | None = None) -> list[dict]:
    """One row per target (:mod:`dc_lightning.targets`): ``layer`` (the target's name), ``weights``, ``kept``,
    ``density`` (kept/weights) and ``threshold``.

    A target without a mask counts as dense (``threshold`` 0.0 unless given).
    """
    rows = []
    for name, t in layers.items():
        mask = get_mask(t.module, t.param)
        n = t.weight.numel()
        kept = int(mask.sum()) if mask is not None else n
        thr = float((thresholds or {}).get(name, 0.0))
        rows.append({"layer": name, "weights": n, "kept": kept, "density": kept / n, "threshold": thr})
    return rows


def overall_density(rows: Iterable[Mapping[str, Any]]) -> float:
    """Kept weights over all weights of the rows of :func:`mask_summary` (1.0 for no rows)."""
    rows = list(rows)
    total = sum(r["weights"] for r in rows)
    return sum(r["kept"] for r in rows) / total if total else 1.0


# ------------------------------------------------------------------------------------------- target selection


def resolve_targets(
    model: nn.Module,
    densities: Any = None,
    quality: Any = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    types: tuple[type[nn.Module], ...] = DEFAULT_TARGET_TYPES,
    what: str = "pruning",
) -> tuple[dict[str, Target], dict[str, float], str]:
    """Targets to prune (:mod:`dc_lightning.targets`) and each one's target value.

    ``include``/``exclude``/``types`` pick candidate targets (:func:`dc_lightning.targets.select_targets`). A scalar
    value applies to every candidate; with a ``{pattern: value}`` mapping the last matching pattern wins and
    candidates that no pattern names are *not* pruned (so ``{"model.fc6": 0.09}`` prunes fc6 only). A pattern
    matches a target's name, its ``<module>.<param>`` name or its module name.

    Returns:
        ``(targets, values, mode)`` with ``mode`` ``"density"`` or ``"quality"``.

    Raises:
        ValueError: neither or both of ``densities``/``quality``, a bad value, or a pattern matching no layer
            (the message lists the available layer names).
    """
    if (densities is None) == (quality is None):
        raise ValueError(f"{what}: give exactly one of densities (got {densities!r}) or quality (got {quality!r})")
    mode = "density" if densities is not None else "quality"
    value = check_densities(densities) if mode == "density" else check_quality(quality)
    field = "densities" if mode == "density" else "quality"
    candidates = select_targets(model, include=include, exclude=exclude, types=types, what=what)
    per_layer = resolve_per_layer(
        value, list(candidates), field=f"{what}: {field}", default=_SKIP, aliases=pattern_aliases(candidates)
    )
    values = {n: float(v) for n, v in per_layer.items() if v is not _SKIP}
    layers = {n: candidates[n] for n in values}
    return layers, values, mode


@torch.no_grad()
def prune_model(
    model: nn.Module,
    densities: float | Mapping[str, float] | None = None,
    quality: float | Mapping[str, float] | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    types: tuple[type[nn.Module], ...] = DEFAULT_TARGET_TYPES,
    std_of: str = "all",
) -> list[dict]:
    """One-shot magnitude pruning: compute each target layer's mask, attach it and zero the pruned weights.

    Layers already carrying a mask are pruned further, never revived. No retraining happens here; for the
    iterative prune/retrain procedure use :class:`dc_lightning.MagnitudePruning`.

    Args:
        model: any ``nn.Module``; targets are named as in :mod:`dc_lightning.targets`.
        densities: fraction kept per target (float or ``{pattern: density}``).
        quality: threshold in std units per target (float or ``{pattern: quality}``), [NIPS §4].
        include: fnmatch patterns of targets to consider (default: all of ``types``).
        exclude: fnmatch patterns of targets to leave dense.
        types: module types considered (default :data:`dc_lightning.kinds.DEFAULT_TARGET_TYPES`: Linear,
            Conv1d/2d/3d, Embedding, MultiheadAttention, LSTM/GRU/RNN).
        std_of: ``"all"`` or ``"kept"``, see :func:`magnitude_mask`.

    Returns:
        Rows of :func:`mask_summary` (``layer, weights, kept, density, threshold``).

    Raises:
        ValueError: see :func:`resolve_targets` and :func:`magnitude_mask`.

    Example::

        rows = prune_model(model, densities={"*": 0.3, "conv1": 0.66})
    """
    layers, values, mode = resolve_targets(model, densities, quality, include, exclude, types, what="prune_model")
    thresholds = {}
    for name, t in layers.items():
        kw = {"density": values[name]} if mode == "density" else {"quality": values[name], "std_of": std_of}
        mask, thresholds[name] = magnitude_mask(t.weight, current_mask=get_mask(t.module, t.param), **kw)
        attach_mask(t.module, mask, t.param)
        t.weight.masked_fill_(~mask, 0.0)
    return mask_summary(layers, thresholds)
