"""Huffman coder: ours (vectorised NumPy) vs dahuffman (pure Python), sizes vs zlib/lzma, whole-VGG-16 timings.

    python -m bench.kernels.bench_huffman            # 1M-symbol streams + full-size VGG-16 export/decode
    python -m bench.kernels.bench_huffman --no-vgg   # only the 1M-symbol comparison

Streams: the codebook-index (5-bit, 32 symbols) and relative-index (5-bit gaps with fillers) streams of a
magnitude-pruned (9%), k-means-quantized 4096x4096 fc layer (random init, so weights are not trained), plus a
uniform 32-symbol stream. Times are medians of wall-clock repeats (:func:`bench.harness.timing.cpu_us`). Writes
``huffman.json`` and ``.csv`` under ``--out`` (default ``bench/results/<date>/huffman``).
"""

from __future__ import annotations

import argparse
import json
import lzma
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

from bench.harness.report import env_info, print_table, results_dir, write_csv, write_json
from bench.harness.timing import cpu_us
from dc_lightning.dcz import huffman
from dc_lightning.dcz.relative_index import encode_gaps, positions_from_mask

N = 1_000_000


def layer_streams(n: int = N) -> dict[str, np.ndarray]:
    from torch import nn

    from dc_lightning.pruning.masks import prune_model
    from dc_lightning.quantization.codebooks import quantize_model

    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(4096, 4096))
    prune_model(lin, densities=0.09)
    quantize_model(lin, bits=5)
    m = lin[0]
    mask = m.weight_mask.numpy()
    pos = positions_from_mask(mask)
    rows, cols = pos % 4096, pos // 4096
    codes = m.weight_assign.numpy()[rows, cols].astype(np.int64)
    gaps = encode_gaps(pos, 5).astype(np.int64)
    rng = np.random.default_rng(0)
    return {
        "codebook idx (5b, fc 9%)": codes[:n],
        "relative idx (5b, fc 9%)": gaps[:n],
        "uniform 32 symbols": rng.integers(0, 32, n),
    }


def timeit(fn, repeat: int = 3) -> tuple[float, object]:
    """(median seconds over ``repeat`` calls, the result of the last call)."""
    out = []
    seconds = cpu_us(lambda: out.append(fn()), repeats=repeat, warmup=0) / 1e6
    return seconds, out[-1]


def bench_streams(n: int = N) -> list[dict]:
    try:  # the pure-Python peer (pip install dc-lightning[bench]); its columns stay empty without it
        from dahuffman import HuffmanCodec
    except ImportError:
        HuffmanCodec = None  # noqa: N806
        print("dahuffman not installed: the peer's columns are left empty")
    rows = []
    for name, sym in layer_streams(n).items():
        alpha = int(sym.max()) + 1
        t_enc, st = timeit(lambda s=sym, a=alpha: huffman.encode(s, alphabet_size=a))
        t_dec, dec = timeit(lambda s=st: huffman.decode(s))
        assert np.array_equal(dec, sym)
        t_enc_d = t_dec_d = enc_d = None
        if HuffmanCodec is not None:
            lst = sym.tolist()
            codec = HuffmanCodec.from_data(lst)
            t_enc_d, enc_d = timeit(lambda c=codec, x=lst: c.encode(x), repeat=1)
            t_dec_d, dec_d = timeit(lambda c=codec, e=enc_d: c.decode(e), repeat=1)
            assert dec_d == lst
        raw = sym.astype(np.uint8).tobytes()
        ours_bytes = st.data.size + st.sync.size * 2 + st.lengths.size
        counts = np.bincount(sym, minlength=alpha)
        p = counts[counts > 0] / sym.size
        rows.append(
            {
                "stream": name,
                "symbols": sym.size,
                "entropy_bits": round(float(-(p * np.log2(p)).sum()), 3),
                "ours_bits_per_sym": round(st.nbits / sym.size, 3),
                "ours_bytes_with_tables": ours_bytes,
                "dahuffman_bytes": len(enc_d) if enc_d is not None else None,
                "zlib9_bytes": len(zlib.compress(raw, 9)),
                "lzma_bytes": len(lzma.compress(raw, preset=9)),
                "fixed_5bit_bytes": sym.size * 5 // 8,
                "ours_encode_s": round(t_enc, 4),
                "ours_decode_s": round(t_dec, 4),
                "dahuffman_encode_s": round(t_enc_d, 3) if t_enc_d is not None else None,
                "dahuffman_decode_s": round(t_dec_d, 3) if t_dec_d is not None else None,
                "encode_speedup": round(t_enc_d / t_enc, 1) if t_enc_d is not None else None,
                "decode_speedup": round(t_dec_d / t_dec, 1) if t_dec_d is not None else None,
            }
        )
    return rows


def bench_vgg() -> dict:
    from bench.storage.bench_storage import build_compressed
    from dc_lightning.dcz import build_file, read_compressed, read_stream

    model, times = build_compressed("vgg16")
    nnz = sum(int(m.weight_mask.sum()) for m in model.modules() if getattr(m, "weight_mask", None) is not None)
    t_exp, (meta, data) = timeit(lambda: build_file(model, index_bits={"features.*": 8, "classifier.*": 5}), repeat=2)
    path = Path(tempfile.mkdtemp(prefix="bench_huffman_")) / "vgg16.dcz"
    path.write_bytes(data)
    streams = []
    from safetensors.numpy import load

    arrays = load(data)
    for rec in meta["layers"]:  # stream records -> HuffmanStream, decoded below in one pass
        pay = arrays[rec["tensor"]]
        streams.append(read_stream(pay, rec["code"], rec["k"], "code"))
        streams.append(read_stream(pay, rec["gap"], 1 << rec["index_bits"], "gap"))
    t_dec, _ = timeit(lambda: huffman.decode_many(streams))
    t_read, _ = timeit(lambda: read_compressed(path), repeat=2)
    return {
        "nnz": nnz,
        "symbols": int(sum(s.count for s in streams)),
        "streams": len(streams),
        "export_s": round(t_exp, 2),
        "decode_all_streams_s": round(t_dec, 2),
        "read_compressed_s": round(t_read, 2),
        "file_bytes": len(data),
    }


COLUMNS = ["stream", "entropy_bits", "ours_bits_per_sym", "ours_bytes_with_tables", "dahuffman_bytes", "zlib9_bytes",
           "lzma_bytes", "fixed_5bit_bytes", "ours_encode_s", "dahuffman_encode_s", "encode_speedup", "ours_decode_s",
           "dahuffman_decode_s", "decode_speedup"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--no-vgg", action="store_true")
    p.add_argument("--symbols", type=int, default=N, help="symbols per stream (default 1M)")
    p.add_argument("--out", type=Path, default=results_dir("huffman"))
    args = p.parse_args(argv)
    rows = bench_streams(args.symbols)
    print_table(rows, COLUMNS)
    res = {"env": env_info("cpu"), "streams": rows}
    if not args.no_vgg:
        res["vgg16"] = bench_vgg()
        print("\nVGG-16 (Table 5 densities, 8/5 bits, index 8 conv / 5 fc):", json.dumps(res["vgg16"]))
    write_json(res, args.out / "huffman.json")
    write_csv(rows, args.out / "huffman.csv")
    print(f"wrote {args.out}/huffman.json/.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
