"""Iterative pruning schedules [NIPS §3.3]: the per-round densities (geometric to a target) or quality factors."""

from __future__ import annotations

from dc_lightning.pruning.masks import check_densities, check_quality, check_rounds

# ------------------------------------------------------------------------------------------------- schedules


def geometric_schedule(target: float, rounds: int) -> list[float]:
    """Per-round densities falling geometrically from 1.0 to ``target``: ``target ** (i / rounds)``, i = 1..rounds.

    Each round removes the same *fraction* of the survivors; the last entry is ``target`` exactly.

    Raises:
        ValueError: ``target`` not in (0, 1] or ``rounds`` < 1.

    Example::

        geometric_schedule(0.09, 3)  # [0.448..., 0.200..., 0.09]
    """
    target = check_densities(target, "target")
    if isinstance(target, dict):
        raise ValueError(f"target: got a mapping {target!r}; expected a number in (0, 1]")
    rounds = check_rounds(rounds)
    out = [target ** (i / rounds) for i in range(1, rounds + 1)]
    out[-1] = target
    return out


def quality_schedule(quality: float, rounds: int) -> list[float]:
    """Per-round quality parameters growing linearly to ``quality``: ``quality * i / rounds``, i = 1..rounds.

    The threshold grows at each iteration (as in Han's thesis, per [DIST-Z]); the last entry is ``quality``
    exactly.

    Raises:
        ValueError: ``quality`` < 0 or ``rounds`` < 1.
    """
    quality = check_quality(quality, "quality")
    if isinstance(quality, dict):
        raise ValueError(f"quality: got a mapping {quality!r}; expected a number >= 0")
    rounds = check_rounds(rounds)
    out = [quality * i / rounds for i in range(1, rounds + 1)]
    out[-1] = quality
    return out
