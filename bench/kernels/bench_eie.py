"""EIE inference benchmark: our Triton kernels vs cuBLAS (fp32/fp16/bf16), cuSPARSE CSR and int4 weight-only.

Side by side in one run, on EIE's nine benchmark layers [EIE Table III] (shapes, weight densities and activation
densities from the paper; random 4-bit codebooks) at several batch sizes, plus the AlexNet and VGG-16 FC stacks
(fc6 -> ReLU -> fc7 -> ReLU -> fc8), with energy per inference from NVML.

Timing (:mod:`bench.harness.timing`): every provider captured in one CUDA graph that rotates through enough copies
of the layer (or stack) to exceed the L2 cache, median of replays; ``ours_eager`` is one eager call (dispatch and
launch included). The floor of a layer is one graph node plus the compressed bytes (weights + x + y) over the
measured device-to-device copy bandwidth.

Run from the repository root (needs a CUDA GPU; ``--smoke``: CPU, Triton interpreter, layers scaled down 32x)::

    python -m bench.kernels.bench_eie                 # full table + stacks + energy + plot
    python -m bench.kernels.bench_eie --sweep         # launch-config sweep on four layers
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before dc_lightning.kernels imports triton

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.harness.eie import EIE_LAYERS, STACKS, clone_packed, random_activations, random_layer, safe_int4  # noqa: E402
from bench.harness.report import env_info, print_table, results_dir, write_csv  # noqa: E402
from bench.harness.timing import capture, copies_for, eager_us, floor_parts, replay_us, time_calls  # noqa: E402

DEV = "cuda"  # "cpu" in --smoke mode (Triton interpreter, tiny layers, wall-clock timing: checks the plumbing only)
LAYERS = EIE_LAYERS


def rotation_us(factory, x: torch.Tensor, weight_bytes: int) -> float:
    """µs per call of the provider ``factory(copy) -> fn(x)`` over a rotation of copies (bench.harness.timing)."""
    fns = [factory(i) for i in range(copies_for(weight_bytes) if DEV == "cuda" else 1)]
    return time_calls([lambda f=f: f(x) for f in fns], repeats=_reps(), device=DEV)


def _reps() -> int:
    return 15 if DEV == "cuda" else 1  # the interpreter is slow: one timed round in --smoke


def build_providers(bias: torch.Tensor, packed, relu: bool = False) -> dict:
    """name -> (factory(copy) -> fn(x), input dtype, weight bytes): ours at fp32/fp16 activations, dense cuBLAS
    fp32/fp16/bf16, cuSPARSE CSR fp32 and int4 weight-only bf16, all on the weights ``packed`` decodes to."""
    from dc_lightning.kernels.sparse import layout as L
    from dc_lightning.kernels.sparse import op as E

    w32 = L.decode_dense(packed).contiguous()
    act = torch.relu if relu else (lambda t: t)

    def ours(i):
        p = packed if i == 0 else clone_packed(packed)
        return lambda x: E.eie_linear(x, p, bias, relu)

    def dense(dtype):
        w0, b0 = w32.to(dtype), bias.to(dtype)

        def factory(i):
            w = w0 if i == 0 else w0.clone()
            return lambda x: act(F.linear(x, w, b0))

        return factory, dtype, w0.nbytes

    def csr(i):
        m = w32.to_sparse_csr()
        return lambda x: act((m @ x.t()).t() + bias)

    def int4(i):
        fn, bbf = safe_int4(w32), bias.bfloat16()
        return lambda x: act(fn(x) + bbf)

    nnz = packed.nnz if packed.nnz >= 0 else int((w32 != 0).sum())
    return {
        "ours": (ours, torch.float32, packed.nbytes),
        "ours_fp16": (ours, torch.float16, packed.nbytes),
        "dense_fp32": dense(torch.float32),
        "dense_fp16": dense(torch.float16),
        "dense_bf16": dense(torch.bfloat16),
        "csr_fp32": (csr, torch.float32, nnz * 8 + 4 * (w32.shape[0] + 1)),
        "int4_bf16": (int4, torch.bfloat16, w32.numel() // 2 + w32.numel() // 128 * 4),
    }


def config_variant(packed, bias: torch.Tensor, config: dict):
    """Provider factory of ``eie_linear_triton`` with forced ``config`` (``{"kernel": "split"}``: the two-kernel
    design; ``{"skip_zero_chunks": True}``: the zero-chunk skip)."""
    from dc_lightning.kernels.sparse import op as E

    def factory(i):
        p = packed if i == 0 else clone_packed(packed)
        return lambda x: E.eie_linear_triton(x, p, bias, config=config)

    return factory


def run_layers(batches, floor: dict) -> list[dict]:
    from dc_lightning.kernels.sparse import layout as L
    from dc_lightning.kernels.sparse import op as E

    rows_out = []
    for li, (name, n_in, n_out, wd, ad, eie_us) in enumerate(LAYERS):
        rows, cols, codes, codebook, bias = random_layer(n_in, n_out, wd, seed=li, device=DEV)
        t0 = time.time()
        packed = L.pack(n_out, n_in, rows, cols, codes, codebook, device=DEV)
        pack_s = time.time() - t0
        provs = build_providers(bias, packed)
        for B in batches:
            x32 = random_activations(B, n_in, ad, seed=100 + li, device=DEV)
            rec = {"layer": name, "in": n_in, "out": n_out, "weight_density": wd, "act_density": ad, "batch": B,
                   "nnz": packed.nnz, "padding": round(packed.padding, 4), "chunk": packed.chunk,
                   "packed_bytes": packed.nbytes, "pack_s": round(pack_s, 3), "eie_us": eie_us}  # fmt: skip
            nbytes = packed.nbytes + x32.numel() * 4 + B * n_out * 4
            rec["floor_us"] = floor["graph_node_us"] + nbytes / floor["copy_bw_Bps"] * 1e6
            for pname, (factory, dt, wbytes) in provs.items():
                try:  # every provider rotated through copies in a CUDA graph: GPU time, weights from HBM
                    rec[pname] = rotation_us(factory, x32.to(dt), wbytes)
                except Exception as err:  # a peer that does not run on this shape/GPU is recorded, not fatal
                    rec[pname] = float("nan")
                    rec[pname + "_error"] = f"{type(err).__name__}: {str(err)[:120]}"
            ours_fn = provs["ours"][0](0)
            # one eager call: Python dispatch and launch overhead included
            rec["ours_eager"] = eager_us(lambda f=ours_fn, x=x32: f(x), repeats=_reps(), device=DEV)
            split = config_variant(packed, bias, {"kernel": "split"})  # the previous two-kernel design
            rec["ours_2k"] = rotation_us(split, x32, packed.nbytes)
            if B == 1:
                skip = config_variant(packed, bias, {"skip_zero_chunks": True})
                rec["ours_skipzero"] = rotation_us(skip, x32, packed.nbytes)
            if DEV == "cuda":
                tuned = E.autotune(packed, (B,), torch.float32, bias=bias)
                rec["tuned_cfg"] = json.dumps(tuned.get(B, {}))
                rec["ours_tuned"] = rotation_us(provs["ours"][0], x32, packed.nbytes)  # the op looks it up now
            else:
                rec["ours_tuned"] = rec["ours"]
            rec["ours_best"] = min(rec["ours"], rec["ours_tuned"])
            rec["speedup_vs_fp16"] = rec["dense_fp16"] / rec["ours_best"]
            rec["ours_over_floor"] = rec["ours_best"] / rec["floor_us"]
            rows_out.append(rec)
            print(f"{name:8s} B={B:<3d} ours {rec['ours']:7.2f} tuned {rec['ours_tuned']:7.2f} "
                  f"fp16 {rec['dense_fp16']:7.2f}  int4 {rec.get('int4_bf16', float('nan')):7.2f}  "
                  f"csr {rec['csr_fp32']:7.2f}  floor {rec['floor_us']:6.2f}", flush=True)  # fmt: skip
        del provs, packed
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return rows_out


LAYER_COLUMNS = ["layer", "batch", *[(c, c, ".2f") for c in (
    "ours", "ours_tuned", "ours_2k", "ours_eager", "ours_fp16", "dense_fp32", "dense_fp16", "dense_bf16", "csr_fp32",
    "int4_bf16", "floor_us", "eie_us", "ours_skipzero")],
    ("x vs fp16", "speedup_vs_fp16", ".2f"), ("ours/floor", "ours_over_floor", ".2f")]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# FC stacks + energy
# ----------------------------------------------------------------------------------------------------------------


def _nvml_energy_reader():
    """Return ``read() -> millijoules`` from NVML's cumulative counter (pynvml, else ctypes), or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
        return lambda: float(pynvml.nvmlDeviceGetTotalEnergyConsumption(h))
    except Exception:
        pass
    try:
        import ctypes

        lib = ctypes.CDLL("libnvidia-ml.so.1")
        lib.nvmlInit_v2()
        h = ctypes.c_void_p()
        lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(torch.cuda.current_device()), ctypes.byref(h))
        e = ctypes.c_ulonglong()

        def read() -> float:
            if lib.nvmlDeviceGetTotalEnergyConsumption(h, ctypes.byref(e)) != 0:
                raise RuntimeError("nvmlDeviceGetTotalEnergyConsumption failed")
            return float(e.value)

        read()
        return read
    except Exception:
        return None


