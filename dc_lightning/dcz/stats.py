"""Why a compressed file is the size it is: per-layer entropy floors and weight-tail shape of a ``.dcz`` file.

For every pruned + quantized layer (:func:`file_stats`, one row per layer, from :func:`layer_stats`):

* ``code_bits``: zero-order entropy (bits) of the codebook indices, the floor of the Huffman-coded weight stream;
  ``code_bits_per_row_table``: the same with one code table per output unit (what per-row Huffman tables could
  reach, before paying for the tables);
* ``gap_bits`` per scan order: bits per non-zero of the best relative-index stream (widths 2..8, fillers included)
  when the 4-D conv weight ``(out, in, kh, kw)`` is scanned in another order (``oihw`` is the file's row-major
  order); a random mask gives the same value for every order;
* ``max_over_thr``: largest kept magnitude over the smallest kept one (the pruning threshold), beside
  ``gaussian_max_over_thr``, what a Gaussian weight of the same size and density gives. With [DC]'s linear centroids
  spanning ``[min, max]`` the weight stream costs about ``h(w) - log2(step)`` bits: a ratio near the Gaussian one
  means evenly spread codes (~6 bits of 8), long tails (ImageNet-trained weights) a coarse step where the weights
  are and fewer bits.

Example::

    from dc_lightning.dcz.stats import file_stats

    for row in file_stats("vgg16.dcz"):
        print(row["layer"], row["code_bits"], row["gap_bits"])
"""

from __future__ import annotations

from os import PathLike
from statistics import NormalDist
from typing import Any

import numpy as np

from dc_lightning.dcz.decode import read_compressed
from dc_lightning.dcz.records import CompressedFile, CompressedLayer
from dc_lightning.dcz.relative_index import encode_gaps

__all__ = ["SCAN_ORDERS", "entropy", "gap_bits", "layer_stats", "file_stats"]

#: scan orders of a 4-D conv weight ``(out, in, kh, kw)``: name -> axis permutation (``oihw`` is the file's)
SCAN_ORDERS = {"oihw": (0, 1, 2, 3), "ihwo": (1, 2, 3, 0), "hwio": (2, 3, 1, 0)}


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


def layer_stats(layer: CompressedLayer) -> dict[str, Any]:
    """The entropy floors and tail ratios of one pruned + quantized layer (see the module docstring)."""
    if layer.kind != "pq" or not layer.nnz:
        raise ValueError(f"layer {layer.name!r}: kind {layer.kind!r} with {layer.nnz} non-zeros; "
                         "layer_stats needs a pruned + quantized layer (kind 'pq') with at least one non-zero")
    numel = int(np.prod(layer.shape))
    density = layer.nnz / numel
    mags = np.abs(layer.codebook[layer.codes].astype(np.float64))
    thr = float(mags.min())
    row: dict[str, Any] = {"layer": layer.name, "shape": list(layer.shape), "nnz": layer.nnz, "density": density,
                           "code_bits": entropy(layer.codes)}  # fmt: skip
    m, a = layer.mask(), layer.assign()
    rows_m, rows_a = m.reshape(m.shape[0], -1), a.reshape(a.shape[0], -1)
    cond = sum(entropy(rows_a[i][rows_m[i]]) * int(rows_m[i].sum()) for i in range(rows_m.shape[0]))
    row["code_bits_per_row_table"] = cond / layer.nnz
    orders = SCAN_ORDERS if m.ndim == 4 else {"oihw": tuple(range(m.ndim))}
    row["gap_bits"] = {k: gap_bits(m.transpose(o).reshape(-1)) for k, o in orders.items()}
    row["max_over_thr"] = float(mags.max()) / thr if thr > 0 else float("inf")
    nd = NormalDist()
    t_g = nd.inv_cdf(1 - density / 2) if density < 1 else 0.0
    row["gaussian_max_over_thr"] = nd.inv_cdf(1 - 0.5 / numel) / t_g if t_g > 0 else float("inf")
    return row


def file_stats(file: str | PathLike | CompressedFile) -> list[dict[str, Any]]:
    """:func:`layer_stats` of every pruned + quantized layer with non-zeros of a file (path or read file), in file
    order; an empty list when it has none.

    Raises:
        OSError: the path cannot be read.
        CorruptFileError: the file is not a readable ``.dcz`` file.
    """
    f = file if isinstance(file, CompressedFile) else read_compressed(file)
    return [layer_stats(layer) for layer in f.layers.values() if layer.kind == "pq" and layer.nnz]
