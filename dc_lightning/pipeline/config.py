"""Hydra glue: compose a recipe without the CLI and build its DataModule, LightningModule and Trainer.

The configs live in the repository's ``conf/`` (groups) and ``recipes/<name>/recipe.yaml``; this module finds
them next to the package, so it serves source checkouts and editable installs (the documented install).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
RECIPES = tuple(sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml")))


def _ensure_recipes_importable() -> None:
    """``conf/train.yaml`` finds the recipes through ``pkg://recipes`` (the repository's ``recipes/`` package).
    ``python train.py`` puts the repository root first on ``sys.path``; the ``dc-lightning`` console script and other
    callers run from elsewhere do not, and an unrelated installed package named ``recipes`` would then be found
    instead of ours. Put the repository root first unless ``import recipes`` already finds this checkout's package.

    Raises:
        ImportError: a different package named ``recipes`` is already imported in this process (Hydra would read
            its folder instead of the recipes).
    """
    import importlib
    import importlib.util
    import sys

    ours = REPO_ROOT / "recipes" / "__init__.py"
    if not ours.is_file():
        return

    def is_ours(path: str | None) -> bool:
        return path is not None and Path(path).resolve() == ours.resolve()

    loaded = sys.modules.get("recipes")
    if loaded is not None:
        if not is_ours(getattr(loaded, "__file__", None)):
            raise ImportError(
                f"recipes: the module imported as 'recipes' is {getattr(loaded, '__file__', None)!r}, not "
                f"dc_lightning's recipe folder {str(ours.parent)!r}; Hydra would read the wrong configs. Import "
                "dc_lightning.pipeline.config before that package, or run from a process that does not import it"
            )
        return
    spec = importlib.util.find_spec("recipes")
    if spec is None or not is_ours(spec.origin):
        root = str(REPO_ROOT)
        if root in sys.path:
            sys.path.remove(root)
        sys.path.insert(0, root)
        importlib.invalidate_caches()


def compose(recipe: str = "lenet300", overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``python train.py recipe=<recipe> <overrides>`` would run, without touching the CLI.

    ``hydra:`` interpolations (the run folder) are resolved to ``outputs/<recipe>/compose`` unless an
    ``output_dir=...`` override is given.

    Raises:
        ValueError: unknown recipe (the message lists the valid ones).
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe: unknown recipe {recipe!r}; valid recipes: {list(RECIPES)}")
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    _ensure_recipes_importable()
    overrides = list(overrides)
    if not any(o.startswith("output_dir=") for o in overrides):
        overrides.append(f"output_dir=outputs/{recipe}/compose")
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = _compose(config_name="train", overrides=[f"recipe={recipe}", *overrides])
    return cfg


def build_datamodule(cfg: DictConfig):
    """Instantiate ``cfg.data`` (a LightningDataModule)."""
    from dc_lightning.utils import instantiate

    return instantiate(cfg.data)


def build_module(cfg: DictConfig, **overrides: Any):
    """A fresh LightningModule from ``cfg.module`` and ``cfg.model``: the class ``cfg.module._target_`` names
    (default :class:`~dc_lightning.module.ClassifierModule`; ``dc_lightning.module.LanguageModule`` for the LM
    recipes), given ``model=cfg.model`` and the other keys of ``cfg.module``."""
    from hydra.utils import get_class

    kwargs = OmegaConf.to_container(cfg.module, resolve=True)
    kwargs.update(overrides)
    # called directly, not through instantiate: the class's own ValueError reaches the user unwrapped
    cls = get_class(kwargs.pop("_target_", "dc_lightning.module.ClassifierModule"))
    return cls(model=OmegaConf.to_container(cfg.model, resolve=True), **kwargs)


def build_logger(cfg: DictConfig, stage: str):
    """The configured logger (wandb offline unless ``WANDB_MODE`` says otherwise; ``logger=none`` -> False)."""
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return False
    from dc_lightning.utils import instantiate

    target = cfg.logger._target_
    if target.endswith("WandbLogger"):
        os.environ.setdefault("WANDB_MODE", "offline")  # never ask for a login; WANDB_MODE=online syncs
        os.environ.setdefault("WANDB_SILENT", "true")
        if os.environ["WANDB_MODE"] == "disabled":
            return False
        return instantiate(cfg.logger, name=f"{cfg.recipe_name}-{stage}", group=str(cfg.recipe_name))
    return instantiate(cfg.logger, version=stage) if target.endswith("CSVLogger") else instantiate(cfg.logger)


def build_trainer(cfg: DictConfig, stage: str, max_epochs: int, callbacks: Sequence[Any] = (), **overrides: Any):
    """A Lightning Trainer for one pipeline stage: ``cfg.trainer`` + the stage's epochs and callbacks."""
    import lightning.pytorch as pl

    from dc_lightning.utils import instantiate

    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.update(overrides)
    extra = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    logger = kwargs.pop("logger") if "logger" in kwargs else build_logger(cfg, stage)
    if not logger:  # LearningRateMonitor needs a logger
        extra = [c for c in extra if type(c).__name__ != "LearningRateMonitor"]
    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=[*callbacks, *extra],
        logger=logger,
        default_root_dir=str(Path(cfg.output_dir) / stage),
        enable_checkpointing=False,
        **kwargs,
    )


def load_module_checkpoint(cfg: DictConfig, path: str | os.PathLike, **overrides: Any):
    """Rebuild the recipe's module and load a Lightning checkpoint into it (mask/codebook buffers and dropout rates
    included: :func:`dc_lightning.checkpoint.restore_checkpoint`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a Lightning checkpoint.
    """
    from dc_lightning.checkpoint import read_checkpoint, restore_checkpoint

    # a Lightning checkpoint is the user's own file; weights_only keeps torch.load from running pickled code
    ckpt = read_checkpoint(path, weights_only=True)
    return restore_checkpoint(build_module(cfg, **overrides), ckpt)
