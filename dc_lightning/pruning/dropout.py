"""Dropout adjustment for pruned layers [NIPS §3.2, eq. 2] and the dropout rates a checkpoint carries."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

from torch import nn

from dc_lightning.buffers import get_mask
from dc_lightning.utils import is_number

# ------------------------------------------------------------------------------------------ dropout adjustment


def adjusted_dropout(p_orig: float, c_io: int, c_ir: int) -> float:
    """Dropout rate for a pruned layer, [NIPS §3.2] Eq. 2: ``D_r = D_o * sqrt(C_ir / C_io)``.

    A sparser layer has less capacity, so it needs less dropout to avoid overfitting.

    Args:
        p_orig: the original dropout rate ``D_o`` in [0, 1].
        c_io: the layer's connection count before pruning (> 0).
        c_ir: its connection count after pruning, in [0, c_io].

    Raises:
        ValueError: an argument is out of range.

    Example::

        adjusted_dropout(0.5, 4096 * 4096, int(0.09 * 4096 * 4096))  # 0.15
    """
    if not is_number(p_orig) or not 0.0 <= p_orig <= 1.0:
        raise ValueError(f"adjusted_dropout: p_orig={p_orig!r}; expected a number in [0, 1]")
    if not isinstance(c_io, numbers.Integral) or c_io <= 0:
        raise ValueError(f"adjusted_dropout: c_io={c_io!r}; expected an integer > 0")
    if not isinstance(c_ir, numbers.Integral) or not 0 <= c_ir <= c_io:
        raise ValueError(f"adjusted_dropout: c_ir={c_ir!r}; expected an integer in [0, c_io={c_io}]")
    return float(p_orig) * math.sqrt(c_ir / c_io)


def adjust_dropouts_to_masks(
    model: nn.Module, original: dict[str, float] | None = None, dropout_map: dict[str, str] | None = None
) -> dict[str, float]:
    """Set every ``nn.Dropout`` that feeds a masked ``nn.Linear`` to ``D_o * sqrt(density)`` ([NIPS §3.2]).

    ``D_o`` comes from ``original`` (``{dropout_name: rate}``; a dropout missing there records its current rate in
    it first, so repeated calls keep using the unpruned rate, as :class:`MagnitudePruning` does after every round).
    Without ``original`` it is the current rate: call that once, on a model rebuilt from its config and loaded from
    a pruned checkpoint (dropout rates are not part of a ``state_dict``, so a later stage restarted from the
    checkpoint would otherwise retrain with the unpruned rates; a model that saves :func:`dropout_rates` with its
    checkpoint, as ``ClassifierModule`` does, needs no such call). ``dropout_map`` (``{linear_name: dropout_name}``)
    defaults to :func:`find_feeding_dropouts` over every masked ``nn.Linear``. Returns ``{dropout_name: new_rate}``.
    """
    modules = dict(model.named_modules())
    if dropout_map is None:
        masked = [n for n, m in modules.items() if isinstance(m, nn.Linear) and get_mask(m) is not None]
        dropout_map = find_feeding_dropouts(model, masked)
    original = {} if original is None else original
    rates = {}
    for linear_name, drop_name in dropout_map.items():
        mask, drop = get_mask(modules[linear_name]), modules[drop_name]
        drop.p = adjusted_dropout(original.setdefault(drop_name, float(drop.p)), mask.numel(), int(mask.sum()))
        rates[drop_name] = drop.p
    return rates


def find_feeding_dropouts(model: nn.Module, layer_names: Iterable[str]) -> dict[str, str]:
    """Map each named ``nn.Linear`` to the ``nn.Dropout`` that feeds it: ``{linear_name: dropout_name}``.

    The rule: inside an ``nn.Sequential``, an ``nn.Dropout`` that is the child *immediately before* the Linear
    (as in torchvision's AlexNet ``Dropout, Linear`` and VGG ``ReLU, Dropout, Linear``). Linears outside an
    ``nn.Sequential``, or with anything else (e.g. a ReLU) right before them, have no feeding dropout: the data
    flow of an arbitrary ``forward`` cannot be known without tracing. Dropout subclasses with other semantics
    (``AlphaDropout``, ``Dropout2d``) are not matched.
    """
    wanted = set(layer_names)
    found: dict[str, str] = {}
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (prev_name, prev), (name, child) in zip(children, children[1:], strict=False):
            qual = f"{seq_name}.{name}" if seq_name else name
            if qual in wanted and isinstance(child, nn.Linear) and type(prev) is nn.Dropout:
                found[qual] = f"{seq_name}.{prev_name}" if seq_name else prev_name
    return found


#: the module types whose rate ``p`` :func:`dropout_rates` reads and :func:`set_dropout_rates` writes
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout
)


def dropout_rates(model: nn.Module) -> dict[str, float]:
    """``{name: p}`` of every dropout module of ``model``.

    Dropout rates are module state that ``state_dict()`` does not hold, yet pruning changes them ([NIPS §3.2], see
    :func:`adjust_dropouts_to_masks`): a model saves them beside its weights (``ClassifierModule`` does, in its
    Lightning checkpoint) and restores them with :func:`set_dropout_rates`, so that a stage restarted from a pruned
    checkpoint retrains with the rates the pruning left.
    """
    return {name: float(m.p) for name, m in model.named_modules() if isinstance(m, DROPOUT_TYPES)}


def set_dropout_rates(model: nn.Module, rates: Mapping[str, float]) -> None:
    """Set the rates ``{name: p}`` (as :func:`dropout_rates` returns them) on the dropout modules of ``model``.

    Raises:
        ValueError: a name that is not a dropout module of ``model`` (the message lists them), or a rate outside
            [0, 1]; nothing is set then.
    """
    modules = dict(model.named_modules())
    for name, p in rates.items():
        module = modules.get(name)
        if not isinstance(module, DROPOUT_TYPES):
            raise ValueError(
                f"dropout rates: {name!r} is not a dropout module of this model; its dropout modules: "
                f"{sorted(dropout_rates(model))}"
            )
        if not is_number(p) or not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout rates: {name!r} has rate {p!r}; expected a number in [0, 1]")
    for name, p in rates.items():  # all checked first: a rejected call changes nothing
        modules[name].p = float(p)
