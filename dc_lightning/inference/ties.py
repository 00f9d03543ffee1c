"""Tied weights in the conversion (``inference.conversion``'s rules, "Tied weights"): which conversion targets hold
one compressed parameter (by identity: ``lm_head.weight = wte.weight``), whether such a group converts together, and
the replacements that share one packed table.

A group converts when every member may be converted and the members are ``Embedding`` layers and at most one
``Linear`` (:data:`TIE_ROLES`): the Linear becomes a :class:`~dc_lightning.inference.linear.CompressedLinear` built
from the weight's one compression state (its buffers live on one holder), every embedding a
:class:`~dc_lightning.inference.embedding.TiedEmbedding` looking its rows up in the Linear's LUT copy; embeddings
tied only to each other become one :class:`~dc_lightning.inference.embedding.CompressedEmbedding` under every name.
Any other group (a member kept dense for any reason, a holder that is no conversion target, other kinds) stays
dense in every member: converting some would keep the dense matrix alive and add a compressed one.

The functions read and set the fields of the conversion's ``Decision`` objects (``name``, ``kind``, ``action``,
``reason``, ``tied``, ``trial``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from dc_lightning import buffers
from dc_lightning.inference.embedding import CompressedEmbedding, TiedEmbedding
from dc_lightning.inference.matrix import compressed_matrix

__all__ = ["TIE_ROLES", "build_ties", "compression_states", "decide_tie", "plan_ties", "state_of"]

#: the weight kinds (:attr:`dc_lightning.kinds.Kind.name`) whose replacements can share one packed table, and how:
#: an embedding looks rows up in it, a Linear (at most one per tie: its bias is its own) multiplies with it
TIE_ROLES = {"Embedding": "table", "Linear": "projection"}


def compression_states(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """``{id(parameter): (module, name)}`` of every parameter carrying compression buffers, by the module that
    carries them (a tied weight's buffers live on one of its holders)."""
    states: dict[int, tuple[nn.Module, str]] = {}
    for m in model.modules():
        for p in buffers.compressed_params(m):
            states.setdefault(id(getattr(m, p)), (m, p))
    return states


def state_of(states: dict[int, tuple[nn.Module, str]], owner: nn.Module, param: str) -> tuple[nn.Module, str] | None:
    """Where the compression state of ``owner.<param>`` lives (itself, or another holder of the tied weight)."""
    if buffers.has_compression(owner, param):
        return owner, param
    return states.get(id(getattr(owner, param, None)))


def plan_ties(model: nn.Module, decisions: list[Any], states: dict[int, tuple[nn.Module, str]]) -> None:
    """Group the targets that hold one compressed parameter (by identity; a module registered twice is one holder)
    and let :func:`decide_tie` convert each group once or keep it dense."""
    holders: dict[int, dict[int, str]] = {}  # id(param) -> {id(module): its first name}
    for mname, m in model.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None and id(p) in states:
                holders.setdefault(id(p), {}).setdefault(id(m), mname)
    active = {d.name: d for d in decisions if d.action != "dense"}
    root = {n: n for n in active}
    names_of: dict[int, list[str]] = {}  # a module registered twice is one target under two names
    for n in active:
        names_of.setdefault(id(model.get_submodule(n) if n else model), []).append(n)

    def find(n: str) -> str:
        while root[n] != n:
            n = root[n]
        return n

    def target_of(holder: str) -> str | None:
        return next((t for t in active if not t or holder == t or holder.startswith(t + ".")), None)

    tied, outside = set(), []
    for names in holders.values():
        if len(names) < 2:
            continue
        found = [(target_of(h), h) for h in names.values()]
        members = [n for t, _ in found if t is not None for n in names_of[id(model.get_submodule(t) if t else model)]]
        for t in members[1:]:
            root[find(t)] = find(members[0])
        tied.update(members)
        outside += [(members[0], h) for t, h in found if t is None and members]
    groups: dict[str, list[Any]] = {}
    for n in active:
        if n in tied:
            groups.setdefault(find(n), []).append(active[n])
    for key, group in groups.items():
        out = sorted({h for t, h in outside if find(t) == key})
        if len(group) > 1 or out:
            decide_tie(model, group, out)


def decide_tie(model: nn.Module, group: list[Any], outside: list[str]) -> None:
    """Mark the members of a supported group ``tied`` (:data:`TIE_ROLES`: ``Embedding`` layers and
    at most one ``Linear``, all convertible), or keep every member dense, saying which holder or kinds keep it so."""
    modules = {d.name: model.get_submodule(d.name) if d.name else model for d in group}
    dense = next((d for d in group if d.action == "skip"), None)
    projections = {id(modules[d.name]) for d in group if TIE_ROLES.get(d.kind) == "projection"}
    if outside:
        why = f"its weight is tied to {', '.join(h or '<model>' for h in outside)}, which is not converted"
    elif dense is not None:
        why = f"its weight is tied to {dense.name or '<model>'}, which stays dense ({dense.reason})"
    elif not all(d.kind in TIE_ROLES for d in group) or len(projections) > 1:
        held = ", ".join(f"{d.name} ({d.kind})" for d in group)
        why = f"its weight is tied to {held}; a tie is converted between Embedding layers and at most one Linear"
    else:
        for d in group:
            d.tied = tuple(o.name for o in group if o is not d)
            note = f"tied with {', '.join(d.tied)}: one packed table"
            d.reason = f"{d.reason}; {note}" if d.reason else note
        return
    for d in group:
        if d.action == "convert":
            d.action, d.trial = "skip", ""
            d.reason = f"{why}; converting {d.name or '<model>'} alone would keep the dense matrix alive"


def build_ties(model: nn.Module, decisions: list[Any], relu: Callable[[str], bool]) -> dict[str, nn.Module]:
    """The replacements of every tied group (``tied``), by layer name, built from the one compression
    state of the shared weight: the Linear's :class:`CompressedLinear` and a :class:`TiedEmbedding` per embedding
    reading its rows, or one :class:`CompressedEmbedding` for embeddings tied only to each other. A group that
    cannot be built stays dense, every member with the reason."""
    states = compression_states(model)
    out: dict[str, nn.Module] = {}
    by_name = {d.name: d for d in decisions}
    for d in decisions:
        if d.action != "convert" or not d.tied or d.name in out:
            continue
        group = [d, *(by_name[n] for n in d.tied)]
        modules = {g.name: model.get_submodule(g.name) for g in group}
        owner, param = state_of(states, modules[d.name], "weight")
        linear = next((g.name for g in group if TIE_ROLES[g.kind] == "projection"), None)
        try:
            if linear is None:  # embeddings only (the owner of the state is one of them): one module, every name
                table = CompressedEmbedding.from_module(owner)
                out.update({g.name: table for g in group})
                continue
            table = compressed_matrix(owner, param, modules[linear].bias, relu=relu(linear), lookup=True)
            made: dict[int, nn.Module] = {id(modules[linear]): table}  # one replacement per module object
            for g in group:
                emb = modules[g.name]
                if id(emb) not in made:
                    made[id(emb)] = TiedEmbedding(table, padding_idx=emb.padding_idx, dtype=emb.weight.dtype,
                                                  table_name=linear)  # fmt: skip
                out[g.name] = made[id(emb)]
        except ValueError as err:
            for g in group:
                g.action, g.reason = "skip", f"its tied group {[x.name for x in group]} cannot be converted: {err}"
                out.pop(g.name, None)
    return out
