"""Tests of the TrainedQuantization callback: shared weights after every step, eq. 3 updates, resume, DDP."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from nets import cpu_trainer, toy_loader
from torch import nn

from dc_lightning.buffers import get_codebook
from dc_lightning.callbacks.trained_quantization import TrainedQuantization
from dc_lightning.quantization.codebooks import codebook_grad, decode_weight

os.environ.setdefault("WANDB_MODE", "disabled")

CONV, FC1, FC2 = "model.0", "model.3", "model.5"


class Module(pl.LightningModule):
    def __init__(self, optimizer: str = "sgd", lr: float = 0.05, sched: bool = False) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 10)
        )
        self.optimizer, self.lr, self.sched = optimizer, lr, sched

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        if self.optimizer == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=self.lr * 0.1)
        elif self.optimizer == "plain":
            opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-3)
        if self.sched:
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}
        return opt


def prune_by_hand(module: Module, density: float = 0.5) -> None:
    """A fixed mask per layer (the buffer contract of docs/DESIGN.md) without depending on MagnitudePruning."""
    for name in (CONV, FC1, FC2):
        lin = module.get_submodule(name)
        w = lin.weight.detach()
        mask = w.abs() >= w.abs().flatten().quantile(1 - density)
        lin.register_buffer("weight_mask", mask)
        with torch.no_grad():
            lin.weight.mul_(mask)


class Check(Callback):
    """After every optimizer step: weights == decode exactly, zeros kept, <= 2**bits distinct values."""

    def __init__(self, q: TrainedQuantization) -> None:
        self.q = q
        self.steps = 0
        self.first_codebooks: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self.q.clustered and not self.first_codebooks:
            for name in (CONV, FC1, FC2):
                self.first_codebooks[name] = get_codebook(pl_module.get_submodule(name))[0].clone()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self.q.clustered:
            return
        self.steps += 1
        for name, bits in self.q.layer_bits.items():
            m = pl_module.get_submodule(name)
            w = m.weight.detach()
            assert torch.equal(w, decode_weight(m)), name
            mask = getattr(m, "weight_mask", None)
            if mask is not None:
                assert (w[~mask] == 0).all() and not torch.signbit(w[~mask]).any(), name
            assert w[w != 0].unique().numel() <= 2**bits, name


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_shared_weights_zeros_and_moving_centroids(optimizer):
    pl.seed_everything(0)
    module = Module(optimizer)
    prune_by_hand(module)
    masks = {n: module.get_submodule(n).weight_mask.clone() for n in (CONV, FC1, FC2)}
    q = TrainedQuantization(bits={"*": 3, FC2: 2}, start_epoch=1, verbose=False)
    check = Check(q)
    cpu_trainer(3, [q, check]).fit(module, toy_loader())
    assert q.clustered and check.steps == 8  # epochs 1 and 2, 4 steps each
    assert q.layer_bits == {CONV: 3, FC1: 3, FC2: 2}
    for name in (CONV, FC1, FC2):
        m = module.get_submodule(name)
        cb, assign = get_codebook(m)
        assert cb.numel() == 2 ** q.layer_bits[name] and assign.dtype == torch.uint8
        assert torch.equal(m.weight_mask, masks[name])
        moved = (cb - check.first_codebooks[name]).abs().max()
        assert moved > 1e-5, (name, moved)  # the centroids were fine-tuned
    assert len(q.codebook_optimizers()) == 1
    assert type(q.codebook_optimizers()[0]) is (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)
    # codebooks were not decayed: the SGD group's weight_decay is replaced by codebook_weight_decay (0)
    assert all(g["weight_decay"] == 0.0 for g in q.codebook_optimizers()[0].param_groups)


class RecordStep(Callback):
    """Record codebooks and the (clipped, masked) weight grads right before the step, and codebooks after."""

    def __init__(self, q: TrainedQuantization) -> None:
        self.q = q
        self.records: list[dict] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self.q.clustered:
            return
        rec = {"lr": optimizer.param_groups[0]["lr"], "layers": {}}
        for name in self.q.layer_bits:
            m = pl_module.get_submodule(name)
            cb, assign = get_codebook(m)
            rec["layers"][name] = (cb.clone(), m.weight.grad.clone(), assign.clone(), getattr(m, "weight_mask", None))
        self.records.append(rec)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.records and "after" not in self.records[-1]:
            self.records[-1]["after"] = {
                n: get_codebook(pl_module.get_submodule(n))[0].clone() for n in self.q.layer_bits
            }


def test_max_iter_zero_keeps_the_evenly_spaced_linear_centroids():
    """max_iter=0: uniform quantization, the codebook starts as linspace(min, max) of each layer's kept weights."""
    torch.manual_seed(0)
    module = Module()
    prune_by_hand(module)
    kept = {}
    for name in (CONV, FC1, FC2):
        m = module.get_submodule(name)
        kept[name] = m.weight.detach()[m.weight_mask].clone()
    q = TrainedQuantization(bits=4, max_iter=0, zero_code=False, verbose=False, log_histograms=False)
    check = Check(q)
    cpu_trainer(1, [q, check], limit_train_batches=2).fit(module, toy_loader())
    for name, w in kept.items():
        expected = torch.linspace(w.min().item(), w.max().item(), 16)
        torch.testing.assert_close(check.first_codebooks[name], expected, rtol=0, atol=1e-6)
    # the 4-bit default reserves the pruned positions' 0.0: 15 evenly spaced centroids, then the zero
    torch.manual_seed(0)
    module = Module()
    prune_by_hand(module)
    q = TrainedQuantization(bits=4, max_iter=0, verbose=False, log_histograms=False)
    check = Check(q)
    cpu_trainer(1, [q, check], limit_train_batches=2).fit(module, toy_loader())
    for name, w in kept.items():
        expected = torch.cat([torch.linspace(w.min().item(), w.max().item(), 15), torch.zeros(1)])
        torch.testing.assert_close(check.first_codebooks[name], expected, rtol=0, atol=1e-6)
    # Lloyd (the default) moves the centroids away from the even spacing on the same weights
    torch.manual_seed(0)
    module = Module()
    prune_by_hand(module)
    q = TrainedQuantization(bits=4, zero_code=False, verbose=False, log_histograms=False)
    check = Check(q)
    cpu_trainer(1, [q, check], limit_train_batches=2).fit(module, toy_loader())
    w = kept[FC1]
    assert not torch.allclose(check.first_codebooks[FC1], torch.linspace(w.min().item(), w.max().item(), 16))


