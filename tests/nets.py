"""Small models shared by the test files (tests/ is on sys.path through its conftest.py)."""

import torch
from torch import nn


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
