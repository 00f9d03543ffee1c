"""Why a compressed file is the size it is: per-layer entropy bounds and weight-tail shape of a ``.dcz`` file.

For every pruned + quantized layer of the file this prints

* ``code H`` -- zero-order entropy (bits) of the codebook indices, the floor for the Huffman-coded weight stream;
  ``code H|row`` -- the same with one code table per output unit (what per-row Huffman tables could reach, before
  paying for the tables);
* ``gap H`` per scan order -- bits per non-zero of the best relative-index stream (widths 2..8, fillers included) when
  the 4-D conv weight ``(out, in, kh, kw)`` is scanned in another order (``oihw`` is the file's row-major order);
  a random mask gives the same value for every order;
* ``max/thr`` -- largest kept magnitude over the smallest kept one (the pruning threshold), beside what a Gaussian
  weight of the same size and density gives. With [DC]'s linear centroids spanning ``[min, max]``, the weight stream
  costs about ``h(w) - log2(step)`` bits: a ratio near the Gaussian one means evenly spread codes (~6 bits of 8),
  long tails (ImageNet-trained weights) mean a coarse step where the weights are and fewer bits.

    python bench/dcz_stats.py model.dcz [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import NormalDist

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dc_lightning.dcz import CorruptFileError, read_compressed  # noqa: E402
from dc_lightning.dcz.relative_index import encode_gaps  # noqa: E402

ORDERS = {"oihw": (0, 1, 2, 3), "ihwo": (1, 2, 3, 0), "hwio": (2, 3, 1, 0)}


def entropy(x: np.ndarray) -> float:
    """Zero-order entropy in bits per symbol (0 for an empty or constant array)."""
    if x.size == 0:
        return 0.0
    _, counts = np.unique(x, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def gap_bits(mask_flat: np.ndarray) -> float:
    """Smallest entropy-coded relative-index cost per non-zero over index widths 2..8 (fillers included)."""
    pos = np.flatnonzero(mask_flat)
    if pos.size == 0:
        return 0.0
    best = float("inf")
    for b in range(2, 9):
        g = encode_gaps(pos, b)
        best = min(best, entropy(g) * g.size / pos.size)
    return best


def layer_stats(layer) -> dict:
    numel = int(np.prod(layer.shape))
    density = layer.nnz / numel
    mags = np.abs(layer.codebook[layer.codes].astype(np.float64))
    thr = float(mags.min())
    row = {
        "layer": layer.name,
        "shape": list(layer.shape),
        "nnz": layer.nnz,
        "density": density,
        "code_bits": entropy(layer.codes),
    }
    m = layer.mask()
    a = layer.assign()
    rows_m, rows_a = m.reshape(m.shape[0], -1), a.reshape(a.shape[0], -1)
    cond = sum(entropy(rows_a[i][rows_m[i]]) * int(rows_m[i].sum()) for i in range(rows_m.shape[0]))
    row["code_bits_per_row_table"] = cond / max(layer.nnz, 1)
    orders = ORDERS if m.ndim == 4 else {"oihw": tuple(range(m.ndim))}
    row["gap_bits"] = {k: gap_bits(m.transpose(o).reshape(-1)) for k, o in orders.items()}
    row["max_over_thr"] = float(mags.max()) / thr if thr > 0 else float("inf")
    nd = NormalDist()
    t_g = nd.inv_cdf(1 - density / 2) if density < 1 else 0.0
    row["gaussian_max_over_thr"] = nd.inv_cdf(1 - 0.5 / numel) / t_g if t_g > 0 else float("inf")
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", help="a .dcz file written by save_compressed")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    try:
        f = read_compressed(args.file)
    except (OSError, CorruptFileError) as err:
        print(f"dcz_stats: cannot read {args.file}: {err}", file=sys.stderr)
        return 2
    rows = [layer_stats(L) for L in f.layers.values() if L.kind == "pq" and L.nnz]
    if not rows:
        print(f"{args.file}: no pruned + quantized layers", file=sys.stderr)
        return 1
    print(f"{'layer':22s} {'nnz':>9s} {'dens':>5s} {'code H':>6s} {'H|row':>6s} {'gap H per order':34s} "
          f"{'max/thr':>7s} {'gauss':>6s}")
    for r in rows:
        gaps = " ".join(f"{k}={v:.2f}" for k, v in r["gap_bits"].items())
        print(f"{r['layer']:22s} {r['nnz']:9d} {r['density']:5.3f} {r['code_bits']:6.2f} "
              f"{r['code_bits_per_row_table']:6.2f} {gaps:34s} {r['max_over_thr']:7.2f} "
              f"{r['gaussian_max_over_thr']:6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
