"""Per-layer pruning sensitivity: prune one layer at a time, measure accuracy, pick per-layer densities.

[NIPS §5] (Fig. 6) chooses each layer's threshold from its sensitivity: prune a single layer to a range of
densities without retraining, keep every other layer dense, and watch top-1 accuracy. Convolutional layers
(conv1 most of all) tolerate less pruning than fully connected ones, so they get higher densities.

Turning a sweep into a recipe: :func:`suggest_densities` gives, per layer, the lowest swept density whose
accuracy stays within ``max_drop`` percentage points of the dense model. The names are the layers' qualified
names in the model that was swept; for a checkpoint of :class:`~dc_lightning.module.ClassifierModule` they start
with ``model.``, which is what a recipe's ``pipeline.prune.callback.densities`` expects::

    rows = sensitivity_analysis(module, dm.val_dataloader(), batch_transform=lambda b: dm.on_after_batch_transfer(b, 0))
    suggest_densities(rows, max_drop=0.5)
    # {'model.ip1': 0.05, 'model.ip2': 0.1, 'model.ip3': 0.3}

    # recipes/<name>/recipe.yaml
    pipeline:
      prune:
        callback:
          densities: {model.ip1: 0.05, model.ip2: 0.1, model.ip3: 0.3}

The layers interact and retraining recovers accuracy ([NIPS §5]: with retraining accuracy holds down to about
1/10 of the connections, against 1/3 without), so treat the suggestion as a starting point: layers pruned
together lose more than the sum of the single-layer drops, and retraining wins much of it back.

Command line: ``dc-lightning sensitivity --ckpt last.ckpt --recipe lenet300 --out sens/ [overrides ...]`` writes
``sensitivity.csv``, ``sensitivity.png`` and ``suggested_densities.json``.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dc_lightning.buffers import get_mask
from dc_lightning.kinds import DEFAULT_TARGET_TYPES
from dc_lightning.pruning.masks import check_densities, magnitude_mask
from dc_lightning.targets import select_targets
from dc_lightning.utils import atomic_write

log = logging.getLogger(__name__)

DEFAULT_DENSITIES: tuple[float, ...] = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05)
CSV_FIELDS = ("layer", "density", "kept", "weights", "accuracy")


def _batches(dataloader: Iterable, max_batches: int | None, transform: Callable | None, device: torch.device):
    out = []
    for i, batch in enumerate(dataloader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = batch[0].to(device), batch[1].to(device)
        if transform is not None:  # after the move, as Lightning's on_after_batch_transfer would be
            x, y = transform((x, y))[:2]
        out.append((x, y))
    if not out:
        raise ValueError("sensitivity_analysis: the dataloader yielded no batch")
    return out


@torch.no_grad()
def _accuracy(model: nn.Module, batches: list) -> float:
    correct = total = 0
    for x, y in batches:
        logits = model(x)
        # classes on the last dim: [B, C] for a classifier, [B, T, vocab] for a language model (next-token accuracy)
        correct += int((logits.argmax(dim=-1) == y).sum())
        total += int(y.numel())
    return 100.0 * correct / total


@torch.no_grad()
def sensitivity_analysis(
    model: nn.Module,
    dataloader: Iterable,
    densities: Sequence[float] = DEFAULT_DENSITIES,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
    batch_transform: Callable[[Any], Any] | None = None,
    types: tuple[type[nn.Module], ...] = DEFAULT_TARGET_TYPES,
) -> list[dict]:
    """Prune ONE layer at a time to each density (no retraining), measure top-1 accuracy, restore the layer.

    The evaluation batches (at most ``max_batches``) are read once and kept on ``device``. A layer that already
    carries a ``weight_mask`` is pruned further from its current mask (never revived). The model is put in
    ``eval()`` mode and left there, on ``device``; its weights are restored bit for bit after each layer.

    Args:
        model: a classifier returning logits ``[B, classes]``; layer names are those of ``named_modules()``.
        dataloader: yields ``(inputs, targets, ...)`` batches.
        densities: fractions of weights kept to try, each in (0, 1]; include 1.0 for the dense baseline (used
            by :func:`suggest_densities`).
        include: fnmatch patterns of targets to sweep (default: every weight matrix of ``types``; names as in
            :mod:`dc_lightning.targets`, e.g. ``model.lstm.weight_hh_l0``).
        exclude: fnmatch patterns of targets to skip.
        device: where to evaluate.
        max_batches: evaluate on the first ``max_batches`` batches only.
        batch_transform: applied to each batch before the model (e.g. a DataModule's
            ``lambda b: dm.on_after_batch_transfer(b, 0)`` when it normalises on the device).
        types: module types considered (default :data:`dc_lightning.kinds.DEFAULT_TARGET_TYPES`).

    Returns:
        One row per (target, density): ``layer``, ``density`` (requested), ``kept``, ``weights`` and ``accuracy``
        (top-1, percent).

    Raises:
        ValueError: a density outside (0, 1], an include/exclude pattern matching no layer (the message lists
            the layer names), or an empty dataloader.

    Example::

        rows = sensitivity_analysis(model, val_loader, max_batches=20)
        write_sensitivity(rows, "sens/")
    """
    densities = [float(check_densities(d, "densities")) for d in densities]
    if not densities:
        raise ValueError("sensitivity_analysis: densities is empty; give e.g. (1.0, 0.5, 0.1)")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"sensitivity_analysis: max_batches={max_batches!r}; expected an integer >= 1 or None")
    device = torch.device(device)
    layers = select_targets(model, include=include, exclude=exclude, types=types, what="sensitivity_analysis")
    model.to(device).eval()
    batches = _batches(dataloader, max_batches, batch_transform, device)
    baseline = _accuracy(model, batches)
    rows = []
    for name, t in layers.items():
        weight = t.weight
        original = weight.detach().clone()
        current = get_mask(t.module, t.param)
        n = weight.numel()
        for d in densities:
            if d == 1.0 and (current is None or bool(current.all())):
                kept, acc = n, baseline  # nothing to prune: the dense model's accuracy
            else:
                mask, _ = magnitude_mask(original, density=d, current_mask=current)
                weight.copy_(original.masked_fill(~mask, 0.0))
                kept, acc = int(mask.sum()), _accuracy(model, batches)
                weight.copy_(original)
            rows.append({"layer": name, "density": d, "kept": kept, "weights": n, "accuracy": acc})
        curve = ", ".join(f"{r['density']:.2f}->{r['accuracy']:.2f}%" for r in rows[-len(densities) :])
        log.info("sensitivity %s: %s", name, curve)
    return rows


def suggest_densities(rows: Iterable[dict], max_drop: float = 0.5) -> dict[str, float]:
    """Per layer, the lowest density whose accuracy stays within ``max_drop`` percentage points of the dense one.

    Conservative on noisy curves: densities are scanned from high to low and the scan stops at the first one
    that loses more than ``max_drop``, so a lucky point below a bad one is not picked. The dense reference is
    the layer's row at density 1.0 (the layer's current mask, if it had one).

    Raises:
        ValueError: ``max_drop`` < 0, or a layer has no row at density 1.0.

    Example::

        suggest_densities(rows, max_drop=0.5)  # {'model.ip1': 0.05, 'model.ip2': 0.1, 'model.ip3': 0.3}
    """
    if not isinstance(max_drop, int | float) or not max_drop >= 0:
        raise ValueError(f"suggest_densities: max_drop={max_drop!r}; expected a number >= 0 (percentage points)")
    by_layer: dict[str, dict[float, float]] = {}
    for r in rows:
        by_layer.setdefault(r["layer"], {})[float(r["density"])] = float(r["accuracy"])
    out = {}
    for layer, curve in by_layer.items():
        if 1.0 not in curve:
            raise ValueError(f"suggest_densities: layer {layer!r} has no row at density 1.0 (the dense reference)")
        base, best = curve[1.0], 1.0
        for d in sorted(curve, reverse=True):
            if base - curve[d] > max_drop + 1e-9:
                break
            best = d
        out[layer] = best
    return out


def write_sensitivity(rows: Sequence[dict], out_dir: str | Path) -> dict[str, Path]:
    """Write ``sensitivity.csv`` and ``sensitivity.png`` (accuracy vs density, one line per layer, the view of
    [NIPS] Fig. 6) into ``out_dir``, each atomically. Returns ``{"csv": path, "png": path}``.

    Raises:
        ValueError: ``rows`` is empty.
    """
    if not rows:
        raise ValueError("write_sensitivity: no rows to write")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_dir / "sensitivity.csv", out_dir / "sensitivity.png"
    with atomic_write(csv_path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    for layer in layers:
        pts = sorted((r["density"], r["accuracy"]) for r in rows if r["layer"] == layer)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=layer)
    ax.set_xlabel("density of the pruned layer (fraction of weights kept)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Pruning sensitivity, one layer at a time, no retraining")
    ax.invert_xaxis()  # pruning more goes to the right, as in [NIPS] Fig. 6
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(layers) > 8 else 1)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    with atomic_write(png_path, "wb") as f:
        f.write(buf.getvalue())
    return {"csv": csv_path, "png": png_path}
