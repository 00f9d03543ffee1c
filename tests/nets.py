"""Small models and training helpers shared by the test files (tests/ is on sys.path through its conftest.py)."""

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def toy_loader(n: int = 64, batch_size: int = 16) -> DataLoader:
    """``n`` fixed random 1x8x8 images with labels in 0..9, unshuffled."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def cpu_trainer(max_epochs: int, callbacks: list, **kw: Any) -> pl.Trainer:
    """A quiet single-process CPU trainer (no logger, checkpointing, progress bar or sanity check); ``kw`` wins."""
    settings = dict(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    settings.update(kw)
    return pl.Trainer(callbacks=callbacks, **settings)


class Nested(nn.Module):
    """Conv1d/Conv2d/Linear with and without bias, nested, plus layers that must never be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.seq1d = nn.Conv1d(8, 6, 3, bias=False)
        self.emb = nn.Embedding(10, 16)
        self.head = nn.Module()
        self.head.block = nn.Sequential(
            nn.Linear(8 * 6 * 6 + 6 * 6, 64),
            nn.LayerNorm(64),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(64, 10, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 1, 8, 8]
        a = self.features(x).flatten(1)  # [B, 8*6*6]
        b = self.seq1d(x.squeeze(1)).flatten(1)  # [B, 8, 8] -> [B, 6, 6] -> [B, 36]
        return self.head.block(torch.cat([a, b], 1)) + self.emb.weight[:, :10].sum(0)
