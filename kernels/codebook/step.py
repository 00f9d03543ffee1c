"""Fused codebook step of trained quantization [DC §3.3, eq. 3] for many layers at once: two passes, three launches.

During fine-tuning the assignments are fixed, so everything that depends only on them is computed once per
clustering (or mask change) into a :class:`CodebookPlan`:

* the member positions of every layer sorted by cluster (``order``, int32, stable), and a work list of *chunks*:
  runs of at most ``chunk`` consecutive entries of ``order`` that never straddle a cluster;
* a work list of fixed-size blocks over the flat weights of all layers, for the rewrite.

A step is then

1. ``_partial_kernel`` (one program per chunk): gathers the chunk's gradients through ``order`` and sums them in
   float64 lanes, reduced by ``tl.sum`` into one float64 partial per chunk;
2. ``_segment_kernel`` (one program per cluster of every layer): sums that cluster's partials in chunk order and
   writes the float32 codebook gradient, ∂L/∂C_k = Σ_ij ∂L/∂W_ij · 1(I_ij = k) [DC eq. 3];
3. (the codebook optimizer steps, outside this file);
4. ``_rewrite_kernel`` (one program per block): ``w = where(mask, codebook[assign], 0)`` for every layer.

No atomics and a reduction order that depends only on the plan and the launch constants, so the result is
bitwise reproducible and identical on every DDP rank (their gradients are identical after the all-reduce). The
float64 accumulation keeps it within float64 rounding of the exact sum, i.e. equal to the float64 reference after
rounding to float32 up to ties at the last bit. That reference is the one of the package,
:func:`dc_lightning.quantization.codebooks.codebook_grad` (and ``decode_weight`` for the rewrite): the CPU path of
``quantization.CodebookStep`` and the oracle of ``tests/kernels/test_codebook_step.py``; this file defines none.

Layers are addressed through int64 pointer tables (as in Triton's grouped-GEMM tutorial), so one launch covers all
layers of a dtype: the plan groups layers by weight dtype. Traffic per step: the members' gradients plus their
int32 positions, then 2 bytes read (codes, mask) and one weight written per weight.

Public API: :func:`build_plan`, :class:`CodebookPlan`, :func:`codebook_grads_triton`, :func:`rewrite_triton`,
:func:`triton_usable`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dc_lightning.buffers import MAX_CODES

from ..runtime import (  # Triton is optional: without it CodebookStep runs the float64 reference
    HAS_TRITON,
    interpret_mode,
    tl,
    triton,
)

__all__ = [
    "CodebookPlan",
    "build_plan",
    "codebook_grads_triton",
    "rewrite_triton",
    "triton_usable",
]

CHUNK = 4096  # gradients summed per program of the first pass
BLOCK = 1024  # float64 lanes of a program of the first pass
REWRITE_BLOCK = 4096  # weights rewritten per program
_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_usable(device: torch.device) -> bool:
    """True when the Triton kernels can run on ``device``: CUDA, or the CPU under ``TRITON_INTERPRET=1``."""
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpret_mode())


@dataclass
class CodebookPlan:
    """Everything of a group of quantized layers that stays fixed while their assignments and masks do.

    Shapes: ``L`` layers, ``G = Σ k_l`` clusters, ``M`` members, ``C`` chunks, ``B`` rewrite blocks. Pointer tables
    hold raw addresses, so the plan keeps references to the tensors it points to (``weights``, ``assigns``,
    ``masks``) and is only valid while those tensors are the layers' buffers with unchanged contents (the caller
    checks: ``quantization.CodebookStep.stale``).
    """

    device: torch.device
    weight_dtype: torch.dtype
    ks: list[int]
    cb_offsets: list[int]  # [L + 1], cluster j of layer l is global cluster cb_offsets[l] + j
    order: Tensor  # int32 [M], member positions within their layer, sorted by (layer, cluster), stable
    chunk_start: Tensor  # int64 [C], first entry of ``order``
    chunk_len: Tensor  # int32 [C]
    chunk_layer: Tensor  # int32 [C]
    seg_chunks: Tensor  # int32 [G + 1], chunks of global cluster g: seg_chunks[g]:seg_chunks[g + 1]
    numels: Tensor  # int64 [L]
    cb_offset_t: Tensor  # int32 [L]
    blk_layer: Tensor  # int32 [B]
    blk_start: Tensor  # int64 [B], first flat weight of the block within its layer
    weight_ptrs: Tensor  # int64 [L]
    assign_ptrs: Tensor  # int64 [L]
    mask_ptrs: Tensor  # int64 [L], 0 = no mask
    weights: list[Tensor]
    assigns: list[Tensor]
    masks: list[Tensor | None]
    chunk: int
    block: int
    rewrite_block: int
    _grad_key: list[int] = field(default_factory=list)  # addresses of the last gradients, and their table
    _grad_ptrs: Tensor | None = None

    @property
    def total_k(self) -> int:
        return self.cb_offsets[-1]


def _codes(assign: Tensor, mask: Tensor | None, k: int) -> Tensor:
    a = assign.reshape(-1).long()
    if mask is not None:
        a = torch.where(mask.reshape(-1), a, torch.full_like(a, k))  # non-members go to bucket k
    return a


def build_plan(
    weights: Sequence[Tensor],
    assigns: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    ks: Sequence[int],
    chunk: int = CHUNK,
    block: int = BLOCK,
    rewrite_block: int = REWRITE_BLOCK,
) -> CodebookPlan:
    """Precompute the work lists of :func:`codebook_grads_triton` / :func:`rewrite_triton` for these layers.

    Args:
        weights: the layers' weights (one device, one dtype of float32/float16/bfloat16); only their storage is used.
        assigns: uint8 codes, each the shape of its weight.
        masks: bool masks of the weights' shapes, or None for a layer without a mask (every weight a member).
        ks: codebook size of each layer (1..MAX_CODES = 256).
        chunk: gradients per partial sum (a multiple of ``block``).
        block: float64 lanes per program of the first pass (a power of two).
        rewrite_block: weights per program of the rewrite (a power of two).

    Raises:
        ValueError: mismatched lengths, shapes, dtypes or devices (the message names the layer index), a layer with
            2**31 or more weights, or bad chunk/block sizes.
    """
    n = len(weights)
    if not (len(assigns) == len(masks) == len(ks) == n) or n == 0:
        raise ValueError(
            f"build_plan: need one assign, mask (or None) and k per weight and at least one layer, got {n} weights, "
            f"{len(assigns)} assigns, {len(masks)} masks, {len(ks)} ks"
        )
    if block < 1 or block & (block - 1) or chunk < block or chunk % block:
        raise ValueError(f"build_plan: block must be a power of two and chunk a multiple of it, got {block}, {chunk}")
    if rewrite_block < 1 or rewrite_block & (rewrite_block - 1):
        raise ValueError(f"build_plan: rewrite_block must be a power of two, got {rewrite_block}")
    device, dtype = weights[0].device, weights[0].dtype
    if dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"build_plan: weight dtype must be one of {_WEIGHT_DTYPES}, got {dtype}")
    for i, (w, a, m, k) in enumerate(zip(weights, assigns, masks, ks, strict=True)):
        if w.device != device or w.dtype != dtype:
            raise ValueError(f"build_plan: layer {i}: weight on {w.device}/{w.dtype}, layer 0 on {device}/{dtype}")
        if not w.is_contiguous() or w.numel() >= 2**31:
            raise ValueError(f"build_plan: layer {i}: the weight must be contiguous with < 2**31 entries")
        if a.dtype != torch.uint8 or a.shape != w.shape or a.device != device or not a.is_contiguous():
            raise ValueError(f"build_plan: layer {i}: assign must be contiguous uint8 of shape {tuple(w.shape)}")
        if m is not None and (m.dtype != torch.bool or m.shape != w.shape or m.device != device or
                              not m.is_contiguous()):  # fmt: skip
            raise ValueError(f"build_plan: layer {i}: mask must be a contiguous bool tensor of shape {tuple(w.shape)}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_CODES:
            raise ValueError(f"build_plan: layer {i}: k must be an int in 1..{MAX_CODES}, got {k!r}")

    orders, counts = [], []
    for a, m, k in zip(assigns, masks, ks, strict=True):
        code = _codes(a, m, k)
        cnt = torch.bincount(code, minlength=k + 1)[:k]
        members = int(cnt.sum())
        orders.append(torch.argsort(code, stable=True)[:members].to(torch.int32))
        counts.append(cnt)
    order = torch.cat(orders)
    count = torch.cat(counts)  # [G]
    g = count.numel()
    seg_start = torch.cumsum(count, 0) - count  # first entry of ``order`` of each global cluster
    nch = (count + chunk - 1) // chunk
    seg_chunks = torch.cat([count.new_zeros(1), torch.cumsum(nch, 0)])
    n_chunks = int(seg_chunks[-1])
    seg_of_chunk = torch.repeat_interleave(torch.arange(g, device=device), nch)
    chunk_start = seg_start[seg_of_chunk] + (torch.arange(n_chunks, device=device) - seg_chunks[seg_of_chunk]) * chunk
    chunk_len = torch.minimum((seg_start + count)[seg_of_chunk] - chunk_start, torch.full_like(chunk_start, chunk))
    ks_t = torch.tensor(list(ks), device=device)
    layer_of_seg = torch.repeat_interleave(torch.arange(n, device=device), ks_t)
    cb_offsets = [0]
    for k in ks:
        cb_offsets.append(cb_offsets[-1] + int(k))

    numels = torch.tensor([w.numel() for w in weights], dtype=torch.int64, device=device)
    nblk = (numels + rewrite_block - 1) // rewrite_block
    blk_layer = torch.repeat_interleave(torch.arange(n, device=device), nblk)
    first = torch.cumsum(nblk, 0) - nblk
    blk_start = (torch.arange(blk_layer.numel(), device=device) - first[blk_layer]) * rewrite_block

    def table(ts: Sequence[Tensor | None]) -> Tensor:
        return torch.tensor([0 if t is None else t.data_ptr() for t in ts], dtype=torch.int64).to(device)

    return CodebookPlan(
        device=device,
        weight_dtype=dtype,
        ks=[int(k) for k in ks],
        cb_offsets=cb_offsets,
        order=order,
        chunk_start=chunk_start.to(torch.int64),
        chunk_len=chunk_len.to(torch.int32),
        chunk_layer=layer_of_seg[seg_of_chunk].to(torch.int32),
        seg_chunks=seg_chunks.to(torch.int32),
        numels=numels,
        cb_offset_t=torch.tensor(cb_offsets[:-1], dtype=torch.int32, device=device),
        blk_layer=blk_layer.to(torch.int32),
        blk_start=blk_start.to(torch.int64),
        weight_ptrs=table(weights),
        assign_ptrs=table(assigns),
        mask_ptrs=table(masks),
        weights=list(weights),
        assigns=list(assigns),
        masks=list(masks),
        chunk=chunk,
        block=block,
        rewrite_block=rewrite_block,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _partial_kernel(
        grad_ptrs,  # int64 [L], address of each layer's gradient
        order_ptr,  # int32 [M]
        chunk_start_ptr,  # int64 [C]
        chunk_len_ptr,  # int32 [C]
        chunk_layer_ptr,  # int32 [C]
        partial_ptr,  # float64 [C]
        GRAD_DTYPE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0)
        start = tl.load(chunk_start_ptr + c)
        n = tl.load(chunk_len_ptr + c)
        layer = tl.load(chunk_layer_ptr + c)
        g_ptr = tl.load(grad_ptrs + layer).to(tl.pointer_type(GRAD_DTYPE))
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for i in range(0, n, BLOCK):  # n <= chunk, from the plan: the sum order never depends on the values
            inb = i + offs < n
            pos = tl.load(order_ptr + start + i + offs, mask=inb, other=0)
            acc += tl.load(g_ptr + pos, mask=inb, other=0.0).to(tl.float64)
        tl.store(partial_ptr + c, tl.sum(acc, axis=0))

    @triton.jit
    def _segment_kernel(partial_ptr, seg_chunks_ptr, out_ptr, BLOCK: tl.constexpr):
        s = tl.program_id(0)
        lo = tl.load(seg_chunks_ptr + s)
        hi = tl.load(seg_chunks_ptr + s + 1)
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for i in range(lo, hi, BLOCK):
            acc += tl.load(partial_ptr + i + offs, mask=i + offs < hi, other=0.0)
        tl.store(out_ptr + s, tl.sum(acc, axis=0).to(tl.float32))

    @triton.jit
    def _rewrite_kernel(
        weight_ptrs,  # int64 [L]
        assign_ptrs,  # int64 [L]
        mask_ptrs,  # int64 [L], 0 = no mask
        numel_ptr,  # int64 [L]
        cb_offset_ptr,  # int32 [L]
        cb_ptr,  # [G] in the weights' dtype, all codebooks concatenated
        blk_layer_ptr,  # int32 [B]
        blk_start_ptr,  # int64 [B]
        W_DTYPE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        b = tl.program_id(0)
        layer = tl.load(blk_layer_ptr + b)
        offs = tl.load(blk_start_ptr + b) + tl.arange(0, BLOCK)
        inb = offs < tl.load(numel_ptr + layer)
        a_ptr = tl.load(assign_ptrs + layer).to(tl.pointer_type(tl.uint8))
        code = tl.load(a_ptr + offs, mask=inb, other=0).to(tl.int32)
        val = tl.load(cb_ptr + tl.load(cb_offset_ptr + layer) + code, mask=inb, other=0.0)
        m_addr = tl.load(mask_ptrs + layer)
        if m_addr != 0:
            keep = tl.load(m_addr.to(tl.pointer_type(tl.int8)) + offs, mask=inb, other=0)
            val = tl.where(keep != 0, val, tl.zeros_like(val))  # +0.0 exactly where pruned
        w_ptr = tl.load(weight_ptrs + layer).to(tl.pointer_type(W_DTYPE))
        tl.store(w_ptr + offs, val, mask=inb)

    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _check_triton(plan: CodebookPlan) -> None:
    if not triton_usable(plan.device):
        raise RuntimeError(
            f"the codebook-step kernels need Triton and CUDA tensors (or TRITON_INTERPRET=1 on the CPU); the plan's "
            f"tensors are on {plan.device}"
        )


def codebook_grads_triton(plan: CodebookPlan, grads: Sequence[Tensor]) -> Tensor:
    """float32 ``[G]``: every layer's codebook gradient [DC eq. 3] in two launches (see the module docstring).

    Args:
        plan: from :func:`build_plan`.
        grads: ``∂L/∂W`` of each layer, contiguous, the weights' shapes, dtype and device.

    Raises:
        ValueError: a gradient of the wrong shape, dtype or device, or not contiguous (the message names the layer
            index).
        RuntimeError: Triton cannot run on the plan's device.
    """
    _check_triton(plan)
    if len(grads) != len(plan.weights):
        raise ValueError(f"codebook_grads_triton: {len(grads)} gradients for a plan of {len(plan.weights)} layers")
    for i, (gr, w) in enumerate(zip(grads, plan.weights, strict=True)):
        if gr.shape != w.shape or gr.dtype != w.dtype or gr.device != w.device or not gr.is_contiguous():
            raise ValueError(
                f"codebook_grads_triton: gradient {i} is {tuple(gr.shape)}/{gr.dtype}/{gr.device}"
                f"{'' if gr.is_contiguous() else ' non-contiguous'}; need contiguous {tuple(w.shape)}/{w.dtype}/"
                f"{w.device}"
            )
    key = [gr.data_ptr() for gr in grads]
    if key != plan._grad_key:  # the caching allocator usually hands back the same blocks: upload only on change
        table = torch.tensor(key, dtype=torch.int64)
        if plan.device.type == "cuda":  # pinned + non_blocking: a pageable copy would wait for the whole stream
            table = table.pin_memory()
        plan._grad_ptrs = table.to(plan.device, non_blocking=True)
        plan._grad_key = key
    n_chunks = plan.chunk_start.numel()
    partial = torch.empty(n_chunks, dtype=torch.float64, device=plan.device)
    if n_chunks:
        _partial_kernel[(n_chunks,)](
            plan._grad_ptrs,
            plan.order,
            plan.chunk_start,
            plan.chunk_len,
            plan.chunk_layer,
            partial,
            GRAD_DTYPE=_TL_DTYPES[plan.weight_dtype],
            BLOCK=plan.block,
        )
    out = torch.empty(plan.total_k, dtype=torch.float32, device=plan.device)
    _segment_kernel[(plan.total_k,)](partial, plan.seg_chunks, out, BLOCK=64)
    return out


def rewrite_triton(plan: CodebookPlan, codebooks: Sequence[Tensor]) -> None:
    """``weight <- where(mask, codebook[assign], 0)`` for every layer of the plan in one launch.

    Raises:
        ValueError: a codebook whose length is not the plan's ``k`` for its layer.
        RuntimeError: Triton cannot run on the plan's device.
    """
    _check_triton(plan)
    for i, (cb, k) in enumerate(zip(codebooks, plan.ks, strict=True)):
        if cb.numel() != k or cb.device != plan.device:
            raise ValueError(f"rewrite_triton: codebook {i} has {cb.numel()} entries on {cb.device}, need {k}")
    # cast on the host (round to nearest even, as decode_weight's .to(dtype)); the kernel only copies values
    cb_all = torch.cat([cb.reshape(-1) for cb in codebooks]).float().to(plan.weight_dtype)
    n_blocks = plan.blk_layer.numel()
    if n_blocks == 0:
        return
    _rewrite_kernel[(n_blocks,)](
        plan.weight_ptrs,
        plan.assign_ptrs,
        plan.mask_ptrs,
        plan.numels,
        plan.cb_offset_t,
        cb_all,
        plan.blk_layer,
        plan.blk_start,
        W_DTYPE=_TL_DTYPES[plan.weight_dtype],
        BLOCK=plan.rewrite_block,
    )