def test_centroid_update_is_eq3_with_the_scheduled_lr():
    pl.seed_everything(1)
    module = Module("plain", lr=0.2, sched=True)
    prune_by_hand(module, 0.6)
    q = TrainedQuantization(bits=4, start_epoch=0, lr_scale=0.5, verbose=False)
    rec = RecordStep(q)
    cpu_trainer(2, [q, rec]).fit(module, toy_loader())
    assert len(rec.records) == 8
    assert [r["lr"] for r in rec.records] == [0.2] * 4 + [0.1] * 4  # StepLR halves after epoch 0
    for r in rec.records:
        for name, (cb, grad, assign, mask) in r["layers"].items():
            g = codebook_grad(grad, assign, mask, cb.numel())
            # by hand: the sum of the member gradients of each cluster
            hand = torch.stack([grad[(assign.long() == j) & mask].sum() for j in range(cb.numel())])
            torch.testing.assert_close(g, hand, rtol=1e-5, atol=1e-7)
            expected = cb - 0.5 * r["lr"] * g  # plain SGD on the centroid, lr scaled by lr_scale
            torch.testing.assert_close(r["after"][name], expected, rtol=0, atol=1e-7)


def test_auto_lr_divides_sgd_by_members_per_centroid_and_leaves_adam():
    """lr_scale="auto": SGD-like -> LR / (members per used centroid) per layer; Adam-like -> the weights' LR."""
    pl.seed_everything(1)
    module = Module("plain", lr=0.2)
    prune_by_hand(module, 0.6)
    q = TrainedQuantization(bits=4, start_epoch=0, verbose=False)  # "auto" is the default
    rec = RecordStep(q)
    cpu_trainer(1, [q, rec]).fit(module, toy_loader())
    for r in rec.records:
        for name, (cb, grad, assign, mask) in r["layers"].items():
            members = int(mask.sum())
            used = int(assign[mask].unique().numel())
            g = codebook_grad(grad, assign, mask, cb.numel())
            expected = cb - r["lr"] * used / members * g
            torch.testing.assert_close(r["after"][name], expected, rtol=0, atol=1e-7)
    assert any(int(m.sum()) > 2 * 16 for *_, m in rec.records[0]["layers"].values())  # the factor is not ~1
    adam = TrainedQuantization(bits=4, start_epoch=0, verbose=False)
    mod2 = Module("adam")
    prune_by_hand(mod2, 0.6)
    cpu_trainer(1, [adam]).fit(mod2, toy_loader())
    (_, cb_opt, layers, _), = adam._cb_opts.values()
    assert [lay.lr_factor for lay in layers] == [1.0] * 3
    assert all(g["lr"] == pytest.approx(0.005) for g in cb_opt.param_groups)  # Module("adam") uses lr * 0.1


