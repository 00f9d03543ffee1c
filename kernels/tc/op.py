"""Launcher, launch configurations and ``torch.library`` op of the tensor-core LUT layout (``layout``).

``torch.ops.dc_lightning.tc_linear`` computes ``act(x @ W.T + b)`` for a :class:`TCPacked` layer: the Triton kernel
``jit.tc_matmul_kernel`` on CUDA (and on the CPU under ``TRITON_INTERPRET=1``), the PyTorch reference elsewhere.
:func:`choose_tc_config` maps shapes (never data) to a configuration, so calls are safe under ``torch.compile`` and
inside CUDA graphs; the register decode's table comes from the layer's host copy (``TCPacked.table``), never from
the device. :func:`autotune_tc` times :func:`tc_candidates` once per layer and batch and records the winner.
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
from .decode import QUARTERS, decode_asm
from .jit import tc_matmul_kernel
from .layout import TCPacked, tc_linear_reference

__all__ = ["TC_TUNED", "tc_tune_key", "choose_tc_config", "tc_candidates", "tc_linear_triton", "autotune_tc",
           "tc_linear", "launch_plan", "operand_layout_ok", "asm_failures"]  # fmt: skip

log = logging.getLogger(__name__)

TC_TUNED: dict[tuple, dict[str, Any]] = {}  # tc_tune_key(...) -> config recorded by autotune_tc
_SMS = 132  # H100/H200 streaming multiprocessors: split-K aims at a few programs per SM
_KEYS = ("block_n", "block_b", "decode", "split", "num_warps", "num_stages")
# Should a Triton build fail to compile the register decode, or compile it without keeping the decode in the
# tensor cores' operand layout (the layout's word order assumes that layout), the first eager launch falls back to
# the codebook load and this flag keeps later defaults there (logged once).
_ASM_FAILED: list[str] = []
_ASM_CHECKED: set[tuple] = set()  # (block_n, block_b, num_warps, num_stages, dtype) whose compiled IR was checked


def asm_failures() -> list[str]:
    """Why the register decode was given up in this process (empty while it runs): a compile error, or a compile
    that did not keep the decode in the operand layout (see :func:`operand_layout_ok`)."""
    return list(_ASM_FAILED)


def operand_layout_ok(kernel: Any) -> bool:
    """Whether a compiled ``tc_matmul_kernel`` (register decode) runs every decode in the dot-operand layout: the
    code words' nibble order (``layout.py``) is that layout's register order, so any other layout would decode the
    wrong positions. Checked once per configuration from the kernel's TTGIR."""
    ir = getattr(kernel, "asm", {}).get("ttgir", "")
    lines = [ln for ln in ir.splitlines() if "elementwise_inline_asm" in ln]
    def in_fragment_order(line: str) -> bool:  # the 16-bit operand's layout: pairs along K, rows r and r + 8
        result = line.split("->")[-1]
        return "#ttg.dot_op<{opIdx = 0" in result and "kWidth = 2" in result

    return len(lines) == QUARTERS and all(in_fragment_order(ln) for ln in lines)


def _batch_bucket(batch: int) -> int:
    return next_pow2(max(1, int(batch)))


def tc_tune_key(batch: int, packed: TCPacked, dtype: torch.dtype) -> tuple:
    return (_batch_bucket(batch), packed.out_features, packed.in_features, str(dtype))


