"""``dc-lightning sensitivity``: the per-layer pruning sensitivity sweep of a trained checkpoint ([NIPS] Fig. 6)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from dc_lightning.pruning.sensitivity import (
    DEFAULT_DENSITIES,
    sensitivity_analysis,
    suggest_densities,
    write_sensitivity,
)
from dc_lightning.utils import atomic_write
from dc_lightning.utils import console as rich_console

__all__ = ["cli_sensitivity"]


def _parse_densities(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--densities: {text!r} is not a list of numbers") from err
    bad = [v for v in values if not (0.0 < v <= 1.0 and math.isfinite(v))]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"--densities: {bad or text!r} must be numbers in (0, 1]")
    return values


def cli_sensitivity(argv: list[str]) -> int:
    """``dc-lightning sensitivity --ckpt PATH --recipe NAME [--out DIR] [--densities ...] [--max-batches N]
    [--max-drop P] [--device D] [overrides ...]``: sweep a trained checkpoint on the recipe's validation set."""
    parser = argparse.ArgumentParser(
        prog="dc-lightning sensitivity",
        description="Prune one layer at a time (no retraining) and plot top-1 accuracy vs density ([NIPS] Fig. 6).",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint of the trained model")
    parser.add_argument("--recipe", required=True, help="recipe name (e.g. lenet300, vgg16)")
    parser.add_argument("--out", default="sensitivity", help="output folder (default: ./sensitivity)")
    parser.add_argument(
        "--densities",
        type=_parse_densities,
        default=list(DEFAULT_DENSITIES),
        help="comma-separated densities to try, e.g. 1,0.5,0.2,0.1 (1.0 is always added)",
    )
    parser.add_argument("--max-batches", type=int, default=None, help="evaluate on this many validation batches")
    parser.add_argument("--max-drop", type=float, default=0.5, help="accuracy drop (points) for the suggestion")
    parser.add_argument("--include", nargs="*", default=None, help="fnmatch patterns of layers to sweep")
    parser.add_argument("--exclude", nargs="*", default=None, help="fnmatch patterns of layers to skip")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=fake data.batch_size=256")
    args = parser.parse_intermixed_args(argv)
    # `--include model.ip1 data.root=X`: the pattern lists would swallow the overrides that follow them; a layer
    # name never contains "=", a Hydra override always does
    for name in ("include", "exclude"):
        patterns = getattr(args, name)
        if patterns:
            setattr(args, name, [p for p in patterns if "=" not in p] or None)
            args.overrides = [*args.overrides, *(p for p in patterns if "=" in p)]
    if args.max_batches is not None and args.max_batches < 1:
        parser.error(f"--max-batches: {args.max_batches} must be >= 1")

    from dc_lightning.pipeline.config import build_datamodule, compose, load_module_checkpoint

    cfg = compose(args.recipe, args.overrides)
    dm = build_datamodule(cfg)
    dm.setup("validate")
    module = load_module_checkpoint(cfg, args.ckpt)
    densities = sorted(set(args.densities) | {1.0}, reverse=True)
    transform = (lambda b: dm.on_after_batch_transfer(b, 0)) if hasattr(dm, "on_after_batch_transfer") else None
    rows = sensitivity_analysis(
        module,
        dm.val_dataloader(),
        densities=densities,
        include=args.include,
        exclude=args.exclude,
        device=args.device,
        max_batches=args.max_batches,
        batch_transform=transform,
    )
    paths = write_sensitivity(rows, args.out)
    suggestion = suggest_densities(rows, args.max_drop)
    with atomic_write(Path(args.out) / "suggested_densities.json", "w") as f:
        json.dump({"max_drop": args.max_drop, "densities": suggestion}, f, indent=2)
    from rich.table import Table

    table = Table(title=f"sensitivity of {args.ckpt} (top-1 %, one layer pruned at a time)")
    table.add_column("layer")
    for d in densities:
        table.add_column(f"{d:g}", justify="right")
    table.add_column(f"suggested (<= {args.max_drop:g} pt)", justify="right")
    for layer in dict.fromkeys(r["layer"] for r in rows):
        acc = {r["density"]: r["accuracy"] for r in rows if r["layer"] == layer}
        table.add_row(layer, *(f"{acc[d]:.2f}" for d in densities), f"{suggestion[layer]:g}")
    rich_console().print(table)
    rich_console().print(f"wrote {paths['csv']}, {paths['png']} and {Path(args.out) / 'suggested_densities.json'}")
    return 0