def energy_per_inference(graph, graph_us: float, batch: int, reader, seconds: float) -> dict:
    """Replay ``graph`` in bursts for at least ``seconds`` of wall time and read NVML's energy counter around it."""
    burst = max(1, int(0.05 / (graph_us * 1e-6)))
    n_rep = 0
    torch.cuda.synchronize()
    e0, t0 = reader(), time.perf_counter()
    while True:
        for _ in range(burst):
            graph.replay()
        n_rep += burst
        torch.cuda.synchronize()
        if time.perf_counter() - t0 >= seconds:
            break
    e1, t1 = reader(), time.perf_counter()
    return {"energy_uJ_per_inference": (e1 - e0) * 1e3 / (n_rep * batch), "avg_power_W": (e1 - e0) * 1e-3 / (t1 - t0),
            "energy_window_s": t1 - t0}  # fmt: skip


def run_stacks(batches, energy_s: float = 1.5) -> list[dict]:
    from dc_lightning.kernels.sparse import layout as L
    from dc_lightning.kernels.sparse import op as E

    spec = {name: (n_in, n_out, wd, ad) for name, n_in, n_out, wd, ad, _ in LAYERS}
    reader = _nvml_energy_reader() if DEV == "cuda" else None
    recs = []
    for stack, names in STACKS.items():
        layers = []
        for i, nm in enumerate(names):
            n_in, n_out, wd, _ = spec[nm]
            rows, cols, codes, codebook, bias = random_layer(n_in, n_out, wd, seed=50 + i, device=DEV)
            packed = L.pack(n_out, n_in, rows, cols, codes, codebook, device=DEV)
            layers.append((packed, bias, build_providers(bias, packed, relu=i < len(names) - 1)))
        methods = {"ours_fp32": "ours", "ours_fp16": "ours_fp16", "dense_fp16": "dense_fp16",
                   "int4_bf16": "int4_bf16", "csr_fp32": "csr_fp32"}  # fmt: skip
        n_in0, _, _, ad0 = spec[names[0]]
        for B in batches:
            if DEV == "cuda":  # load-time autotuning of every layer for this batch size, both activation dtypes
                for j, (packed, bias, _) in enumerate(layers):
                    for dt in (torch.float32, torch.float16):
                        E.autotune(packed, (B,), dt, bias=bias, relu=j < len(layers) - 1)
            x32 = random_activations(B, n_in0, ad0, seed=7, device=DEV)
            ref = None
            for mname, pname in methods.items():
                rec = {"stack": stack, "batch": B, "method": mname}
                try:
                    per_layer = [provs[pname] for _, _, provs in layers]
                    dt = per_layer[0][1]
                    copies = copies_for(sum(p[2] for p in per_layer)) if DEV == "cuda" else 1
                    chains = [[p[0](i) for p in per_layer] for i in range(copies)]
                    x = x32.to(dt).clone()

                    def run(chain, x=x):
                        h = x
                        for fn in chain:
                            h = fn(h)
                        return h

                    calls = [lambda c=c, run=run: run(c) for c in chains]
                    if DEV == "cuda":
                        graph, outs = capture(calls)
                        rec["graph_us"] = replay_us(graph, repeats=50, per=copies)
                    else:
                        outs = [call() for call in calls]
                        rec["graph_us"] = time_calls(calls, repeats=1, device=DEV)
                    y = outs[0].float()
                    ref = y.clone() if ref is None else ref
                    rec["rel_err_vs_ours_fp32"] = float((y - ref).norm() / ref.norm())
                    rec["copies"] = copies
                    rec["us_per_inference"] = rec["graph_us"] / B
                    if reader is not None and mname in ("ours_fp32", "dense_fp16", "int4_bf16"):
                        # one replay runs every copy once: energy per inference counts copies * B inferences
                        rec.update(energy_per_inference(graph, rec["graph_us"] * copies, B * copies, reader, energy_s))
                    if DEV == "cuda":
                        del graph
                    del chains, outs
                except Exception as err:  # noqa: BLE001
                    rec["error"] = f"{type(err).__name__}: {str(err)[:160]}"
                recs.append(rec)
                print(f"{stack:8s} B={B:<3d} {mname:11s} {rec.get('graph_us', float('nan')):8.2f} us  "
                      f"{rec.get('energy_uJ_per_inference', float('nan')):9.2f} uJ/inf  {rec.get('error', '')}",
                      flush=True)  # fmt: skip
        del layers
        if DEV == "cuda":
            torch.cuda.empty_cache()
    base = {(r["stack"], r["batch"]): r.get("graph_us") for r in recs if r["method"] == "dense_fp16"}
    for r in recs:
        b = base.get((r["stack"], r["batch"]))
        r["speedup_vs_dense_fp16"] = b / r["graph_us"] if b and r.get("graph_us") else float("nan")
    return recs


