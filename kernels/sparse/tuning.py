"""Launch configurations of the EIE sparse kernels: shape heuristics, autotuning candidates, the tuned table.

:func:`choose_config` maps shapes (never data, so it is safe under ``torch.compile`` and inside CUDA graphs) to a
configuration; ``eie_spmv.autotune`` times :func:`candidates` once per layer and batch at load time and stores the
winner in :data:`TUNED` under :func:`tune_key`, which :func:`choose_config` then prefers over the heuristic.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..runtime import next_pow2

__all__ = ["MAX_FLAT_CHUNKS", "TUNED", "tune_key", "choose_config", "candidates"]

MAX_FLAT_CHUNKS = 64  # block pointers of one row tile held in registers by the flat kernel
TUNED: dict[tuple, dict[str, Any]] = {}  # tune_key(...) -> config recorded by eie_spmv.autotune


def tune_key(
    batch: int, out_features: int, in_features: int, row_tile: int, chunk: int, n_entries: int, dtype: torch.dtype
) -> tuple:
    return (int(batch), int(out_features), int(in_features), int(row_tile), int(chunk), int(n_entries), str(dtype))


def choose_config(
    batch: int,
    out_features: int,
    n_chunks: int,
    row_tile: int,
    overrides: dict[str, Any] | None = None,
    n_entries: int | None = None,
    tuned_key: tuple | None = None,
) -> dict[str, Any]:
    """Launch configuration from shapes only (no data, so it is safe under ``torch.compile`` and CUDA graphs).

    Keys: ``block_b`` (batch columns per program), ``block_k`` (ELL steps per iteration), ``chunks_per_prog``
    (``n_chunks`` or more = one launch with the epilogue fused), ``num_warps``, ``transpose_x`` (gather from ``x.T``
    so that a column's batch values are adjacent), ``skip_zero_chunks`` (two-kernel design only), ``kernel``
    (``"flat"``: one launch per layer, ``eie_kernels.eie_flat_kernel``; ``"split"``: partial sums + reduce kernel) and
    ``split`` (flat kernel: programs per row tile, combined with fp32 atomics). A configuration recorded by
    :func:`autotune` for ``tuned_key`` wins over the heuristic; ``overrides`` win over both.
    """
    n_tiles = -(-out_features // row_tile)
    n_blocks = max(n_tiles * n_chunks, 1)
    mean_width = (n_entries / (n_blocks * row_tile)) if n_entries else 32.0
    block_b = 1 if batch <= 1 else min(next_pow2(batch), 16)
    # At batch 1 the kernel is latency bound: each loop iteration costs two dependent memory round trips (entries,
    # then the x/codebook gathers), so one iteration should cover a typical block (BLOCK_K >= mean width), within
    # a 4096-value accumulator. With a batch the accumulator is [BLOCK_K, ROW_TILE, BLOCK_B].
    budget = 4096 if batch <= 1 else 2048
    block_k = max(1, min(next_pow2(int(math.ceil(mean_width))), budget // (row_tile * block_b)))
    cpp = n_chunks if n_chunks <= 1 else 1
    cfg = {
        "block_b": block_b,
        "block_k": block_k,
        "chunks_per_prog": cpp,
        "num_warps": 4 if row_tile * block_k * block_b <= 2048 else 8,
        "transpose_x": batch >= 4,
        "skip_zero_chunks": False,
    }
    # The one-launch flat kernel (eie_kernels.eie_flat_kernel) wherever the tile's block pointers fit in registers.
    # Split-K over a tile's steps so that the layer spreads over about 4 programs per SM (132 SMs on an H200).
    # Measured on the H200 (bench/RESULTS.md): the flat kernel wins at batch 1-16, the two-kernel design at 64.
    flat = n_chunks + 1 <= MAX_FLAT_CHUNKS and batch <= 16
    if overrides and "kernel" not in overrides and {"chunks_per_prog", "skip_zero_chunks"} & set(overrides):
        flat = False  # options of the two-kernel design ask for it
    steps_per_tile = (n_entries or 0) / max(n_tiles * row_tile, 1)
    split = 1
    if flat:
        block_k = max(1, 2048 // (row_tile * block_b))
        cfg["block_k"] = block_k
        cfg["num_warps"] = 4
        want = max(1, -(-528 // max(n_tiles, 1)))
        split = int(max(1, min(want, 16, steps_per_tile // max(block_k, 1))))
    cfg["kernel"] = "flat" if flat else "split"
    cfg["split"] = split
    if tuned_key is not None and tuned_key in TUNED:
        cfg.update(TUNED[tuned_key])
    if overrides:
        unknown = set(overrides) - set(cfg)
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; valid keys: {sorted(cfg)}")
        cfg.update(overrides)
    return cfg


def candidates(batch: int, n_chunks: int, row_tile: int) -> list[dict[str, Any]]:
    out = []
    if n_chunks + 1 <= MAX_FLAT_CHUNKS:
        bb = 1 if batch <= 1 else min(next_pow2(batch), 16)
        for acc in (1024, 2048, 4096):
            bk = max(1, acc // (row_tile * bb))
            for split in (1, 2, 4, 8, 16):
                out.append(
                    {
                        "kernel": "flat",
                        "split": split,
                        "block_b": bb,
                        "block_k": bk,
                        "num_warps": 4 if acc <= 2048 else 8,
                        "transpose_x": batch >= 4,
                    }
                )
    cpps = sorted({1, 2, 4, n_chunks}) if n_chunks > 1 else [1]
    if batch <= 1:
        for bk in (16, 32, 64, 128):
            if row_tile * bk > 4096:
                continue
            for cpp in cpps:
                out.append(
                    {
                        "block_b": 1,
                        "block_k": bk,
                        "chunks_per_prog": cpp,
                        "num_warps": 4 if row_tile * bk <= 2048 else 8,
                        "kernel": "split",
                    }
                )
        return out
    for bb in sorted({min(next_pow2(batch), b) for b in (4, 8, 16, 32)}):
        for acc in (1024, 4096):
            bk = max(1, acc // (row_tile * bb))
            for cpp in sorted({1, 4, n_chunks}):
                out.append(
                    {
                        "block_b": bb,
                        "block_k": bk,
                        "chunks_per_prog": min(cpp, n_chunks),
                        "num_warps": 4 if acc <= 1024 else 8,
                        "transpose_x": True,
                        "kernel": "split",
                    }
                )
    return out
