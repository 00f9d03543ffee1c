"""``dc-lightning predict``: top-1 of a ``.dcz`` file on a recipe's data, dense decode vs the EIE inference path."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dc_lightning.cli import user_errors

__all__ = ["cli_predict"]


@torch.no_grad()
def _top1(
    model: nn.Module, loader: Any, device: torch.device, limit: int | None, transform: Any = None
) -> tuple[float, int, Tensor]:
    """Top-1 over ``loader``; ``transform(batch)`` runs on the device first (the DataModule's
    ``on_after_batch_transfer``: the in-memory datasets convert uint8 images to normalised floats there)."""
    correct, total, preds = 0, 0, []
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        x, y = batch[0].to(device), batch[1].to(device)
        if transform is not None:
            x, y = transform((x, y))
        p = model(x).argmax(dim=-1)
        preds.append(p.cpu())
        correct += int((p == y).sum())
        total += int(y.numel())
    return correct / max(total, 1), total, torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


@user_errors("dc-lightning predict")
def cli_predict(argv: Sequence[str] | None = None) -> int:
    """``dc-lightning predict FILE.dcz --recipe NAME [overrides]``: top-1 of the dense decode and the kernel path.

    Returns 0 when both paths give the same predictions, 1 otherwise.
    """
    parser = argparse.ArgumentParser(
        prog="dc-lightning predict", description="evaluate a compressed file through the EIE inference path"
    )
    parser.add_argument("path", help="compressed .dcz file")
    parser.add_argument("--recipe", required=True, help="recipe whose data to evaluate on (e.g. lenet300)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--limit-batches", type=int, default=None, help="evaluate only this many batches")
    parser.add_argument(
        "--trusted",
        action="append",
        default=None,
        help="builder the file may name beyond dc_lightning's and torchvision's (e.g. 'mypkg.*'); repeatable",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.batch_size=256")
    # intermixed: `predict model.dcz --recipe lenet300 data.root=...` (overrides after the options) must parse
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))

    from dc_lightning.inference.conversion import to_compressed_inference
    from dc_lightning.io import load_compressed
    from dc_lightning.pipeline.config import build_datamodule, compose  # lazy: Hydra is heavy

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = compose(args.recipe, args.overrides)
    dm = build_datamodule(cfg)
    if hasattr(dm, "prepare_data"):
        dm.prepare_data()
    dm.setup("test" if args.split == "test" else "validate")
    loader = dm.test_dataloader() if args.split == "test" else dm.val_dataloader()

    trust = {"trusted": args.trusted} if args.trusted else {}  # a missing file or a directory: one line (OSError)
    dense = load_compressed(args.path, **trust).to(device).eval()
    fast = to_compressed_inference(dense, device=device)
    transform = (lambda b: dm.on_after_batch_transfer(b, 0)) if hasattr(dm, "on_after_batch_transfer") else None
    acc_dense, n, p_dense = _top1(dense, loader, device, args.limit_batches, transform)
    acc_fast, _, p_fast = _top1(fast, loader, device, args.limit_batches, transform)
    agree = float((p_dense == p_fast).float().mean()) if n else 1.0
    path_name = "triton" if device.type == "cuda" else "pytorch-reference"
    print(f"{args.path}: {n} {args.split} samples on {device}")
    print(f"  top-1 dense decode         : {acc_dense * 100:.2f}%")
    print(f"  top-1 compressed ({path_name}): {acc_fast * 100:.2f}%")
    print(f"  prediction agreement       : {agree * 100:.2f}%")
    return 0 if p_dense.equal(p_fast) else 1
