"""The default callbacks on the weight matrices of attention, recurrent, embedding and Linear-subclass layers: densities
and codebooks reached, masks kept through the optimizers, export -> reload, exact resume, DDP."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos import Transformer as DemoTransformer
from nets import LSTM_WEIGHTS, MIXED_TARGETS, Mixed, MyLinear, cpu_trainer, lstm_reference
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dc_lightning import MagnitudePruning, TrainedQuantization, buffers
from dc_lightning.io import load_compressed, save_compressed
from dc_lightning.quantization.codebooks import decode_weight
from dc_lightning.targets import select_targets

os.environ.setdefault("WANDB_MODE", "disabled")

VOCAB, SEQ, D = 13, 6, 8


def token_loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    """Fixed random token sequences (the model predicts the next token); unshuffled."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=batch_size, shuffle=False)


# ------------------------------------------------------------------------------------------------ tiny models


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, D)
        layer = nn.TransformerEncoderLayer(D, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.encoder(self.embedding(tokens), mask=causal, is_causal=True))


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, D)
        layer = nn.TransformerDecoderLayer(D, 2, dim_feedforward=16, dropout=0.0, batch_first=False)
        self.decoder = nn.TransformerDecoder(layer, 1)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens).transpose(0, 1)  # [T, B, D]: batch_first=False as well
        causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.decoder(x, x.flip(0), tgt_mask=causal).transpose(0, 1))


class Seq2Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, D)
        self.transformer = nn.Transformer(D, 2, 1, 1, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.transformer(x, x, tgt_mask=causal))


class Demo(nn.Module):
    """Lightning's demo ``Transformer`` (a tiny one; it returns log-probabilities ``[B*T, vocab]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = DemoTransformer(vocab_size=VOCAB, ninp=D, nhead=2, nhid=16, nlayers=1, dropout=0.0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens, tokens).view(tokens.shape[0], tokens.shape[1], VOCAB)


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase] = nn.LSTM) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, D)
        self.rnn = cell(D, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(12, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embedding(tokens))[0])


class EmbeddingBag(nn.Module):
    """An embedding and a Linear subclass only."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 16)
        self.head = MyLinear(16, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(tokens))


def rnn_names(prefix: str) -> list[str]:
    return [n.replace("lstm.", prefix + ".") for n in LSTM_WEIGHTS]


ENC_LAYER = ["self_attn.in_proj_weight", "self_attn.out_proj", "linear1", "linear2"]
DEC_LAYER = [*ENC_LAYER[:2], "multihead_attn.in_proj_weight", "multihead_attn.out_proj", "linear1", "linear2"]
MODELS: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "encoder": (Encoder, ["embedding", *(f"encoder.layers.{i}.{n}" for i in (0, 1) for n in ENC_LAYER), "head"]),
    "decoder": (Decoder, ["embedding", *(f"decoder.layers.0.{n}" for n in DEC_LAYER), "head"]),
    "transformer": (
        Seq2Seq,
        ["embedding", *(f"transformer.encoder.layers.0.{n}" for n in ENC_LAYER),
         *(f"transformer.decoder.layers.0.{n}" for n in DEC_LAYER), "head"],
    ),
    "demo": (
        Demo,
        ["net.embedding", *(f"net.transformer.encoder.layers.0.{n}" for n in ENC_LAYER),
         *(f"net.transformer.decoder.layers.0.{n}" for n in DEC_LAYER), "net.decoder"],
    ),
    "lstm": (Recurrent, ["embedding", *rnn_names("rnn"), "head"]),
    "gru": (lambda: Recurrent(nn.GRU), ["embedding", *rnn_names("rnn"), "head"]),
    "embedding": (EmbeddingBag, ["embedding", "head"]),
    "mixed": (lambda: Mixed(VOCAB), MIXED_TARGETS),
}


class LM(pl.LightningModule):
    """Next-token cross-entropy over any of the models above."""

    def __init__(self, net: nn.Module, optimizer: str = "sgd", lr: float = 0.05) -> None:
        super().__init__()
        self.net, self.optimizer, self.lr = net, optimizer, lr

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x).reshape(-1, VOCAB), y.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr * 0.2, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-2)


