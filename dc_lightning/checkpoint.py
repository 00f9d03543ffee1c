"""Load a Lightning checkpoint of a compressed model into a fresh LightningModule (masks and codebooks included).

A fresh ``MyModule(...)`` has no ``weight_mask`` / ``weight_codebook`` / ``weight_assign`` buffers, so Lightning's
``MyModule.load_from_checkpoint(path)`` stops at "Unexpected key(s) ...". :func:`load_from_checkpoint` is the same
call with the buffers the checkpoint holds registered first (:func:`dc_lightning.buffers.install_load_hook`), and the
load kept strict. Inside ``Trainer.fit(ckpt_path=...)`` the callbacks install the same hook themselves.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl

from dc_lightning.buffers import install_load_hook

__all__ = ["load_from_checkpoint"]

M = TypeVar("M", bound=pl.LightningModule)


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
    path = Path(checkpoint_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint_path: no file at {str(path)!r}")
    original = cls.on_load_checkpoint

    def on_load_checkpoint(self: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning calls this between building the module and load_state_dict: the hook registers the buffers
        install_load_hook(self)
        original(self, checkpoint)

    # a one-off subclass carries the hook, so the user's class is never patched; the instance gets cls back
    loader = type(cls.__name__, (cls,), {"on_load_checkpoint": on_load_checkpoint, "__module__": cls.__module__})
    model = loader.load_from_checkpoint(
        path, map_location=map_location, hparams_file=hparams_file, weights_only=weights_only, **kwargs
    )
    model.__class__ = cls
    return model
