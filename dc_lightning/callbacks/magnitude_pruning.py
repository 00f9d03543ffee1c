"""``MagnitudePruning``: iterative magnitude pruning with retraining [NIPS §3], the first stage of [DC] §2."""

from __future__ import annotations

import bisect
import logging
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor, nn

from dc_lightning.buffers import get_mask, install_load_hook
from dc_lightning.callbacks.common import (
    broadcast_from_rank_zero,
    check_bool,
    check_patterns,
    check_types,
    log_metrics,
    print_table,
)
from dc_lightning.kinds import DEFAULT_TARGET_TYPES
from dc_lightning.pruning.dropout import adjust_dropouts_to_masks, find_feeding_dropouts
from dc_lightning.pruning.masks import (
    attach_mask,
    check_densities,
    check_quality,
    check_std_of,
    magnitude_mask,
    mask_summary,
    overall_density,
    resolve_targets,
)
from dc_lightning.pruning.schedules import geometric_schedule, quality_schedule
from dc_lightning.targets import Target
from dc_lightning.utils import is_number

log = logging.getLogger(__name__)

#: optimizers whose update keeps a weight at +0.0 when its gradient and state are zero, by inspection of their
#: update rules (momentum/dampening/nesterov, L2 and decoupled weight decay, amsgrad, maximize); the tests check
#: SGD, Adam and AdamW step by step
_ZERO_PRESERVING: tuple[type, ...] = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


