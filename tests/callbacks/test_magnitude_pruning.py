"""Tests of the MagnitudePruning callback: schedule, masks-are-law under several optimizers, resume, DDP."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from nets import Nested as Net
from nets import cpu_trainer, toy_loader
from torch import nn

from dc_lightning.buffers import get_mask
from dc_lightning.callbacks.magnitude_pruning import MagnitudePruning

os.environ.setdefault("WANDB_MODE", "disabled")

TARGETS = ["model.features.0", "model.seq1d", "model.head.block.0", "model.head.block.4"]


class Module(pl.LightningModule):
    def __init__(self, optimizer: str = "sgd", lr: float = 0.05, weight_decay: float = 1e-2) -> None:
        super().__init__()
        self.model = Net()
        self.optimizer, self.lr, self.weight_decay = optimizer, lr, weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        if self.optimizer == "noisy":
            return NoisySGD(self.parameters(), lr=self.lr)
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class NoisySGD(torch.optim.SGD):
    """An optimizer that moves every weight, zero gradient or not (as e.g. noise injection or a buggy one would)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(torch.randn_like(p) * 1e-3)
        return loss


def masks(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {n: get_mask(m).clone() for n, m in module.named_modules() if get_mask(m) is not None}


class ZeroChecker(Callback):
    """After every optimizer step: pruned weights are +0.0 and so is the optimizer state at pruned positions."""

    def __init__(self) -> None:
        self.checked = 0
        self.pruned_seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        opt = trainer.optimizers[0]
        for name, m in pl_module.named_modules():
            mask = get_mask(m)
            if mask is None:
                continue
            w = m.weight[~mask]
            assert (w == 0).all(), f"{name}: {int((w != 0).sum())} pruned weights revived"
            assert not torch.signbit(w).any(), f"{name}: pruned weights are -0.0"
            self.pruned_seen += w.numel()
            for key, value in opt.state.get(m.weight, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                    assert (value[~mask] == 0).all(), f"{name}: optimizer state {key} nonzero at pruned positions"
        self.checked += 1


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))


