"""EIE's benchmark layers [EIE Table III], random pruned + weight-shared layers at their densities, the int4
weight-only peer, and copies of a packed layer (for the rotation of :mod:`bench.harness.timing`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

# [EIE Table III]: name, in, out, weight density, activation density; [EIE Table IV] EIE actual latency (us)
EIE_LAYERS = [
    ("Alex-6", 9216, 4096, 0.09, 0.351, 30.3),
    ("Alex-7", 4096, 4096, 0.09, 0.353, 12.2),
    ("Alex-8", 4096, 1000, 0.25, 0.375, 9.9),
    ("VGG-6", 25088, 4096, 0.04, 0.183, 34.4),
    ("VGG-7", 4096, 4096, 0.04, 0.375, 8.7),
    ("VGG-8", 4096, 1000, 0.23, 0.411, 8.4),
    ("NT-We", 4096, 600, 0.10, 1.0, 8.0),
    ("NT-Wd", 600, 8791, 0.11, 1.0, 13.9),
    ("NT-LSTM", 1201, 2400, 0.10, 1.0, 7.5),
]
#: the FC stacks fc6 -> ReLU -> fc7 -> ReLU -> fc8
STACKS = {"AlexNet": ["Alex-6", "Alex-7", "Alex-8"], "VGG-16": ["VGG-6", "VGG-7", "VGG-8"]}


def random_layer(n_in: int, n_out: int, density: float, bits: int = 4, seed: int = 0, device: str = "cuda"):
    """Random pruned, ``bits``-bit weight-shared layer: ``(rows, cols, codes, codebook, bias)`` on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    mask = torch.rand(n_out, n_in, generator=g, device=device) < density
    rows, cols = mask.nonzero(as_tuple=True)
    del mask
    codes = torch.randint(0, 2**bits, (rows.numel(),), generator=g, device=device)
    codebook = torch.randn(2**bits, generator=g, device=device) * 0.05
    bias = torch.randn(n_out, generator=g, device=device) * 0.01
    return rows, cols, codes, codebook, bias


def random_activations(batch: int, n: int, density: float, seed: int = 1, device: str = "cuda") -> torch.Tensor:
    """ReLU-like input ``[batch, n]``: ``density`` of the values non-zero (positive)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, n, generator=g, device=device).abs()
    return torch.where(torch.rand(batch, n, generator=g, device=device) < density, x, torch.zeros((), device=device))


def clone_packed(packed: Any) -> Any:
    """A copy of a packed-layer dataclass with every tensor field cloned (same shapes, so the same tuned configs)."""
    tensors = {f.name: getattr(packed, f.name).clone() for f in dataclasses.fields(packed)
               if isinstance(getattr(packed, f.name), torch.Tensor)}  # fmt: skip
    return dataclasses.replace(packed, **tensors)


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def make_int4(w: torch.Tensor, group: int = 128, inner_k_tiles: int = 8) -> Callable[[torch.Tensor], torch.Tensor]:
    """Weight-only int4 (``torch.ops.aten._weight_int4pack_mm``, group 128): returns ``fn(x) -> y``.

    K is zero-padded to a multiple of 128 and N to a multiple of 8 (the kernel's tiles); the values are a real
    asymmetric group quantization of ``w``.
    """
    n, k = w.shape
    npad, kpad = _round_up(n, 8), _round_up(k, max(group, inner_k_tiles * 16))
    wp = torch.zeros(npad, kpad, device=w.device, dtype=torch.float32)
    wp[:n, :k] = w
    wg = wp.view(npad, kpad // group, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = ((wg - lo) / scale).round().clamp(0, 15).to(torch.int32).view(npad, kpad)
    zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
    packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    try:
        wq = torch.ops.aten._convert_weight_to_int4pack(packed_u8, inner_k_tiles)
    except (RuntimeError, TypeError):  # older torch takes the int32 matrix
        wq = torch.ops.aten._convert_weight_to_int4pack(q, inner_k_tiles)
    sz = torch.stack([scale.view(npad, -1), zero.view(npad, -1)], dim=-1).transpose(0, 1).contiguous()
    sz = sz.to(torch.bfloat16)

    def fn(x: torch.Tensor) -> torch.Tensor:
        if kpad != k:
            x = F.pad(x, (0, kpad - k))
        y = torch.ops.aten._weight_int4pack_mm(x, wq, group, sz)
        return y[:, :n] if npad != n else y

    return fn


def safe_int4(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`make_int4`, or a function that raises its error when called (the peer is then recorded as failed)."""
    try:
        return make_int4(w)
    except Exception as err:  # noqa: BLE001
        msg = f"{type(err).__name__}: {err}"

        def fail(x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError(msg)

        return fail
