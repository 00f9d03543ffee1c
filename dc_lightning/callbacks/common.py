"""What the compression callbacks share: rank-0 broadcast, the logger step, metrics, histograms, per-layer tables and
the checks of their common constructor arguments.

The callbacks decide *when*; these helpers keep the distributed and reporting details in one place so that every
callback broadcasts, logs and prints the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from dc_lightning.utils import console


def broadcast_from_rank_zero(tensor: Tensor) -> Tensor:
    """Rank 0's ``tensor`` on every rank (a no-op outside ``torch.distributed``).

    Other dtypes are broadcast in place (the same tensor is returned); a bool tensor goes through a uint8 copy, since
    gloo and NCCL broadcast uint8 but not bool, and the returned tensor is a new one.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    if tensor.dtype != torch.bool:
        dist.broadcast(tensor, src=0)
        return tensor
    buf = tensor.to(torch.uint8)
    dist.broadcast(buf, src=0)
    return buf.bool()


def logger_step(trainer: pl.Trainer) -> int:
    """The step Lightning's own ``self.log`` uses for the loggers: optimizer-stepping batches of this fit.

    ``trainer.global_step`` counts the steps of every optimizer; the fit loop's batch counter is what the loggers' x
    axis is, so compression metrics line up with the training curves.
    """
    epoch_loop = getattr(trainer.fit_loop, "epoch_loop", None)
    return getattr(epoch_loop, "_batches_that_stepped", trainer.global_step)


def log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float], step: int | None = None) -> None:
    """``metrics`` to every logger of ``trainer`` from global rank 0, at ``step`` (default :func:`logger_step`)."""
    if not trainer.is_global_zero:
        return
    step = logger_step(trainer) if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


def log_histograms(trainer: pl.Trainer, values: Mapping[str, Tensor], step: int) -> None:
    """Each 1-D tensor of ``values`` as a 512-bin histogram (under its key) to every ``WandbLogger`` of ``trainer``,
    from rank 0; other loggers have no histogram type. Empty tensors are left out."""
    from lightning.pytorch.loggers import WandbLogger

    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if not loggers or rank_zero_only.rank != 0:
        return
    import wandb

    payload = {}
    for key, v in values.items():
        if v.numel() == 0:
            continue
        lo, hi = float(v.min()), float(v.max())
        if hi <= lo:
            hi = lo + 1e-12
        counts = torch.histc(v, bins=512, min=lo, max=hi)
        edges = torch.linspace(lo, hi, 513)
        payload[key] = wandb.Histogram(np_histogram=(counts.numpy(), edges.numpy()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.experiment.log({**payload, "trainer/global_step": step})


@rank_zero_only
def print_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    total: Sequence[str] | None = None,
    stderr: bool = False,
) -> None:
    """A rich table on rank 0: the first column left-aligned (layer names), the others right-aligned (numbers).

    Args:
        title: the table's title.
        columns: column headers.
        rows: one row of formatted cells per layer, ``len(columns)`` each.
        total: an optional last row, printed bold.
        stderr: print to stderr instead of stdout.
    """
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    if total is not None:
        table.add_row(*total, style="bold")
    console(stderr=stderr).print(table)


# ------------------------------------------------------------------------------------ constructor argument checks


def check_bool(value: Any, field: str) -> bool:
    """``value`` if it is a bool.

    Raises:
        ValueError: otherwise (the message names ``field``, e.g. ``"MagnitudePruning: verbose"``).
    """
    if not isinstance(value, bool):
        raise ValueError(f"{field}={value!r}; expected True or False")
    return value


def check_patterns(value: Any, field: str) -> list[str] | None:
    """``None`` or a list of fnmatch patterns (a single string is refused: it would be read letter by letter).

    Raises:
        ValueError: not None and not an iterable of non-empty strings.
    """
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"{field}={value!r}; expected None or a list of fnmatch patterns such as ['model.fc*']")
    out = list(value)
    if not all(isinstance(p, str) and p for p in out):
        raise ValueError(f"{field}={out!r}; every pattern must be a non-empty string")
    return out


def check_types(value: Any, field: str) -> tuple[type[nn.Module], ...]:
    """A non-empty tuple of ``nn.Module`` subclasses (a list from a config node works as well).

    Raises:
        ValueError: anything else.
    """
    out = tuple(value) if isinstance(value, Iterable) and not isinstance(value, str) else (value,)
    if not out or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in out):
        raise ValueError(f"{field}={value!r}; expected a non-empty tuple of nn.Module classes such as (nn.Linear,)")
    return out
