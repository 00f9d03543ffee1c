"""The ``@triton.jit`` kernels of the EIE sparse layout (``layout``); launched by ``op``.

The kernels are "pull" style (EIE §VII-A distributes rows, not columns, across PEs for the same reason: no cross-PE
reduction of outputs):

* :func:`eie_spmm_kernel` (the two-kernel design): a program owns one row tile and ``chunks_per_prog`` consecutive
  chunks; it gathers ``x`` and the codebook with ``tl.load`` and accumulates in fp32 registers. Programs of the same
  row tile write their partial sums into a ``[groups, B, out]`` fp32 buffer with plain stores (no memset, no
  atomics, deterministic); :func:`eie_reduce_kernel` sums the groups and applies bias, ReLU and the cast to the
  activation dtype. When one group covers all chunks the first kernel applies the epilogue itself.
* :func:`eie_flat_kernel` (one launch per layer, the default at batch 1-16): a program walks a row tile's blocks as
  one flat list of ELL steps; ``split`` programs per row tile combine fp32 partials with relaxed atomics in the
  self-resetting workspace of ``runtime.workspace`` (the last program applies bias/ReLU/cast).

Both product kernels decode and accumulate a block of ELL steps with the same device function, :func:`ell_step`.

Activation sparsity (EIE §III-C skips every zero ``a_j``): at batch 1 a pull kernel cannot skip single columns
without serialising, so :func:`eie_spmm_kernel` can skip whole column chunks whose activations are all zero
(``SKIP_ZERO``). See ``bench/RESULTS.md`` for what that measured.
"""

from __future__ import annotations

from ..runtime import HAS_TRITON, tl, triton

__all__ = ["ell_step", "eie_spmm_kernel", "eie_reduce_kernel", "eie_flat_kernel"]

