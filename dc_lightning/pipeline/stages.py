"""The Deep Compression pipeline driven by a recipe ([DC] Fig. 1):

    baseline (train or load) -> prune + retrain -> trained quantization -> export -> reload -> evaluate

Each stage is one function; each writes a Lightning checkpoint (``<run>/checkpoints/<stage>.ckpt``) so a later
run can start at any stage (``stage=quantize pruned_ckpt=...``). The summary (accuracies, compression ratio,
wall time per stage) goes to ``<run>/summary.json`` and the per-layer report beside the paper's table to
``<run>/report.md``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from dc_lightning.pipeline.config import build_datamodule, build_module, build_trainer, load_module_checkpoint
from dc_lightning.utils import atomic_write, instantiate

log = logging.getLogger(__name__)

STAGES = ("baseline", "prune", "quantize", "export", "evaluate")


def measure_accuracy(
    cfg: DictConfig, module: pl.LightningModule, dm: pl.LightningDataModule, stage: str
) -> dict[str, float]:
    """Test ``module`` on the recipe's test set with a one-off trainer: ``{"acc1": ..., "acc5": ...}``, plus
    ``"ppl"`` for a :class:`~dc_lightning.module.LanguageModule` (its ``main_metric``)."""
    trainer = build_trainer(cfg, f"{stage}-test", max_epochs=1, logger=False, callbacks=[])
    (metrics,) = trainer.test(module, datamodule=dm, verbose=False)
    main = f"test/{getattr(module, 'main_metric', 'acc1')}"
    return {k.replace("test/", ""): float(v) for k, v in metrics.items() if k.startswith("test/acc") or k == main}


#: stages that build an object from ``pipeline.<stage>.callback``
CALLBACK_STAGES = ("prune", "quantize", "export")


def build_stage_callback(cfg: DictConfig, stage: str) -> Any:
    """The object of ``pipeline.<stage>.callback`` (``_target_`` + arguments), built by the one instantiate helper.

    Raises:
        ValueError: the stage has no ``callback`` node with a ``_target_``, or the class rejects a value.
        TypeError: the class rejects an argument (e.g. a misspelt name); the message starts with the node's path.
    """
    node = cfg.pipeline[stage].get("callback")
    if not node or "_target_" not in node:
        raise ValueError(
            f"pipeline.{stage}.callback: expected a node with _target_ and the class's arguments (conf/train.yaml "
            f"shows them), got {node!r}"
        )
    try:
        return instantiate(node)
    except InstantiationException as e:  # Hydra wraps the constructor's own error: re-raise it, with the node's path
        cause = e.__cause__
        if isinstance(cause, (ValueError, TypeError)):
            error_type = TypeError if isinstance(cause, TypeError) else ValueError
            raise error_type(f"pipeline.{stage}.callback ({node._target_}): {cause}") from cause
        raise


def _fit(cfg: DictConfig, module: pl.LightningModule, dm: pl.LightningDataModule, stage: str, epochs: int,
         callbacks: list, ckpt_path: str | None) -> pl.Trainer:
    trainer = build_trainer(cfg, stage, max_epochs=epochs, callbacks=callbacks)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    path = Path(cfg.output_dir) / "checkpoints" / f"{stage}.ckpt"
    trainer.save_checkpoint(path)
    if trainer.logger:
        trainer.logger.finalize("success")
    return trainer


def _need(cfg: DictConfig, key: str, stage: str) -> str:
    if not cfg.get(key):
        raise ValueError(f"stage={stage}: the run starts at this stage, so {key}=<path> must name the previous "
                         "stage's checkpoint (its run folder's checkpoints/*.ckpt)")
    return str(cfg[key])


def stage_baseline(cfg: DictConfig, dm, resume: str | None) -> pl.LightningModule:
    if cfg.get("baseline_ckpt"):
        return load_module_checkpoint(cfg, cfg.baseline_ckpt)
    module = build_module(cfg)
    if cfg.model.get("pretrained"):  # a trained dense model (e.g. torchvision's ImageNet weights): evaluate only
        return module
    _fit(cfg, module, dm, "baseline", cfg.pipeline.baseline.epochs, [], resume)
    return module


def _with_lr(module: pl.LightningModule, cfg: DictConfig, scale: float) -> pl.LightningModule:
    module.hparams.lr = float(cfg.module.lr) * float(scale)  # configure_optimizers reads it
    module.hparams.warmup_epochs = 0  # retraining starts from a trained model: no warm-up
    return module


def stage_prune(cfg: DictConfig, dm, module, resume: str | None) -> pl.LightningModule:
    p = cfg.pipeline.prune
    module = module or load_module_checkpoint(cfg, _need(cfg, "baseline_ckpt", "prune"))
    _fit(cfg, _with_lr(module, cfg, p.lr_scale), dm, "prune", p.epochs, [build_stage_callback(cfg, "prune")], resume)
    return module


def stage_quantize(cfg: DictConfig, dm, module, resume: str | None) -> pl.LightningModule:
    q = cfg.pipeline.quantize
    module = module or load_module_checkpoint(cfg, _need(cfg, "pruned_ckpt", "quantize"))
    _fit(cfg, _with_lr(module, cfg, q.lr_scale), dm, "quantize", q.epochs, [build_stage_callback(cfg, "quantize")],
         resume)
    return module


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.stages`` from ``cfg.stage`` on; returns (and writes) the run summary.

    Raises:
        ValueError: an unknown stage, or a start stage whose input checkpoint is not given.
        ValueError, TypeError: a ``pipeline.<stage>.callback`` node the class rejects (checked before any stage runs).
    """
    stages = list(cfg.stages)
    for s in [*stages, cfg.stage]:
        if s not in STAGES:
            raise ValueError(f"stages: unknown stage {s!r}; valid stages, in order: {list(STAGES)}")
    if cfg.stage not in stages:
        raise ValueError(f"stage: {cfg.stage!r} is not among this run's stages {stages}")
    for stage in stages[stages.index(cfg.stage):]:  # a bad callback argument fails now, not after hours of training
        if stage in CALLBACK_STAGES:
            build_stage_callback(cfg, stage)
    out = Path(cfg.output_dir)
    writer = cfg.pipeline.export.callback  # the file the export stage writes and the evaluate stage reads
    path = Path(cfg.get("compressed_file") or Path(writer.get("dirpath") or out) / writer.filename)
    todo = stages[stages.index(cfg.stage):]
    if "evaluate" in todo and "export" not in todo and not path.is_file():
        raise ValueError(
            f"stage=evaluate: no compressed file at {str(path)!r}; the run starts at this stage, so "
            "compressed_file=<path to a .dcz> must name the file to evaluate (the export stage writes it)"
        )
    out.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    previous = out / "config.yaml"
    if previous.is_file() and previous.read_text() != resolved and not cfg.get("overwrite", False):
        raise FileExistsError(
            f"output_dir: {str(out)!r} holds another run (its config.yaml differs from this one); its checkpoints "
            "and compressed file would be overwritten. Pick another output_dir, or pass overwrite=true"
        )
    with atomic_write(previous, "w") as f:
        f.write(resolved)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    pl.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg)
    summary: dict[str, Any] = {"recipe": cfg.recipe_name, "output_dir": str(out), "accuracy": {}, "seconds": {}}
    module = None
    for i, stage in enumerate(todo):
        resume = cfg.get("resume_ckpt") if i == 0 else None
        t0 = time.perf_counter()
        if stage == "baseline":
            module = stage_baseline(cfg, dm, resume)
        elif stage == "prune":
            module = stage_prune(cfg, dm, module, resume)
        elif stage == "quantize":
            module = stage_quantize(cfg, dm, module, resume)
        elif stage == "export":
            module = module or load_module_checkpoint(cfg, _need(cfg, "quantized_ckpt", "export"))
            summary["report"] = export(cfg, module, path)
        elif stage == "evaluate":
            summary["accuracy"]["reloaded"] = evaluate(cfg, dm, path, summary)
        if stage in ("baseline", "prune", "quantize"):
            summary["accuracy"][stage] = measure_accuracy(cfg, module, dm, stage)
        summary["seconds"][stage] = round(time.perf_counter() - t0, 1)
        log.info("stage %s done in %.1f s", stage, summary["seconds"][stage])
    from dc_lightning.pipeline.summary import print_summary, write_summary

    write_summary(cfg, summary)
    print_summary(cfg, summary)
    return summary