def test_start_after_pruning_and_zeros_with_magnitude_pruning():
    from dc_lightning.callbacks import magnitude_pruning as mp

    pl.seed_everything(2)
    module = Module("sgd")
    pruning = mp.MagnitudePruning(densities=0.3, prune_epochs=[0, 1], verbose=False)
    q = TrainedQuantization(verbose=False)  # paper default bits; start = last pruning round + 1
    check = Check(q)

    class Epochs(Callback):
        first = None

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if q.clustered and Epochs.first is None:
                Epochs.first = trainer.current_epoch

    cpu_trainer(4, [pruning, q, Epochs(), check]).fit(module, toy_loader())
    assert Epochs.first == 2 and check.steps == 8
    assert q.layer_bits == {CONV: 8, FC1: 5, FC2: 5}  # [DC §5]
    for name in (CONV, FC1, FC2):
        m = module.get_submodule(name)
        assert abs(float(m.weight_mask.float().mean()) - 0.3) < 0.02
        assert (m.weight[~m.weight_mask] == 0).all()
        assert torch.equal(m.weight.detach(), decode_weight(m))


def run_resumable(tmp_path, max_epochs: int, ckpt: str | None = None) -> Module:
    pl.seed_everything(3)
    module = Module("sgd")
    q = TrainedQuantization(bits=3, start_epoch=1, verbose=False)
    mc = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    cpu_trainer(max_epochs, [q, mc], enable_checkpointing=True).fit(module, toy_loader(), ckpt_path=ckpt)
    return module, q


def test_exact_resume_mid_fine_tuning(tmp_path):
    full, _ = run_resumable(tmp_path / "a", 4)
    ckpt = tmp_path / "a" / "epoch=1.ckpt"  # saved after clustering (epoch 1) and one epoch of fine-tuning
    state = torch.load(ckpt, weights_only=False)
    qstate = next(v for k, v in state["callbacks"].items() if "TrainedQuantization" in k)
    assert qstate["clustered"] and qstate["codebook_optimizers"][0]["state"]  # momentum buffers saved
    resumed, q = run_resumable(tmp_path / "b", 4, ckpt=str(ckpt))
    assert q.summary == {}  # resuming after clustering must not cluster again
    sa, sb = full.state_dict(), resumed.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    # the codebooks are real, not the zero placeholders of setup
    assert not torch.equal(full.get_submodule(FC1).weight_codebook, torch.zeros(8))


