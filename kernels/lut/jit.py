"""The ``@triton.jit`` kernel of the dense packed-code layout (``lut_layout``); launched by ``lut_matmul``.

:func:`lut_matmul_kernel`: a program owns ``BLOCK_N`` output rows x ``BLOCK_B`` batch rows and a range of column
groups (split-K: ``n_split`` programs per output tile, combined by ``runtime.splitk_finish``; a run-time
value, so one compiled kernel serves every split). Per group it loads the
``[BLOCK_N, 32]`` code words once and decodes them slice by slice (``PW = 32 // CBITS`` slices of 32 columns):
shift + mask gives the codes, the codebook (held in registers, ``DECODE=1``: ``tl.gather``; ``DECODE=0``: a
``tl.load`` from the 1 KB table, which stays in L1) gives the weights, the bitmap word of the slice zeroes the
pruned ones (with ``DECODE=1`` on the tensor-core path the register codebook is converted to the activation dtype
once, so no weight is converted). Every weight is decoded once per program and reused across the whole batch tile:

* ``USE_DOT``: the ``[BLOCK_N, 32]`` weight slice times the ``[32, BLOCK_B]`` activation slice on tensor cores
  (``tl.dot``, fp32 accumulation; fp16/bf16 operands in the activation dtype, fp32 activations as IEEE fp32);
* otherwise (batch 1-4): CUDA-core FMAs into a ``[BLOCK_N, 32, BLOCK_B]`` fp32 accumulator.
"""

from __future__ import annotations

from ..runtime import HAS_TRITON, tl, triton

__all__ = ["lut_matmul_kernel"]

if HAS_TRITON:
    from ..runtime import splitk_finish

    @triton.jit
    def lut_matmul_kernel(
        x_ptr,
        codes_ptr,
        mask_ptr,
        codebook_ptr,
        bias_ptr,
        y_ptr,
        ws_ptr,
        cnt_ptr,
        B,
        N,
        K,
        n_groups,
        groups_per_split,
        n_split,
        CBITS: tl.constexpr,
        HAS_MASK: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_B: tl.constexpr,
        USE_DOT: tl.constexpr,
        DECODE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        RELU: tl.constexpr,
    ):
        PW: tl.constexpr = 32 // CBITS
        NCB: tl.constexpr = 1 << CBITS
        G: tl.constexpr = 32 * PW
        tile = tl.program_id(0)
        sp = tl.program_id(1)
        bgrp = tl.program_id(2)
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        r_ok = rows < N
        bb = bgrp * BLOCK_B + tl.arange(0, BLOCK_B)
        b_ok = bb < B
        j = tl.arange(0, 32)
        jbit = (1 << j).to(tl.int32)  # bit j of a bitmap word: column j of the slice (bit 31 wraps to INT_MIN)
        n_words = n_groups * 32
        n_mwords = n_groups * PW
        if DECODE == 1:
            cb = tl.load(codebook_ptr + tl.arange(0, NCB))
            if USE_DOT:  # the tensor-core operand dtype: convert 2**CBITS values once, not every weight
                cb = cb.to(x_ptr.dtype.element_ty)
            cb2 = tl.broadcast_to(cb[None, :], (BLOCK_N, NCB))
        if USE_DOT:
            acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
        else:
            acc3 = tl.zeros([BLOCK_N, 32, BLOCK_B], dtype=tl.float32)
        g_lo = sp * groups_per_split
        g_hi = tl.minimum(n_groups, g_lo + groups_per_split)
        for g in range(g_lo, g_hi):
            words = tl.load(codes_ptr + rows[:, None] * n_words + g * 32 + j[None, :], mask=r_ok[:, None], other=0)
            for s in tl.static_range(PW):
                code = (words >> (s * CBITS)) & (NCB - 1)
                if DECODE == 1:
                    w = tl.gather(cb2, code, 1)
                else:
                    w = tl.load(codebook_ptr + code)
                if HAS_MASK:
                    mw = tl.load(mask_ptr + rows * n_mwords + g * PW + s, mask=r_ok, other=0)
                    w = tl.where((mw[:, None] & jbit[None, :]) != 0, w, tl.zeros_like(w))
                cols = g * G + s * 32 + j
                xt = tl.load(
                    x_ptr + bb[None, :] * K + cols[:, None], mask=b_ok[None, :] & (cols[:, None] < K), other=0.0
                )  # [32, BLOCK_B]
                if USE_DOT:
                    if x_ptr.dtype.element_ty == tl.float32:
                        acc = tl.dot(w, xt, acc, input_precision="ieee")
                    else:
                        acc = tl.dot(w.to(x_ptr.dtype.element_ty), xt, acc)
                else:
                    acc3 += w[:, :, None] * xt[None, :, :].to(tl.float32)
        if USE_DOT:
            res = acc
        else:
            res = tl.sum(acc3, axis=1)  # [BLOCK_N, BLOCK_B]
        omask = r_ok[:, None] & b_ok[None, :]
        yoff = bb[None, :] * N + rows[:, None]
        cidx = tile * tl.num_programs(2) + bgrp
        splitk_finish(res, rows, yoff, omask, bias_ptr, y_ptr, ws_ptr, cnt_ptr, cidx, N, n_split, HAS_BIAS, RELU)
