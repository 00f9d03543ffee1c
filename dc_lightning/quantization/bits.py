"""Default and per-layer bit widths [DC §5]: the paper's 8 bits for conv layers and 5 bits for fc layers (the family
of each layer type is in :mod:`dc_lightning.kinds`); and the per-layer ``zero_code`` choice that goes with a width
(:func:`~dc_lightning.quantization.codebooks.quantize_layer`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dc_lightning.kinds import paper_bits
from dc_lightning.targets import Target, pattern_aliases
from dc_lightning.utils import resolve_per_layer

_UNSET = object()  # resolve_per_layer default for layers no {pattern: bits} entry names


def check_bits(bits: Any, where: str = "bits") -> int:
    """Validate a bit width: an int in 1..8 (assignments are stored as uint8).

    Raises:
        ValueError: ``bits`` is not an int in 1..8; the message names ``where``.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"{where}: bits must be an int in 1..8 (codebook indices are stored as uint8), got {bits!r}")
    return bits


def bits_for_layers(layers: dict[str, Target], bits: int | dict[str, int] | None, field: str = "bits") -> dict:
    """Resolve ``bits`` (None = paper default, :func:`dc_lightning.kinds.paper_bits`; an int; or ``{fnmatch pattern:
    bits}``) to ``{target: bits}``.

    With a dict, the last matching pattern wins (a pattern matches a target's name, ``<module>.<param>`` name or
    module name) and targets no pattern matches keep the paper default.

    Raises:
        ValueError: a pattern matches no target, or a bit width is outside 1..8 (the message names the target).
    """
    default = {n: paper_bits(t.module) for n, t in layers.items()}
    if bits is None:
        out = default
    elif isinstance(bits, dict):
        resolved = resolve_per_layer(bits, list(layers), field, default=_UNSET, aliases=pattern_aliases(layers))
        out = {n: default[n] if b is _UNSET else b for n, b in resolved.items()}
    else:
        out = {n: bits for n in layers}
    for n, b in out.items():
        check_bits(b, f"{field} for layer {n!r}")
    return out


ZeroCode = bool | None | dict[str, bool | None]


def check_zero_code(zero_code: Any, where: str, error: type[Exception] = TypeError) -> ZeroCode:
    """Validate ``zero_code``: ``None`` (reserve the zero at 4 bits only), a bool, or a non-empty ``{fnmatch pattern:
    None | bool}`` (a Hydra ``DictConfig`` too; returned as a dict).

    Raises:
        ``error`` (TypeError by default): any other value; the message names ``where`` and the pattern.
    """
    if zero_code is None or isinstance(zero_code, bool):
        return zero_code
    if isinstance(zero_code, Mapping) and zero_code:
        out = {str(p): v for p, v in zero_code.items()}
        for p, v in out.items():
            if v is not None and not isinstance(v, bool):
                raise error(f"{where}: zero_code[{p!r}] must be True, False or None (None: True at 4 bits), got {v!r}")
        return out
    raise error(
        f"{where}: zero_code must be True, False or None (None: True at 4 bits), or a non-empty {{pattern: one of "
        f"those}}, got {zero_code!r}"
    )


def zero_code_for_layers(layers: dict[str, Target], zero_code: ZeroCode, field: str = "zero_code") -> dict:
    """Resolve a checked ``zero_code`` (:func:`check_zero_code`) to ``{target: None | bool}``; with a dict the last
    matching pattern wins (as for ``bits``) and targets no pattern matches get ``None``.

    Raises:
        ValueError: a pattern matches no target.
    """
    if not isinstance(zero_code, dict):
        return {n: zero_code for n in layers}
    resolved = resolve_per_layer(zero_code, list(layers), field, default=_UNSET, aliases=pattern_aliases(layers))
    return {n: None if v is _UNSET else v for n, v in resolved.items()}
