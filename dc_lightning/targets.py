"""What the compression callbacks compress: parameter-level targets, their names and how patterns select them.

A **target** is one weight matrix of a module: ``(module, parameter name)``. Which parameters of a module are
weight matrices, and which module types are targets by default, is the weight-kind registry's business
(:mod:`dc_lightning.kinds`: ``in_proj_weight`` or ``q/k/v_proj_weight`` of an ``nn.MultiheadAttention``, every
2-D ``weight_*`` of an ``nn.LSTM``/``nn.GRU``/``nn.RNN``, ``weight`` for ``nn.Linear``, ``nn.Conv*``,
``nn.Embedding`` and for a module of a ``types=`` type the registry does not know).

Biases, norms and other 1-D parameters are never targets.

**Names.** A target's name is its module's name for the parameter ``weight`` (``model.classifier.6``, as before
parameter-level targets existed, so recipes, metric names ``compression/<name>/density`` and files stay the same),
and ``<module name>.<parameter name>`` otherwise (``encoder.layers.0.self_attn.in_proj_weight``,
``lstm.weight_hh_l1``). The names are those of ``model.named_modules()`` of the object handed in.

**Patterns** (``densities``/``bits`` keys, ``include``/``exclude``) are fnmatch patterns; one selects a target when it
matches the target's name, its full name ``<module>.<param>`` (``fc1.weight``) or its module name. So the module
pattern ``"*.self_attn"`` selects every ``in_proj_weight`` of those attention modules but not their ``out_proj``
(module ``*.self_attn.out_proj``, a target of its own: ``"*.self_attn*"`` selects both), and ``"lstm"`` selects every
weight matrix of the LSTM. A pattern that matches no target is an error (a typo must not leave a layer dense); the
message also names the modules the pattern does match whose type is not in ``types`` (with the fix,
``types=(*DEFAULT_TARGET_TYPES, <type>)``). A tied weight's other names select its target (below).

**Tied weights.** A parameter registered under several names (``decoder.weight = embedding.weight``, found by
identity) is ONE target, named by its first holder of a target type in ``named_modules()`` order; its other names are
:attr:`Target.tied`, and a pattern matching one of them selects the target too (``"lm_head"`` selects a nanoGPT's
``wte``: it is the same matrix). The callbacks therefore prune, cluster and fine-tune it once, its buffers live on
that first holder, and the file stores it once (``dcz.encode``: the other names are the file's ``aliases``).

**Left dense by type.** Weight matrices (2-D or more) of modules whose type is not in ``types`` stay dense; the first
selection over a model class and ``types`` logs one warning naming those types and their share of the weights.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import Tensor, nn

from dc_lightning.kinds import DEFAULT_TARGET_TYPES, weight_params
from dc_lightning.utils import target_name

__all__ = ["Target", "Targets", "pattern_aliases", "select_targets"]

log = logging.getLogger(__name__)
#: (model class, types) already warned about (:func:`select_targets` warns once per pair)
_WARNED: set[tuple[type, tuple[type, ...]]] = set()
#: module names listed in a hint at most
_SHOWN = 6


@dataclass(frozen=True)
class Target:
    """One weight matrix to compress: parameter ``param`` of ``module``, named ``module_name`` in the model."""

    module_name: str
    param: str
    module: nn.Module = field(compare=False, repr=False)
    #: the parameter's other names (``<module>.<param>`` of every other holder) when it is tied, else ``()``
    tied: tuple[str, ...] = field(default=(), compare=False)

    @property
    def name(self) -> str:
        """The target's name (:func:`target_name`): what tables, metrics, the file and the report call it."""
        return target_name(self.module_name, self.param)

    @property
    def full_name(self) -> str:
        """``<module name>.<param>``: the parameter's state-dict key."""
        return f"{self.module_name}.{self.param}" if self.module_name else self.param

    @property
    def aliases(self) -> tuple[str, ...]:
        """The names a pattern may match to select this target: its name, full name and module name, and those of
        every other holder of a tied parameter (:attr:`tied`)."""
        names = [self.name, self.full_name, self.module_name]
        for full in self.tied:
            module, _, param = full.rpartition(".")
            names += [target_name(module, param), full, module]
        return tuple(dict.fromkeys(n for n in names if n))

    @property
    def weight(self) -> Tensor:
        """The parameter itself (always read from the module: a wrapper may re-register it)."""
        return getattr(self.module, self.param)

    def matches(self, pattern: str) -> bool:
        """Whether the fnmatch ``pattern`` selects this target (its name, full name or module name)."""
        return any(fnmatch.fnmatchcase(n, pattern) for n in self.aliases)


class Targets(dict):
    """:func:`select_targets`' result, ``{name: Target}``, that also knows which weight matrices of the model are not
    targets though a pattern may name them (:meth:`unmatched_hint`)."""

    def __init__(self, items: dict[str, Target], untargeted: list[Target]) -> None:
        super().__init__(items)
        self.untargeted = untargeted  #: matrices of modules whose type is not in ``types``

    @property
    def tied(self) -> dict[str, str]:
        """``{full name: target name}`` of the other names of tied targets (:attr:`Target.tied`)."""
        return {full: t.name for t in self.values() for full in t.tied}

    def unmatched_hint(self, pattern: str) -> str:
        """What ``pattern`` (which matches no target) matches among the model's non-target matrices, and the fix;
        ``""`` when nothing."""
        parts = []
        passed = [t for t in self.untargeted if t.matches(pattern)]
        if passed:
            names = [f"{t.full_name if t.param != 'weight' else t.module_name} ({type(t.module).__name__})"
                     for t in passed]
            more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
            kinds = ", ".join(dict.fromkeys(type(t.module).__name__ for t in passed))
            parts.append(
                f"these modules match it but their type is not targeted: {', '.join(names[:_SHOWN])}{more}; pass "
                f"types=(*DEFAULT_TARGET_TYPES, {kinds}) to compress them"
            )
        return "; ".join(parts)


