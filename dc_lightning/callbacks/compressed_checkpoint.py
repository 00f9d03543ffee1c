"""``CompressedCheckpoint``: write the Deep Compression file (``.dcz``) at the end of training.

The callback only decides *when* and *where*; :func:`dc_lightning.io.save_compressed` decides *what*.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from dc_lightning.callbacks.common import check_bool, log_metrics
from dc_lightning.dcz import AUTO
from dc_lightning.dcz.relative_index import MAX_INDEX_BITS

if TYPE_CHECKING:
    from dc_lightning.report import Report

log = logging.getLogger(__name__)

_DTYPES = ("float32", "float16")


def _check_index_bits(index_bits: Any) -> None:
    """``None``, an int in 1..MAX_INDEX_BITS, ``"auto"``, or a non-empty ``{pattern: int or "auto"}``.

    Raises:
        ValueError: anything else (the message names the bad value, and the pattern for a dict).
    """
    valid = f"valid: None, an int in 1..{MAX_INDEX_BITS}, {AUTO!r}, or {{pattern: int or {AUTO!r}}}"

    def ok(v: Any) -> bool:
        return v == AUTO or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_INDEX_BITS)

    if index_bits is None or (not isinstance(index_bits, dict) and ok(index_bits)):
        return
    if not isinstance(index_bits, dict) or not index_bits:
        raise ValueError(f"CompressedCheckpoint: index_bits={index_bits!r}; {valid}")
    for pattern, v in index_bits.items():
        if not isinstance(pattern, str) or not ok(v):
            raise ValueError(f"CompressedCheckpoint: index_bits[{pattern!r}]={v!r}; {valid}")


class CompressedCheckpoint(Callback):
    r"""Write the model as one compressed ``.dcz`` file (Huffman-coded sparse streams + codebooks, no pickle).

    At ``on_fit_end`` global rank 0 writes ``<dirpath>/<filename>`` (default ``<trainer.log_dir or
    trainer.default_root_dir>/compressed.dcz``), logs ``compression/ratio`` (dense fp32 bytes / compressed bytes,
    Huffman stage, [DC] Tables 2-5) and ``compression/file_bytes`` to the trainer's loggers, then all ranks meet at
    ``trainer.strategy.barrier()``. With ``every_checkpoint=True`` a file ``compressed-epoch=E-step=S.dcz`` is also
    written whenever Lightning saves a checkpoint (the model is only read, never modified).

    Args:
        dirpath: folder for the files; default the trainer's log dir (or ``default_root_dir``).
        filename: name of the end-of-fit file (extension ``.dcz`` by convention).
        every_checkpoint: also write a compressed file with every Lightning checkpoint.
        index_bits: relative-index bits (``None`` = 8 conv / 5 fc [DC §2], an int, ``"auto"`` = the smallest
            coded stream per layer, or ``{pattern: int or "auto"}``).
        codebook_dtype: ``"float32"`` (bit-exact) or ``"float16"``.
        dense_dtype: storage of uncompressed float tensors: ``"float32"`` or ``"float16"``.
        strict: passed to ``save_compressed`` (raise if a layer breaks the mask/codebook invariants).

    Raises:
        ValueError: an invalid argument.

    Example::

        trainer = Trainer(callbacks=[MagnitudePruning(...), TrainedQuantization(...), CompressedCheckpoint()])
        trainer.fit(model)
        print(trainer.callbacks[-1].report.to_markdown())
    """

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        filename: str = "compressed.dcz",
        every_checkpoint: bool = False,
        index_bits: int | str | dict[str, int | str] | None = None,
        codebook_dtype: str = "float32",
        dense_dtype: str = "float32",
        strict: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(filename, str) or not filename or os.sep in filename:
            raise ValueError(f"CompressedCheckpoint: filename={filename!r} must be a plain file name like 'model.dcz'")
        if not isinstance(codebook_dtype, str) or codebook_dtype not in _DTYPES:
            raise ValueError(f"CompressedCheckpoint: codebook_dtype={codebook_dtype!r}; valid: {list(_DTYPES)}")
        if not isinstance(dense_dtype, str) or dense_dtype not in _DTYPES:
            raise ValueError(f"CompressedCheckpoint: dense_dtype={dense_dtype!r}; valid: {list(_DTYPES)}")
        check_bool(every_checkpoint, "CompressedCheckpoint: every_checkpoint")
        check_bool(strict, "CompressedCheckpoint: strict")
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise ValueError(f"CompressedCheckpoint: dirpath={dirpath!r}; expected None or a folder path")
        _check_index_bits(index_bits)
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.filename = filename
        self.every_checkpoint = every_checkpoint
        self.save_kwargs: dict[str, Any] = {
            "index_bits": index_bits,
            "codebook_dtype": codebook_dtype,
            "dense_dtype": dense_dtype,
            "strict": strict,
        }
        self.report = None
        self.last_path: Path | None = None

    def _dir(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return self.dirpath
        return Path(trainer.log_dir or trainer.default_root_dir)

    def write(self, pl_module: nn.Module, path: str | os.PathLike) -> Report:
        """Write ``pl_module`` to ``path`` now with this callback's settings; returns the compression report.

        The hooks call it on rank 0; the pipeline's export stage calls it directly (no trainer needed).
        """
        from dc_lightning.io import save_compressed

        path = Path(path)
        report = save_compressed(pl_module, path, overwrite=True, **self.save_kwargs)
        self.report, self.last_path = report, path
        rank_zero_info(f"CompressedCheckpoint: wrote {path}: {report.summary()}")
        return report

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            report = self.write(pl_module, self._dir(trainer) / self.filename)
            metrics = {
                "compression/ratio": report.total.ratio_pqh,
                "compression/ratio_pq": report.total.ratio_pq,
                "compression/file_bytes": float(report.file_bytes),
            }
            log_metrics(trainer, metrics, step=trainer.global_step)
        trainer.strategy.barrier("CompressedCheckpoint.on_fit_end")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # called on every rank; only rank 0 writes (atomically), no barrier: ranks may not all reach this hook
        if self.every_checkpoint and trainer.is_global_zero:
            name = f"compressed-epoch={trainer.current_epoch}-step={trainer.global_step}.dcz"
            self.write(pl_module, self._dir(trainer) / name)

    def state_dict(self) -> dict[str, Any]:
        return {"last_path": None if self.last_path is None else str(self.last_path)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        p = state_dict.get("last_path")
        self.last_path = None if p is None else Path(p)
