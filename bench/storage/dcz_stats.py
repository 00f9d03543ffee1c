"""Why a compressed file is the size it is: the per-layer entropy floors of :mod:`dc_lightning.dcz.stats`, as a table.

Per pruned + quantized layer: ``code H`` (entropy of the codebook indices, the Huffman floor of the weight stream),
``H|row`` (with one code table per output unit), ``gap H`` per scan order (best relative-index stream in bits per
non-zero when a conv weight is scanned ``oihw``/``ihwo``/``hwio``), ``max/thr`` (largest over smallest kept
magnitude) beside ``gauss`` (the same for a Gaussian weight of that size and density).

    python -m bench.storage.dcz_stats model.dcz [--json out.json]

Exit status 2 when the file cannot be read, 1 when it has no pruned + quantized layer.
"""

from __future__ import annotations

import argparse
import sys

from bench.harness.report import print_table, write_json
from dc_lightning.dcz import CorruptFileError
from dc_lightning.dcz.stats import file_stats

COLUMNS = ["layer", "nnz", ("dens", "density", ".3f"), ("code H", "code_bits", ".2f"),
           ("H|row", "code_bits_per_row_table", ".2f"),
           ("gap H per order", lambda r: " ".join(f"{k}={v:.2f}" for k, v in r["gap_bits"].items()), ""),
           ("max/thr", "max_over_thr", ".2f"), ("gauss", "gaussian_max_over_thr", ".2f")]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", help="a .dcz file written by save_compressed")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    try:
        rows = file_stats(args.file)
    except (OSError, CorruptFileError) as err:
        print(f"dcz_stats: cannot read {args.file}: {err}", file=sys.stderr)
        return 2
    if not rows:
        print(f"{args.file}: no pruned + quantized layers", file=sys.stderr)
        return 1
    print_table(rows, COLUMNS)
    if args.json:
        write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