STACK_COLUMNS = ["stack", "batch", "method", ("graph us / batch", "graph_us", ".2f"),
                 ("us / inference", "us_per_inference", ".2f"), ("x vs dense fp16", "speedup_vs_dense_fp16", ".2f"),
                 ("uJ / inference (NVML)", "energy_uJ_per_inference", ".1f"),
                 ("avg W", "avg_power_W", ".0f")]  # fmt: skip


def plot(recs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [n for n, *_ in LAYERS]
    batches = sorted({r["batch"] for r in recs})
    fig, ax = plt.subplots(figsize=(11, 4.5))
    w = 0.8 / len(batches)
    for i, B in enumerate(batches):
        vals = [next((r["speedup_vs_fp16"] for r in recs if r["layer"] == ln and r["batch"] == B), math.nan)
                for ln in layers]  # fmt: skip
        ax.bar([j + i * w for j in range(len(layers))], vals, w, label=f"batch {B}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(layers))], layers)
    ax.set_ylabel("speed-up over dense fp16 cuBLAS")
    ax.set_yscale("log", base=2)
    ax.set_title("EIE Triton kernel (fp32 activations, 4-bit codebook), per layer [EIE Table III]")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------------------------------
# config sweep (to set the shape heuristics of choose_config)
# ----------------------------------------------------------------------------------------------------------------


def run_sweep(layers=("VGG-6", "Alex-7", "Alex-8", "NT-Wd"), batches=(1, 16, 64)) -> list[dict]:
    from dc_lightning.kernels.sparse import layout as L
    from dc_lightning.kernels.sparse import op as E
    from dc_lightning.kernels.sparse import tuning as T

    spec = {name: (n_in, n_out, wd, ad) for name, n_in, n_out, wd, ad, _ in LAYERS}
    recs = []
    for li, name in enumerate(layers):
        n_in, n_out, wd, ad = spec[name]
        rows, cols, codes, codebook, bias = random_layer(n_in, n_out, wd, seed=li, device=DEV)
        packs = {}
        for rt, ch in [(16, 2048), (32, 512), (32, 1024), (32, 2048), (64, 512)]:
            p = L.pack(n_out, n_in, rows, cols, codes, codebook, row_tile=rt, chunk=ch, device=DEV)
            packs[(rt, ch)] = [p] + [clone_packed(p) for _ in range(copies_for(p.nbytes) - 1 if DEV == "cuda" else 0)]
        w32 = L.decode_dense(packs[(32, 1024)][0])
        for B in batches:
            if B > 1 and name not in ("VGG-6", "Alex-7"):
                continue  # the batched configs are swept on two layers only (device time)
            x = random_activations(B, n_in, ad, seed=3, device=DEV)
            ref = x.double() @ w32.double().T
            configs = []
            for rt, ch in packs:
                n_chunks = -(-n_in // ch)
                if B == 1:
                    for bk, cpp in itertools.product((8, 16, 32), (1, 2, 4)):
                        if cpp <= n_chunks:
                            configs.append((rt, ch, {"block_b": 1, "block_k": bk, "chunks_per_prog": cpp}))
                elif rt in (32, 64) and ch in (512, 2048):
                    for bb, acc, cpp in itertools.product((4, 8, 16, 32), (1024, 4096), (1, 4)):
                        if cpp <= n_chunks:
                            cfg = {"block_b": bb, "block_k": max(1, acc // (rt * bb)), "chunks_per_prog": cpp,
                                   "num_warps": 4 if acc <= 1024 else 8}  # fmt: skip
                            configs.append((rt, ch, cfg))
            for rt, ch, cfg in configs:
                copies = packs[(rt, ch)]
                try:
                    y = E.eie_linear_triton(x, copies[0], config=cfg)
                    err = float((y.double() - ref).norm() / ref.norm())
                    us = time_calls([lambda p=p, cfg=cfg, x=x: E.eie_linear_triton(x, p, config=cfg) for p in copies],
                                    repeats=_reps(), device=DEV)  # fmt: skip
                except Exception as e:  # noqa: BLE001
                    err, us = float("nan"), float("nan")
                    print("sweep error", name, B, rt, ch, cfg, e)
                recs.append({"layer": name, "batch": B, "row_tile": rt, "chunk": ch, "padding": copies[0].padding,
                             **cfg, "us": us, "rel_err": err})  # fmt: skip
            best = sorted((r for r in recs if r["layer"] == name and r["batch"] == B), key=lambda r: r["us"])[:5]
            default = T.choose_config(B, n_out, -(-n_in // packs[(32, 1024)][0].chunk), 32)
            print(f"SWEEP {name} B={B}: default-ish {default}")
            print_table(best, [("us", "us", ".2f"), "row_tile", "chunk", "block_b", "block_k", "chunks_per_prog",
                               "num_warps", ("padding", "padding", ".2f"), ("rel err", "rel_err", ".1e")])  # fmt: skip
    return recs


def main(argv: list[str] | None = None) -> int:
    global DEV, LAYERS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=results_dir("eie"))
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--stack-batches", default="1,16")
    ap.add_argument("--sweep", action="store_true", help="only run the launch-config sweep")
    ap.add_argument("--no-stacks", action="store_true")
    ap.add_argument("--energy-s", type=float, default=1.0)
    ap.add_argument("--smoke", action="store_true", help="CPU plumbing check: interpreter, layers scaled down 32x")
    args = ap.parse_args(argv)
    if args.smoke:
        DEV = "cpu"
        LAYERS = [(n, max(1, i // 32), max(1, o // 32), w, a, e) for n, i, o, w, a, e in EIE_LAYERS]
    elif not torch.cuda.is_available():
        print("bench_eie needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # dense fp32 peer is true fp32
    info = env_info(DEV)
    print(json.dumps(info))
    if args.sweep:
        write_csv(run_sweep(), out / "eie_sweep.csv")
        return 0
    floor = floor_parts(DEV)
    info.update(floor)
    print(f"one graph node {floor['graph_node_us']:.2f} us, copy bandwidth {floor['copy_bw_Bps'] / 1e12:.2f} TB/s")
    recs = run_layers([int(b) for b in args.batches.split(",")], floor)
    write_csv(recs, out / "eie_layers.csv")
    try:
        plot(recs, out / "eie_speedup.png")
    except Exception as err:  # noqa: BLE001
        print("plot failed:", err)
    stack_recs = []
    if not args.no_stacks:
        stack_recs = run_stacks([int(b) for b in args.stack_batches.split(",")], args.energy_s)
        write_csv(stack_recs, out / "eie_stacks.csv")
    lt = print_table(recs, LAYER_COLUMNS, title=json.dumps(info))
    st = print_table(stack_recs, STACK_COLUMNS) if stack_recs else ""
    (out / "eie_tables.md").write_text(json.dumps(info) + "\n\n" + lt + "\n\n" + st + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
