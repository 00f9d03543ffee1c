"""EIE-style sparse, weight-shared matrix-vector / matrix-matrix products: ``y = act(W @ x + b)``.

The launcher and the ``torch.library`` op of the EIE sparse layout. The pieces live beside it, one role per file:

* ``layout``: the sliced-ELL layout (:class:`EIEPacked`, :func:`pack`, :func:`unpack`, :func:`decode_dense`)
  and :func:`eie_linear_reference`, the pure-PyTorch product (the tests' oracle and the CPU fallback);
* ``jit``: the ``@triton.jit`` kernels (two-kernel split design and the one-launch flat kernel);
* ``tuning``: :func:`choose_config` (shape heuristics), the autotuning candidates and the tuned table;
* ``..runtime``: what every layout shares (call checks, launch prologue, op plumbing, autotuning loop, split-K
  workspace, timing harness).

Only the registered op ``torch.ops.dc_lightning.eie_linear`` takes the layer as a flat argument list
(:meth:`EIEPacked.op_args`); every Python function takes the :class:`EIEPacked`.

Public API (re-exported here): :func:`pack`, :class:`EIEPacked`, :func:`unpack`, :func:`decode_dense`,
:func:`eie_linear` (the op), :func:`eie_linear_triton` (launcher with tunable config), :func:`eie_linear_reference`,
:func:`choose_config`, :func:`autotune`, :func:`interpret_mode`.
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
    next_pow2,
    register_op,
    run_op,
    start_launch,
    workspace,
)
from .jit import eie_flat_kernel, eie_reduce_kernel, eie_spmm_kernel
from .layout import EIEPacked, eie_linear_reference
from .tuning import MAX_FLAT_CHUNKS, TUNED, candidates, choose_config, tune_key

__all__ = ["autotune", "eie_linear", "eie_linear_triton"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------------------


def eie_linear_triton(
    x: Tensor,
    packed: EIEPacked,
    bias: Tensor | None = None,
    relu: bool = False,
    config: dict[str, Any] | None = None,
    wrap: Any = None,
) -> Tensor:
    """Launch the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

    Args:
        x: ``[B, in_features]`` float32/float16/bfloat16, contiguous.
        packed: the layer (:func:`pack`), on ``x``'s device.
        bias: optional ``[out_features]``.
        relu: apply ReLU in the epilogue.
        config: overrides of :func:`choose_config`.
        wrap: ``torch.library.wrap_triton`` when called inside the registered ``triton_op``.

    Returns:
        ``[B, out_features]`` in ``x.dtype``.

    Raises:
        RuntimeError: if Triton is missing or the tensors are on the CPU without the interpreter.
        ValueError, TypeError: on bad arguments (see ``runtime.check_call`` and :meth:`EIEPacked.check`).
    """
    launch, y = start_launch(x, packed, bias, wrap, "eie_linear")
    entries, block_ptr, codebook = packed.entries, packed.block_ptr, packed.codebook
    out_features, in_features, row_tile, chunk = packed.out_features, packed.in_features, packed.row_tile, packed.chunk
    code_shift = packed.code_shift
    B = x.shape[0]
    n_tiles = -(-out_features // row_tile)
    n_chunks = -(-in_features // chunk)
    if B == 0:
        return y
    key = tune_key(B, out_features, in_features, row_tile, chunk, entries.numel(), x.dtype)
    cfg = choose_config(B, out_features, n_chunks, row_tile, config, n_entries=entries.numel(), tuned_key=key)
    bb, bk, cpp = int(cfg["block_b"]), int(cfg["block_k"]), int(cfg["chunks_per_prog"])
    n_groups = -(-n_chunks // cpp)
    n_bgroups = -(-B // bb)
    if cfg["transpose_x"] and B > 1:
        xs = x.t().contiguous()  # [K, B]: the batch values of one column are adjacent for the gather
        stride_xb, stride_xk = 1, B
    else:
        xs = x
        stride_xb, stride_xk = in_features, 1
    has_bias = bias is not None
    if cfg["kernel"] == "flat" and n_chunks + 1 <= MAX_FLAT_CHUNKS and not cfg["skip_zero_chunks"]:
        split = max(1, int(cfg.get("split", 1)))
        ws = None
        if split > 1 and can_use_workspace(x):
            ws = workspace(x.device, B * out_features, n_tiles * n_bgroups)
        if ws is None:
            split = 1
            ws = (codebook, block_ptr)  # never touched when SPLIT == 1
        launch(eie_flat_kernel)[(n_tiles, split, n_bgroups)](
            xs,
            entries,
            block_ptr,
            codebook,
            bias if has_bias else codebook,
            y,
            ws[0],
            ws[1],
            B,
            out_features,
            n_chunks,
            chunk,
            stride_xb,
            stride_xk,
            ROW_TILE=row_tile,
            CODE_SHIFT=code_shift,
            ENTRY16=entries.dtype == torch.int16,
            BLOCK_K=bk,
            BLOCK_B=bb,
            MAXC=next_pow2(n_chunks + 1),
            SPLIT=split,
            HAS_BIAS=has_bias,
            RELU=bool(relu),
            num_warps=int(cfg["num_warps"]),
        )
        return y
    fused = n_groups == 1
    bias_arg = bias if has_bias else codebook  # any valid pointer; never read when HAS_BIAS is False
    if fused:
        out, stride_og, stride_ob = y, 0, out_features
    else:
        out = torch.empty((n_groups, B, out_features), dtype=torch.float32, device=x.device)
        stride_og, stride_ob = B * out_features, out_features
    launch(eie_spmm_kernel)[(n_tiles, n_groups, n_bgroups)](
        xs,
        entries,
        block_ptr,
        codebook,
        bias_arg,
        out,
        B,
        out_features,
        in_features,
        n_chunks,
        chunk,
        cpp,
        stride_xb,
        stride_xk,
        stride_og,
        stride_ob,
        ROW_TILE=row_tile,
        CODE_SHIFT=code_shift,
        ENTRY16=entries.dtype == torch.int16,
        BLOCK_K=bk,
        BLOCK_B=bb,
        FUSED=fused,
        HAS_BIAS=has_bias,
        RELU=bool(relu),
        SKIP_ZERO=bool(cfg["skip_zero_chunks"]),
        SKIP_BLOCK=min(chunk, 256),
        num_warps=int(cfg["num_warps"]),
    )
    if not fused:
        block_n = 256
        launch(eie_reduce_kernel)[(-(-out_features // block_n), B)](
            out,
            bias_arg,
            y,
            n_groups,
            out_features,
            stride_og,
            stride_ob,
            out_features,
            HAS_BIAS=has_bias,
            RELU=bool(relu),
            BLOCK_N=block_n,
            BLOCK_G=min(next_pow2(n_groups), 8),
            num_warps=4,
        )
    return y


def autotune(
    packed: EIEPacked,
    batch_sizes: tuple[int, ...] = (1,),
    dtype: torch.dtype = torch.float32,
    bias: Tensor | None = None,
    relu: bool = False,
    rep_ms: int = 20,
) -> dict[int, dict[str, Any]]:
    """Time candidate launch configurations of one packed layer (CUDA graphs, L2 flushed) and record the fastest.

    Done once at load time, like a GEMM library's heuristics table; the choice is keyed by shapes and dtype only,
    so later calls (eager, ``torch.compile`` or CUDA-graph capture) just look it up. Returns ``{batch: config}``
    (each with its median time under ``"us"``).

    Raises:
        RuntimeError: if the layer is not on a CUDA device or Triton is missing.
    """
    if not HAS_TRITON or packed.entries.device.type != "cuda":
        raise RuntimeError("autotune needs Triton and a packed layer on a CUDA device")
    p = packed

    def record(batch: int, cfg: dict[str, Any]) -> None:
        TUNED[tune_key(batch, p.out_features, p.in_features, p.row_tile, p.chunk, p.entries.numel(), dtype)] = dict(cfg)

    return autotune_batches(
        p,
        batch_sizes,
        dtype,
        lambda x, cfg: eie_linear_triton(x, p, bias, relu, config=cfg),
        lambda batch: candidates(batch, p.n_chunks, p.row_tile),
        record,
        rep_ms,
    )


# --------------------------------------------------------------------------------------------------------------
# torch.library registration: works under torch.compile and inside CUDA graphs
# --------------------------------------------------------------------------------------------------------------


def _eie_linear_impl(
    x: Tensor,
    entries: Tensor,
    block_ptr: Tensor,
    codebook: Tensor,
    bias: Tensor | None,
    out_features: int,
    in_features: int,
    row_tile: int,
    chunk: int,
    code_shift: int,
    relu: bool,
) -> Tensor:
    p = EIEPacked.from_op_args(entries, block_ptr, codebook, out_features, in_features, row_tile, chunk, code_shift)
    return run_op(x, p, bias, relu, eie_linear_triton, eie_linear_reference)


def _eie_linear_fake(
    x, entries, block_ptr, codebook, bias, out_features, in_features, row_tile, chunk, code_shift, relu
):  # fmt: skip
    p = EIEPacked.from_op_args(entries, block_ptr, codebook, out_features, in_features, row_tile, chunk, code_shift)
    return fake_op(x, p, bias)


_eie_linear_op = register_op("dc_lightning::eie_linear", _eie_linear_impl, _eie_linear_fake)


def eie_linear(x: Tensor, packed: EIEPacked, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """``act(x @ W.T + bias)`` through ``torch.ops.dc_lightning.eie_linear`` (Triton on CUDA, PyTorch on CPU).

    Example::

        >>> p = pack(4, 8, torch.tensor([0, 3]), torch.tensor([1, 7]), torch.tensor([1, 0]), torch.tensor([2., -1.]))
        >>> eie_linear(torch.ones(1, 8), p)
        tensor([[-1.,  0.,  0.,  2.]])
    """
    return torch.ops.dc_lightning.eie_linear(*packed.op_args(x, bias, relu))
