"""The CPU product paths of one large ``tc`` layer against dense ``F.linear``: what picks ``tc/layout.py``'s
constants and ``runtime.ROW_BLOCK_BYTES``.

Providers, side by side in one process on the same random 4-bit layer (density 0.5, 15 centroids + the zero code)
and inputs, median of ``--repeats`` calls each (providers take turns), one thread by default:

* ``dense``: ``F.linear`` on the decoded float32 weight (the reference).
* ``native<KiB>``: ``_row_block_product`` (the native decode, ``kernels/native.py``) with
  ``runtime.ROW_BLOCK_BYTES`` set to that many KiB (skipped when the native decode is unavailable).
* ``storage<KiB>``: ``_storage_order_product`` (PyTorch gathers, the words' storage order) with ``BLOCK_BYTES`` set.
* ``rows``: the PyTorch row-order decode of the whole weight, then ``F.linear`` (the fallback above
  ``STORAGE_ORDER_MAX_BATCH`` rows).

Each provider is checked against float64 (relative error <= 1e-5) before it is timed. Prints one line per shape and
batch (times in ms, ratios to dense) and writes the rows as JSON.

    python -m bench.kernels.cpu_tc_paths --out bench/results/2026-12-08/cpu_tc_paths_1thread.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dc_lightning.kernels import native, runtime  # noqa: E402
from dc_lightning.kernels.runtime import decoded_linear  # noqa: E402
from dc_lightning.kernels.tc import layout as L  # noqa: E402

from bench.harness.report import env_info, write_json  # noqa: E402

SHAPES = [(1024, 1024), (4096, 1024), (1000, 4096), (3072, 768), (2400, 600)]
BATCHES = [1, 4, 16, 32, 64]
NATIVE_KIB = [512, 1024, 2048]
STORAGE_KIB = [256, 512, 768, 1024, 2048, 4096]


def torch_decode(p: L.TCPacked) -> torch.Tensor:
    """The whole weight decoded by the PyTorch gathers (row order), float32 ``[out, in]``."""
    saved = os.environ.get(native.ENV)
    os.environ[native.ENV] = "0"
    try:
        return L.decode_dense_tc(p).contiguous()
    finally:
        os.environ[native.ENV] = saved if saved is not None else "1"


def rows_path(x: torch.Tensor, p: L.TCPacked) -> torch.Tensor:
    return decoded_linear(x, torch_decode(p))


def with_block(fn, module, attr: str, value: int):
    def run(x: torch.Tensor, p: L.TCPacked) -> torch.Tensor:
        old = getattr(module, attr)
        setattr(module, attr, value)
        try:
            return fn(x, p)
        finally:
            setattr(module, attr, old)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/out"), "cpu_tc_paths.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"native decode: {native.status()}")
    results = []
    for n, k in SHAPES:
        mask = torch.rand(n, k) < 0.5
        rows, cols = mask.nonzero(as_tuple=True)
        p = L.pack_tc(n, k, rows, cols, torch.randint(0, 15, (rows.numel(),)), torch.linspace(-1, 1, 15))
        w = torch_decode(p)
        providers = {"dense": lambda x, p, w=w: F.linear(x, w)}
        os.environ[native.ENV] = "1"
        if native.available():
            for kib in NATIVE_KIB:
                providers[f"native{kib}"] = with_block(L._row_block_product, runtime, "ROW_BLOCK_BYTES", kib << 10)
        os.environ[native.ENV] = "0"  # the storage order is the PyTorch path: time it with PyTorch's gathers
        for kib in STORAGE_KIB:
            providers[f"storage{kib}"] = with_block(L._storage_order_product, L, "BLOCK_BYTES", kib << 10)
        providers["rows"] = rows_path
        for batch in BATCHES:
            x = torch.randn(batch, k)
            ref = x.double() @ w.double().T
            times: dict[str, list[float]] = {name: [] for name in providers}
            with torch.inference_mode():
                for name, fn in providers.items():
                    os.environ[native.ENV] = "1" if name.startswith("native") else "0"
                    y = fn(x, p)[:, :n].double()
                    err = float((y - ref).abs().max() / ref.abs().max())
                    if err > 1e-5:
                        raise SystemExit(f"{name} at {n}x{k} batch {batch}: relative error {err:.2e} > 1e-5")
                for _ in range(args.repeats):
                    for name, fn in providers.items():
                        os.environ[native.ENV] = "1" if name.startswith("native") else "0"
                        t = time.perf_counter()
                        fn(x, p)
                        times[name].append(time.perf_counter() - t)
            ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
            row = {"out": n, "in": k, "batch": batch, "ms": ms, "ratio": {m: v / ms["dense"] for m, v in ms.items()}}
            results.append(row)
            natives = [(v, m) for m, v in ms.items() if m.startswith("native")]
            best_native = min(natives) if natives else None
            best_storage = min((v, m) for m, v in ms.items() if m.startswith("storage"))
            print(
                f"{n:>5}x{k:<5} batch {batch:>3}: dense {ms['dense']:.3f} ms | "
                + (f"best {best_native[1]} {best_native[0] / ms['dense']:.2f}x | " if best_native else "")
                + f"best {best_storage[1]} {best_storage[0] / ms['dense']:.2f}x | rows {ms['rows'] / ms['dense']:.2f}x"
                + " | "
                + " ".join(f"{m} {v / ms['dense']:.2f}" for m, v in ms.items() if m != "dense"),
                flush=True,
            )
    os.environ.pop(native.ENV, None)
    meta = {**env_info("cpu"), "threads": args.threads, "repeats": args.repeats, "native": native.status()}
    print(f"wrote {write_json({'meta': meta, 'rows': results}, args.out)}")


if __name__ == "__main__":
    main()
