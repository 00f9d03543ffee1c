"""The per-step work of codebook fine-tuning [DC §3.3]: codebook gradients and the weight rewrite for a group of
quantized layers (Triton on CUDA, the float64 reference elsewhere)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from dc_lightning import buffers
from dc_lightning.buffers import get_codebook, get_mask
from dc_lightning.quantization.codebooks import codebook_grad, codebook_segments, decode_weight

log = logging.getLogger(__name__)

CODEBOOK_BACKENDS = ("auto", "triton", "reference")


class CodebookStep:
    """The per-step work of codebook fine-tuning for a group of quantized layers: gradients and weight rewrite.

    Assignments are fixed during fine-tuning [DC §3.3], so the grouping of every layer's members by centroid is
    computed once, when the step is built, and reused until :meth:`stale`. Two backends give the same numbers:

    * ``"triton"``: :mod:`dc_lightning.kernels.codebook.step`: the codebook gradients of all layers of one weight
      dtype in two launches (a fixed-order float64 segmented sum over the members' gradients), the rewrite
      ``weight = where(mask, codebook[assign], 0)`` of all layers in one more. Deterministic (no atomics), hence
      identical on every DDP rank.
    * ``"reference"``: :func:`codebook_grad` (float64 prefix sums), layer by layer, and :func:`decode_weight` as
      one gather from cached codes straight into the weight; the CPU path. ``codebook_grad`` and ``decode_weight``
      are the package's one reference (the tests' oracle; the kernels file defines none).

    ``"auto"`` picks Triton on CUDA (or on the CPU under ``TRITON_INTERPRET=1``) when the weights are contiguous, the
    reference otherwise (and for good, with a logged warning, if an automatically chosen kernel fails on its first
    call). Both are equal up to float64 rounding before the final rounding to float32.

    Args:
        modules: quantized layers, or ``(module, parameter name)`` pairs for parameters other than ``weight``
            (``dc_lightning.targets``: attention's ``in_proj_weight``, an LSTM's ``weight_hh_l0``...); each carries
            the parameter's codebook and assignments (:mod:`dc_lightning.buffers`) and optionally a mask.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Raises:
        ValueError: a bad ``backend``, a layer without codebook, or ``"triton"`` for layers it cannot run on.

    Example::

        step = CodebookStep([model.fc1, model.fc2])
        grads, finite = step.codebook_grads([model.fc1.weight.grad, model.fc2.weight.grad])
        ...                                    # move the codebooks with grads (if finite)
        step.rewrite()                         # weights = where(mask, codebook[assign], 0)
    """

    def __init__(self, modules: Iterable[nn.Module | tuple[nn.Module, str]], backend: str = "auto") -> None:
        if backend not in CODEBOOK_BACKENDS:
            raise ValueError(f"CodebookStep: backend must be one of {CODEBOOK_BACKENDS}, got {backend!r}")
        pairs = [m if isinstance(m, tuple) else (m, buffers.WEIGHT) for m in modules]
        self.modules = [m for m, _ in pairs]
        self.params = [p for _, p in pairs]
        for i, (m, p) in enumerate(pairs):
            if get_codebook(m, p) is None:
                raise ValueError(
                    f"CodebookStep: layer {i} ({type(m).__name__}) has no {buffers.CODEBOOK}/{buffers.ASSIGN} buffers"
                )
        self._key = self._state_key()
        self._plans: list[tuple[list[int], Any]] = []  # (layer indices, CodebookPlan) per weight dtype and device
        self._segments: list[tuple[Tensor, Tensor] | None] = [None] * len(self.modules)
        self._codes: list[Tensor | None] = [None] * len(self.modules)  # reference rewrite: codes, k where pruned
        self._requested = backend
        self._triton_ran: set[str] = set()  # Triton calls that have run once (compiled) since auto chose Triton
        self.backend = self._build(backend)

    def _weight(self, i: int) -> Tensor:
        return getattr(self.modules[i], self.params[i])

    def _codebook(self, i: int) -> tuple[Tensor, Tensor]:
        return get_codebook(self.modules[i], self.params[i])

    def _mask(self, i: int) -> Tensor | None:
        return get_mask(self.modules[i], self.params[i])

    def _state_key(self) -> list[tuple]:
        key = []
        for i in range(len(self.modules)):
            cb, assign = self._codebook(i)
            mask = self._mask(i)
            key.append((self._weight(i), cb, assign, assign._version, mask, -1 if mask is None else mask._version))
        return key

    def _build(self, backend: str) -> str:
        if backend == "reference":
            return backend
        from dc_lightning.kernels.codebook import step as kcs  # Triton itself is optional: see triton_usable
        groups: dict[tuple, list[int]] = {}
        for i in range(len(self.modules)):
            w = self._weight(i)
            groups.setdefault((w.device, w.dtype), []).append(i)
        plans = []
        try:
            for (device, _), idx in groups.items():
                if not kcs.triton_usable(device):
                    raise ValueError(f"Triton cannot run on {device}")
                plans.append(
                    (
                        idx,
                        kcs.build_plan(
                            [self._weight(i).data for i in idx],
                            [self._codebook(i)[1] for i in idx],
                            [self._mask(i) for i in idx],
                            [self._codebook(i)[0].numel() for i in idx],
                        ),
                    )
                )
        except ValueError as err:
            if backend == "triton":
                raise ValueError(f"CodebookStep: backend='triton' cannot run these layers: {err}") from err
            return "reference"
        self._plans = plans
        return "triton"

    def stale(self) -> bool:
        """True when a layer's codebook, assignments or mask changed (or were replaced) since the step was built."""
        key = self._state_key()
        return len(key) != len(self._key) or any(
            any(x is not y if isinstance(x, Tensor) or x is None else x != y for x, y in zip(a, b, strict=True))
            for a, b in zip(key, self._key, strict=True)
        )

    def codebook_grads(self, grads: list[Tensor | None]) -> tuple[list[Tensor | None], Tensor]:
        """Every layer's codebook gradient [DC eq. 3] from its weight gradient, and whether all are finite.

        Args:
            grads: ``∂L/∂W`` per layer (None for a layer without gradient: its codebook gradient is None).

        Returns:
            ``(codebook grads, finite)``: float32 ``[2**bits]`` per layer (views of one buffer per dtype group with
            Triton) or None, and a 0-dim bool tensor on the weights' device (no host synchronisation).
        """
        if len(grads) != len(self.modules):
            raise ValueError(f"CodebookStep.codebook_grads: {len(grads)} gradients for {len(self.modules)} layers")
        out: list[Tensor | None] = [None] * len(self.modules)
        flags = self._first_triton_call("grads", self._grads_triton, self._grads_reference, grads, out)
        device = self._weight(0).device if self.modules else torch.device("cpu")
        if not flags:
            return out, torch.ones((), dtype=torch.bool, device=device)
        finite = flags[0] if len(flags) == 1 else torch.stack(flags).all()
        return out, finite

    @torch.no_grad()
    def rewrite(self) -> None:
        """``weight = where(mask, codebook[assign], 0)`` for every layer, bit for bit as :func:`decode_weight`."""
        self._first_triton_call("rewrite", self._rewrite_triton, self._rewrite_reference)

    def _first_triton_call(self, what: str, triton_fn: Any, reference_fn: Any, *args: Any) -> Any:
        """Run the Triton variant; if an *automatically chosen* Triton fails on its first call (e.g. a kernel that
        does not compile for this GPU), log it and continue with the reference for good."""
        if self.backend != "triton":
            return reference_fn(*args)
        if self._requested != "auto" or what in self._triton_ran:
            return triton_fn(*args)
        try:
            result = triton_fn(*args)
        except Exception as err:  # noqa: BLE001 - any kernel failure: the reference gives the same numbers
            log.warning("CodebookStep: the Triton %s kernel failed (%r); using the float64 reference", what, err)
            self.backend = "reference"
            return reference_fn(*args)
        self._triton_ran.add(what)
        return result

    def _grads_triton(self, grads: list[Tensor | None], out: list[Tensor | None]) -> list[Tensor]:
        from dc_lightning.kernels.codebook.step import codebook_grads_triton

        flags = []
        for idx, plan in self._plans:
            if all(grads[i] is None for i in idx):
                continue
            gs = [torch.zeros_like(self._weight(i)) if grads[i] is None else grads[i].contiguous() for i in idx]
            flat = codebook_grads_triton(plan, gs)
            flags.append(torch.isfinite(flat).all())
            for j, i in enumerate(idx):
                if grads[i] is not None:
                    out[i] = flat[plan.cb_offsets[j] : plan.cb_offsets[j + 1]]
        return flags

    def _grads_reference(self, grads: list[Tensor | None], out: list[Tensor | None]) -> list[Tensor]:
        flags = []
        for i, g in enumerate(grads):
            if g is None:
                continue
            cb, assign = self._codebook(i)
            mask = self._mask(i)
            if self._segments[i] is None:
                self._segments[i] = codebook_segments(assign, mask, cb.numel())
            out[i] = codebook_grad(g, assign, mask, cb.numel(), segments=self._segments[i])
            flags.append(out[i].isfinite().all())
        return flags

    def _rewrite_triton(self) -> None:
        from dc_lightning.kernels.codebook.step import rewrite_triton

        for idx, plan in self._plans:
            rewrite_triton(plan, [self._codebook(i)[0] for i in idx])

    def _rewrite_reference(self) -> None:
        # decode_weight as one gather straight into the weight: pruned positions index an appended 0.0 (cached
        # int32 codes, 4 bytes per weight); falls back to decode_weight for non-contiguous weights
        for i, m in enumerate(self.modules):
            cb, assign = self._codebook(i)
            w = self._weight(i).data
            if not w.is_contiguous():
                w.copy_(decode_weight(m, self.params[i]))
                continue
            if self._codes[i] is None:
                mask = self._mask(i)
                code = assign.reshape(-1).to(torch.int32)
                if mask is not None:
                    code = torch.where(mask.reshape(-1), code, torch.full_like(code, cb.numel()))
                self._codes[i] = code
            table = torch.cat([cb.to(w.dtype), torch.zeros(1, dtype=w.dtype, device=w.device)])
            torch.index_select(table, 0, self._codes[i], out=w.view(-1))
