"""The dynamic half of the conversion's safety check: run the dense and the converted model on ``example_inputs``,
compare their outputs, and name the converted layers that disagree."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def mha_fast_path(enabled: bool) -> Iterator[None]:
    """torch's fused attention paths off: the nested-tensor path returns zeros at padded positions, so the slow
    path is the reference semantics."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, dict):
        args, kwargs = (), example_inputs
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    with torch.no_grad(), mha_fast_path(False):
        return model(*args, **kwargs)


def reference_outputs(
    model: nn.Module, example_inputs: Any, targets: Iterable[tuple[str, nn.Module]]
) -> tuple[Any, dict[str, list[tuple]]]:
    """The dense model's outputs on ``example_inputs`` (a tensor, a tuple of positional arguments or a dict of
    keyword arguments), with torch's fused attention fast paths off, and the ``(args, kwargs, output)`` of every call
    of every conversion target in ``targets`` (``(name, module)``), so that a mismatch can be traced to a layer."""
    calls: dict[str, list[tuple]] = {}
    handles = []
    for name, m in targets:
        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any, _name: str = name) -> None:
            calls.setdefault(_name, []).append((args, kwargs, out))

        handles.append(m.register_forward_hook(hook, with_kwargs=True))
    try:
        return call_model(model, example_inputs), calls
    finally:
        for h in handles:
            h.remove()


def _leaves(out: Any, path: str = "output") -> Iterator[tuple[str, Any]]:
    if isinstance(out, dict):
        for k, v in out.items():
            yield from _leaves(v, f"{path}[{k!r}]")
    elif isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, out


def _compare(out: Any, reference: Any, tolerance: float | None) -> tuple[float, str | None]:
    """``(largest relative L2 error, what differs or None)`` between two (nested) outputs."""
    got, want = dict(_leaves(out)), dict(_leaves(reference))
    if got.keys() != want.keys():
        return math.inf, f"output structure changed: {sorted(got)} vs {sorted(want)}"
    worst = 0.0
    for key, ref in want.items():
        new = got[key]
        if not isinstance(ref, Tensor):
            continue
        if not ref.is_floating_point():
            if not torch.equal(new, ref):
                return math.inf, f"{key} differs from the original model's"
            continue
        tol = tolerance if tolerance is not None else (2e-2 if ref.dtype in (torch.float16, torch.bfloat16) else 1e-4)
        r = ref.double()
        err = float((new.double() - r).norm() / r.norm().clamp_min(1e-30))
        worst = max(worst, err)
        if not err <= tol:
            return worst, f"{key} differs from the original's: relative L2 error {err:.3g} > tolerance {tol:g}"
    return worst, None


def _culprits(model: nn.Module, converted: Sequence[str], calls: dict[str, list[tuple]], tol: float | None) -> str:
    """Converted layers whose own outputs differ on the inputs they got in the dense model's run."""
    found = []
    for name in converted:
        layer = model.get_submodule(name) if name else model
        for args, kwargs, out in calls.get(name, []):
            try:
                with torch.no_grad():
                    problem = _compare(layer(*args, **kwargs), out, tol)[1]
            except Exception as err:  # a layer failing on its own inputs is a culprit too
                problem = f"fails: {err!r}"
            if problem:
                found.append(f"{name or '<model>'} ({problem})")
                break
    return f" Layers that differ on their own inputs: {'; '.join(found)}." if found else ""


def check_outputs(
    model: nn.Module,
    example_inputs: Any,
    reference: Any,
    tolerance: float | None = None,
    converted: Sequence[str] = (),
    calls: dict[str, list[tuple]] | None = None,
) -> float:
    """Run the converted ``model`` on ``example_inputs`` and compare with ``reference`` (relative L2 error per
    floating-point output; other outputs must be equal). Returns the largest relative error.

    ``tolerance`` defaults to 1e-4 for float32/float64 outputs and 2e-2 for float16/bfloat16. On a mismatch the
    converted layers are run on the inputs they got in the dense run (``calls`` of :func:`reference_outputs`) and
    those whose outputs differ are named in the error.

    Raises:
        ValueError: the converted model fails on the inputs, or an output differs beyond the tolerance.
    """
    hint = (
        f" Converted layers: {', '.join(c or '<model>' for c in converted) or 'none'}; keep the culprit dense with "
        "to_compressed_inference(..., exclude=['<name>'])."
    )
    try:
        out = call_model(model, example_inputs)
    except Exception as err:  # any failure of the converted forward is reported as a conversion error
        raise ValueError(
            f"to_compressed_inference: the converted model fails on example_inputs: {err!r}.{hint}"
        ) from err
    worst, problem = _compare(out, reference, tolerance)
    if problem:
        culprits = _culprits(model, converted, calls or {}, tolerance)
        raise ValueError(f"to_compressed_inference: {problem}.{culprits}{hint}")
    return worst
