"""The ``@triton.jit`` kernel of the tensor-core LUT layout (``tc``); launched by ``op.tc_linear_triton``.

:func:`tc_matmul_kernel` computes ``Y^T[rows, batch] = W[rows, K] . X^T[K, batch]``: the weights are the *left*
operand of ``tl.dot`` ("swap-AB"), so on Hopper the decoded tile can feed ``wgmma`` from registers (only its left
operand may come from registers) and the batch, however small, is the product's narrow side (16-64 columns).

A program owns ``BLOCK_N`` output rows x ``BLOCK_B`` batch rows and a range of 128-column K tiles (split-K:
``n_split`` programs per output tile, combined by ``runtime.splitk_finish``, a run-time value). Per K tile it
loads the ``[BLOCK_N, 64]`` code bytes once (``evict_first``: each weight is read once per call), decodes the low
nibbles into the tile's first 64 columns and the high nibbles into the next 64, and multiplies each with its
``[64, BLOCK_B]`` slice of ``X^T`` (``evict_last``: every row tile re-reads the activations from L2):

* ``DECODE == 0``: the register decode (``decode.decode_asm``, a pure one-operand inline asm with the table baked
  in; fp16/bf16 activations; CUDA only: the interpreter cannot run PTX);
* ``DECODE == 1``: one ``tl.load`` of the float32 codebook per weight (fp32 activations as IEEE fp32 products, and
  the interpreter's path in CPU CI).

Rows are padded to a multiple of 16 in the layout (``n_rows``); the code loads are masked only when the row tile
does not divide them (``EVEN_N``); columns past ``K`` hold codes whose activations load as 0. fp32 accumulation;
bias, ReLU and the cast to the activation dtype in the epilogue.
"""

from __future__ import annotations

from ..runtime import HAS_TRITON, tl, triton

__all__ = ["tc_matmul_kernel"]

if HAS_TRITON:
    from ..runtime import splitk_finish

    @triton.jit
    def tc_matmul_kernel(
        x_ptr,
        codes_ptr,
        codebook_ptr,
        bias_ptr,
        y_ptr,
        ws_ptr,
        cnt_ptr,
        B,
        N,
        K,
        n_rows,
        k_tiles,
        tiles_per_split,
        n_split,
        BLOCK_N: tl.constexpr,
        BLOCK_B: tl.constexpr,
        DECODE: tl.constexpr,
        ASM_LO: tl.constexpr,
        ASM_HI: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        RELU: tl.constexpr,
        EVEN_N: tl.constexpr,
    ):
        HALF: tl.constexpr = 64
        tile = tl.program_id(0)
        sp = tl.program_id(1)
        bgrp = tl.program_id(2)
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        bb = bgrp * BLOCK_B + tl.arange(0, BLOCK_B)
        b_ok = bb < B
        j = tl.arange(0, HALF)
        row_bytes = k_tiles * HALF
        acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
        t_lo = sp * tiles_per_split
        t_hi = tl.minimum(k_tiles, t_lo + tiles_per_split)
        for t in range(t_lo, t_hi):
            c_ptr = codes_ptr + rows[:, None] * row_bytes + t * HALF + j[None, :]
            if EVEN_N:
                c = tl.load(c_ptr, eviction_policy="evict_first")
            else:
                c = tl.load(c_ptr, mask=rows[:, None] < n_rows, other=0, eviction_policy="evict_first")
            k_lo = t * (2 * HALF) + j
            k_hi = k_lo + HALF
            x_lo = tl.load(x_ptr + bb[None, :] * K + k_lo[:, None], mask=b_ok[None, :] & (k_lo[:, None] < K),
                           other=0.0, eviction_policy="evict_last")  # fmt: skip
            x_hi = tl.load(x_ptr + bb[None, :] * K + k_hi[:, None], mask=b_ok[None, :] & (k_hi[:, None] < K),
                           other=0.0, eviction_policy="evict_last")  # fmt: skip
            if DECODE == 0:
                w_lo = tl.inline_asm_elementwise(ASM_LO, "=r,=r,r", [c], dtype=x_ptr.dtype.element_ty, is_pure=True,
                                                 pack=4)  # fmt: skip
                w_hi = tl.inline_asm_elementwise(ASM_HI, "=r,=r,r", [c], dtype=x_ptr.dtype.element_ty, is_pure=True,
                                                 pack=4)  # fmt: skip
                acc = tl.dot(w_lo, x_lo, acc)
                acc = tl.dot(w_hi, x_hi, acc)
            else:
                w_lo = tl.load(codebook_ptr + (c & 15).to(tl.int32))
                w_hi = tl.load(codebook_ptr + (c >> 4).to(tl.int32))
                if x_ptr.dtype.element_ty == tl.float32:
                    acc = tl.dot(w_lo, x_lo, acc, input_precision="ieee")
                    acc = tl.dot(w_hi, x_hi, acc, input_precision="ieee")
                else:
                    acc = tl.dot(w_lo.to(x_ptr.dtype.element_ty), x_lo, acc)
                    acc = tl.dot(w_hi.to(x_ptr.dtype.element_ty), x_hi, acc)
        omask = (rows[:, None] < N) & b_ok[None, :]
        yoff = bb[None, :] * N + rows[:, None]
        cidx = tile * tl.num_programs(2) + bgrp
        splitk_finish(acc, rows, yoff, omask, bias_ptr, y_ptr, ws_ptr, cnt_ptr, cidx, N, n_split, HAS_BIAS, RELU)
