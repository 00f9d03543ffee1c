"""Run a forward on *fake* CUDA tensors (``FakeTensorMode``: shapes and devices only, no GPU needed) and record what
CUDA-graph capture would refuse: a read of a value on the host raises (``DataDependentOutputException`` from
``aten._local_scalar_dense``: ``.item()``, ``bool(t)``, ``nonzero``...), and every op that turns a CPU tensor into a
CUDA one (a copy from host memory) is recorded.
Used by ``tests/test_compile_converted.py`` and ``tests/test_decode.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class HostToDevice(TorchDispatchMode):
    """Records every op that reads a CPU tensor and returns a CUDA one."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" for t in inputs) and any(t.device.type == "cuda" for t in outputs):
            self.copies.append(str(func))
        return out


def run_on_fake_cuda(model: nn.Module, fn: Callable[..., Any], *inputs: Any) -> tuple[Any, list[str]]:
    """``fn(fake_model, *fake_inputs)`` with a copy of ``model`` and ``inputs`` (nested tuples/lists/dicts of tensors)
    as fake CUDA tensors; returns ``(fn's result, the host-to-device copies made inside fn)``."""
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # fake tensors cannot go into param.data
    fake = copy.deepcopy(model)  # outside the mode: a deepcopy inside it fails
    watch = HostToDevice()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = fake.to("cuda")
            args = _to_cuda(inputs)
            with torch.no_grad(), watch:
                out = fn(fake, *args)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    return out, watch.copies


def _to_cuda(obj: Any) -> Any:
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_cuda(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_cuda(v) for k, v in obj.items()}
    return obj.to("cuda") if isinstance(obj, torch.Tensor) else obj
