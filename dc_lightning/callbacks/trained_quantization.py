"""``TrainedQuantization``: k-means weight sharing once, then fine-tune the shared weights [DC §3]."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor, nn

from dc_lightning import buffers
from dc_lightning.buffers import get_codebook, get_mask
from dc_lightning.callbacks.common import (
    broadcast_from_rank_zero,
    check_bool,
    check_patterns,
    check_types,
    log_histograms,
    log_metrics,
    logger_step,
    print_table,
)
from dc_lightning.kinds import DEFAULT_TARGET_TYPES
from dc_lightning.quantization.bits import ZeroCode, bits_for_layers, check_bits, check_zero_code, zero_code_for_layers
from dc_lightning.quantization.codebooks import decode_weight, quantize_layer
from dc_lightning.quantization.kmeans import INITS
from dc_lightning.quantization.step import CodebookStep
from dc_lightning.targets import Target, select_targets
from dc_lightning.utils import is_number

log = logging.getLogger(__name__)


#: optimizers whose step size does not grow with the gradient's magnitude (see "How the codebook LR is chosen")
_SCALE_INVARIANT = (
    torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop,
    torch.optim.Adagrad,
)


@dataclass
class _Layer:
    """Per-layer fine-tuning state (rebuilt from the model's buffers; nothing here is saved)."""

    name: str
    module: nn.Module
    k: int
    lr_factor: float = 1.0  # this layer's codebook LR relative to the weights' (lr_scale, or "auto")
    param: str = buffers.WEIGHT  # the quantized parameter of ``module`` (dc_lightning.targets)

    @property
    def weight(self) -> Tensor:
        return getattr(self.module, self.param)


class TrainedQuantization(Callback):
    r"""Share weights by 1-D k-means once, then fine-tune the shared weights (centroids) [DC §3].

    **Clustering.** At the start of epoch ``start_epoch`` every target layer's surviving weights (``weight_mask``
    True, or all entries of an unpruned layer) are clustered into ``2**bits`` centroids with
    :func:`~dc_lightning.quantization.kmeans.kmeans_1d` (default init ``"linear"``, the paper's choice [DC §3.2]).
    The layer gets the buffers ``weight_codebook`` (float32 ``[2**bits]``) and ``weight_assign`` (uint8,
    ``weight.shape``) and its weight becomes ``where(mask, codebook[assign], 0)``. With ``start_epoch=None`` the
    callback starts one epoch after the last round of a
    :class:`~dc_lightning.callbacks.magnitude_pruning.MagnitudePruning` callback in the same trainer, or at epoch 0
    without one.

    **Targets** are the weight matrices of :mod:`dc_lightning.targets` (by default those of Linear, Conv, Embedding,
    MultiheadAttention and LSTM/GRU/RNN modules); a parameter ``<param>`` other than ``weight`` gets the buffers
    ``<param>_codebook``/``<param>_assign`` and is named ``<module>.<param>`` in ``bits`` patterns, tables and metrics.

    **Fine-tuning** [DC §3.3, eq. 3, Fig. 3]. Assignments stay fixed; each centroid's gradient is the sum of its
    member weights' gradients, ∂L/∂C_k = Σ_ij ∂L/∂W_ij · 1(I_ij = k). The centroids follow the trainer's optimizer:
    for every trainer optimizer the callback owns a *codebook optimizer* of the same class over the codebooks of the
    layers that optimizer trains, with one param group per layer, copying the hyper-parameters of the group that
    trains the layer's weight (momentum, betas, eps, ...) and re-reading them before every step, so LR schedulers
    apply; ``weight_decay`` is replaced by ``codebook_weight_decay`` (default 0: decaying a centroid shrinks every
    member weight at once, which [DC] does not describe).

    **How the codebook LR is chosen.** ``lr = lr_scale x`` the weights' current LR. A centroid's gradient is a *sum*
    over its members, so with SGD its step grows with the cluster size: [DC] gives no LR, and at the weights' LR a
    VGG-16 fc6 centroid (~128K members) moved far enough in one epoch to collapse the model (recipes/vgg16). The
    default ``lr_scale="auto"`` divides the LR, per layer, by the mean number of members per used centroid when the
    optimizer's step scales with the gradient (SGD and any optimizer not listed as scale-invariant): a centroid then
    takes the mean of its members' would-be steps. Adam, AdamW, Adamax, NAdam, RAdam, RMSprop and Adagrad normalise
    the step by the gradient's magnitude, so "auto" leaves their LR unchanged. A number gives the same factor to every
    layer (``1.0`` = the literal weights' LR). Mechanism, per trainer optimizer:

    * a torch step pre-hook wraps Lightning's closure, so that *after* backward, DDP all-reduce, AMP unscaling,
      ``on_before_optimizer_step`` (where MagnitudePruning masks gradients) and gradient clipping, but *before* the
      parameter update, the codebook gradients are computed, the codebook optimizer steps, and the quantized weights'
      ``.grad`` is set to None so the trainer's optimizer leaves them alone (SGD/Adam skip params without grad).
      Without a closure (AMP's GradScaler runs it earlier and calls ``step()`` bare) the update runs in the pre-hook
      directly. When the GradScaler skips a step (inf/NaN), ``optimizer.step`` is not called, so the codebooks do not
      move either; non-finite codebook gradients also skip the codebook step (on a GPU without a host sync: the
      step is undone on the device; ``skipped_steps`` is read back at epoch end).
    * a step post-hook rewrites every quantized weight as ``where(mask, codebook[assign], 0)`` exactly, so after
      every optimizer step each layer has at most ``2**bits`` distinct values and pruned weights are exactly 0.0,
      whatever order this and the pruning callback's hooks run in.
    * both go through :class:`~dc_lightning.quantization.step.CodebookStep`: on CUDA the gradients of all layers of an
      optimizer take two Triton launches and the rewrite one (one pass over the members' gradients, one over the
      weights); on the CPU the float64 reference runs layer by layer.

    **Resume and DDP.** A layer carries a codebook only once it is clustered: checkpoints and ``.dcz`` files written
    before store it unquantized. ``setup`` installs a ``load_state_dict`` pre-hook
    (:func:`dc_lightning.buffers.install_load_hook`) that registers the codebooks a restored checkpoint holds; the
    ``clustered`` flag, the resolved start epoch and the codebook optimizers' state are in ``state_dict``, so a run
    resumed after clustering continues bit-for-bit and does not cluster again. Clustering is deterministic and its
    result is broadcast from rank 0 under ``torch.distributed``; codebook gradients are summed in a fixed order (no
    atomics), so every rank holds identical codebooks.

    Args:
        bits: bits per shared-weight index: an int for all targets, or ``{pattern: bits}`` (fnmatch on target names,
            ``<module>.<param>`` names or module names; last match wins). Default None = the paper's 8 bits for conv
            layers and 5 bits for fc layers [DC §5] (and fc-like matrices: embeddings, attention, recurrent). 1..8.
        init: centroid initialisation, ``"linear"`` (default), ``"density"`` or ``"random"`` [DC §3.2].
        include: fnmatch patterns of targets (default: every weight matrix of the modules of ``types``).
        exclude: fnmatch patterns of targets never quantized.
        start_epoch: epoch at whose start the layers are clustered; None = after pruning (see above).
        lr_scale: codebook learning rate = ``lr_scale`` × the current lr of the weight's param group: a number > 0,
            or ``"auto"`` (default; 1 / mean members per centroid for SGD-like optimizers, 1 for Adam-like ones).
        codebook_weight_decay: weight decay of the codebook optimizer, >= 0.
        refine: split/merge refinement of k-means (see :func:`~dc_lightning.quantization.kmeans.kmeans_1d`); False
            (default) runs the paper's plain Lloyd iterations from ``init``.
        max_iter: Lloyd iterations at most, >= 0. ``0`` with ``init="linear"`` keeps the evenly spaced initial
            centroids (uniform quantization; fine-tuning still trains them): for an entropy-coded (Huffman) file
            that is the better rate-distortion trade-off, since Lloyd spreads code use evenly and so raises the
            codes' entropy (measured in recipes/lenet300/README.md).
        seed: seed of the ``"random"`` init (the same on every rank).
        types: module types considered (default :data:`dc_lightning.kinds.DEFAULT_TARGET_TYPES`).
        verbose: print a per-layer table (rich) on rank 0 after clustering.
        log_histograms: with a ``WandbLogger``, log each layer's weight histogram before and after clustering
            (the view of [DC] Figs. 4/5).
        zero_code: reserve the last codebook entry of every pruned layer for an exact 0.0 (``2**bits - 1``
            centroids; EIE's 4-bit table of 15 shared values + the zero [EIE §III]). No kept weight uses it, so its
            codebook gradient is 0 and it stays 0.0 through fine-tuning; at 4 bits a pruned layer then converts to
            the ``tc`` tensor-core layout (0.5 bytes per weight) instead of ``lut`` + bitmap (0.625). ``None``
            (default): True for 4-bit layers (EIE's table), False at other widths (the paper's ``2**bits``
            centroids). Per layer: ``{pattern: True | False | None}`` like ``bits`` (unmatched targets: ``None``).

    Raises:
        ValueError: a bad argument (the message names it and the valid values); in ``setup``, a pattern that matches
            no layer or a bit width outside 1..8 for a named layer.

    Example::

        from dc_lightning import MagnitudePruning, TrainedQuantization

        trainer = Trainer(max_epochs=30, callbacks=[
            MagnitudePruning(densities={"*": 0.3, "model.classifier.*": 0.09}, rounds=3),
            TrainedQuantization(),          # 8 bits conv / 5 bits fc, starts after the last pruning round
        ])
        trainer.fit(module, datamodule)
    """

    def __init__(
        self,
        bits: int | Mapping[str, int] | None = None,
        init: str = "linear",
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        start_epoch: int | None = None,
        lr_scale: float | str = "auto",
        codebook_weight_decay: float = 0.0,
        refine: bool = False,
        max_iter: int = 300,
        seed: int = 0,
        types: tuple[type[nn.Module], ...] = DEFAULT_TARGET_TYPES,
        verbose: bool = True,
        log_histograms: bool = True,
        zero_code: ZeroCode = None,
    ) -> None:
        if isinstance(bits, Mapping):
            if not bits:
                raise ValueError(
                    "TrainedQuantization: bits is an empty mapping; give an int in 1..8 or {pattern: bits}"
                )
            bits = {str(p): check_bits(b, f"TrainedQuantization: bits[{p!r}]") for p, b in bits.items()}
        elif bits is not None:
            check_bits(bits, "TrainedQuantization: bits")
        if not isinstance(init, str) or init not in INITS:
            raise ValueError(f"TrainedQuantization: init must be one of {INITS}, got {init!r} ('linear' = [DC §3.2])")
        if start_epoch is not None and (
            isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0
        ):
            raise ValueError(f"TrainedQuantization: start_epoch must be None or an int >= 0, got {start_epoch!r}")
        if lr_scale != "auto" and (not is_number(lr_scale) or not (0 < lr_scale < math.inf)):
            raise ValueError(
                f"TrainedQuantization: lr_scale must be 'auto' or a finite number > 0, got {lr_scale!r}"
            )
        if not is_number(codebook_weight_decay) or not (0 <= codebook_weight_decay < math.inf):
            raise ValueError(
                "TrainedQuantization: codebook_weight_decay must be a finite number >= 0, "
                f"got {codebook_weight_decay!r}"
            )
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
            raise ValueError(f"TrainedQuantization: max_iter must be an int >= 0, got {max_iter!r}")
        self.bits = bits
        self.init = init
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"TrainedQuantization: seed must be an int >= 0, got {seed!r}")
        self.include = check_patterns(include, "TrainedQuantization: include")
        self.exclude = check_patterns(exclude, "TrainedQuantization: exclude")
        self.start_epoch = start_epoch
        self.lr_scale = lr_scale if lr_scale == "auto" else float(lr_scale)
        self.codebook_weight_decay = float(codebook_weight_decay)
        self.refine = check_bool(refine, "TrainedQuantization: refine")
        self.max_iter = max_iter
        self.seed = seed
        self.types = check_types(types, "TrainedQuantization: types")  # a list from a config node works as well
        self.verbose = check_bool(verbose, "TrainedQuantization: verbose")
        self.log_histograms = check_bool(log_histograms, "TrainedQuantization: log_histograms")
        self.zero_code = check_zero_code(zero_code, "TrainedQuantization", ValueError)

        self.summary: dict[str, dict[str, Any]] = {}  # per-layer clustering report (rank-local)
        self._layers: dict[str, Target] = {}
        self._bits: dict[str, int] = {}
        self._zero: dict[str, bool | None] = {}
        self._clustered = False
        self._start: int | None = None
        self._hooks: list[Any] = []
        # per trainer optimizer index: (that optimizer, its codebook optimizer, layers, source group of each cb group)
        self._cb_opts: dict[int, tuple[torch.optim.Optimizer, torch.optim.Optimizer, list[_Layer], list[int]]] = {}
        self._pending_opt_state: dict[int, dict] | None = None
        self._skipped_steps = 0
        self._nonfinite: Tensor | None = None  # device-side count of skipped codebook steps, read back lazily
        self._steps: dict[int, tuple[torch.optim.Optimizer, CodebookStep]] = {}  # id(codebook optimizer) -> step

    # ------------------------------------------------------------------------------------------- public API

    @property
    def clustered(self) -> bool:
        """True once the layers carry their codebooks (after clustering, or restored from a checkpoint)."""
        return self._clustered

    @property
    def layer_bits(self) -> dict[str, int]:
        """``{target: bits}`` of the targets (after ``setup``)."""
        return dict(self._bits)

    @property
    def skipped_steps(self) -> int:
        """Codebook steps skipped because a codebook gradient was not finite."""
        self._read_skips()
        return self._skipped_steps

    def codebook_optimizers(self) -> list[torch.optim.Optimizer]:
        """The codebook optimizers, one per trainer optimizer that trains a quantized layer (after clustering)."""
        return [e[1] for e in self._cb_opts.values()]

    # --------------------------------------------------------------------------------------- Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # before checkpoint restore and DDP wrapping. No placeholder codebooks: a layer is quantized only once it is
        # clustered, so every checkpoint and file written before that stores it as it is. A checkpoint's codebooks
        # are registered when it is loaded (buffers.install_load_hook).
        self._layers = select_targets(
            pl_module, self.include, self.exclude, types=self.types, what="TrainedQuantization"
        )
        self._bits = bits_for_layers(self._layers, self.bits, field="TrainedQuantization.bits")
        self._zero = zero_code_for_layers(self._layers, self.zero_code, field="TrainedQuantization.zero_code")
        buffers.install_load_hook(pl_module)
        for name, t in self._layers.items():
            got = get_codebook(t.module, t.param)
            if got is not None and got[0].numel() != 2 ** self._bits[name] and not self._clustered:
                rank_zero_warn(
                    f"TrainedQuantization: layer {name!r} has a codebook of {got[0].numel()} entries but bits="
                    f"{self._bits[name]} asks for {2 ** self._bits[name]}; clustering will replace it"
                )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the model is on its device and the optimizers exist; a checkpoint's buffers and our state are loaded
        self._remove_hooks()
        for opt in trainer.optimizers:
            self._hooks.append(opt.register_step_pre_hook(self._pre_step))
            self._hooks.append(opt.register_step_post_hook(self._post_step))
        if self._clustered:
            self._build_codebook_optimizers(trainer)
            self._rewrite_weights()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is None:  # resolved once, after any restore, and saved with the state
            self._start = self._resolve_start(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._clustered and self._start is not None and trainer.current_epoch >= self._start:
            self._cluster(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._clustered:
            rank_zero_warn(
                f"TrainedQuantization: training ended at epoch {trainer.current_epoch} before the start epoch "
                f"{self._start}; no layer was quantized. Raise max_epochs or lower start_epoch."
            )

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read_skips()  # one host sync per epoch instead of one per step

    def state_dict(self) -> dict[str, Any]:
        self._read_skips()
        return {
            "version": 1,
            "clustered": self._clustered,
            "start_epoch": self._start,
            "bits": dict(self._bits),
            "codebook_optimizers": {i: e[1].state_dict() for i, e in self._cb_opts.items()},
            "skipped_steps": self._skipped_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_bits = state_dict.get("bits") or {}
        for name, b in saved_bits.items():
            if name in self._bits and self._bits[name] != b:
                raise ValueError(
                    f"TrainedQuantization: the checkpoint quantized layer {name!r} with {b} bits, this callback asks "
                    f"for {self._bits[name]}; use the same bits to resume"
                )
        self._clustered = bool(state_dict["clustered"])
        self._start = state_dict.get("start_epoch")
        self._skipped_steps = int(state_dict.get("skipped_steps", 0))
        self._nonfinite = None
        self._pending_opt_state = {int(i): s for i, s in state_dict.get("codebook_optimizers", {}).items()}

    # ------------------------------------------------------------------------------------------- internals

    def _resolve_start(self, trainer: pl.Trainer) -> int:
        if self.start_epoch is not None:
            return self.start_epoch
        pruning = _find_pruning(trainer)
        if pruning is None:
            return 0
        start = int(pruning.last_round_epoch(trainer)) + 1
        rank_zero_info(f"TrainedQuantization: clustering at the start of epoch {start} (after the last pruning round)")
        return start

    @torch.no_grad()
    def _cluster(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pruning = _find_pruning(trainer)
        if pruning is not None and not getattr(pruning, "finished", True):
            rank_zero_warn(
                "TrainedQuantization: clustering while MagnitudePruning still has rounds to go; later rounds zero "
                "more weights but the codebooks are not re-fitted"
            )
        before: dict[str, Tensor] = {}
        for name, t in self._layers.items():
            if self.log_histograms:
                before[name] = _members(t)
            self.summary[name] = quantize_layer(
                t.module,
                self._bits[name],
                init=self.init,
                max_iter=self.max_iter,
                seed=self.seed,
                name=name,
                refine=self.refine,
                param=t.param,
                zero_code=self._zero[name],
            )
        for t in self._layers.values():  # float noise must not make ranks disagree
            for tensor in get_codebook(t.module, t.param):  # codebook and assignments, both broadcast in place
                broadcast_from_rank_zero(tensor)
        self._rewrite_weights()
        self._clustered = True
        self._build_codebook_optimizers(trainer)

        metrics = {f"compression/{n}/bits": float(b) for n, b in self._bits.items()}
        log_metrics(trainer, metrics)
        if self.log_histograms:  # [DC] Figs. 4/5: each layer's weights before and after clustering
            values = {f"quantization/{n}/before": v for n, v in before.items()}
            values.update({f"quantization/{n}/after": _members(t) for n, t in self._layers.items()})
            log_histograms(trainer, values, logger_step(trainer))
        if rank_zero_only.rank == 0:
            log.info("TrainedQuantization: clustered %d layers at epoch %d", len(self._layers), trainer.current_epoch)
        if self.verbose:
            print_table(
                f"TrainedQuantization (epoch {trainer.current_epoch})",
                ("layer", "weights", "members", "bits", "centroids used", "WCSS"),
                [
                    (name, f"{row['weights']:,}", f"{row['members']:,}", str(row["bits"]),
                     f"{row['centroids_used']}/{2 ** row['bits']}", f"{row['wcss']:.4g}")
                    for name, row in self.summary.items()
                ],
                stderr=True,
            )

    def _build_codebook_optimizers(self, trainer: pl.Trainer) -> None:
        """One codebook optimizer per trainer optimizer, same class, one group per source param group."""
        owner: dict[int, tuple[int, int]] = {}
        for oi, opt in enumerate(trainer.optimizers):
            for gi, group in enumerate(opt.param_groups):
                for p in group["params"]:
                    owner.setdefault(id(p), (oi, gi))
        plan: dict[int, dict[int, list[_Layer]]] = {}
        frozen = []
        for name, t in self._layers.items():
            hit = owner.get(id(t.weight))
            if hit is None:
                frozen.append(name)
                continue
            lay = _Layer(name, t.module, 2 ** self._bits[name], param=t.param)
            plan.setdefault(hit[0], {}).setdefault(hit[1], []).append(lay)
        if frozen:
            rank_zero_warn(
                f"TrainedQuantization: the weights of {frozen} are in no optimizer; their codebooks stay fixed"
            )
        self._cb_opts = {}
        for oi, groups in plan.items():
            src = trainer.optimizers[oi]
            layers, cb_group, param_groups = [], [], []
            for gi, group_layers in groups.items():
                for lay in group_layers:  # one codebook param group per layer: the LR factor is per layer
                    lay.lr_factor = self._lr_factor(src, lay)
                    hp = self._hyper_params(src.param_groups[gi], lay.lr_factor)
                    param_groups.append({"params": [get_codebook(lay.module, lay.param)[0]], **hp})
                    layers.append(lay)
                    cb_group.append(gi)
            try:
                cb_opt = type(src)(param_groups, **src.defaults)
            except TypeError:  # an optimizer whose defaults are not its constructor arguments
                cb_opt = type(src)(param_groups)
            self._cb_opts[oi] = (src, cb_opt, layers, cb_group)
        if self._pending_opt_state is not None:
            for oi, state in self._pending_opt_state.items():
                if oi in self._cb_opts:
                    self._cb_opts[oi][1].load_state_dict(state)
            self._pending_opt_state = None

    def _lr_factor(self, optimizer: torch.optim.Optimizer, lay: _Layer) -> float:
        """Codebook LR / weights' LR for one layer: ``lr_scale``, or with ``"auto"`` see the class docstring."""
        if self.lr_scale != "auto":
            return float(self.lr_scale)
        if isinstance(optimizer, _SCALE_INVARIANT):  # Adam-type steps do not grow with the gradient's size
            return 1.0
        cb, assign = get_codebook(lay.module, lay.param)
        mask = get_mask(lay.module, lay.param)
        members = int(assign.numel() if mask is None else mask.sum())
        used = int(torch.unique(assign if mask is None else assign[mask]).numel()) if members else 1
        return 1.0 / max(members / max(used, 1), 1.0)

    def _hyper_params(self, group: Mapping[str, Any], lr_factor: float) -> dict[str, Any]:
        hp = {k: v for k, v in group.items() if k != "params"}
        hp["lr"] = group["lr"] * lr_factor
        if "weight_decay" in hp:
            hp["weight_decay"] = self.codebook_weight_decay
        return hp

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self._clustered:
            return None
        closure = kwargs.get("closure", args[0] if args else None)
        if closure is None:  # grads are ready (e.g. AMP's GradScaler ran the closure before step())
            self._update_codebooks(optimizer)
            return None

        # Lightning runs forward/backward inside optimizer.step(closure): update right after the closure returns
        def closure_then_codebooks() -> Any:
            out = closure()
            self._update_codebooks(optimizer)
            return out

        if "closure" in kwargs:
            kwargs = {**kwargs, "closure": closure_then_codebooks}
        else:
            args = (closure_then_codebooks, *args[1:])
        return args, kwargs

    def _codebook_step(self, cb_opt: torch.optim.Optimizer, layers: list[_Layer], check: bool) -> CodebookStep:
        """The cached fused step of these layers; rebuilt when stale (``check``) or built for a new optimizer."""
        cached = self._steps.get(id(cb_opt))
        if cached is None or cached[0] is not cb_opt or (check and cached[1].stale()):  # assignments fixed; masks
            cached = (cb_opt, CodebookStep([(lay.module, lay.param) for lay in layers]))  # may tighten
            self._steps[id(cb_opt)] = cached
        return cached[1]

    @torch.no_grad()
    def _update_codebooks(self, optimizer: torch.optim.Optimizer) -> None:
        entry = self._entry_for(optimizer)
        if entry is None:
            return
        cb_opt, layers, src_groups = entry
        step = self._codebook_step(cb_opt, layers, check=True)
        grads, finite = step.codebook_grads([lay.weight.grad for lay in layers])  # [DC eq. 3]
        if all(g is None for g in grads):
            return
        for lay, g in zip(layers, grads, strict=True):
            get_codebook(lay.module, lay.param)[0].grad = g
            lay.weight.grad = None  # the trainer's optimizer must not move a shared weight on its own
        for cb_group, gi, lay in zip(cb_opt.param_groups, src_groups, layers, strict=True):
            cb_group.update(self._hyper_params(optimizer.param_groups[gi], lay.lr_factor))  # follows schedulers
        self._step_unless_nonfinite(cb_opt, finite)
        cb_opt.zero_grad(set_to_none=True)

    def _step_unless_nonfinite(self, cb_opt: torch.optim.Optimizer, finite: Tensor, sync: bool | None = None) -> None:
        """Step ``cb_opt`` unless ``finite`` is False, without a host sync where the optimizer state allows it.

        On an accelerator, when the codebooks and all their optimizer state are tensors of one float dtype on the
        device (SGD with or without momentum, Adam with ``capturable``/``fused``), the step always runs and is undone
        on the device when ``finite`` is False: parameters and state are restored from a snapshot with one
        ``where``. A step that *creates* optimizer state (the first one) reads ``finite`` on the host after it, and
        so does everything else (the CPU, Adam's CPU step counters). ``sync=True`` forces the host path.
        """
        if sync is None:
            sync = finite.device.type == "cpu"
        params = [p for group in cb_opt.param_groups for p in group["params"] if p.grad is not None]
        tensors = None if sync else _state_tensors(cb_opt, params, finite.device)
        if tensors is None:
            if bool(finite):
                cb_opt.step()
            else:
                self._count_skip()
            return
        stateless = [p for p in params if not cb_opt.state.get(p)]
        sizes = [t.numel() for t in tensors]
        before = torch.cat([t.reshape(-1) for t in tensors])

        def restore(flat: Tensor) -> None:
            torch._foreach_copy_(tensors, [v.view_as(t) for v, t in zip(flat.split(sizes), tensors, strict=True)])

        cb_opt.step()
        if any(cb_opt.state.get(p) for p in stateless):  # the step created state: undoing that needs the host
            if not bool(finite):
                restore(before)
                for p in stateless:
                    cb_opt.state.pop(p, None)
                self._count_skip()
            return
        restore(torch.where(finite, torch.cat([t.reshape(-1) for t in tensors]), before))
        skipped = (~finite).to(torch.int64)
        self._nonfinite = skipped if self._nonfinite is None else self._nonfinite + skipped

    def _count_skip(self) -> None:
        self._skipped_steps += 1
        rank_zero_warn("TrainedQuantization: non-finite codebook gradient; codebook step skipped")

    def _read_skips(self) -> None:
        """Add the device-side count of skipped codebook steps to ``skipped_steps`` (one host sync)."""
        if self._nonfinite is None:
            return
        n, self._nonfinite = int(self._nonfinite), None
        if n:
            self._skipped_steps += n
            rank_zero_warn(f"TrainedQuantization: non-finite codebook gradient; {n} codebook step(s) skipped")

    @torch.no_grad()
    def _post_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if not self._clustered:
            return
        entry = self._entry_for(optimizer)
        if entry is not None:  # all layers of the optimizer in one pass (validated by the pre-step)
            self._codebook_step(entry[0], entry[1], check=False).rewrite()

    def _entry_for(
        self, optimizer: torch.optim.Optimizer
    ) -> tuple[torch.optim.Optimizer, list[_Layer], list[int]] | None:
        for src, cb_opt, layers, src_groups in self._cb_opts.values():
            if src is optimizer:
                return cb_opt, layers, src_groups
        return None

    @torch.no_grad()
    def _rewrite_weights(self) -> None:
        for t in self._layers.values():
            t.weight.copy_(decode_weight(t.module, t.param))

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


# ---------------------------------------------------------------------------------------------------- helpers


def _state_tensors(optimizer: torch.optim.Optimizer, params: list[Tensor], device: torch.device) -> list[Tensor] | None:
    """``params`` and all their optimizer state, or None unless all of it is tensors of one float dtype on
    ``device`` (what a snapshot-and-restore on the device needs)."""
    tensors = list(params)
    for p in params:
        for v in (optimizer.state.get(p) or {}).values():
            if not isinstance(v, Tensor):
                return None
            tensors.append(v)
    if not tensors or any(t.device != device or t.dtype != tensors[0].dtype for t in tensors):
        return None
    return tensors


def _members(t: Target) -> Tensor:
    """The weights that are clustered: the kept ones of a pruned target, all of an unpruned one (float32, CPU)."""
    mask, w = get_mask(t.module, t.param), t.weight.detach()
    return (w[mask] if mask is not None else w.reshape(-1)).float().cpu()


def _find_pruning(trainer: pl.Trainer) -> Any:
    """The trainer's MagnitudePruning callback (any callback with a ``last_round_epoch`` method), else None."""
    for cb in trainer.callbacks:
        if callable(getattr(cb, "last_round_epoch", None)):
            return cb
    return None
