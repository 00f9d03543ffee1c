"""The ``@triton.jit`` kernel of the tensor-core LUT layout (``tc``); launched by ``op.tc_linear_triton``.

:func:`tc_matmul_kernel` computes ``Y^T[rows, batch] = W[rows, K] . X^T[K, batch]``: the weights are the *left*
operand of ``tl.dot`` ("swap-AB"), so on Hopper the decoded tile can feed ``wgmma`` from registers (only its left
operand may come from registers) and the batch, however small, is the product's narrow side (16-64 columns).

A program owns ``BLOCK_N`` output rows x ``BLOCK_B`` batch rows and a range of 256-column K tiles (split-K:
``n_split`` programs per output tile, combined by ``runtime.splitk_finish``, a run-time value). Per K tile it
loads the ``[BLOCK_N, 64]`` int16 code words once (``evict_first``: each weight is read once per call), decodes
them into four ``[BLOCK_N, 64]`` operands (the tile's four 64-column quarters) and multiplies each with its
``[64, BLOCK_B]`` slice of ``X^T`` (``evict_last``: every row tile re-reads the activations from L2):

* ``DECODE == 0``: the register decode (``decode.decode_asm``, a pure one-operand inline asm per quarter with the
  table baked in; fp16/bf16 activations; CUDA only: the interpreter cannot run PTX). Each thread decodes the code
  words it holds in the operand's register layout; the layout stores every group's codes where that decode reads
  them (``layout.py``).
* ``DECODE == 1``: each weight's code fetched from its word by address and looked up in the float32 codebook (fp32
  activations as IEEE fp32 products, and the interpreter's path in CPU CI).

Rows are padded to a multiple of 16 in the layout (``n_rows``); the code loads are masked only when the row tile
does not divide them (``EVEN_N``); columns past ``K`` hold codes whose activations load as 0 (no column mask when
``K`` is a multiple of 256: ``EVEN_K``). fp32 accumulation;
bias, ReLU and the cast to the activation dtype in the epilogue.
"""

from __future__ import annotations

from ..runtime import HAS_TRITON, tl, triton

__all__ = ["tc_matmul_kernel"]

if HAS_TRITON:
    from ..runtime import splitk_finish

    @triton.jit
    def _quarter(x_ptr, codes_ptr, codebook_ptr, rows, bb, b_ok, j, t, row_words, K, n_rows, acc, Q: tl.constexpr,
                 DECODE: tl.constexpr, ASM: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, c):  # fmt: skip
        """Add quarter ``Q`` of K tile ``t`` to ``acc`` (``c``: the tile's code words, used by the register decode)."""
        k = t * 256 + Q * 64 + j
        if EVEN_K:  # K a multiple of 256: only the batch rows are masked (loop-invariant predicates)
            xq = tl.load(x_ptr + bb[None, :] * K + k[:, None], mask=b_ok[None, :], other=0.0,
                         eviction_policy="evict_last")  # fmt: skip
        else:
            xq = tl.load(x_ptr + bb[None, :] * K + k[:, None], mask=b_ok[None, :] & (k[:, None] < K), other=0.0,
                         eviction_policy="evict_last")  # fmt: skip
        if DECODE == 0:
            w = tl.inline_asm_elementwise(ASM, "=r,=r,r,r", [c], dtype=x_ptr.dtype.element_ty, is_pure=True, pack=4)
            acc = tl.dot(w, xq, acc)
        else:
            # the word of quarter Q of the group of (row, column): rows r, r+8 and columns k, k+1 share a group; word
            # Q sits at row offset 8 * (Q // 2), column offset Q % 2; the code is nibble 2 * (row bit 3) + (k & 1)
            wrow = rows - (rows & 8) + 8 * (Q // 2)
            wcol = t * 64 + j - (j & 1) + (Q % 2)
            ptr = codes_ptr + wrow[:, None] * row_words + wcol[None, :]
            if EVEN_N:
                word = tl.load(ptr).to(tl.int32)
            else:
                word = tl.load(ptr, mask=wrow[:, None] < n_rows, other=0).to(tl.int32)
            shift = 4 * (2 * ((rows[:, None] >> 3) & 1) + (j[None, :] & 1))
            w = tl.load(codebook_ptr + ((word >> shift) & 15))
            if x_ptr.dtype.element_ty == tl.float32:
                acc = tl.dot(w, xq, acc, input_precision="ieee")
            else:
                acc = tl.dot(w.to(x_ptr.dtype.element_ty), xq, acc)
        return acc

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
        ASM0: tl.constexpr,
        ASM1: tl.constexpr,
        ASM2: tl.constexpr,
        ASM3: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        RELU: tl.constexpr,
        EVEN_N: tl.constexpr,
        EVEN_K: tl.constexpr,
    ):
        tile = tl.program_id(0)
        sp = tl.program_id(1)
        bgrp = tl.program_id(2)
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        bb = bgrp * BLOCK_B + tl.arange(0, BLOCK_B)
        b_ok = bb < B
        j = tl.arange(0, 64)
        row_words = k_tiles * 64
        acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
        t_lo = sp * tiles_per_split
        t_hi = tl.minimum(k_tiles, t_lo + tiles_per_split)
        for t in range(t_lo, t_hi):
            c = None
            if DECODE == 0:
                c_ptr = codes_ptr + rows[:, None] * row_words + t * 64 + j[None, :]
                if EVEN_N:
                    c = tl.load(c_ptr, eviction_policy="evict_first")
                else:
                    c = tl.load(c_ptr, mask=rows[:, None] < n_rows, other=0, eviction_policy="evict_first")
            acc = _quarter(x_ptr, codes_ptr, codebook_ptr, rows, bb, b_ok, j, t, row_words, K, n_rows, acc, 0, DECODE,
                           ASM0, EVEN_N, EVEN_K, c)  # fmt: skip
            acc = _quarter(x_ptr, codes_ptr, codebook_ptr, rows, bb, b_ok, j, t, row_words, K, n_rows, acc, 1, DECODE,
                           ASM1, EVEN_N, EVEN_K, c)  # fmt: skip
            acc = _quarter(x_ptr, codes_ptr, codebook_ptr, rows, bb, b_ok, j, t, row_words, K, n_rows, acc, 2, DECODE,
                           ASM2, EVEN_N, EVEN_K, c)  # fmt: skip
            acc = _quarter(x_ptr, codes_ptr, codebook_ptr, rows, bb, b_ok, j, t, row_words, K, n_rows, acc, 3, DECODE,
                           ASM3, EVEN_N, EVEN_K, c)  # fmt: skip
        omask = (rows[:, None] < N) & b_ok[None, :]
        yoff = bb[None, :] * N + rows[:, None]
        cidx = tile * tl.num_programs(2) + bgrp
        splitk_finish(acc, rows, yoff, omask, bias_ptr, y_ptr, ws_ptr, cnt_ptr, cidx, N, n_split, HAS_BIAS, RELU)
