"""Codebook LR in the many-members regime: ``lr_scale=1.0`` (the literal weights' LR) vs ``"auto"`` (CPU).

    python -m bench.experiments.codebook_lr          # writes bench/results/<date>/codebook_lr/codebook_lr.json

A 784-4096-4096-10 MLP on Fashion-MNIST (3.2M + 16.8M + 41K weights, fc shapes like AlexNet/VGG's fc7) is trained
for one epoch, pruned by magnitude to 9 % / 4 % / 25 % (one shot) and retrained for one epoch, then quantized to 5 bits
and fine-tuned for ``--steps`` SGD-momentum steps with each codebook LR setting; ~20K members per centroid in the
4096x4096 layer, the regime where VGG-16's fc6 (~128K) collapsed on the H200. Prints test top-1 after each stage.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.harness.report import print_table, results_dir, write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--limit-batches", type=int, default=None, help="batches per epoch and per test (a quick check)")
    ap.add_argument("--out", type=Path, default=results_dir("codebook_lr"))
    args = ap.parse_args(argv)

    import copy

    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch import nn

    from dc_lightning.callbacks.trained_quantization import TrainedQuantization
    from dc_lightning.data.images import FashionMNISTDataModule
    from dc_lightning.pruning.masks import prune_model

    torch.set_num_threads(2)
    pl.seed_everything(0)

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Sequential(nn.Flatten(), nn.Linear(784, 4096), nn.ReLU(), nn.Linear(4096, 4096),
                                       nn.ReLU(), nn.Linear(4096, 10))

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def test_step(self, batch, _):
            x, y = batch
            self.log("acc", (self(x).argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)

    dm = FashionMNISTDataModule(batch_size=128, download=False)

    limit = {} if args.limit_batches is None else {"limit_train_batches": args.limit_batches}

    def fit(module, epochs=1, steps=None, callbacks=()):
        pl.Trainer(max_epochs=epochs, max_steps=steps or -1, accelerator="cpu", logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   limit_val_batches=0, callbacks=list(callbacks), **limit).fit(module, datamodule=dm)

    def test(module):
        t = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                       limit_test_batches=args.limit_batches)
        return t.test(module, datamodule=dm, verbose=False)[0]["acc"]

    m = MLP()
    m.lr = 0.05
    fit(m)
    res = {"dense": test(m)}
    prune_model(m, densities={"model.1": 0.09, "model.3": 0.04, "model.5": 0.25})
    from dc_lightning.callbacks.magnitude_pruning import MagnitudePruning

    m.lr = 0.005
    fit(m, callbacks=[MagnitudePruning(densities={"model.1": 0.09, "model.3": 0.04, "model.5": 0.25},
                                       prune_epochs=[0], verbose=False)])
    res["pruned"] = test(m)
    for scale in (1.0, "auto"):
        q_model = copy.deepcopy(m)
        q = TrainedQuantization(bits=5, start_epoch=0, lr_scale=scale, verbose=False)
        fit(q_model, steps=args.steps, callbacks=[q])
        res[f"quantized lr_scale={scale}"] = test(q_model)
    write_json(res, args.out / "codebook_lr.json")
    print_table([{"stage": k, "top1": 100 * v} for k, v in res.items()], ["stage", ("top-1 %", "top1", ".2f")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