if HAS_TRITON:
    from ..runtime import splitk_finish

    @triton.jit
    def ell_step(
        acc,
        e,
        col0,
        emask,
        codebook_ptr,
        x_ptr,
        bb,
        b_ok,
        stride_xb,
        stride_xk,
        CODE_SHIFT: tl.constexpr,
        ENTRY16: tl.constexpr,
    ):
        """``acc + w * x`` for one block of ELL steps: ``e`` [BLOCK_K, ROW_TILE] entries (int16/int32 words
        ``(local_col << CODE_SHIFT) | code``) whose columns start at ``col0`` (a scalar, or [BLOCK_K, 1] per step),
        ``emask`` [BLOCK_K, 1] the real steps; ``acc`` is [BLOCK_K, ROW_TILE, BLOCK_B] fp32.

        Padding entries point at a 0.0 codebook slot; masked lanes read slot 0 and are zeroed here.
        """
        e = e.to(tl.int32)
        if ENTRY16:
            e = e & 0xFFFF
        code = e & ((1 << CODE_SHIFT) - 1)
        col = col0 + (e >> CODE_SHIFT)
        w = tl.where(emask, tl.load(codebook_ptr + code), 0.0)
        xv = tl.load(
            x_ptr + col[:, :, None] * stride_xk + bb[None, None, :] * stride_xb,
            mask=emask[:, :, None] & b_ok[None, None, :],
            other=0.0,
        )
        return acc + w[:, :, None] * xv.to(tl.float32)

    @triton.jit
    def eie_spmm_kernel(
        x_ptr,
        entries_ptr,
        block_ptr_ptr,
        codebook_ptr,
        bias_ptr,
        out_ptr,
        B,
        N,
        K,
        n_chunks,
        chunk_size,
        chunks_per_prog,
        stride_xb,
        stride_xk,
        stride_og,
        stride_ob,
        ROW_TILE: tl.constexpr,
        CODE_SHIFT: tl.constexpr,
        ENTRY16: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_B: tl.constexpr,
        FUSED: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        RELU: tl.constexpr,
        SKIP_ZERO: tl.constexpr,
        SKIP_BLOCK: tl.constexpr,
    ):
        """One program: a row tile x chunks_per_prog chunks x BLOCK_B batch columns.

        The chunk size and chunks per program are run-time values so that one compiled kernel serves every layout.
        """
        tile = tl.program_id(0)
        grp = tl.program_id(1)
        bgrp = tl.program_id(2)
        r = tl.arange(0, ROW_TILE)
        kk = tl.arange(0, BLOCK_K)
        bb = bgrp * BLOCK_B + tl.arange(0, BLOCK_B)
        b_ok = bb < B
        acc = tl.zeros([BLOCK_K, ROW_TILE, BLOCK_B], dtype=tl.float32)
        for c in range(chunks_per_prog):
            chunk = grp * chunks_per_prog + c
            valid = chunk < n_chunks
            blk = tile * n_chunks + chunk
            start = tl.load(block_ptr_ptr + blk, mask=valid, other=0)
            end = tl.load(block_ptr_ptr + blk + 1, mask=valid, other=0)
            width = (end - start) // ROW_TILE
            col0 = chunk * chunk_size
            if SKIP_ZERO:
                # EIE §III-C skips zero activations; a pull kernel can only afford to skip whole chunks.
                nz = tl.zeros([SKIP_BLOCK, BLOCK_B], dtype=tl.float32)
                for s0 in range(0, chunk_size, SKIP_BLOCK):
                    cc = col0 + s0 + tl.arange(0, SKIP_BLOCK)
                    xs = tl.load(
                        x_ptr + cc[:, None] * stride_xk + bb[None, :] * stride_xb,
                        mask=(cc[:, None] < K) & b_ok[None, :] & valid,
                        other=0.0,
                    )
                    nz = tl.maximum(nz, tl.abs(xs.to(tl.float32)))
                width = tl.where(tl.max(tl.max(nz, axis=1), axis=0) > 0, width, 0)
            for k0 in range(0, width, BLOCK_K):
                kidx = k0 + kk
                emask = kidx[:, None] < width  # [BLOCK_K, 1]
                e = tl.load(entries_ptr + start + kidx[:, None] * ROW_TILE + r[None, :], mask=emask, other=0)
                acc = ell_step(
                    acc, e, col0, emask, codebook_ptr, x_ptr, bb, b_ok, stride_xb, stride_xk, CODE_SHIFT, ENTRY16
                )
        res = tl.sum(acc, axis=0)  # [ROW_TILE, BLOCK_B]
        rows = tile * ROW_TILE + r
        omask = (rows[:, None] < N) & b_ok[None, :]
        if FUSED:
            if HAS_BIAS:
                res += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
            if RELU:
                res = tl.maximum(res, 0.0)
            tl.store(out_ptr + bb[None, :] * stride_ob + rows[:, None], res.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            tl.store(out_ptr + grp * stride_og + bb[None, :] * stride_ob + rows[:, None], res, mask=omask)

    @triton.jit
    def eie_reduce_kernel(
        part_ptr,
        bias_ptr,
        y_ptr,
        G,
        N,
        stride_pg,
        stride_pb,
        stride_yb,
        HAS_BIAS: tl.constexpr,
        RELU: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_G: tl.constexpr,
    ):
        """y[b, n] = act(sum_g part[g, b, n] + bias[n]) cast to y's dtype."""
        pid = tl.program_id(0)
        b = tl.program_id(1)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        g = tl.arange(0, BLOCK_G)
        acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
        for g0 in range(0, G, BLOCK_G):
            gg = g0 + g
            acc += tl.load(
                part_ptr + gg[:, None] * stride_pg + b * stride_pb + n[None, :],
                mask=(gg[:, None] < G) & (n[None, :] < N),
                other=0.0,
            )
        res = tl.sum(acc, axis=0)
        if HAS_BIAS:
            res += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)
        if RELU:
            res = tl.maximum(res, 0.0)
        tl.store(y_ptr + b * stride_yb + n, res.to(y_ptr.dtype.element_ty), mask=n < N)

    @triton.jit
    def eie_flat_kernel(
        x_ptr,
        entries_ptr,
        block_ptr_ptr,
        codebook_ptr,
        bias_ptr,
        y_ptr,
        ws_ptr,
        cnt_ptr,
        B,
        N,
        n_chunks,
        chunk_size,
        stride_xb,
        stride_xk,
        ROW_TILE: tl.constexpr,
        CODE_SHIFT: tl.constexpr,
        ENTRY16: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_B: tl.constexpr,
        MAXC: tl.constexpr,
        SPLIT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        RELU: tl.constexpr,
    ):
        """One launch per layer: a program walks a row tile's blocks as ONE flat list of ELL steps.

        The blocks of a row tile are contiguous in ``entries``, so the program loads the tile's block pointers once
        (a register vector) and finds the chunk of every step by comparing against it: no per-chunk dependent
        load of the block pointer, and the next step block's entries are prefetched while the current one's
        ``x``/codebook gathers are in flight (two-stage software pipeline by hand; the Triton pipeliner does not
        pipeline gathers). ``SPLIT`` programs share a row tile (split-K over the tile's steps): they add fp32
        partials into a zeroed workspace with relaxed atomics and bump a per-tile arrival counter; the last to
        arrive reads the sum back with an ``atomic_add(.., 0)``, re-zeroes the workspace and the counter for the
        next call, and applies bias/ReLU/cast. No memset node, no second kernel, CUDA-graph safe.
        """
        tile = tl.program_id(0)
        sp = tl.program_id(1)
        bgrp = tl.program_id(2)
        r = tl.arange(0, ROW_TILE)
        kk = tl.arange(0, BLOCK_K)
        ci = tl.arange(0, MAXC)
        bb = bgrp * BLOCK_B + tl.arange(0, BLOCK_B)
        b_ok = bb < B
        base = tile * n_chunks
        # chunk starts and the tile's end in one vector load; the two scalars hit the same lines, in parallel
        bp = tl.load(block_ptr_ptr + base + ci, mask=ci <= n_chunks, other=2147483647)
        start = tl.load(block_ptr_ptr + base)
        end = tl.load(block_ptr_ptr + base + n_chunks)
        n_steps = (end - start) // ROW_TILE
        per = tl.cdiv(tl.cdiv(n_steps, SPLIT), BLOCK_K) * BLOCK_K
        s_lo = sp * per
        s_hi = tl.minimum(n_steps, s_lo + per)
        acc = tl.zeros([BLOCK_K, ROW_TILE, BLOCK_B], dtype=tl.float32)
        s_cur = s_lo + kk
        m_cur = s_cur < s_hi
        e_cur = tl.load(entries_ptr + start + s_cur[:, None] * ROW_TILE + r[None, :], mask=m_cur[:, None], other=0)
        for s0 in range(s_lo, s_hi, BLOCK_K):
            s_nxt = s0 + BLOCK_K + kk
            m_nxt = s_nxt < s_hi
            e_nxt = tl.load(entries_ptr + start + s_nxt[:, None] * ROW_TILE + r[None, :], mask=m_nxt[:, None], other=0)
            pos = start + s_cur * ROW_TILE
            chunk = tl.sum((bp[None, :] <= pos[:, None]).to(tl.int32), axis=1) - 1  # [BLOCK_K]
            acc = ell_step(
                acc,
                e_cur,
                (chunk * chunk_size)[:, None],
                m_cur[:, None],
                codebook_ptr,
                x_ptr,
                bb,
                b_ok,
                stride_xb,
                stride_xk,
                CODE_SHIFT,
                ENTRY16,
            )
            e_cur = e_nxt
            s_cur = s_nxt
            m_cur = m_nxt
        res = tl.sum(acc, axis=0)  # [ROW_TILE, BLOCK_B]
        rows = tile * ROW_TILE + r
        omask = (rows[:, None] < N) & b_ok[None, :]
        yoff = bb[None, :] * N + rows[:, None]
        cidx = tile * tl.num_programs(2) + bgrp
        splitk_finish(res, rows, yoff, omask, bias_ptr, y_ptr, ws_ptr, cnt_ptr, cidx, N, SPLIT, HAS_BIAS, RELU)