def test_placeholders_removed_when_never_clustered():
    module = Module()
    q = TrainedQuantization(start_epoch=5, verbose=False)
    with pytest.warns(UserWarning, match="before the start epoch"):
        cpu_trainer(1, [q]).fit(module, toy_loader())
    assert not q.clustered
    assert all(get_codebook(module.get_submodule(n)) is None for n in (CONV, FC1, FC2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 0}, "1..8"),
        ({"bits": 9}, "1..8"),
        ({"bits": {"*": 9}}, r"bits\['\*'\]"),
        ({"bits": {}}, "empty"),
        ({"init": "kmeans++"}, "init must be one of"),
        ({"start_epoch": -1}, "start_epoch"),
        ({"lr_scale": 0}, "lr_scale"),
        ({"codebook_weight_decay": -1}, "codebook_weight_decay"),
        ({"max_iter": -1}, "max_iter"),
        ({"max_iter": 2.5}, "max_iter"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainedQuantization(**kwargs)


def test_unknown_pattern_names_layers():
    q = TrainedQuantization(bits={"model.99": 4}, verbose=False)
    with pytest.raises(ValueError, match="model.99"):
        cpu_trainer(1, [q]).fit(Module(), toy_loader())


class Metrics(pl.loggers.Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "m"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.metrics.update(metrics)


def test_bits_are_logged():
    logger = Metrics()
    q = TrainedQuantization(bits={"*": 6, FC2: 2}, verbose=False)
    cpu_trainer(1, [q], logger=logger).fit(Module(), toy_loader())
    assert logger.metrics[f"compression/{CONV}/bits"] == 6.0
    assert logger.metrics[f"compression/{FC2}/bits"] == 2.0


class PerturbRank1(Callback):
    """Make rank 1's weights differ right before clustering: only the broadcast can make codebooks agree."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1 and trainer.global_rank == 1:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.mul_(1.01)


class Dump(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def _dump(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        state = {k: v.clone() for k, v in pl_module.state_dict().items() if "codebook" in k or "assign" in k}
        state["weights"] = {n: pl_module.get_submodule(n).weight.detach().clone() for n in (CONV, FC1, FC2)}
        torch.save(state, os.path.join(self.out, f"{tag}_rank{trainer.global_rank}.pt"))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            self._dump(trainer, pl_module, "clustered")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dump(trainer, pl_module, "end")


def test_ddp_identical_codebooks(tmp_path):
    pl.seed_everything(4)
    q = TrainedQuantization(bits=4, start_epoch=1, verbose=False)
    t = cpu_trainer(
        3, [PerturbRank1(), q, Dump(str(tmp_path))], devices=2, strategy="ddp_spawn", use_distributed_sampler=True
    )
    t.fit(Module("adam"), toy_loader())
    for tag in ("clustered", "end"):
        r0 = torch.load(tmp_path / f"{tag}_rank0.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"{tag}_rank1.pt", weights_only=True)
        assert {k for k in r0 if "codebook" in k} == {f"{n}.weight_codebook" for n in (CONV, FC1, FC2)}
        for key in r0:
            if key == "weights":
                for n in r0[key]:
                    assert torch.equal(r0[key][n], r1[key][n]), (tag, n)
                    assert r0[key][n].unique().numel() <= 16 + 1
            else:
                assert torch.equal(r0[key], r1[key]), (tag, key)
    end = torch.load(tmp_path / "end_rank0.pt", weights_only=True)
    start = torch.load(tmp_path / "clustered_rank0.pt", weights_only=True)
    assert not torch.equal(end["model.3.weight_codebook"], start["model.3.weight_codebook"])  # fine-tuned


def test_wandb_histograms_before_and_after(tmp_path):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(mode="disabled", save_dir=str(tmp_path))
    logged: dict[str, Any] = {}
    logger.experiment.log = lambda data, *a, **k: logged.update(data)
    q = TrainedQuantization(bits=3, verbose=False)
    cpu_trainer(1, [q], logger=logger).fit(Module(), toy_loader())
    for name in (CONV, FC1, FC2):
        for tag in ("before", "after"):
            assert isinstance(logged[f"quantization/{name}/{tag}"], wandb.Histogram)
