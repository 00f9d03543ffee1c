"""``ClassifierModule``: the LightningModule that trains the paper's networks with the paper's knobs.

SGD with momentum and L2 weight decay ([NIPS] §3.1: L2 gives the best pruning results), a step or cosine LR
schedule, top-1/top-5 accuracy. The network is built from a plain dict (``model={"name": "vgg16", ...}``) so
that ``load_from_checkpoint`` and ``load_compressed`` can rebuild it without Hydra.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from dc_lightning.models import build_model
from dc_lightning.pruning.dropout import dropout_rates, set_dropout_rates

SCHEDULERS = ("none", "step", "cosine")
OPTIMIZERS = ("sgd", "adam", "adamw")


def topk_correct(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """Number of samples whose target is among the ``k`` highest logits."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == target[:, None]).any(dim=1).sum()


class ClassifierModule(pl.LightningModule):
    """Image classification with cross-entropy.

    Args:
        model: keyword arguments of :func:`dc_lightning.models.build_model` (``name`` required).
        optimizer: ``sgd`` (default, with ``momentum``), ``adam`` or ``adamw``.
        lr: base learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        nesterov: Nesterov momentum for SGD.
        scheduler: ``none``, ``step`` (multiply by ``gamma`` every ``step_size`` epochs) or ``cosine`` (to 0 over
            the trainer's ``max_epochs``).
        step_size: epochs between steps of the ``step`` schedule.
        gamma: factor of the ``step`` schedule.
        warmup_epochs: epochs of linear LR warm-up (from lr/10) before the schedule; helps plain (no batch norm)
            VGG-16/AlexNet start from scratch.
        num_classes: classes used for top-5 (top-5 is logged only when there are at least 5 classes).

    Raises:
        ValueError: an unknown optimizer/scheduler or a non-positive learning rate.

    Example::

        module = ClassifierModule(model={"name": "lenet300"}, lr=0.1, weight_decay=1e-4)
        pl.Trainer(max_epochs=15).fit(module, datamodule=FashionMNISTDataModule())
    """

    #: the metric ``measure_accuracy`` returns beside ``acc*`` (logged as ``test/<main_metric>``)
    main_metric = "acc1"

    def __init__(self, model: dict[str, Any], optimizer: str = "sgd", lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 1e-4, nesterov: bool = False, scheduler: str = "none", step_size: int = 10,
                 gamma: float = 0.1, warmup_epochs: int = 0, num_classes: int | None = None) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"module.optimizer: {optimizer!r} is not one of {list(OPTIMIZERS)}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"module.scheduler: {scheduler!r} is not one of {list(SCHEDULERS)}")
        if warmup_epochs < 0:
            raise ValueError(f"module.warmup_epochs: {warmup_epochs} must be >= 0")
        if not lr > 0:
            raise ValueError(f"module.lr: {lr} must be > 0")
        if not isinstance(model, dict) and hasattr(model, "items"):  # an omegaconf DictConfig
            from omegaconf import OmegaConf

            model = OmegaConf.to_container(model, resolve=True)
        self.save_hyperparameters()
        self.model = build_model(**model)
        out = next(m for m in reversed(list(self.model.modules())) if isinstance(m, nn.Linear)).out_features
        self.num_classes = num_classes or out
        # rebuild recipe for load_compressed: this module minus any local weights file
        hp = dict(self.hparams)
        hp["model"] = {k: v for k, v in dict(model).items() if k != "pretrained"}
        self.dc_builder = {"callable": f"{type(self).__module__}:{type(self).__qualname__}", "kwargs": hp}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch: Any, split: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        n = y.shape[0]
        self.log(f"{split}/loss", loss, prog_bar=split != "test", batch_size=n, sync_dist=split != "train")
        self.log(f"{split}/acc1", topk_correct(logits, y, 1).float() / n, prog_bar=True, batch_size=n,
                 sync_dist=split != "train")
        if self.num_classes >= 5 and split != "train":
            self.log(f"{split}/acc5", topk_correct(logits, y, 5).float() / n, batch_size=n, sync_dist=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # dropout rates are not in the state_dict, yet MagnitudePruning(adjust_dropout=True) lowers them ([NIPS]
        # §3.2): the checkpoint carries them, so a stage restarted from it retrains with the pruned rates
        checkpoint["dropout_rates"] = dropout_rates(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        set_dropout_rates(self, checkpoint.get("dropout_rates", {}))  # absent in checkpoints of older versions

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                                  nesterov=hp.nesterov)
        elif hp.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        warmup = int(hp.get("warmup_epochs", 0))
        if hp.scheduler == "none" and not warmup:
            return opt
        epochs = max(int(self.trainer.max_epochs or 1) - warmup, 1)
        if hp.scheduler == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=hp.step_size, gamma=hp.gamma)
        elif hp.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        else:
            sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
        if warmup:
            ramp = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=warmup)
            sched = torch.optim.lr_scheduler.SequentialLR(opt, [ramp, sched], milestones=[warmup])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class LanguageModule(ClassifierModule):
    """Next-token language modelling: the network maps tokens ``[B, T]`` to logits ``[B, T, vocab]``.

    Same arguments and optimizers as :class:`ClassifierModule` (``model={"name": "lstm_lm"}``); batches are
    ``(x, y)`` int64 ``[B, T]`` with ``y`` the next token of each position
    (:class:`dc_lightning.data.text.TextDataModule`).
    Logs ``<split>/loss`` (mean cross-entropy per token, nats), ``<split>/acc1`` (next-token accuracy) and, per
    validation/test epoch, ``<split>/ppl``: exp of the mean cross-entropy over every token of the epoch (summed
    across processes), which is the corpus perplexity, not a mean of per-batch perplexities.

    Example::

        module = LanguageModule(model={"name": "lstm_lm"}, optimizer="adam", lr=2e-3)
        pl.Trainer(max_epochs=1).fit(module, datamodule=TextDataModule(seq_len=128))
    """

    main_metric = "ppl"

    def _step(self, batch: Any, split: str) -> torch.Tensor:
        x, y = batch
        logits = self(x).flatten(0, 1)  # [B*T, vocab]
        y = y.flatten()
        loss = F.cross_entropy(logits, y)
        n = y.numel()
        self.log(f"{split}/loss", loss, prog_bar=split != "test", batch_size=n, sync_dist=split != "train")
        self.log(f"{split}/acc1", topk_correct(logits, y, 1).float() / n, batch_size=n, sync_dist=split != "train")
        if split != "train":  # token-weighted sums for the epoch's perplexity
            sums = getattr(self, "_nll_sums", None)
            add = torch.stack([loss.detach().double() * n, torch.tensor(float(n), dtype=torch.float64,
                                                                          device=loss.device)])
            self._nll_sums = add if sums is None else sums + add
        return loss

    def _log_perplexity(self, split: str) -> None:
        sums, self._nll_sums = getattr(self, "_nll_sums", None), None
        if sums is None:
            return
        nll, count = self.trainer.strategy.reduce(sums, reduce_op="sum").tolist()
        self.log(f"{split}/ppl", math.exp(nll / count), sync_dist=False)  # already summed over processes

    def on_validation_epoch_start(self) -> None:
        self._nll_sums = None

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val")

    def on_test_epoch_start(self) -> None:
        self._nll_sums = None

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test")