# ------------------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"densities": 0.0}, r"densities: got 0.0"),
        ({"densities": 1.5}, r"densities: got 1.5"),
        ({"densities": {"model.fc6": 0.0}}, r"densities\['model.fc6'\]: got 0.0"),
        ({"quality": -1.0}, r"quality: got -1.0"),
        ({}, "exactly one of densities"),
        ({"densities": 0.5, "quality": 1.0}, "exactly one of densities"),
        ({"densities": 0.5, "rounds": 0}, "rounds=0"),
        ({"densities": 0.5, "prune_epochs": [2, 1]}, "strictly increasing"),
        ({"densities": 0.5, "prune_epochs": [0, 1], "prune_steps": [0, 5]}, "at most one"),
        ({"densities": 0.5, "prune_epochs": [0, 1], "rounds": 3}, "rounds=3"),
        ({"densities": 0.5, "prune_steps": [-1]}, "prune_steps"),
        ({"densities": 0.5, "prune_fraction": 0.0}, "prune_fraction"),
        ({"quality": 1.0, "std_of": "median"}, "std_of"),
        ({"densities": 0.5, "remask_after_step": "yes"}, "remask_after_step"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MagnitudePruning(**kwargs)


def test_unknown_pattern_lists_layer_names():
    for kw in ({"include": ["model.fc6"]}, {"exclude": ["model.head.*.9"]}, {"densities": {"model.fc6": 0.1}}):
        cb = MagnitudePruning(**{"densities": 0.5, **kw}, verbose=False)
        with pytest.raises(ValueError, match="matches no") as err:
            cpu_trainer(1, [cb]).fit(Module(), toy_loader())
        assert "model.seq1d" in str(err.value) and "model.head.block.4" in str(err.value)


# ----------------------------------------------------------------------------------------- schedule/targets


def test_densities_reached_and_other_layers_untouched():
    pl.seed_everything(0)
    module = Module()
    logger = MemoryLogger()
    cb = MagnitudePruning(densities={"*": 0.3, "model.head.block.4": 0.5}, prune_epochs=[0, 1], verbose=False)
    checker = ZeroChecker()
    emb_before = module.model.emb.weight.detach().clone()
    cpu_trainer(3, [cb, checker], logger=logger).fit(module, toy_loader())
    assert cb.finished and cb.rounds_done == 2 and cb.layer_names == TARGETS
    got = {n: float(m.float().mean()) for n, m in masks(module).items()}
    assert set(got) == set(TARGETS)  # BatchNorm, LayerNorm, a non-target type got no mask
    for name, density in got.items():
        target = 0.5 if name.endswith("block.4") else 0.3
        assert abs(density - target) <= max(0.005, 0.5 / get_mask(dict(module.named_modules())[name]).numel())
    # round 1 was the geometric midpoint sqrt(target)
    first = {r["layer"]: r["density"] for r in cb.history[0]["layers"]}
    assert first["model.head.block.0"] == pytest.approx(0.3**0.5, abs=0.005)
    assert [h["at"] for h in cb.history] == [0, 1]
    # untouched types still trained
    assert not torch.equal(module.model.emb.weight, emb_before)
    assert checker.checked == 12 and checker.pruned_seen > 0
    # visibility: per-layer and overall density logged at each round
    rounds = [m for _, m in logger.records if "compression/density" in m]
    assert len(rounds) == 2
    assert rounds[-1]["compression/model.seq1d/density"] == pytest.approx(got["model.seq1d"])
    total = sum(int(m.sum()) for m in masks(module).values()) / sum(m.numel() for m in masks(module).values())
    assert rounds[-1]["compression/density"] == pytest.approx(total)


def test_include_exclude_select_layers():
    module = Module()
    cb = MagnitudePruning(densities=0.2, include=["model.head.*"], exclude=["model.head.block.4"], verbose=False)
    cpu_trainer(1, [cb]).fit(module, toy_loader())
    assert list(masks(module)) == ["model.head.block.0"]
    module = Module()
    cb = MagnitudePruning(densities=0.2, types=(nn.Conv1d, nn.Conv2d), verbose=False)
    cpu_trainer(1, [cb]).fit(module, toy_loader())
    assert list(masks(module)) == ["model.features.0", "model.seq1d"]


def test_default_schedule_rule_and_collisions():
    cb = MagnitudePruning(densities=0.2, rounds=3, verbose=False)
    t = cpu_trainer(10, [cb])
    assert cb.schedule is None
    assert cb.last_round_epoch(t) == 3  # usable before fit (e.g. from another callback's setup)
    assert cb.schedule == ("epoch", [0, 1, 3])  # floor(i * 5 / 3), first half of 10 epochs
    cb = MagnitudePruning(densities=0.2, rounds=4, prune_fraction=1.0, verbose=False)
    cb.last_round_epoch(cpu_trainer(8, [cb]))
    assert cb.schedule == ("epoch", [0, 2, 4, 6])
    # more rounds than epochs: rounds collide, the latest due one is applied, the target is still reached
    module = Module()
    cb = MagnitudePruning(densities=0.2, rounds=3, verbose=False)
    with pytest.warns(UserWarning, match="collide"):
        cpu_trainer(2, [cb]).fit(module, toy_loader())
    assert cb.finished and len(cb.history) == 1 and cb.history[0]["round"] == 3
    assert all(abs(float(m.float().mean()) - 0.2) <= 0.01 for m in masks(module).values())


def test_prune_steps_schedule_and_last_round_epoch():
    module = Module()
    seen = []

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.global_step, cb.rounds_done, cb.finished))

    cb = MagnitudePruning(densities=0.1, prune_steps=[0, 5, 10], verbose=False)
    t = cpu_trainer(4, [cb, Spy()])  # 4 batches/epoch -> steps 0..15
    t.fit(module, toy_loader())
    assert [h["at"] for h in cb.history] == [0, 5, 10] and [h["unit"] for h in cb.history] == ["step"] * 3
    assert [r for s, r, _ in seen] == [1] * 5 + [2] * 5 + [3] * 6
    assert [f for s, _, f in seen] == [False] * 10 + [True] * 6
    assert cb.last_round_epoch(t) == 2  # step 10 // 4 steps per epoch
    dens = [h["density"] for h in cb.history]
    assert dens[0] > dens[1] > dens[2] and dens[2] == pytest.approx(0.1, abs=0.01)
    # gradient accumulation: 2 optimizer steps per epoch -> step 10 happens in epoch 5
    cb2 = MagnitudePruning(densities=0.1, prune_steps=[0, 5, 10], verbose=False)
    t2 = cpu_trainer(6, [cb2], accumulate_grad_batches=2)
    t2.fit(Module(), toy_loader())
    assert cb2.last_round_epoch(t2) == 5 and [h["at"] for h in cb2.history] == [0, 5, 10]


