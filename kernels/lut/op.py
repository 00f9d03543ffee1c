"""Launcher, launch configurations and ``torch.library`` op of the dense packed-code layout (``layout``).

``torch.ops.dc_lightning.lut_linear`` computes ``act(x @ W.T + b)`` for a :class:`LUTPacked` layer: the Triton
kernel ``jit.lut_matmul_kernel`` on CUDA (and on the CPU under ``TRITON_INTERPRET=1``), the PyTorch
reference elsewhere. :func:`choose_lut_config` maps shapes (never data) to a configuration, so calls are safe under
``torch.compile`` and inside CUDA graphs; :func:`autotune_lut` times :func:`lut_candidates` once per layer and
batch and records the winner, which :func:`choose_lut_config` then prefers.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from ..runtime import (
    HAS_TRITON,
    autotune_batches,
    can_use_workspace,
    fake_op,
    interpret_mode,
    next_pow2,
    reference_check,
    register_op,
    run_op,
    start_launch,
    workspace,
)
from .jit import lut_matmul_kernel
from .layout import LUTPacked, lut_linear_reference

__all__ = [
    "LUT_TUNED",
    "lut_tune_key",
    "choose_lut_config",
    "lut_candidates",
    "lut_linear_triton",
    "autotune_lut",
    "lut_linear",
]

log = logging.getLogger(__name__)

LUT_TUNED: dict[tuple, dict[str, Any]] = {}  # lut_tune_key(...) -> config recorded by autotune_lut
_SMS = 132  # H200 streaming multiprocessors: the split-K target is a few programs per SM
_KEYS = ("block_n", "block_b", "use_dot", "decode", "split", "num_warps", "num_stages")
# The default decode of the tensor-core path is tl.gather from the codebook held in registers (probe on the H200,
# gpu-kernels.md: twice the throughput of a tl.load per weight). Should a Triton build fail to compile it, the
# first eager launch falls back to tl.load and this flag keeps later defaults there.
_GATHER_FAILED: list[str] = []


def lut_tune_key(batch: int, packed: LUTPacked, dtype: torch.dtype) -> tuple:
    p = packed
    return (int(batch), p.out_features, p.in_features, p.cbits, p.mask is not None, str(dtype))


def choose_lut_config(
    batch: int, packed: LUTPacked, dtype: torch.dtype, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Launch configuration from shapes only.

    Keys: ``block_n`` (output rows per program), ``block_b`` (batch rows per program), ``use_dot`` (tensor cores;
    needs ``block_b >= 16``), ``decode`` (0: codebook ``tl.load``, 1: ``tl.gather`` from registers, the default
    with tensor cores and codes of up to 4 bits), ``split``
    (programs per output tile over the column groups), ``num_warps``, ``num_stages``. A configuration recorded by
    :func:`autotune_lut` wins over the heuristic; ``overrides`` win over both.

    Raises:
        ValueError: on an unknown key in ``overrides``.
    """
    use_dot = batch > 4
    gather = use_dot and packed.cbits <= 4 and not _GATHER_FAILED
    block_b = max(16, min(next_pow2(batch), 64)) if use_dot else next_pow2(max(batch, 1))
    # A program re-reads its [block_b, K] slab of x from L2 once per row tile: at batch 64 and 64-row tiles that
    # is as many bytes as a dense fp16 weight (VGG-6: 205 MB), so large batches take 128-row tiles.
    block_n = (128 if block_b >= 32 else 64) if use_dot else max(16, 128 // block_b)
    n_tiles = -(-packed.out_features // block_n) * -(-max(batch, 1) // block_b)
    # Split-K to about 4 programs per SM, 2 at batch >= 32 (each split adds B x block_n fp32 atomics per tile)
    want = max(1, -(-(2 if batch >= 32 else 4) * _SMS // n_tiles))
    split = int(max(1, min(want, 32, packed.n_groups)))
    cfg = {
        "block_n": block_n,
        "block_b": block_b,
        "use_dot": use_dot,
        "decode": 1 if gather else 0,
        "split": split,
        "num_warps": 8 if block_n * block_b > 4096 else 4,
        "num_stages": 2,
    }
    cfg.update(LUT_TUNED.get(lut_tune_key(batch, packed, dtype), {}))
    if overrides:
        unknown = set(overrides) - set(cfg)
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; valid keys: {sorted(cfg)}")
        cfg.update(overrides)
    if cfg["use_dot"] and cfg["block_b"] < 16:
        raise ValueError(f"use_dot needs block_b >= 16 (tl.dot's smallest tile), got block_b={cfg['block_b']}")
    return cfg


def lut_candidates(batch: int, packed: LUTPacked) -> list[dict[str, Any]]:
    """Configurations :func:`autotune_lut` times for one layer and batch (at most 48; 12 compiled variants)."""
    out = []
    decodes = (0, 1) if packed.cbits <= 4 else (0,)
    n_groups = packed.n_groups
    if batch <= 4:
        bbs, dots = [next_pow2(max(batch, 1))], [False]
    else:
        bbs, dots = sorted({16, max(16, min(next_pow2(batch), 64))}), [True]
    for use_dot in dots:
        for bb in bbs:
            for bn in (32, 64, 128) if use_dot else (16, 32, 64):
                if not use_dot and bn * 32 * bb > 8192:
                    continue
                n_tiles = -(-packed.out_features // bn) * -(-max(batch, 1) // bb)
                for per_sm in (1, 2, 4, 8):  # split is a run-time argument: no compile per value
                    split = int(max(1, min(-(-per_sm * _SMS // n_tiles), 64, n_groups)))
                    for dec in decodes:
                        cfg = {"block_n": bn, "block_b": bb, "use_dot": use_dot, "decode": dec, "split": split}
                        cfg.update(num_warps=4 if bn * bb <= 4096 else 8, num_stages=2)
                        if cfg not in out:
                            out.append(cfg)
    return out


def lut_linear_triton(
    x: Tensor,
    packed: LUTPacked,
    bias: Tensor | None = None,
    relu: bool = False,
    config: dict[str, Any] | None = None,
    wrap: Any = None,
) -> Tensor:
    """Launch :func:`jit.lut_matmul_kernel` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

    Args:
        x: ``[B, in_features]`` float32/float16/bfloat16, contiguous.
        packed: the layer (:func:`layout.pack_lut`), on ``x``'s device.
        bias: optional ``[out_features]``.
        relu: apply ReLU in the epilogue.
        config: overrides of :func:`choose_lut_config`.
        wrap: ``torch.library.wrap_triton`` when called inside the registered ``triton_op``.

    Returns:
        ``[B, out_features]`` in ``x.dtype``.

    Raises:
        RuntimeError: if Triton is missing or the tensors are on the CPU without the interpreter.
        ValueError, TypeError: on bad arguments (see ``runtime.check_call`` and :meth:`LUTPacked.check`).
    """
    launch, y = start_launch(x, packed, bias, wrap, "lut_linear")
    p = packed
    B, N = x.shape[0], p.out_features
    if B == 0:
        return y
    cfg = choose_lut_config(B, p, x.dtype, config)
    bn, bb = int(cfg["block_n"]), int(cfg["block_b"])
    n_tiles, n_bgroups = -(-N // bn), -(-B // bb)
    split = max(1, min(int(cfg["split"]), p.n_groups))
    per = -(-p.n_groups // split)
    split = -(-p.n_groups // per)  # no empty programs
    ws = None
    if split > 1 and can_use_workspace(x):
        ws = workspace(x.device, B * N, n_tiles * n_bgroups)
    if ws is None:
        split, per = 1, p.n_groups
        ws = (p.codebook, p.codes)  # never touched when SPLIT == 1
    args = (
        x,
        p.codes,
        p.mask if p.mask is not None else p.codes,
        p.codebook,
        bias if bias is not None else p.codebook,
        y,
        ws[0],
        ws[1],
        B,
        N,
        p.in_features,
        p.n_groups,
        per,
        split,
    )
    meta = dict(
        CBITS=p.cbits,
        HAS_MASK=p.mask is not None,
        BLOCK_N=bn,
        BLOCK_B=bb,
        USE_DOT=bool(cfg["use_dot"]),
        HAS_BIAS=bias is not None,
        RELU=bool(relu),
        num_warps=int(cfg["num_warps"]),
    )
    if type(x) is torch.Tensor:  # eager; a traced call (inductor) keeps Triton's default stages
        meta["num_stages"] = int(cfg["num_stages"])
    grid = (n_tiles, split, n_bgroups)
    decode = int(cfg["decode"])
    if decode == 1 and not (config and "decode" in config) and type(x) is torch.Tensor:
        try:  # the default gather decode, eager: a compile failure falls back (see _GATHER_FAILED)
            launch(lut_matmul_kernel)[grid](*args, DECODE=1, **meta)
            return y
        except Exception as err:  # noqa: BLE001 - any compiler error: the tl.load decode always compiles
            _GATHER_FAILED.append(f"{type(err).__name__}: {err}"[:300])
            log.warning("lut_linear: the tl.gather decode failed (%s); using tl.load from now on", _GATHER_FAILED[-1])
            decode = 0
    launch(lut_matmul_kernel)[grid](*args, DECODE=decode, **meta)
    return y


def autotune_lut(
    packed: LUTPacked,
    batch_sizes: tuple[int, ...] = (1,),
    dtype: torch.dtype = torch.float32,
    bias: Tensor | None = None,
    relu: bool = False,
    rep_ms: int = 20,
) -> dict[int, dict[str, Any]]:
    """Time :func:`lut_candidates` of one layer per batch size (CUDA graphs, L2 flushed); record the fastest.

    A candidate is kept only if its output matches the PyTorch reference (relative error <= 1e-2 for 16-bit
    activations, 1e-4 for fp32), so a decode variant that miscompiles on some GPU can never be recorded.
    Returns ``{batch: config}`` with the median time under ``"us"``.

    Raises:
        RuntimeError: if the layer is not on a CUDA device (the interpreter aside) or Triton is missing.
    """
    if not HAS_TRITON or (packed.codes.device.type != "cuda" and not interpret_mode()):
        raise RuntimeError("autotune_lut needs Triton and a packed layer on a CUDA device (or the interpreter)")
    p = packed
    def record(batch: int, cfg: dict[str, Any]) -> None:
        LUT_TUNED[lut_tune_key(batch, p, dtype)] = {k: cfg[k] for k in _KEYS}

    return autotune_batches(
        p,
        batch_sizes,
        dtype,
        lambda x, cfg: lut_linear_triton(x, p, bias, relu, config=cfg),
        lambda batch: lut_candidates(batch, p),
        record,
        rep_ms,
        reference_check(lut_linear_reference, p, bias, relu, dtype),
    )


# --------------------------------------------------------------------------------------------------------------
# torch.library registration: works under torch.compile and inside CUDA graphs
# --------------------------------------------------------------------------------------------------------------


def _lut_linear_impl(
    x: Tensor,
    codes: Tensor,
    mask: Tensor | None,
    codebook: Tensor,
    bias: Tensor | None,
    out_features: int,
    in_features: int,
    cbits: int,
    relu: bool,
) -> Tensor:
    p = LUTPacked(codes, mask, codebook, int(out_features), int(in_features), int(cbits))
    return run_op(x, p, bias, relu, lut_linear_triton, lut_linear_reference)


def _lut_linear_fake(x, codes, mask, codebook, bias, out_features, in_features, cbits, relu):
    return fake_op(x, LUTPacked(codes, mask, codebook, out_features, in_features, cbits), bias)


_lut_linear_op = register_op("dc_lightning::lut_linear", _lut_linear_impl, _lut_linear_fake)


def lut_linear(x: Tensor, packed: LUTPacked, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """``act(x @ W.T + bias)`` through ``torch.ops.dc_lightning.lut_linear`` (Triton on CUDA, PyTorch on CPU).

    Example::

        >>> from dc_lightning.kernels.lut.layout import pack_lut
        >>> rows, cols, codes = torch.tensor([0, 1]), torch.tensor([2, 0]), torch.tensor([1, 0])
        >>> p = pack_lut(2, 3, rows, cols, codes, torch.tensor([-1.0, 2.0]))
        >>> lut_linear(torch.ones(1, 3), p)
        tensor([[ 2., -1.]])
    """
    return torch.ops.dc_lightning.lut_linear(*packed.op_args(x, bias, relu))