class MagnitudePruning(Callback):
    r"""Prune the smallest-magnitude weights in rounds spread over training, and keep them at zero while retraining.

    [NIPS §3]: train, prune connections below a threshold, retrain the rest, iterate. Each round lowers every
    target layer's density geometrically from 1.0 toward its target (``densities``: round ``i`` of ``N`` keeps
    ``target ** (i / N)``, the target exactly at the last round) or raises its threshold linearly (``quality``:
    round ``i`` uses ``quality * i / N`` times the std of the layer's weights, [NIPS §4]). Pruned connections
    never come back.

    **When rounds happen.** Exactly one of:

    * ``prune_epochs=[0, 3, 6]``: at the start of these epochs (before their first batch).
    * ``prune_steps=[0, 500, 1000]``: before the first batch at which ``trainer.global_step`` (optimizer steps
      done) has reached the value; use for long epochs.
    * default: ``rounds`` rounds at the start of epochs ``floor(i * S / rounds)``, ``i = 0..rounds-1``, with
      ``S = max(1, floor(prune_fraction * trainer.max_epochs))``; with the default ``prune_fraction=0.5`` the
      rounds are spread over the first half of training and the second half retrains the final sparse network.
      E.g. ``max_epochs=10, rounds=3`` prunes at epochs 0, 1, 3. The first round runs before any training, so
      start from a trained model ([NIPS] step 1). If rounds collide (``rounds > S``) the later one wins.

    A round scheduled where the fit never gets (at or after ``max_epochs`` / ``max_steps``, gradient accumulation
    counted) is reported with a warning in ``setup`` (explicit epochs/steps) or at ``on_train_start``.

    The resolved schedule is frozen at the first ``on_train_start`` and saved in the callback state, so a run resumed
    with a different ``max_epochs`` keeps it. If training skips past a scheduled point (e.g. resume), the latest
    due round is applied at once.

    **Targets** are weight matrices (:mod:`dc_lightning.targets`): by default every ``weight`` of ``nn.Linear`` (and
    subclasses such as attention's ``out_proj``), ``nn.Conv1d/2d/3d`` and ``nn.Embedding``, the ``in_proj_weight``
    (or ``q/k/v_proj_weight``) of ``nn.MultiheadAttention`` and every ``weight_ih_l*``/``weight_hh_l*`` of
    ``nn.LSTM``/``nn.GRU``/``nn.RNN``; biases, norms and 1-D parameters stay dense. A target is named after its
    module for ``weight`` (``model.classifier.6``) and ``<module>.<param>`` otherwise (``model.lstm.weight_hh_l1``).

    **Masks are law.** Every target gets a bool buffer ``<param>_mask`` (``weight_mask``, ``in_proj_weight_mask``,
    ...) in ``setup`` (all True until its first round, so a checkpoint's masks load into it). After every optimizer
    step every pruned weight is exactly ``+0.0`` (masked in place, so an RNN runs with the masked weights, cuDNN's
    flattened copy included):

    * at each round the pruned weights are set to ``+0.0`` and the optimizer state tensors shaped like the
      weight (``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``, ...) are zeroed at the pruned positions;
    * before every step, in ``on_before_optimizer_step`` (after backward, DDP all-reduce and AMP unscaling,
      before gradient clipping, so the clipping norm ignores them), the gradients of pruned weights are zeroed.
      A torch step pre-hook would be too early: Lightning runs the closure (forward/backward) inside
      ``optimizer.step``;
    * with ``remask_after_step`` an optimizer step post-hook also re-masks the weights after every step. For
      ``torch.optim.SGD``/``Adam``/``AdamW`` (exact types) this is provably redundant (zero weight, zero
      gradient and zero state give a zero update, weight decay scales zero, and ``+0.0 + -0.0 = +0.0``), so the
      default ``None`` turns it on only for other optimizers, saving a full pass over the weights each step.

    **Distributed.** Masks are a deterministic function of the replicated weights (ties broken by index); under
    ``torch.distributed`` they are also broadcast from rank 0 so float noise cannot make ranks disagree.
    Only rank 0 prints; loggers are rank-zero only. With ``ddp_spawn`` the main process gets the trained
    weights back but not the mask buffers (Lightning loads them non-strictly); the checkpoints carry them.

    **Resume.** ``state_dict`` holds the schedule, the rounds done and the original dropout rates; the masks
    are model buffers. ``setup`` installs a ``load_state_dict`` pre-hook
    (:func:`dc_lightning.buffers.install_load_hook`), so ``fit(ckpt_path=...)`` resumes a checkpoint with masks, and a
    dense one (written before this callback was added): its layers start all-kept.

    Args:
        densities: fraction of weights kept at the end, a float for every target or ``{pattern: density}``
            (fnmatch on target names such as ``"model.classifier.6"`` or ``"model.lstm.weight_hh_l0"``, on
            ``<module>.<param>`` names or on module names (``"*.self_attn"``: its ``in_proj_weight``); last matching
            pattern wins; targets no pattern names stay dense). Values in (0, 1].
        quality: alternatively, final threshold in units of each layer's weight std, float or
            ``{pattern: quality}``, values >= 0.
        rounds: number of prune rounds (default schedule); must equal ``len(prune_epochs or prune_steps)`` if
            those are given with ``rounds`` != 1.
        prune_epochs: explicit epochs (strictly increasing, >= 0) at whose start a round happens.
        prune_steps: explicit global steps (strictly increasing, >= 0) at which a round happens.
        prune_fraction: fraction of ``max_epochs`` over which the default schedule spreads the rounds, (0, 1].
        include: fnmatch patterns of candidate targets (default: every weight matrix of the modules of ``types``).
        exclude: fnmatch patterns of targets never pruned (``exclude=["*.embedding"]`` keeps an embedding dense).
        types: module types considered (default :data:`dc_lightning.kinds.DEFAULT_TARGET_TYPES`).
        std_of: quality mode: std over ``"all"`` weights (pruned ones count as 0) or the ``"kept"`` ones.
        adjust_dropout: after each round set the ``nn.Dropout`` feeding each pruned ``nn.Linear`` (the one just
            before it in an ``nn.Sequential``) to ``D_o * sqrt(C_ir / C_io)`` [NIPS §3.2], ``D_o`` the original rate.
        remask_after_step: re-mask the weights after every optimizer step (a step post-hook). ``None``: only
            when some optimizer is not exactly ``SGD``, ``Adam`` or ``AdamW``; ``True`` for extra safety (e.g.
            when other code writes to the weights or gradients after this callback's hook).
        verbose: print a per-layer table (rich) on rank 0 after each round.

    Raises:
        ValueError: neither or both of ``densities``/``quality``; a density outside (0, 1] or a negative quality;
            bad ``rounds``/``prune_epochs``/``prune_steps``/``prune_fraction``/``std_of``. In ``setup``: an
            include/exclude/densities pattern matching no layer (the message lists the layer names).

    Example::

        from dc_lightning import MagnitudePruning

        pruning = MagnitudePruning(densities={"*": 0.3, "model.classifier.*": 0.09}, rounds=3, adjust_dropout=True)
        trainer = Trainer(max_epochs=20, callbacks=[pruning])
        trainer.fit(module, datamodule)  # prunes at epochs 0, 3, 6; retrains 7..19
    """

    def __init__(
        self,
        densities: float | Mapping[str, float] | None = None,
        quality: float | Mapping[str, float] | None = None,
        rounds: int = 1,
        prune_epochs: Sequence[int] | None = None,
        prune_steps: Sequence[int] | None = None,
        prune_fraction: float = 0.5,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        types: tuple[type[nn.Module], ...] = DEFAULT_TARGET_TYPES,
        std_of: str = "all",
        adjust_dropout: bool = False,
        remask_after_step: bool | None = None,
        verbose: bool = True,
    ) -> None:
        if (densities is None) == (quality is None):
            raise ValueError(
                f"MagnitudePruning: give exactly one of densities (got {densities!r}) or quality (got {quality!r}); "
                "e.g. densities=0.1 keeps 10% of each layer's weights"
            )
        self._densities = check_densities(densities) if densities is not None else None
        self._quality = check_quality(quality) if quality is not None else None
        if not isinstance(rounds, numbers.Integral) or isinstance(rounds, bool) or rounds < 1:
            raise ValueError(f"MagnitudePruning: rounds={rounds!r}; expected an integer >= 1")
        if prune_epochs is not None and prune_steps is not None:
            raise ValueError("MagnitudePruning: give at most one of prune_epochs and prune_steps")
        explicit = prune_epochs if prune_epochs is not None else prune_steps
        self._unit = "step" if prune_steps is not None else "epoch"
        self._points: list[int] | None = None
        if explicit is not None:
            field = "prune_steps" if prune_steps is not None else "prune_epochs"
            pts = list(explicit)
            if not pts or any(not isinstance(p, numbers.Integral) or isinstance(p, bool) or p < 0 for p in pts):
                raise ValueError(f"MagnitudePruning: {field}={pts!r}; expected a non-empty list of integers >= 0")
            if any(b <= a for a, b in zip(pts, pts[1:], strict=False)):
                raise ValueError(f"MagnitudePruning: {field}={pts!r} must be strictly increasing")
            if rounds != 1 and rounds != len(pts):
                raise ValueError(
                    f"MagnitudePruning: rounds={rounds} but {field} has {len(pts)} entries; drop rounds or make "
                    "them agree"
                )
            self._points = [int(p) for p in pts]
            rounds = len(pts)
        if not is_number(prune_fraction) or not 0.0 < prune_fraction <= 1.0:
            raise ValueError(f"MagnitudePruning: prune_fraction={prune_fraction!r}; expected a number in (0, 1]")
        check_std_of(std_of, "MagnitudePruning: std_of")
        self.rounds = int(rounds)
        self.prune_fraction = float(prune_fraction)
        self.include = check_patterns(include, "MagnitudePruning: include")
        self.exclude = check_patterns(exclude, "MagnitudePruning: exclude")
        self.types = check_types(types, "MagnitudePruning: types")
        self.std_of = std_of
        self.adjust_dropout = check_bool(adjust_dropout, "MagnitudePruning: adjust_dropout")
        if remask_after_step is not None:
            check_bool(remask_after_step, "MagnitudePruning: remask_after_step (or None)")
        self.remask_after_step = remask_after_step
        self.verbose = check_bool(verbose, "MagnitudePruning: verbose")

        self._rounds_done = 0
        self._layers: dict[str, Target] = {}
        self._targets: dict[str, float] = {}
        self._mode = "density" if densities is not None else "quality"
        self._dropout_orig: dict[str, float] = {}
        self._dropout_map: dict[str, str] = {}
        self._thresholds: dict[str, float] = {}
        # per-step work lists, rebuilt whenever masks change: (weight, mask buffer, grad factor), (weight, ~mask)
        self._keep: list[tuple[Tensor, Tensor, Tensor]] = []
        self._pruned: list[tuple[Tensor, Tensor]] = []
        self._remask = False
        self._hook_handles: list[Any] = []
        self._warned_unreachable = False
        #: one entry per applied round: {"round", "unit", "at", "density", "layers": [mask_summary rows]}
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------- public API

    @property
    def finished(self) -> bool:
        """True once the final round has been applied (the quantization stage may start after it)."""
        return self._rounds_done >= self.rounds

    @property
    def rounds_done(self) -> int:
        """How many prune rounds have been applied so far."""
        return self._rounds_done

    @property
    def schedule(self) -> tuple[str, list[int]] | None:
        """``(unit, points)``: ``"epoch"`` or ``"step"`` and the round positions, once resolved (``on_train_start``)."""
        return None if self._points is None else (self._unit, list(self._points))

    @property
    def layer_names(self) -> list[str]:
        """Names of the targets (after ``setup``; :mod:`dc_lightning.targets`)."""
        return list(self._layers)

    def last_round_epoch(self, trainer: pl.Trainer) -> int:
        """The epoch in which the final round happens.

        For a step schedule this is ``last_step // steps_per_epoch`` with ``steps_per_epoch =
        ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)``, so it needs the train
        dataloader to be loaded (from ``on_train_start`` on).

        Raises:
            RuntimeError: (step schedule) called before the number of training batches is known.
            ValueError: the default schedule cannot be resolved (``trainer.max_epochs`` unset).
        """
        if self._points is None:
            self._points = self._resolve_points(trainer)
        if self._unit == "epoch":
            return self._points[-1]
        nb = trainer.num_training_batches
        if not isinstance(nb, int | float) or not math.isfinite(nb) or nb <= 0:
            raise RuntimeError(
                "MagnitudePruning.last_round_epoch: a step schedule needs trainer.num_training_batches, which is "
                f"not known yet ({nb!r}); call it from on_train_start or later"
            )
        steps_per_epoch = max(1, math.ceil(int(nb) / max(1, trainer.accumulate_grad_batches)))
        return self._points[-1] // steps_per_epoch

    # --------------------------------------------------------------------------------------- Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # before checkpoint restore and before DDP wraps: the placeholders let a checkpoint's masks load
        self._layers, self._targets, _ = resolve_targets(
            pl_module,
            densities=self._densities,
            quality=self._quality,
            include=self.include,
            exclude=self.exclude,
            types=self.types,
            what="MagnitudePruning",
        )
        self._attach_full_masks()
        install_load_hook(pl_module)  # a restored checkpoint brings its masks, or none (a dense checkpoint)
        self._warned_unreachable = False
        if stage == "fit" and self._points is not None:
            self._check_reachable(trainer, None)
        if self.adjust_dropout:
            self._dropout_map = find_feeding_dropouts(pl_module, [t.module_name for t in self._layers.values()])
            if not self._dropout_map:
                rank_zero_warn(
                    "MagnitudePruning(adjust_dropout=True): no nn.Dropout directly precedes a pruned nn.Linear "
                    "inside an nn.Sequential; nothing will be adjusted"
                )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self._remask = self.remask_after_step
        if self._remask is None:
            self._remask = any(type(opt) not in _ZERO_PRESERVING for opt in trainer.optimizers)
        # masks may have been restored from a checkpoint since setup (a dense one removes them: all kept again)
        self._attach_full_masks()
        self._refresh_cache()
        with torch.no_grad():
            for weight, mask, _ in self._keep:
                weight.masked_fill_(~mask, 0.0)
        if self.adjust_dropout and self._rounds_done > 0:
            self._apply_dropout(pl_module)  # rates are not in the model's state_dict
        if self._remask:
            for opt in trainer.optimizers:
                self._hook_handles.append(opt.register_step_post_hook(self._after_step))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # resolved here, after any checkpoint restore, so a resumed run keeps the checkpoint's schedule
        if self._points is None:
            self._points = self._resolve_points(trainer)
        nb = trainer.num_training_batches
        if isinstance(nb, int) and nb > 0:
            self._check_reachable(trainer, max(1, math.ceil(nb / max(1, trainer.accumulate_grad_batches))))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._unit == "epoch":
            self._maybe_prune(trainer, pl_module, trainer.current_epoch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._unit == "step":
            self._maybe_prune(trainer, pl_module, trainer.global_step)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # a torch step pre-hook would run before Lightning's closure (i.e. before backward), so grads are
        # masked here: after backward and AMP unscaling, before gradient clipping and the step. A multiply by
        # the mask is one pass; a -0.0 gradient is harmless (+0.0 + -0.0 = +0.0).
        grads, factors = [], []
        for weight, _, factor in self._keep:
            if weight.grad is not None:
                grads.append(weight.grad)
                factors.append(factor)
        if not grads:
            return
        try:
            torch._foreach_mul_(grads, factors)  # one launch per group instead of one per layer on GPU
        except (RuntimeError, TypeError):  # a backend without this foreach overload: one op per layer
            for grad, factor in zip(grads, factors, strict=True):
                grad.mul_(factor)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "rounds_done": self._rounds_done,
            "rounds": self.rounds,
            "unit": self._unit,
            "points": None if self._points is None else list(self._points),
            "dropout_orig": dict(self._dropout_orig),
            "thresholds": dict(self._thresholds),
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("rounds") not in (None, self.rounds):
            raise ValueError(
                f"MagnitudePruning: the checkpoint was written with rounds={state_dict['rounds']}, this callback has "
                f"rounds={self.rounds}; use the same schedule to resume"
            )
        self._rounds_done = int(state_dict["rounds_done"])
        if state_dict.get("points") is not None:
            self._unit = state_dict["unit"]
            self._points = [int(p) for p in state_dict["points"]]
        self._dropout_orig = dict(state_dict.get("dropout_orig", {}))
        self._thresholds = dict(state_dict.get("thresholds", {}))
        self.history = [dict(h) for h in state_dict.get("history", [])]

    # ------------------------------------------------------------------------------------------- internals

    def _resolve_points(self, trainer: pl.Trainer) -> list[int]:
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 1:
            raise ValueError(
                f"MagnitudePruning: the default schedule spreads rounds over trainer.max_epochs, which is "
                f"{max_epochs!r}; set max_epochs or pass prune_epochs=[...] / prune_steps=[...]"
            )
        span = max(1, math.floor(self.prune_fraction * max_epochs))
        points = [math.floor(i * span / self.rounds) for i in range(self.rounds)]
        if len(set(points)) < len(points):
            rank_zero_warn(
                f"MagnitudePruning: {self.rounds} rounds over {span} epoch(s) collide (epochs {points}); the latest "
                "round due at an epoch is applied. Raise max_epochs/prune_fraction or pass prune_steps."
            )
        return points

    def _check_reachable(self, trainer: pl.Trainer, steps_per_epoch: int | None) -> None:
        """Warn (once per fit) when a round still to come lies where this fit never gets (after ``max_epochs`` /
        ``max_steps``): the layers would end denser than their targets. A warning, not an error: a run may stop early
        on purpose and resume with more epochs. ``steps_per_epoch`` (optimizer steps, known from ``on_train_start``
        on) lets epochs and steps be compared."""
        todo = self._points[self._rounds_done :]
        if not todo:
            return
        last = todo[-1]
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        max_steps = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps >= 0 else None
        if self._unit == "epoch":
            end = max_epochs
            if max_steps is not None and steps_per_epoch:
                end = min(end if end is not None else math.inf, math.ceil(max_steps / steps_per_epoch))
        else:
            end = max_steps
            if max_epochs is not None and steps_per_epoch:
                end = min(end if end is not None else math.inf, max_epochs * steps_per_epoch)
        if end is None or last < end:
            return
        if self._warned_unreachable:
            return
        self._warned_unreachable = True
        missed = [p for p in todo if p >= end]
        field = "prune_steps" if self._unit == "step" else "prune_epochs (resolved)"
        reached = self._rounds_done + len(todo) - len(missed)
        rank_zero_warn(
            f"MagnitudePruning: {field} {self._points} has round(s) at {self._unit}(s) {missed}, but training stops "
            f"before {self._unit} {end} (max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}, "
            f"accumulate_grad_batches={trainer.accumulate_grad_batches}); only {reached} of {self.rounds} rounds "
            "would run and the layers would end denser than their targets. Raise max_epochs/max_steps or move "
            "the rounds earlier (or resume this run later with more epochs)"
        )

    def _maybe_prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, position: int) -> None:
        assert self._points is not None, "setup resolves the schedule"
        due = bisect.bisect_right(self._points, position)  # rounds whose point has been reached
        if due > self._rounds_done:
            self._prune_round(trainer, pl_module, due, position)

    @torch.no_grad()
    def _prune_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule, r: int, position: int) -> None:
        """Apply round ``r`` (1-based) of ``self.rounds``."""
        for name, t in self._layers.items():
            if self._mode == "density":
                kw = {"density": geometric_schedule(self._targets[name], self.rounds)[r - 1]}
            else:
                kw = {"quality": quality_schedule(self._targets[name], self.rounds)[r - 1], "std_of": self.std_of}
            mask, self._thresholds[name] = magnitude_mask(t.weight, current_mask=get_mask(t.module, t.param), **kw)
            mask = broadcast_from_rank_zero(mask)  # float noise must not make ranks disagree
            attach_mask(t.module, mask, t.param)
            t.weight.masked_fill_(~mask, 0.0)  # in place: an RNN's flat weights are views of the parameters
        self._refresh_cache()
        self._zero_optimizer_state(trainer)
        if self.adjust_dropout:
            self._apply_dropout(pl_module)
        self._rounds_done = r

        rows = mask_summary(self._layers, self._thresholds)
        total = overall_density(rows)
        self.history.append({"round": r, "unit": self._unit, "at": position, "density": total, "layers": rows})
        metrics = {f"compression/{row['layer']}/density": row["density"] for row in rows}
        metrics["compression/density"] = total
        metrics["compression/prune_round"] = float(r)
        log_metrics(trainer, metrics)
        if rank_zero_only.rank == 0:
            log.info(
                "MagnitudePruning round %d/%d at %s %d: overall density %.4f",
                r,
                self.rounds,
                self._unit,
                position,
                total,
            )
        if self.verbose:
            print_table(
                f"MagnitudePruning round {r}/{self.rounds} ({self._unit} {position})",
                ("layer", "weights", "kept", "density", "threshold"),
                [
                    (row["layer"], f"{row['weights']:,}", f"{row['kept']:,}", f"{row['density']:.2%}",
                     f"{row['threshold']:.4g}")
                    for row in rows
                ],
                total=("total", f"{sum(r['weights'] for r in rows):,}", f"{sum(r['kept'] for r in rows):,}",
                       f"{total:.2%}", ""),
            )

    def _attach_full_masks(self) -> None:
        for t in self._layers.values():
            if get_mask(t.module, t.param) is None:
                attach_mask(t.module, torch.ones_like(t.weight, dtype=torch.bool), t.param)

    def _refresh_cache(self) -> None:
        self._keep, self._pruned = [], []
        for t in self._layers.values():
            mask, weight = get_mask(t.module, t.param), t.weight
            if mask is not None and not bool(mask.all()):
                # the multiply factor for gradients: the bool buffer itself on GPU (1 byte read per weight, the
                # least traffic); on CPU a float copy, because CPU kernels multiply by bool ~3x slower
                factor = mask if mask.device.type != "cpu" else mask.to(weight.dtype)
                self._keep.append((weight, mask, factor))
                if self._remask:  # cached inverse: masked_fill_ keeps exact +0.0 where a multiply can give -0.0
                    self._pruned.append((weight, ~mask))

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # re-mask after every optimizer step: undoes whatever weight decay, momentum or Adam state did
        with torch.no_grad():
            for weight, pruned in self._pruned:
                weight.masked_fill_(pruned, 0.0)

    def _zero_optimizer_state(self, trainer: pl.Trainer) -> None:
        # momentum / Adam moments at pruned positions would otherwise keep pushing them away from zero
        mask_of = {id(w): m for w, m, _ in self._keep}
        for opt in trainer.optimizers:
            for param, state in opt.state.items():
                mask = mask_of.get(id(param))
                if mask is None:
                    continue
                for value in state.values():
                    if isinstance(value, Tensor) and value.shape == mask.shape:
                        value.masked_fill_(~mask, 0)

    def _apply_dropout(self, pl_module: pl.LightningModule) -> None:
        adjust_dropouts_to_masks(pl_module, self._dropout_orig, self._dropout_map)

    def _remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
