"""Small models and training helpers shared by the test files (tests/ is on sys.path through its conftest.py)."""

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dc_lightning import buffers


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


class Table(nn.Module):
    """A module with a 2-D ``weight`` parameter whose type no compression callback targets by default (the
    non-target case; ``nn.Embedding`` is a default target since parameter-level targets)."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(rows, cols))


class Nested(nn.Module):
    """Conv1d/Conv2d/Linear with and without bias, nested, plus layers that must never be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.seq1d = nn.Conv1d(8, 6, 3, bias=False)
        self.emb = Table(10, 16)
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


class MyLinear(nn.Linear):
    """A Linear subclass (as ``nn.MultiheadAttention.out_proj`` is)."""


class Mixed(nn.Module):
    """Embedding, attention with other key/value sizes, a 2-layer bidirectional LSTM, a GRU, a Linear subclass."""

    def __init__(self, vocab: int = 11, d: int = 8) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, 2, kdim=6, vdim=5, batch_first=True)
        self.key = nn.Linear(d, 6)
        self.value = nn.Linear(d, 5)
        self.lstm = nn.LSTM(d, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(12, 7, batch_first=True)
        self.norm = nn.LayerNorm(7)
        self.head = MyLinear(7, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens [B, T] -> logits [B, T, vocab]
        x = self.embedding(tokens)
        a, _ = self.attn(x, self.key(x), self.value(x), need_weights=False)
        h, _ = self.lstm(x + a)  # [B, T, 12]
        g, _ = self.gru(h)  # [B, T, 7]
        return self.head(self.norm(g))


LSTM_WEIGHTS = [
    f"lstm.weight_{kind}_l{layer}{suffix}" for layer in (0, 1) for suffix in ("", "_reverse") for kind in ("ih", "hh")
]
MIXED_TARGETS = [
    "embedding",
    "attn.q_proj_weight",
    "attn.k_proj_weight",
    "attn.v_proj_weight",
    "attn.out_proj",
    "key",
    "value",
    *LSTM_WEIGHTS,
    "gru.weight_ih_l0",
    "gru.weight_hh_l0",
    "head",
]


def lstm_reference(lstm: nn.LSTM, x: torch.Tensor) -> torch.Tensor:
    """A batch-first multi-layer (bidirectional) LSTM written out gate by gate from the *masked* weights
    (``param * mask``), float64, zero initial state: what the module must compute after a pruning step."""

    def w(name: str) -> torch.Tensor:
        p = getattr(lstm, name).detach().double()
        mask = buffers.get_mask(lstm, name)
        return p * mask if mask is not None else p

    inp = x.double()
    for layer in range(lstm.num_layers):
        outs = []
        for suffix in ("", "_reverse")[: 2 if lstm.bidirectional else 1]:
            wi, wh = w(f"weight_ih_l{layer}{suffix}"), w(f"weight_hh_l{layer}{suffix}")
            b = (getattr(lstm, f"bias_ih_l{layer}{suffix}") + getattr(lstm, f"bias_hh_l{layer}{suffix}")).double()
            h = inp.new_zeros(inp.shape[0], lstm.hidden_size)
            c = torch.zeros_like(h)
            steps = range(inp.shape[1]) if not suffix else reversed(range(inp.shape[1]))
            seq = [None] * inp.shape[1]
            for t in steps:
                i, f, g, o = (inp[:, t] @ wi.T + h @ wh.T + b).chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                seq[t] = h
            outs.append(torch.stack(seq, 1))
        inp = torch.cat(outs, dim=2)
    return inp