def lm(kind: str, **kw: Any) -> LM:
    pl.seed_everything(0)
    return LM(MODELS[kind][0](), **kw)


DENSITIES = {"*": 0.4, "*embedding": 0.6}  # every model has an embedding
BITS = {"*": 4, "*embedding": 3}


def density_of(name: str) -> float:
    return 0.6 if name.endswith("embedding") else 0.4


def bits_of(name: str) -> int:
    return 3 if name.endswith("embedding") else 4


def callbacks() -> list[Callback]:
    return [
        MagnitudePruning(densities=DENSITIES, prune_epochs=[0, 1], verbose=False),
        TrainedQuantization(bits=BITS, verbose=False),
    ]


class Invariants(Callback):
    """After every optimizer step, for every target: pruned weights exactly 0, quantized ones == the decode, and an
    LSTM computes with the masked weights (a gate-by-gate reference)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.steps += 1
        for name, t in select_targets(pl_module).items():
            w, mask = t.weight.detach(), buffers.get_mask(t.module, t.param)
            assert mask is not None and (w[~mask] == 0).all() and (w[~mask].signbit() == 0).all(), name
            codebook = buffers.get_codebook(t.module, t.param)
            if codebook is not None and bool(codebook[0].any()):  # clustered (not setup's zero placeholder)
                assert torch.equal(w, decode_weight(t.module, t.param)), name
        for m in pl_module.modules():
            if isinstance(m, nn.LSTM) and m.batch_first and m.proj_size == 0:
                x = torch.randn(2, 4, m.input_size, device=m.weight_ih_l0.device)
                assert torch.allclose(m(x)[0].double(), lstm_reference(m, x), atol=1e-5)


@pytest.mark.parametrize("kind", list(MODELS))
def test_default_callbacks_compress_every_weight_matrix_and_reload_bit_exact(kind, tmp_path):
    module = lm(kind)
    cbs = callbacks()
    check = Invariants()
    cpu_trainer(3, [*cbs, check], limit_train_batches=2).fit(module, token_loader())
    expected = [f"net.{n}" for n in MODELS[kind][1]]
    assert cbs[0].layer_names == expected and list(cbs[1].layer_bits) == expected  # every matrix, by default
    assert check.steps == 6 and cbs[1].clustered
    targets = select_targets(module)
    for name in expected:
        t = targets[name]
        w, mask = t.weight.detach(), buffers.get_mask(t.module, t.param)
        assert int(mask.sum()) == round(density_of(name) * w.numel()), name  # the target density exactly
        nz = w[w != 0].unique()
        assert 0 < nz.numel() <= 2 ** bits_of(name), name
        assert torch.equal(w, decode_weight(t.module, t.param))
    # biases, norms and other 1-D parameters stay dense: no other parameter carries a buffer
    assert sum(len(buffers.compressed_params(m)) for m in module.modules()) == len(expected)

    report = save_compressed(module, tmp_path / "m.dcz")
    assert [row.name for row in report.layers[: len(expected)]] == expected  # the report uses target names
    fresh = LM(MODELS[kind][0]())
    load_compressed(tmp_path / "m.dcz", model=fresh)
    sa, sb = module.state_dict(), fresh.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]) and sa[key].dtype == sb[key].dtype, key
    module.eval(), fresh.eval()
    x = next(iter(token_loader()))[0]
    assert torch.equal(module(x), fresh(x))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_masks_stay_zero_through_momentum_weight_decay_and_adamw(optimizer):
    module = lm("mixed", optimizer=optimizer)
    check = Invariants()
    pruning = MagnitudePruning(densities=0.3, prune_epochs=[0], verbose=False)
    cpu_trainer(2, [pruning, check], limit_train_batches=3).fit(module, token_loader())
    assert check.steps == 6 and pruning.layer_names == [f"net.{n}" for n in MIXED_TARGETS]
    lstm = module.net.lstm
    for name in LSTM_WEIGHTS:
        p = name.removeprefix("lstm.")
        assert (getattr(lstm, p)[~buffers.get_mask(lstm, p)] == 0).all()


def test_metrics_and_history_use_target_names():
    class Metrics(pl.loggers.Logger):
        name, version = "m", 0

        def __init__(self) -> None:
            super().__init__()
            self.metrics: dict[str, float] = {}

        def log_hyperparams(self, params: Any) -> None:
            pass

        def log_metrics(self, metrics: dict, step: int | None = None) -> None:
            self.metrics.update(metrics)

    logger = Metrics()
    cbs = callbacks()
    cpu_trainer(3, cbs, limit_train_batches=1, logger=logger).fit(lm("lstm"), token_loader())
    assert logger.metrics["compression/net.rnn.weight_hh_l1_reverse/density"] == pytest.approx(0.4, abs=0.01)
    assert logger.metrics["compression/net.rnn.weight_ih_l0/bits"] == 4.0
    assert logger.metrics["compression/net.embedding/bits"] == 3.0
    assert [r["layer"] for r in cbs[0].history[-1]["layers"]] == [f"net.{n}" for n in MODELS["lstm"][1]]


def test_exclude_keeps_a_target_dense():
    module = lm("encoder")
    pruning = MagnitudePruning(densities=0.5, exclude=["*.self_attn", "net.embedding"], prune_epochs=[0], verbose=False)
    cpu_trainer(1, [pruning], limit_train_batches=1).fit(module, token_loader())
    assert "net.encoder.layers.0.self_attn.out_proj" in pruning.layer_names  # a module pattern: not its out_proj
    attn = module.net.encoder.layers[0].self_attn
    assert buffers.get_mask(attn, "in_proj_weight") is None and buffers.get_mask(module.net.embedding) is None
    assert float(buffers.get_mask(attn.out_proj).float().mean()) == 0.5


def run_resumable(root: Any, max_epochs: int, ckpt: str | None = None) -> LM:
    module = lm("lstm")
    mc = ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    cpu_trainer(max_epochs, [*callbacks(), mc], enable_checkpointing=True, limit_train_batches=2).fit(
        module, token_loader(), ckpt_path=ckpt
    )
    return module


def test_exact_resume_of_an_lstm_model(tmp_path):
    full = run_resumable(tmp_path / "a", 4)
    ckpt = tmp_path / "a" / "epoch=2.ckpt"  # pruned at epochs 0 and 1, clustered at epoch 2
    resumed = run_resumable(tmp_path / "b", 4, ckpt=str(ckpt))
    sa, sb = full.state_dict(), resumed.state_dict()
    assert set(sa) == set(sb) and "net.rnn.weight_hh_l1_reverse_codebook" in sa
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


class Dump(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, os.path.join(self.out, f"end_rank{trainer.global_rank}.pt"))


class PerturbRank1(Callback):
    """Rank 1's weights differ before every round and the clustering: only the broadcasts make ranks agree."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == 1:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.mul_(1.01)


def test_ddp_identical_masks_and_codebooks_on_attention_and_lstm(tmp_path):
    pl.seed_everything(4)
    t = cpu_trainer(
        3, [PerturbRank1(), *callbacks(), Dump(str(tmp_path))], devices=2, strategy="ddp_spawn",
        use_distributed_sampler=True, limit_train_batches=2,
    )
    t.fit(lm("mixed", optimizer="adamw"), token_loader())
    r0 = torch.load(tmp_path / "end_rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "end_rank1.pt", weights_only=True)
    keys = [k for k in r0 if buffers.parse_buffer_key(k) is not None]
    assert {"net.attn.q_proj_weight_mask", "net.lstm.weight_hh_l1_reverse_codebook", "net.gru.weight_ih_l0_assign",
            "net.embedding.weight_codebook"} <= set(keys)
    assert len(keys) == 3 * len(MIXED_TARGETS)
    for key in keys:
        assert torch.equal(r0[key], r1[key]), key
    for name in ("net.attn.q_proj_weight", "net.lstm.weight_hh_l1_reverse", "net.head.weight"):
        assert r0[name].unique().numel() <= 16 + 1  # 4 bits + the pruned zeros