def export(cfg: DictConfig, module: pl.LightningModule, path: Path) -> dict[str, Any]:
    """Write the compressed file of ``module`` with ``pipeline.export.callback``; returns the report as a dict.

    Raises:
        TypeError: the node builds an object without ``write(module, path)`` (use CompressedCheckpoint).
    """
    writer = build_stage_callback(cfg, "export")
    if not callable(getattr(writer, "write", None)):
        raise TypeError(
            f"pipeline.export.callback: {cfg.pipeline.export.callback._target_} built a {type(writer).__name__}, which "
            "has no write(module, path); use dc_lightning.CompressedCheckpoint or a subclass"
        )
    return writer.write(module, path).to_dict()


def evaluate(cfg: DictConfig, dm, path: Path, summary: dict[str, Any]) -> dict[str, float]:
    """Reload the compressed file and test it: Triton kernels on a GPU, the dense decode on the CPU."""
    from dc_lightning.io import load_compressed

    module = load_compressed(path)
    mode = cfg.pipeline.evaluate.kernels
    use_kernels = mode is True or (mode == "auto" and torch.cuda.is_available())
    summary["evaluate_path"] = "triton" if use_kernels else "dense-decode"
    if use_kernels:
        from dc_lightning.inference.conversion import to_compressed_inference

        module = to_compressed_inference(module, device="cuda")
    return measure_accuracy(cfg, module, dm, "evaluate")