def test_quality_mode_threshold_grows():
    module = Module()
    cb = MagnitudePruning(quality={"*": 1.0}, prune_epochs=[0, 1, 2], include=["model.head.block.0"], verbose=False)
    cpu_trainer(3, [cb]).fit(module, toy_loader())
    thr = [h["layers"][0]["threshold"] for h in cb.history]
    assert thr[0] < thr[1] < thr[2]
    assert cb.history[-1]["layers"][0]["density"] < cb.history[0]["layers"][0]["density"] < 1.0


def test_never_revive_across_rounds():
    module = Module()
    snapshots = []

    class Snap(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            snapshots.append(masks(pl_module))

    cb = MagnitudePruning(densities=0.1, prune_epochs=[0, 1, 2], verbose=False)
    cpu_trainer(3, [cb, Snap()]).fit(module, toy_loader())  # Snap runs after the round of its epoch
    for before, after in zip(snapshots, snapshots[1:], strict=False):
        for name in TARGETS:
            assert not (after[name] & ~before[name]).any(), f"{name} revived connections"
            assert int(after[name].sum()) < int(before[name].sum())


# --------------------------------------------------------------------------------------------- masks are law


@pytest.mark.parametrize(
    "optimizer, extra",
    [
        ("sgd", {}),
        ("adamw", {}),
        ("adam", {}),
        ("sgd", {"gradient_clip_val": 0.01}),
        ("adamw", {"precision": "bf16-mixed"}),
    ],
)
def test_zeros_stay_zero(optimizer, extra):
    pl.seed_everything(1)
    module = Module(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 0.01, weight_decay=0.05)
    checker = ZeroChecker()
    cb = MagnitudePruning(densities=0.25, prune_epochs=[0, 1], verbose=False)
    cpu_trainer(4, [cb, checker], **extra).fit(module, toy_loader(n=224))  # 14 steps/epoch -> 56 steps
    assert checker.checked == 56 and checker.pruned_seen > 0
    for name, m in masks(module).items():
        w = dict(module.named_modules())[name].weight
        assert (w[~m] == 0).all() and (w[m] != 0).float().mean() > 0.99


@pytest.mark.parametrize("remask", [None, True, False])
def test_remask_after_step_for_other_optimizers(remask):
    pl.seed_everything(2)
    module = Module(optimizer="noisy")
    cb = MagnitudePruning(densities=0.25, prune_epochs=[0], remask_after_step=remask, verbose=False)
    checker = ZeroChecker()
    if remask is False:  # the post-step hook is what protects against such an optimizer
        with pytest.raises(AssertionError, match="revived"):
            cpu_trainer(1, [cb, checker]).fit(module, toy_loader())
        return
    cpu_trainer(2, [cb, checker]).fit(module, toy_loader())
    assert checker.checked == 8 and cb._remask is True
    assert cb._hook_handles == []  # removed at the end of fit


def test_auto_remask_is_off_for_zero_preserving_optimizers():
    cb = MagnitudePruning(densities=0.25, prune_epochs=[0], verbose=False)
    seen = []

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((cb._remask, len(cb._hook_handles), len(cb._keep)))

    cpu_trainer(1, [cb, Spy()]).fit(Module(optimizer="sgd"), toy_loader())
    assert seen == [(False, 0, 4)] * 4


def test_without_the_callback_zeros_do_revive():
    """Control for test_zeros_stay_zero: the checker detects revival when nothing re-masks."""
    from dc_lightning.pruning.masks import prune_model

    module = Module(optimizer="adamw", lr=0.01)
    prune_model(module, densities=0.25)
    with pytest.raises(AssertionError, match="revived"):
        cpu_trainer(1, [ZeroChecker()]).fit(module, toy_loader())


# ------------------------------------------------------------------------------------------------- dropout


def test_adjust_dropout_uses_original_rate():
    module = Module()
    drop = module.model.head.block[3]
    rates = []

    class Spy(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            rates.append(drop.p)

    cb = MagnitudePruning(densities=0.25, prune_epochs=[0, 1], adjust_dropout=True, verbose=False)
    cpu_trainer(2, [cb, Spy()]).fit(module, toy_loader())
    mask = get_mask(module.model.head.block[4])
    mask1 = cb.history[0]["layers"][3]
    assert mask1["layer"] == "model.head.block.4"
    assert rates[0] == pytest.approx(0.5 * (mask1["kept"] / mask1["weights"]) ** 0.5)
    assert rates[1] == pytest.approx(0.5 * float(mask.float().mean()) ** 0.5)  # from D_o = 0.5, not from rates[0]
    assert rates[1] == pytest.approx(0.25, abs=0.01)
    assert module.model.head.block[3] is drop and cb.state_dict()["dropout_orig"] == {"model.head.block.3": 0.5}


# -------------------------------------------------------------------------------------------------- resume


def _final(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class SeedPerEpoch(Callback):
    """Dropout draws from the global RNG, which Lightning checkpoints do not hold: reseed every batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(1000 * trainer.current_epoch + batch_idx)


def test_exact_resume(tmp_path):
    kw = {"densities": {"*": 0.2, "model.features.0": 0.5}, "prune_epochs": [0, 2, 4], "adjust_dropout": True}
    pl.seed_everything(7)
    full = Module()
    cb_full = MagnitudePruning(**kw, verbose=False)
    cpu_trainer(6, [cb_full, SeedPerEpoch()]).fit(full, toy_loader())

    pl.seed_everything(7)
    part = Module()
    cb_part = MagnitudePruning(**kw, verbose=False)
    t = cpu_trainer(3, [cb_part, SeedPerEpoch()])
    t.fit(part, toy_loader())
    assert cb_part.rounds_done == 2 and not cb_part.finished
    ckpt = tmp_path / "mid.ckpt"
    t.save_checkpoint(ckpt)

    pl.seed_everything(123)  # a different seed: everything must come from the checkpoint
    resumed = Module()  # fresh, dense weights
    cb_res = MagnitudePruning(**kw, verbose=False)
    cpu_trainer(6, [cb_res, SeedPerEpoch()]).fit(resumed, toy_loader(), ckpt_path=str(ckpt))
    assert cb_res.finished and [h["at"] for h in cb_res.history] == [0, 2, 4]
    a, b = masks(full), masks(resumed)
    assert set(a) == set(TARGETS) and all(torch.equal(a[n], b[n]) for n in a)
    fa, fb = _final(full), _final(resumed)
    for k in fa:
        torch.testing.assert_close(fb[k], fa[k], rtol=1e-5, atol=1e-6, msg=k)
    assert resumed.model.head.block[3].p == pytest.approx(full.model.head.block[3].p)


def test_schedule_frozen_in_checkpoint(tmp_path):
    module = Module()
    cb = MagnitudePruning(densities=0.3, rounds=3, verbose=False)
    t = cpu_trainer(10, [cb], max_steps=8)  # schedule [0, 1, 3]; max_steps stops it after 2 epochs of 4 steps
    t.fit(module, toy_loader())
    assert cb.schedule == ("epoch", [0, 1, 3]) and cb.rounds_done == 2
    t.save_checkpoint(tmp_path / "a.ckpt")
    cb2 = MagnitudePruning(densities=0.3, rounds=3, verbose=False)
    t2 = cpu_trainer(4, [cb2])  # a fresh resolution would give floor(i * 2 / 3) = [0, 0, 1]
    t2.fit(Module(), toy_loader(), ckpt_path=str(tmp_path / "a.ckpt"))
    assert cb2.schedule == ("epoch", [0, 1, 3]) and [h["at"] for h in cb2.history] == [0, 1, 3]


# ----------------------------------------------------------------------------------------------------- DDP


class PerturbRank1(Callback):
    """Make rank 1's weights differ slightly before every round: masks must still agree (rank 0 broadcasts)."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.global_rank == 1:
            with torch.no_grad():
                for m in pl_module.modules():
                    if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d):
                        m.weight.add_(torch.randn_like(m.weight) * 0.05)


class DumpMasks(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {
                "masks": masks(pl_module),
                "zeros_ok": all(
                    bool((m.weight[~get_mask(m)] == 0).all()) for m in pl_module.modules() if get_mask(m) is not None
                ),
            },
            os.path.join(self.out, f"rank{trainer.global_rank}.pt"),
        )


def test_ddp_identical_masks(tmp_path):
    pl.seed_everything(3)
    cb = MagnitudePruning(densities=0.2, prune_epochs=[0, 1], verbose=False)
    t = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        callbacks=[PerturbRank1(), cb, DumpMasks(str(tmp_path))],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    t.fit(Module(), toy_loader())
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert set(r0["masks"]) == set(TARGETS) == set(r1["masks"])
    for name in TARGETS:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
        assert abs(float(r0["masks"][name].float().mean()) - 0.2) < 0.01
    assert r0["zeros_ok"] and r1["zeros_ok"]