def select_targets(
    model: nn.Module,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    types: tuple[type[nn.Module], ...] = DEFAULT_TARGET_TYPES,
    what: str = "target selection",
) -> Targets:
    """The targets to compress, ``{name: Target}`` in ``named_modules()`` order.

    Candidates are the weight matrices (:func:`dc_lightning.kinds.weight_params`) of the modules of ``types``
    (``isinstance``, so subclasses count); ``include``/``exclude`` fnmatch patterns then filter them (see the module
    docstring for what a pattern matches). A parameter shared by two modules (tied weights) is one target, under its
    first name. The first selection over a model class and ``types`` logs a warning when weight matrices of other
    module types stay dense (the module docstring).

    Raises:
        ValueError: the model has no candidate, or an include/exclude pattern matches none (the message lists them,
            and what the pattern matches that is not a target: :meth:`Targets.unmatched_hint`).
    """
    types = tuple(types)
    candidates: dict[str, Target] = {}
    seen: dict[int, str] = {}
    untargeted: list[Target] = []
    names = _parameter_names(model)
    for module_name, module in model.named_modules():
        if not module_name:
            continue
        if not isinstance(module, types):
            untargeted += [Target(module_name, p, module) for p in weight_params(module)]
            continue
        for param in weight_params(module):
            weight = getattr(module, param)
            full = f"{module_name}.{param}"
            t = Target(module_name, param, module, tuple(n for n in names.get(id(weight), ()) if n != full))
            if id(weight) in seen:  # a tied parameter's other holder: one target, with this name in Target.tied
                continue
            seen[id(weight)] = t.name
            candidates[t.name] = t
    untargeted = [t for t in untargeted if id(t.weight) not in seen and t.weight.dim() >= 2]  # matrices left dense
    if not candidates:
        # the root module is never a target (targets are named by their module's name, and the root has none)
        root = (
            f"; the model itself is a {type(model).__name__}: wrap it (e.g. nn.Sequential(model)) to compress it"
            if isinstance(model, types) and weight_params(model)
            else ""
        )
        raise ValueError(
            f"{what}: the model has no layer of type {[t.__name__ for t in types]} with a weight parameter{root}"
        )
    _warn_untargeted(model, types, candidates, untargeted)
    found = Targets(candidates, untargeted)
    include = list(include) if include is not None else None
    exclude = list(exclude or [])
    for kind, patterns in (("include", include or []), ("exclude", exclude)):
        for pat in patterns:
            if not any(t.matches(pat) for t in candidates.values()):
                hint = found.unmatched_hint(pat)
                raise ValueError(
                    f"{what}: {kind} pattern {pat!r} matches no layer; available layers: {sorted(candidates)}"
                    + (f"; {hint}" if hint else "")
                )
    return Targets(
        {
            name: t
            for name, t in candidates.items()
            if (include is None or any(t.matches(p) for p in include)) and not any(t.matches(p) for p in exclude)
        },
        untargeted,
    )


def _warn_untargeted(
    model: nn.Module, types: tuple[type, ...], candidates: dict[str, Target], untargeted: list[Target]
) -> None:
    """Warn once per (model class, types) that the matrices of ``untargeted`` stay dense, with their share."""
    key = (type(model), types)
    if not untargeted or key in _WARNED:
        return
    _WARNED.add(key)
    left = sum(t.weight.numel() for t in untargeted)
    total = left + sum(t.weight.numel() for t in candidates.values())
    by_type: dict[str, int] = {}
    for t in untargeted:
        by_type[type(t.module).__name__] = by_type.get(type(t.module).__name__, 0) + 1
    log.warning(
        "%s: %d weight matrices (%.0f%% of the weights in matrices) are of module types not targeted and stay dense: "
        "%s; pass types=(*DEFAULT_TARGET_TYPES, %s) to compress them",
        type(model).__name__, len(untargeted), 100.0 * left / max(total, 1),
        ", ".join(f"{n} ({c})" for n, c in by_type.items()), ", ".join(by_type),
    )


def pattern_aliases(targets: dict[str, Target]) -> dict[str, tuple[str, ...]]:
    """``{name: aliases}`` of ``targets``, for :func:`dc_lightning.utils.resolve_per_layer`; from a :class:`Targets`
    it carries its ``unmatched_hint`` too (the error for a pattern that matches nothing then says what it matches)."""
    return _Aliases({n: t.aliases for n, t in targets.items()}, getattr(targets, "unmatched_hint", None))


class _Aliases(dict):
    """``{name: aliases}`` with the ``unmatched_hint`` that :func:`dc_lightning.utils.resolve_per_layer` reads."""

    def __init__(self, items: dict[str, tuple[str, ...]], hint) -> None:  # noqa: ANN001 - Callable | None
        super().__init__(items)
        if hint is not None:
            self.unmatched_hint = hint


def _parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name of every parameter, by ``id``, in ``named_parameters()`` order (a tied one has several)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names
