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


class Int4Linear:
    """Weight-only int4 (``torch.ops.aten._weight_int4pack_mm``, tinygemm, group 128) of a float weight ``[n, k]``:
    ``layer(x) -> x @ W_q.T`` for bf16 ``x``, where ``W_q`` is a real asymmetric group quantization of ``W``
    (16 levels between each group's min and max). K is zero-padded to a multiple of 128 and N to a multiple of 8
    (the kernel's tiles).

    The packing contract of ``_convert_weight_to_int4pack`` has changed across torch releases (int32 matrix, then
    uint8 nibble pairs; the CPU and XPU builds differ again), so the first build in a process tries each known
    contract on a small product and keeps the one whose output matches its own dequantized weights (``contract``);
    none matching raises, so a benchmark records the peer as failed rather than timing a wrong kernel.
    """

    def __init__(self, w: torch.Tensor, group: int = 128, inner_k_tiles: int = 8):
        self.n, k = w.shape
        self.group = group
        npad, self.kpad = _round_up(self.n, 8), _round_up(k, max(group, inner_k_tiles * 16))
        wp = torch.zeros(npad, self.kpad, device=w.device, dtype=torch.float32)
        wp[: self.n, :k] = w
        wg = wp.view(npad, self.kpad // group, group)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((wg - lo) / scale).round().clamp(0, 15)
        self.dequant = (q * scale + lo).view(npad, self.kpad)[: self.n, :k]  # the weights the kernel should use
        q = q.to(torch.int32).view(npad, self.kpad)
        if not _INT4_CONTRACT:
            _INT4_CONTRACT.append(_find_contract(q, scale, lo, npad, inner_k_tiles, group, self.dequant))
        self.contract = _INT4_CONTRACT[0]
        self.wq, self.sz = _int4_pack(self.contract, q, scale, lo, npad, inner_k_tiles)

    def clone(self) -> Int4Linear:
        """A copy with its own packed tensors (for the timing rotation)."""
        out = object.__new__(Int4Linear)
        out.__dict__.update(self.__dict__)
        out.wq, out.sz = self.wq.clone(), self.sz.clone()
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[1]
        if self.kpad != k:
            x = F.pad(x, (0, self.kpad - k))
        y = torch.ops.aten._weight_int4pack_mm(x, self.wq, self.group, self.sz)
        return y[:, : self.n] if y.shape[1] != self.n else y


_INT4_CONTRACT: list[tuple[str, str]] = []  # (weight packing, zero convention) found by the first build
_INT4_PACKINGS = ("uint8 even<<4 | odd", "uint8 odd<<4 | even", "int32 matrix")
_INT4_ZEROS = ("(q-8)*s+z, z=min+8s", "q*s+z, z=min")


def _int4_pack(contract: tuple[str, str], q, scale, lo, npad: int, inner_k_tiles: int):
    packing, zeros = contract
    if packing == _INT4_PACKINGS[0]:
        src = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    elif packing == _INT4_PACKINGS[1]:
        src = (q[:, 1::2] << 4 | q[:, ::2]).to(torch.uint8)
    else:
        src = q
    wq = torch.ops.aten._convert_weight_to_int4pack(src, inner_k_tiles)
    zero = lo + 8 * scale if zeros == _INT4_ZEROS[0] else lo
    sz = torch.stack([scale.view(npad, -1), zero.view(npad, -1)], dim=-1).transpose(0, 1).contiguous()
    return wq, sz.to(torch.bfloat16)


def _find_contract(q, scale, lo, npad: int, inner_k_tiles: int, group: int, dequant: torch.Tensor):
    g = torch.Generator(device=q.device).manual_seed(0)
    x = torch.randn(4, q.shape[1], generator=g, device=q.device).bfloat16()
    ref = x[:, : dequant.shape[1]].double() @ dequant.double().T
    tried = []
    for packing in _INT4_PACKINGS:
        for zeros in _INT4_ZEROS:
            try:
                wq, sz = _int4_pack((packing, zeros), q, scale, lo, npad, inner_k_tiles)
                y = torch.ops.aten._weight_int4pack_mm(x, wq, group, sz)[:, : dequant.shape[0]].double()
                err = float((y - ref).norm() / ref.norm().clamp(min=1e-30))
            except (RuntimeError, TypeError) as e:
                tried.append(f"{packing} / {zeros}: {type(e).__name__}: {str(e)[:80]}")
                continue
            if err <= 2e-2:
                return packing, zeros
            tried.append(f"{packing} / {zeros}: rel. err {err:.2e}")
    raise RuntimeError(
        "no _weight_int4pack_mm packing contract reproduces its own dequantized weights: " + "; ".join(tried)
    )


def make_int4(w: torch.Tensor, group: int = 128, inner_k_tiles: int = 8) -> Int4Linear:
    """:class:`Int4Linear` of ``w``: ``fn(x) -> y`` (bf16 ``x``)."""
    return Int4Linear(w, group, inner_k_tiles)


def safe_int4(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`make_int4`, or a function that raises its error when called (the peer is then recorded as failed)."""
    try:
        return make_int4(w)
    except Exception as err:  # noqa: BLE001
        msg = f"{type(err).__name__}: {err}"

        def fail(x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError(msg)

        fail.clone = lambda: fail  # the timing rotation's copies
        return fail