def choose_tc_config(
    batch: int, packed: TCPacked, dtype: torch.dtype, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Launch configuration from shapes only.

    Keys: ``block_n`` (output rows per program, 64 or 128), ``block_b`` (batch rows per program, 16-64: the narrow
    side of the product), ``decode`` (0: register decode, fp16/bf16 on CUDA; 1: codebook load), ``split`` (programs
    per output tile over the K tiles), ``num_warps``, ``num_stages``. A configuration recorded by
    :func:`autotune_tc` for the batch's power-of-two bucket wins over the heuristic; ``overrides`` over both.

    Raises:
        ValueError: on an unknown key or value in ``overrides``.
    """
    block_b = max(16, min(next_pow2(batch), 64))
    # 128-row tiles decode with the fewest instructions per weight (sm_90a SASS, bench.kernels.tc_sass: 4.45 vs 4.81
    # at batch tile 16), on 8 warps at batch tile 64 (4 would spill); 64-row tiles keep small layers' SMs busy
    block_n = 128 if packed.rows_padded >= 2048 else 64
    warps = 8 if block_n == 128 and block_b == 64 else 4
    n_tiles = -(-packed.rows_padded // block_n) * -(-max(batch, 1) // block_b)
    split = int(max(1, min(-(-3 * _SMS // n_tiles), packed.k_tiles, 64)))
    asm = dtype in (torch.float16, torch.bfloat16) and not interpret_mode() and not _ASM_FAILED
    cfg = {"block_n": block_n, "block_b": block_b, "decode": 0 if asm else 1, "split": split, "num_warps": warps,
           "num_stages": 4}  # fmt: skip
    cfg.update(TC_TUNED.get(tc_tune_key(batch, packed, dtype), {}))
    if overrides:
        unknown = set(overrides) - set(cfg)
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; valid keys: {sorted(cfg)}")
        cfg.update(overrides)
    if cfg["block_n"] not in (16, 32, 64, 128):
        raise ValueError(f"block_n must be one of 16, 32, 64, 128, got {cfg['block_n']}")
    if cfg["block_b"] < 16 or cfg["block_b"] != next_pow2(cfg["block_b"]):
        raise ValueError(f"block_b must be a power of two >= 16 (tl.dot's smallest tile), got {cfg['block_b']}")
    if cfg["decode"] == 0 and dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"decode=0 (register decode) makes float16/bfloat16 operands; activations are {dtype}")
    return cfg


def tc_candidates(batch: int, packed: TCPacked, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Configurations :func:`autotune_tc` times for one layer and batch."""
    out = []
    bb = max(16, min(next_pow2(batch), 64))
    decode = choose_tc_config(batch, packed, dtype)["decode"]
    for bn, nw in ((64, 4), (128, 4), (128, 8)):
        if bn == 128 and nw == 4 and bb > 32:
            continue  # 128 x 64 accumulators + four decoded quarters spill on 4 warps (ptxas, sm_90a)
        n_tiles = -(-packed.rows_padded // bn) * -(-max(batch, 1) // bb)
        for per_sm in (1, 2, 4):  # split is a run-time argument: no compile per value
            split = int(max(1, min(-(-per_sm * _SMS // n_tiles), packed.k_tiles, 64)))
            for stages in (3, 4):
                cfg = {"block_n": bn, "block_b": bb, "decode": decode, "split": split, "num_warps": nw,
                       "num_stages": stages}  # fmt: skip
                if cfg not in out:
                    out.append(cfg)
    return out


def tc_linear_triton(
    x: Tensor,
    packed: TCPacked,
    bias: Tensor | None = None,
    relu: bool = False,
    config: dict[str, Any] | None = None,
    wrap: Any = None,
) -> Tensor:
    """Launch :func:`jit.tc_matmul_kernel` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

    Args:
        x: ``[B, in_features]`` float32/float16/bfloat16, contiguous.
        packed: the layer (:func:`layout.pack_tc`), on ``x``'s device.
        bias: optional ``[out_features]``.
        relu: apply ReLU in the epilogue.
        config: overrides of :func:`choose_tc_config`.
        wrap: ``torch.library.wrap_triton`` when called inside the registered ``triton_op``.

    Returns:
        ``[B, out_features]`` in ``x.dtype``.

    Raises:
        RuntimeError: if Triton is missing or the tensors are on the CPU without the interpreter.
        ValueError, TypeError: on bad arguments (see ``runtime.check_call`` and :meth:`TCPacked.check`).
    """
    launch, y = start_launch(x, packed, bias, wrap, "tc_linear")
    if x.shape[0] == 0:
        return y
    grid, args, meta, decode = launch_plan(x, packed, y, bias, relu, config)
    if decode == 0 and type(x) is torch.Tensor:  # eager: check the first compile of each configuration
        key = (meta["BLOCK_N"], meta["BLOCK_B"], meta["num_warps"], meta.get("num_stages"), x.dtype)
        try:
            kernel = launch(tc_matmul_kernel)[grid](*args, DECODE=0, **meta)
            if key in _ASM_CHECKED:
                return y
            if operand_layout_ok(kernel):
                _ASM_CHECKED.add(key)
                return y
            err = f"the decode of configuration {key} is not in the dot-operand layout (TTGIR)"
        except Exception as exc:  # noqa: BLE001 - any compiler error: the codebook load always compiles
            if config and "decode" in config:
                raise
            err = f"{type(exc).__name__}: {exc}"[:300]
        _ASM_FAILED.append(err)
        log.warning("tc_linear: the register decode is unusable here (%s); using codebook loads from now on", err)
        decode = 1
        meta.update({f"ASM{q}": "" for q in range(QUARTERS)})
    launch(tc_matmul_kernel)[grid](*args, DECODE=decode, **meta)
    return y


def launch_plan(
    x: Tensor, packed: TCPacked, y: Tensor, bias: Tensor | None = None, relu: bool = False,
    config: dict[str, Any] | None = None,
) -> tuple[tuple[int, int, int], tuple, dict[str, Any], int]:  # fmt: skip
    """``(grid, args, meta, decode)`` of one launch of :func:`jit.tc_matmul_kernel` writing ``y`` (what
    :func:`tc_linear_triton` launches; ``bench/gpu/tc_ir.py`` compiles it to read the IR)."""
    p = packed
    B, N = x.shape[0], p.out_features
    cfg = choose_tc_config(B, p, x.dtype, config)
    bn, bb = int(cfg["block_n"]), int(cfg["block_b"])
    n_tiles, n_bgroups = -(-p.rows_padded // bn), -(-B // bb)
    per = -(-p.k_tiles // max(1, min(int(cfg["split"]), p.k_tiles)))
    split = -(-p.k_tiles // per)  # no empty programs
    ws = None
    if split > 1 and can_use_workspace(x):
        ws = workspace(x.device, B * N, n_tiles * n_bgroups)
    if ws is None:
        split, per = 1, p.k_tiles
        ws = (p.codebook, p.codes)  # never touched when n_split == 1
    decode = int(cfg["decode"])
    asm_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float16
    table = tuple(p.table)
    meta = dict(
        BLOCK_N=bn,
        BLOCK_B=bb,
        **{f"ASM{q}": decode_asm(table, asm_dtype, q) if decode == 0 else "" for q in range(QUARTERS)},
        HAS_BIAS=bias is not None,
        RELU=bool(relu),
        EVEN_N=p.rows_padded % bn == 0,
        EVEN_K=p.in_features % 256 == 0,
        num_warps=int(cfg["num_warps"]),
    )
    if type(x) is torch.Tensor:  # eager; a traced call (inductor) keeps Triton's default stages
        meta["num_stages"] = int(cfg["num_stages"])
    args = (x, p.codes, p.codebook, bias if bias is not None else p.codebook, y, ws[0], ws[1], B, N, p.in_features,
            p.rows_padded, p.k_tiles, per, split)  # fmt: skip
    grid = (n_tiles, split, n_bgroups)
    return grid, args, meta, decode


def autotune_tc(
    packed: TCPacked,
    batch_sizes: tuple[int, ...] = (1,),
    dtype: torch.dtype = torch.float16,
    bias: Tensor | None = None,
    relu: bool = False,
    rep_ms: int = 20,
) -> dict[int, dict[str, Any]]:
    """Time :func:`tc_candidates` of one layer per batch size (CUDA graphs, L2 flushed); record the fastest.

    A candidate is kept only if its output matches the PyTorch reference (relative error <= 1e-2 for 16-bit
    activations, 1e-4 for fp32). Returns ``{batch: config}`` with the median time under ``"us"``.

    Raises:
        RuntimeError: if the layer is not on a CUDA device (the interpreter aside) or Triton is missing.
    """
    if not HAS_TRITON or (packed.codes.device.type != "cuda" and not interpret_mode()):
        raise RuntimeError("autotune_tc needs Triton and a packed layer on a CUDA device (or the interpreter)")
    p = packed
    def record(batch: int, cfg: dict[str, Any]) -> None:
        TC_TUNED[tc_tune_key(batch, p, dtype)] = {k: cfg[k] for k in _KEYS}

    return autotune_batches(
        p,
        batch_sizes,
        dtype,
        lambda x, cfg: tc_linear_triton(x, p, bias, relu, config=cfg),
        lambda batch: tc_candidates(batch, p, dtype),
        record,
        rep_ms,
        reference_check(tc_linear_reference, p, bias, relu, dtype),
    )


# --------------------------------------------------------------------------------------------------------------
# torch.library registration: works under torch.compile and inside CUDA graphs
# --------------------------------------------------------------------------------------------------------------


def _tc_linear_impl(
    x: Tensor,
    codes: Tensor,
    codebook: Tensor,
    bias: Tensor | None,
    out_features: int,
    in_features: int,
    table: list[float],
    relu: bool,
) -> Tensor:
    p = TCPacked(codes, codebook, tuple(table), int(out_features), int(in_features))
    return run_op(x, p, bias, relu, tc_linear_triton, tc_linear_reference)


def _tc_linear_fake(x, codes, codebook, bias, out_features, in_features, table, relu):
    return fake_op(x, TCPacked(codes, codebook, tuple(table), out_features, in_features), bias)


_tc_linear_op = register_op("dc_lightning::tc_linear", _tc_linear_impl, _tc_linear_fake)


def tc_linear(x: Tensor, packed: TCPacked, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """``act(x @ W.T + bias)`` through ``torch.ops.dc_lightning.tc_linear`` (Triton on CUDA, PyTorch on CPU).

    Example::

        >>> from dc_lightning.kernels.tc.layout import pack_tc
        >>> rows, cols, codes = torch.tensor([0, 1]), torch.tensor([2, 0]), torch.tensor([1, 0])
        >>> p = pack_tc(2, 3, rows, cols, codes, torch.tensor([-1.0, 2.0]))
        >>> tc_linear(torch.ones(1, 3), p)
        tensor([[ 2., -1.]])
    """
    return torch.ops.dc_lightning.tc_linear(*packed.op_args(x, bias, relu))
