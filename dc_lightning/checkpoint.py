"""Load a Lightning checkpoint of a compressed model into a fresh module (masks, codebooks and dropout rates included).

A fresh ``MyModule(...)`` has no ``weight_mask`` / ``weight_codebook`` / ``weight_assign`` buffers, so Lightning's
``MyModule.load_from_checkpoint(path)`` stops at "Unexpected key(s) ...". The one rule of this module, used by every
loader of the package: before ``load_state_dict``, the module gets the load hook that registers exactly the buffers
the checkpoint holds (:func:`dc_lightning.buffers.install_load_hook`) and its own ``on_load_checkpoint`` runs (the
state a ``state_dict`` lacks: ``ClassifierModule`` restores its dropout rates there); the load stays strict.

* :func:`load_from_checkpoint`: Lightning's ``cls.load_from_checkpoint`` (the module built from the checkpoint's
  hyper-parameters) with that rule; the public entry point.
* :func:`read_checkpoint` + :func:`restore_checkpoint`: the same rule for a module built by the caller (the pipeline
  builds it from the recipe, ``dc-lightning export`` from ``--model-class``).

Inside ``Trainer.fit(ckpt_path=...)`` the callbacks install the same hook themselves.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from torch import nn

from dc_lightning.buffers import install_load_hook

__all__ = ["load_from_checkpoint", "read_checkpoint", "restore_checkpoint"]

M = TypeVar("M", bound=pl.LightningModule)


def _existing(path: str | os.PathLike, field: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{field}: no file at {str(path)!r}")
    return path


def _before_state_dict(module: nn.Module, checkpoint: dict[str, Any], on_load: Callable | None) -> None:
    """What every loader does between building the module and ``load_state_dict``, in Lightning's order: the buffers'
    load hook, then the module's ``on_load_checkpoint`` (``on_load``, unbound; ``None`` for a module without one)."""
    install_load_hook(module)
    if on_load is not None:
        on_load(module, checkpoint)


def read_checkpoint(path: str | os.PathLike, weights_only: bool = True) -> dict[str, Any]:
    """A Lightning checkpoint's dict, loaded on the CPU.

    Args:
        path: the ``.ckpt`` file.
        weights_only: ``torch.load``'s safe mode (tensors and plain containers only). ``False`` unpickles, which can
            run code from the file: only for your own files (``dc-lightning export`` reads ``hyper_parameters``
            objects that way).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is a ``.dcz`` file, ``torch.load`` cannot read it, or it holds no ``state_dict``.
    """
    path = _existing(path, "checkpoint")
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[8:9] == b"{" and b"dc-lightning-compressed" in head:
        raise ValueError(f"{path} is a compressed .dcz file, not a Lightning .ckpt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:
        raise ValueError(
            f"{path} is not a Lightning checkpoint (torch.load failed: {type(e).__name__}: {e}); give the .ckpt "
            "file written by Trainer.fit / ModelCheckpoint"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return ckpt


def restore_checkpoint(module: nn.Module, checkpoint: dict[str, Any], strict: bool = True) -> nn.Module:
    """Load a checkpoint (:func:`read_checkpoint`) into ``module`` as :func:`load_from_checkpoint` does: the module
    gets the compression buffers the checkpoint holds, runs its ``on_load_checkpoint`` (dropout rates) and loads the
    state dict. Returns ``module``, which keeps the ``load_state_dict`` hook.

    Raises:
        ValueError: a buffer key names a layer the module lacks.
        RuntimeError: the checkpoint and the module disagree (``strict`` ``load_state_dict``).
    """
    _before_state_dict(module, checkpoint, getattr(type(module), "on_load_checkpoint", None))
    module.load_state_dict(checkpoint["state_dict"], strict=strict)
    return module


def load_from_checkpoint(
    cls: type[M],
    checkpoint_path: str | os.PathLike,
    map_location: Any = None,
    hparams_file: str | os.PathLike | None = None,
    weights_only: bool | None = None,
    **kwargs: Any,
) -> M:
    """``cls.load_from_checkpoint(checkpoint_path, ...)`` for a module trained with the compression callbacks.

    Lightning builds the module from the checkpoint's hyper-parameters (``kwargs`` override them) and runs its
    ``on_load_checkpoint``; the state dict is then loaded (strictly unless ``strict=False`` is passed) with exactly
    the mask/codebook buffers the checkpoint holds. The module keeps the ``load_state_dict`` hook.

    Args:
        cls: the LightningModule class (``MyModule``).
        checkpoint_path: the ``.ckpt`` file.
        map_location, hparams_file, weights_only, **kwargs: as ``LightningModule.load_from_checkpoint``.

    Returns:
        The module, in eval mode as Lightning returns it.

    Raises:
        TypeError: ``cls`` is not a LightningModule subclass.
        FileNotFoundError: no file at ``checkpoint_path``.
        RuntimeError: the checkpoint and the module disagree (strict ``load_state_dict``).

    Example::

        from dc_lightning import load_from_checkpoint

        model = load_from_checkpoint(MyModule, "epoch=9-step=1000.ckpt")
    """
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise TypeError(f"cls must be a LightningModule subclass, got {cls!r}")
    path = _existing(checkpoint_path, "checkpoint_path")
    original = cls.on_load_checkpoint

    def on_load_checkpoint(self: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning calls this between building the module and load_state_dict
        _before_state_dict(self, checkpoint, original)

    # a one-off subclass carries the hook, so the user's class is never patched; the instance gets cls back
    loader = type(cls.__name__, (cls,), {"on_load_checkpoint": on_load_checkpoint, "__module__": cls.__module__})
    model = loader.load_from_checkpoint(
        path, map_location=map_location, hparams_file=hparams_file, weights_only=weights_only, **kwargs
    )
    model.__class__ = cls
    return model
