"""What every kernel family of ``dc_lightning.kernels`` shares: the optional Triton import, the interpreter switch,
the codebook limit, the base of the packed layouts, the argument checks, the launch prologue, the op plumbing and
the PyTorch reference product common to every layout, the per-device split-K workspace and its ``@triton.jit``
epilogue, and the CUDA-graph timing harness of the autotuners.

A family folder (``sparse/``, ``lut/``, ``rows/``) owns its layout's data (``layout.py``: a :class:`PackedLayer`
dataclass, packing, decode), its ``@triton.jit`` code (``jit.py``) and its launcher + ``torch.library`` op
(``op.py``); ``layouts.py`` lists them in one registry. This module has no layout knowledge.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dc_lightning.buffers import MAX_CODES

try:  # Triton is optional: without it (macOS, Windows, minimal CI) only the reference paths run.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "ACT_DTYPES",
    "PackedLayer",
    "triton",
    "tl",
    "interpret_mode",
    "next_pow2",
    "can_use_workspace",
    "workspace",
    "use_triton",
    "triton_wrapper",
    "launcher",
    "time_candidates",
    "register_op",
    "run_op",
    "fake_op",
    "start_launch",
    "autotune_batches",
    "reference_check",
    "sorted_coordinates",
    "check_activation",
    "check_bias_and_devices",
    "check_call",
    "decoded_linear",
    "blocked_product",
    "finish_linear",
    "ROW_BLOCK_BYTES",
]

log = logging.getLogger(__name__)

ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: most centroids a codebook may hold, in every layout: codes are bytes (``weight_assign`` is uint8), an 8-bit
#: container is the LUT layout's widest and the sparse entry's code field is sized for it


class PackedLayer(ABC):
    """What the packed form of every layout shares; each layout's is a ``@dataclass`` deriving from this class.

    Its fields are its tensors (``None`` for an absent optional one), its integers, and ``out_features``,
    ``in_features`` (the shape of ``W``) and ``nnz`` (kept weights, -1 when unknown).
    """

    out_features: int
    in_features: int
    nnz: int

    @abstractmethod
    def check(self) -> None:
        """Validate the layout's own tensors and integers for a call (shapes, dtypes, contiguity; no data reads).

        Raises:
            ValueError: naming the field, the bad value and what is valid.
        """

    def tensors(self) -> dict[str, Tensor]:
        """The layer's tensors by field name, in field order (absent optional ones left out)."""
        found = ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        return {name: t for name, t in found if isinstance(t, Tensor)}

    @property
    def nbytes(self) -> int:
        """Bytes of the layer's tensors (what a kernel reads for the weights)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> Any:
        """A copy with every tensor on ``device``."""
        return dataclasses.replace(self, **{k: t.to(device) for k, t in self.tensors().items()})


def interpret_mode() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1`` set before ``import triton``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(v: int) -> int:
    """Smallest power of two >= ``v`` (1 for ``v <= 1``)."""
    return 1 << max(0, (int(v) - 1).bit_length())


def use_triton(x: Tensor) -> bool:
    """Whether an op implementation should launch Triton for ``x`` (CUDA, or CPU under the interpreter)."""
    return HAS_TRITON and (x.device.type == "cuda" or (interpret_mode() and x.device.type == "cpu"))


def launcher(x: Tensor, wrap: Any, op: str) -> Callable[[Any], Any]:
    """``kernel -> launchable`` for a launcher called with ``x`` (``wrap``: ``wrap_triton`` inside a triton_op).

    Raises:
        RuntimeError: if Triton is missing, or ``x`` is on the CPU without the interpreter.
    """
    if not HAS_TRITON:
        raise RuntimeError(f"triton is not installed; use {op}_reference or the {op} op")
    if x.device.type != "cuda" and not interpret_mode():
        raise RuntimeError(f"the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1), got x on {x.device}")
    return wrap if wrap is not None else (lambda k: k)


def triton_wrapper() -> Any:
    """``torch.library.wrap_triton`` for launches inside a ``triton_op`` (``None`` under the interpreter)."""
    if interpret_mode():
        return None
    from torch.library import wrap_triton

    return wrap_triton


# --------------------------------------------------------------------------------------------------------------
# Split-K workspace: fp32 partial sums and int32 arrival counters, zero between calls
# --------------------------------------------------------------------------------------------------------------

# Per device. The last program of every output tile re-zeroes its part, so no memset is launched. Calls on ONE
# stream are safe (each call finishes before the next starts); concurrent calls on several streams are not, so the
# launchers fall back to split=1 when they cannot use the shared buffers.
_WS: dict[str, tuple[Tensor, Tensor]] = {}


def can_use_workspace(x: Tensor) -> bool:
    """False while tracing (dynamo, or inductor lowering a triton_op with fake/functional tensors).

    The shared workspace is a real tensor outside the traced program; handing it to a traced kernel fails
    (measured on the H200: inductor raised "Please convert all Tensors to FakeTensors"), so traced calls use
    ``split=1``, which needs no workspace.
    """
    if type(x) is not torch.Tensor:  # FakeTensor, FunctionalTensor, other tracing subclasses
        return False
    if getattr(torch.compiler, "is_compiling", lambda: False)():
        return False
    from torch._guards import detect_fake_mode

    return detect_fake_mode((x,)) is None


def workspace(device: torch.device, n_ws: int, n_cnt: int) -> tuple[Tensor, Tensor] | None:
    """The zeroed ``(fp32 [>= n_ws], int32 [>= n_cnt])`` buffers of ``device``; ``None`` if they would have to be
    allocated during CUDA-graph capture (the buffer would then live in the graph's private pool)."""
    key = str(device)
    ws = _WS.get(key)
    if ws is not None and ws[0].numel() >= n_ws and ws[1].numel() >= n_cnt:
        return ws
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    old_ws, old_cnt = ws if ws is not None else (None, None)
    n_ws = max(n_ws, 0 if old_ws is None else old_ws.numel(), 1 << 16)
    n_cnt = max(n_cnt, 0 if old_cnt is None else old_cnt.numel(), 1 << 12)
    ws = (torch.zeros(n_ws, dtype=torch.float32, device=device), torch.zeros(n_cnt, dtype=torch.int32, device=device))
    _WS[key] = ws
    return ws


# --------------------------------------------------------------------------------------------------------------
# Autotuning harness (CUDA only)
# --------------------------------------------------------------------------------------------------------------


def time_candidates(
    run: Callable[[dict[str, Any]], Tensor],
    candidates: Iterable[dict[str, Any]],
    rep_ms: int = 20,
    check: Callable[[Tensor], bool] | None = None,
) -> list[tuple[float, dict[str, Any]]]:
    """Median µs of ``run(cfg)`` for every candidate, each captured in a CUDA graph (``do_bench`` flushes L2).

    Under the interpreter (CPU) one wall-clock run instead: that times nothing useful but exercises the tuning
    flow in CI. A candidate that fails to compile or launch, or whose output ``check`` rejects, is skipped (logged
    at DEBUG). Returns ``[(us, cfg), ...]`` in candidate order.
    """
    results = []
    for cfg in candidates:
        try:
            y = run(cfg)  # compile outside the capture
            if check is not None and not check(y):
                log.debug("autotune: candidate %s gave a wrong result; skipped", cfg)
                continue
            if interpret_mode():
                t = time.perf_counter()
                run(cfg)
                results.append(((time.perf_counter() - t) * 1e6, cfg))
                continue
            from triton.testing import do_bench

            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run(cfg)
            results.append((float(do_bench(g.replay, warmup=5, rep=rep_ms, return_mode="median")) * 1e3, cfg))
        except Exception as err:  # noqa: BLE001 - a candidate that fails to compile or launch is skipped
            log.debug("autotune: candidate %s failed: %s", cfg, err)
    return results


# --------------------------------------------------------------------------------------------------------------
# torch.library registration and argument checks shared by every layout
# --------------------------------------------------------------------------------------------------------------


def register_op(name: str, impl: Callable[..., Tensor], fake: Callable[..., Tensor]) -> Any:
    """Register ``impl`` as the ``torch.library`` op ``name`` (no mutated arguments).

    With Triton on a GPU build it is a ``triton_op`` (inductor sees the kernels it launches through
    ``wrap_triton``); under the interpreter or without Triton a ``custom_op`` whose ``fake`` gives the output's
    shape and dtype. A module reloaded in the same process gets ``None`` and keeps the registered op.
    """
    try:
        if getattr(torch.library, "triton_op", None) is not None and HAS_TRITON and not interpret_mode():
            return torch.library.triton_op(name, mutates_args=())(impl)
        op = torch.library.custom_op(name, mutates_args=())(impl)
        op.register_fake(fake)
        return op
    except RuntimeError as err:  # pragma: no cover - module reloaded in the same process
        if "already" not in str(err):
            raise
        return None


def run_op(
    x: Tensor,
    packed: PackedLayer,
    bias: Tensor | None,
    relu: bool,
    triton_fn: Callable[..., Tensor],
    reference_fn: Callable[..., Tensor],
) -> Tensor:
    """The body of a layout's registered op: check the call, then the Triton launcher (with ``wrap_triton`` inside
    a ``triton_op``) where :func:`use_triton` says so, else the layout's PyTorch reference."""
    check_call(x, packed, bias)
    if use_triton(x):
        return triton_fn(x, packed, bias, relu, wrap=triton_wrapper())
    return reference_fn(x, packed, bias, relu)


def fake_op(x: Tensor, packed: PackedLayer, bias: Tensor | None) -> Tensor:
    """The fake (meta) implementation of a layout's op: the same checks, an empty ``[batch, out_features]``."""
    check_call(x, packed, bias)
    return x.new_empty((x.shape[0], packed.out_features))


def start_launch(
    x: Tensor, packed: PackedLayer, bias: Tensor | None, wrap: Any, op: str
) -> tuple[Callable[[Any], Any], Tensor]:
    """What every Triton launcher does first: check the call, get the ``kernel -> launchable`` wrapper
    (:func:`launcher`) and allocate the output ``y`` (``[batch, out_features]`` in ``x.dtype``).

    Raises:
        RuntimeError, ValueError, TypeError: as :func:`launcher` and :func:`check_call`.
    """
    check_call(x, packed, bias)
    launch = launcher(x, wrap, op)
    return launch, torch.empty((x.shape[0], packed.out_features), dtype=x.dtype, device=x.device)


def reference_check(
    reference: Callable[..., Tensor], packed: PackedLayer, bias: Tensor | None, relu: bool, dtype: torch.dtype
) -> Callable[[Tensor], Callable[[Tensor], bool]]:
    """The output check of :func:`autotune_batches` for a layout: ``check(x)`` gives ``ok(y)``, true when ``y`` is
    finite and within a relative L2 error of 1e-2 (16-bit activations; 1e-4 for fp32) of the layout's PyTorch
    ``reference``, so a configuration that miscompiles on some GPU is never recorded."""
    tol = 1e-4 if dtype == torch.float32 else 1e-2

    def check(x: Tensor) -> Callable[[Tensor], bool]:
        ref = reference(x, packed, bias, relu).float()
        scale = float(ref.norm()) or 1.0
        return lambda y: bool(torch.isfinite(y).all()) and float((y.float() - ref).norm()) <= tol * scale

    return check


def autotune_batches(
    packed: PackedLayer,
    batch_sizes: Iterable[int],
    dtype: torch.dtype,
    run: Callable[[Tensor, dict[str, Any]], Tensor],
    candidates: Callable[[int], Iterable[dict[str, Any]]],
    record: Callable[[int, dict[str, Any]], None],
    rep_ms: int = 20,
    check: Callable[[Tensor], Callable[[Tensor], bool]] | None = None,
) -> dict[int, dict[str, Any]]:
    """The autotuning loop every layout shares: per batch size, a ReLU'd random ``x`` on the layer's device, the
    median time of ``run(x, cfg)`` for every ``candidates(batch)`` (:func:`time_candidates`; ``check(x)``, when
    given, builds the output check of that ``x``), and ``record(batch, fastest_cfg)``.

    Returns ``{batch: fastest config with its median time under "us"}`` (a batch whose candidates all failed is
    left out).
    """
    device = next(iter(packed.tensors().values())).device
    best = {}
    for batch in batch_sizes:
        x = torch.randn(batch, packed.in_features, device=device).relu_().to(dtype)
        results = time_candidates(
            lambda cfg, x=x: run(x, cfg), candidates(batch), rep_ms, check=None if check is None else check(x)
        )
        if not results:
            continue
        us, cfg = min(results, key=lambda r: r[0])
        record(batch, cfg)
        best[batch] = {**cfg, "us": us}
    return best


def sorted_coordinates(
    out_features: int, in_features: int, rows: Tensor, cols: Tensor, codes: Tensor, codebook: Tensor
) -> tuple[int, int, Tensor, Tensor, Tensor, Tensor]:
    """Validate the coordinates and codes of a layer's kept weights before a layout packs them, and sort them.

    Returns ``(out_features, in_features, rows, cols, codes, codebook)``: ints, three 1-D int64 tensors in row-major
    order (by row, then column), the 1-D float codebook (each on the device it came on).

    Raises:
        ValueError: on an empty shape, a codebook that is not 1-D float with ``1..MAX_CODES`` centroids,
            coordinate tensors of different sizes, a row, column or code out of range, or duplicate
            ``(row, col)`` pairs.
    """
    if int(out_features) < 1 or int(in_features) < 1:
        raise ValueError(f"out_features and in_features must be >= 1, got {out_features} and {in_features}")
    codebook = torch.as_tensor(codebook)
    if codebook.dim() != 1 or not 1 <= codebook.numel() <= MAX_CODES:
        raise ValueError(f"codebook must be 1-D with 1..{MAX_CODES} centroids, got shape {tuple(codebook.shape)}")
    if not codebook.is_floating_point():
        raise ValueError(f"codebook must be a floating-point tensor, got dtype {codebook.dtype}")
    rows, cols, codes = (torch.as_tensor(t).reshape(-1).to(torch.int64) for t in (rows, cols, codes))
    if not rows.numel() == cols.numel() == codes.numel():
        raise ValueError(
            f"rows, cols and codes must have one value per non-zero, got sizes "
            f"{rows.numel()}, {cols.numel()} and {codes.numel()}"
        )
    if rows.numel():
        limits = (("rows", rows, out_features), ("cols", cols, in_features), ("codes", codes, codebook.numel()))
        for name, t, hi in limits:
            lo_v, hi_v = int(t.min()), int(t.max())
            if lo_v < 0 or hi_v >= hi:
                raise ValueError(f"{name} must lie in [0, {hi}), got values in [{lo_v}, {hi_v}]")
    if rows.numel() > 1:
        key, order = torch.sort(rows * int(in_features) + cols)
        if bool((key[1:] == key[:-1]).any()):
            raise ValueError("duplicate (row, col) pairs: every kept weight must appear once")
        rows, cols, codes = rows[order], cols[order], codes[order]
    return int(out_features), int(in_features), rows, cols, codes, codebook


def check_activation(x: Tensor, in_features: int) -> None:
    """``x`` must be a contiguous 2-D ``[batch, in_features]`` float32/float16/bfloat16 tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [batch, in_features], got shape {tuple(x.shape)}")
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"x dtype must be one of float32, float16, bfloat16, got {x.dtype}")
    if x.shape[1] != in_features:
        raise ValueError(f"x.shape[1] must equal in_features={in_features}, got x of shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(
            f"x must be contiguous, got strides {x.stride()} for shape {tuple(x.shape)}; call x.contiguous() first"
        )


def check_bias_and_devices(x: Tensor, bias: Tensor | None, out_features: int, tensors: dict[str, Tensor]) -> None:
    """``bias`` is ``None`` or a floating-point ``[out_features]``; ``bias`` and ``tensors`` are on ``x``'s device."""
    if bias is not None and (bias.dim() != 1 or bias.numel() != out_features or not bias.is_floating_point()):
        raise ValueError(
            f"bias must be a floating-point [out_features]=[{out_features}] tensor, got "
            f"{bias.dtype} shape {tuple(bias.shape)}"
        )
    if bias is not None:
        tensors = {**tensors, "bias": bias}
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move the layer to x's device")


def check_call(x: Tensor, packed: PackedLayer, bias: Tensor | None = None) -> None:
    """Validate a product ``act(x @ W.T + bias)`` of any layout: ``x`` (:func:`check_activation`), the layer's own
    tensors (``packed.check()``), ``bias`` and devices (:func:`check_bias_and_devices`). No data reads: no host sync.

    Raises:
        TypeError: if ``x`` is not a tensor or not float32/float16/bfloat16.
        ValueError: on any other mismatch, naming the field, the bad value and what is valid.
    """
    check_activation(x, packed.in_features)
    packed.check()
    check_bias_and_devices(x, bias, packed.out_features, packed.tensors())


def decoded_linear(x: Tensor, w: Tensor, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """The reference product of every layout (the tests' oracle and the CPU fallback of the ops): ``act(x @ w.T +
    bias)`` by ``F.linear`` on the decoded dense weight ``w``, fp32 accumulation, output in ``x.dtype``."""
    y = F.linear(x.to(torch.float32), w.to(torch.float32), None if bias is None else bias.to(torch.float32))
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype)


def finish_linear(y: Tensor, bias: Tensor | None, relu: bool, dtype: torch.dtype) -> Tensor:
    """The epilogue of the CPU products that multiply without ``F.linear``'s bias (:func:`blocked_product`, the
    layouts' own products): ``act(y + bias)`` in ``dtype``, contiguous."""
    if bias is not None:
        y = y + bias.to(torch.float32)
    if relu:
        y = torch.relu(y)
    return y.to(dtype).contiguous()


#: decoded bytes per block of :func:`blocked_product` (the fastest of 0.5, 1 and 2 MiB for a ``tc`` layer on the 2-core
#: dev box, 1 thread: bench/RESULTS.md "CPU path vs dense, third run")
ROW_BLOCK_BYTES = 1 << 20


def blocked_product(x: Tensor, rows: int, width: int, decode: Callable[[int, int, Tensor], None]) -> Tensor:
    """``x @ W.T``, fp32 ``[B, rows]``, for a weight decoded a block of rows at a time (the CPU references with the
    native decode, :mod:`~dc_lightning.kernels.native`): ``decode(row0, n, out)`` writes rows ``[row0, row0 + n)``
    of ``W`` (``width`` columns each, the layout's padded width) into the float32 ``out``; each block
    (``ROW_BLOCK_BYTES`` decoded) stays in the cache while torch multiplies it. Without autograd one buffer serves every
    block; with it each block keeps its own (the backward reads them).

    Args:
        x: fp32 ``[B, in_features]``, ``in_features <= width`` (padded with zeros to ``width``).
    """
    xp = F.pad(x, (0, width - x.shape[1])) if width != x.shape[1] else x
    step = max(8, ROW_BLOCK_BYTES // (width * 4))
    reuse = not (torch.is_grad_enabled() and x.requires_grad)
    buf = torch.empty(min(step, max(rows, 1)) * width, dtype=torch.float32, device=x.device)
    outs = []
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        if r0 and not reuse:
            buf = torch.empty_like(buf)
        decode(r0, n, buf)
        outs.append(torch.mm(xp, buf[: n * width].view(n, width).t()))
    if not outs:
        return x.new_zeros((x.shape[0], 0), dtype=torch.float32)
    return torch.cat(outs, 1) if len(outs) > 1 else outs[0]


# --------------------------------------------------------------------------------------------------------------
# Split-K epilogue shared by the kernels (Triton device function)
# --------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def splitk_finish(
        res,
        rows,
        yoff,
        omask,
        bias_ptr,
        y_ptr,
        ws_ptr,
        cnt_ptr,
        cidx,
        N,
        SPLIT,
        HAS_BIAS: tl.constexpr,
        RELU: tl.constexpr,
    ):
        """Store one output tile ``res`` ([rows, batch] fp32 partial sums) of a program of a split-K group.

        ``SPLIT`` (programs per tile) may be a constexpr (the branch is then resolved at compile time) or a run-time
        value (both branches compiled; Triton specialises a 1 anyway).

        ``SPLIT == 1``: apply bias/ReLU/cast and store. ``SPLIT > 1``: add the partial into the zeroed workspace
        with relaxed atomics and bump the tile's arrival counter ``cnt_ptr[cidx]``; the last program to arrive
        reads the sum back at the coherence point (an atomic add of 0, not a possibly stale L1 line), re-zeroes the
        workspace and the counter for the next call (visible at the kernel boundary) and applies the epilogue.
        No memset node, no second kernel, CUDA-graph safe.
        """
        if SPLIT > 1:
            tl.atomic_add(ws_ptr + yoff, res, mask=omask, sem="relaxed")
            tl.debug_barrier()  # every thread's partial is issued before the arrival is published (release)
            arrived = tl.atomic_add(cnt_ptr + cidx, 1, sem="acq_rel")
            if arrived == SPLIT - 1:
                res = tl.atomic_add(ws_ptr + yoff, tl.zeros_like(res), mask=omask, sem="relaxed")
                tl.store(ws_ptr + yoff, tl.zeros_like(res), mask=omask)
                tl.store(cnt_ptr + cidx, 0)
                if HAS_BIAS:
                    res += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
                if RELU:
                    res = tl.maximum(res, 0.0)
                tl.store(y_ptr + yoff, res.to(y_ptr.dtype.element_ty), mask=omask)
        else:
            if HAS_BIAS:
                res += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
            if RELU:
                res = tl.maximum(res, 0.0)
            tl.store(y_ptr + yoff, res.to(y_ptr.dtype.element_ty), mask=omask)
