"""Issue 23 benchmark: the tensor-core LUT layout (``tc``) vs dense fp16/bf16 cuBLAS, int4 weight-only and the sparse
EIE kernel, at every batch from 1 to 64, in one process.

Layers: EIE's nine [EIE Table III] at their densities with EIE's 4-bit table (15 shared values + the padding zero:
entry 0.0), ReLU-like inputs; the AlexNet and VGG-16 FC6-8 stacks (fc -> ReLU -> fc -> ReLU -> fc, each layer's
ReLU fused); transformer decode shapes (4096x4096, 11008x4096, 4096x11008 as out x in; density 0.5 and 1.0; a
dense layer uses all 16 entries). Providers:

* ``tc`` (heuristic launch configuration) and ``tc_tuned`` (``autotune_tc`` per layer and batch bucket);
* ``sparse``: the sliced-ELL kernel (``kernels/sparse``), tuned per batch, the batch 1-4 path of sparse layers;
* ``ours``: per layer and batch the faster of what the layer holds by default (``tc`` at density >= 0.5 alone; a
  sparse layer its sparse encoding, plus the tc copy where ``CompressedLinear(alternate=True)`` keeps it), with
  that choice's bytes;
* ``fp16`` / ``bf16``: ``F.linear`` (cuBLAS) on the dense weight; ``int4``: ``torch.ops.aten._weight_int4pack_mm``
  (bf16, group 128; K padded to 128).

Timing (:mod:`bench.harness.timing`): each provider captured in ONE CUDA graph rotating through enough copies of the
layer to exceed twice the L2 (every call reads HBM, no launch gaps); median of 15 replays / copies. Every output is
checked against a float64 product of the same weights (fp16 rel. err <= 2e-3). Results are rewritten after every
layer under ``--out``: ``layers.csv``, ``results.json``, ``summary.md``.

    python -m bench.kernels.bench_tc                 # on the GPU machine, writes bench/results/<date>/tc/
    python -m bench.kernels.bench_tc --smoke         # CPU plumbing under the Triton interpreter, tiny layers
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before dc_lightning.kernels imports triton

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.harness.eie import EIE_LAYERS, STACKS, clone_packed, random_activations, safe_int4  # noqa: E402
from bench.harness.report import env_info, markdown_table, results_dir, write_csv, write_json  # noqa: E402
from bench.harness.timing import copies_for, floor_parts, time_calls  # noqa: E402
from dc_lightning.kernels.sparse import op as sparse_op  # noqa: E402
from dc_lightning.kernels.sparse.layout import pack as pack_sparse  # noqa: E402
from dc_lightning.kernels.tc import op as tc_op  # noqa: E402
from dc_lightning.kernels.tc.layout import pack_tc  # noqa: E402

TRANSFORMER = [("T-4096x4096", 4096, 4096), ("T-11008x4096", 11008, 4096), ("T-4096x11008", 4096, 11008)]
BATCHES = (1, 2, 4, 8, 16, 32, 64)
TOL = 2e-3


SHARED_TABLE: list[bool] = [False]
SPARSE_TUNE_MAX = [16]  # largest batch the sparse kernel is tuned at (--sparse-tune-max)
CONFIGS_FROM: dict[tuple[str, int], dict] = {}  # (layer, batch) -> tc config of an earlier run (--configs-from)
BEST_PATH: dict[tuple[str, int], str] = {}  # (layer, batch) -> "tc" / "sparse": the faster, measured


def load_configs(path: str) -> dict[tuple[str, int], dict]:
    """The ``tc_cfg`` of every row of an earlier run's ``results.json``."""
    import json

    rows = json.loads(Path(path).read_text()).get("rows", [])
    BEST_PATH.update({(r["layer"], int(r["batch"])): r["ours_path"] for r in rows if r.get("ours_path")})
    return {(r["layer"], int(r["batch"])): r["tc_cfg"] for r in rows if isinstance(r.get("tc_cfg"), dict)}


def eie_layer(n_out: int, n_in: int, density: float, seed: int, device: str):
    """Random pruned layer with EIE's 4-bit table: ``(rows, cols, codes, codebook[15], bias)``; a dense layer
    (``density >= 1``) gets 16 shared values."""
    g = torch.Generator(device=device).manual_seed(seed)
    n_cb = 16 if density >= 1.0 else 15
    if density >= 1.0:
        rows = torch.arange(n_out, device=device).repeat_interleave(n_in)
        cols = torch.arange(n_in, device=device).repeat(n_out)
    else:
        rows, cols = (torch.rand(n_out, n_in, generator=g, device=device) < density).nonzero(as_tuple=True)
    codes = torch.randint(0, n_cb, (rows.numel(),), generator=g, device=device)
    codebook = torch.randn(n_cb, generator=g, device=device) * 0.05
    if SHARED_TABLE[0]:
        codebook = torch.linspace(-0.1, 0.1, n_cb, device=device)
    bias = torch.randn(n_out, generator=g, device=device) * 0.01
    return rows, cols, codes, codebook, bias


def dense_of(n_out, n_in, rows, cols, codes, codebook) -> torch.Tensor:
    w = torch.zeros(n_out, n_in, device=codebook.device)
    w[rows, cols] = codebook[codes]
    return w


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


class Layer:
    """One benchmark layer: its packings, dense weights and int4 peer (built once, copies made per timing)."""

    def __init__(self, name: str, n_out: int, n_in: int, density: float, seed: int, device: str, relu: bool):
        self.name, self.n_out, self.n_in, self.density, self.relu = name, n_out, n_in, density, relu
        rows, cols, codes, cb, self.bias = eie_layer(n_out, n_in, density, seed, device)
        self.nnz = rows.numel()
        t = time.perf_counter()
        self.tc = pack_tc(n_out, n_in, rows, cols, codes, cb)
        self.pack_s = time.perf_counter() - t
        self.sparse = pack_sparse(n_out, n_in, rows, cols, codes, cb) if density < 0.5 else None
        self.w32 = dense_of(n_out, n_in, rows, cols, codes, cb)
        self.w16 = self.w32.half()
        self.wbf = self.w32.bfloat16()
        self.int4 = safe_int4(self.w32) if device == "cuda" else None
        self.bias16 = self.bias.half()

    def ref(self, x: torch.Tensor) -> torch.Tensor:
        y = x.double() @ self.w32.double().T + self.bias.double()
        return y.relu() if self.relu else y

    def bytes(self, provider: str) -> int:
        if provider.startswith("tc"):
            return self.tc.nbytes
        if provider == "sparse":
            return self.sparse.nbytes
        if provider in ("fp16", "bf16"):
            return self.w16.numel() * 2
        if provider == "int4":
            return self.w16.numel() // 2 + 4 * self.w16.numel() // 128  # codes + bf16 scale/zero per group of 128
        return 0


def _dense_fn(w: torch.Tensor, bias: torch.Tensor, relu: bool, dtype: torch.dtype):
    w = w.clone()

    def fn(x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(dtype), w, bias)
        return y.relu_() if relu else y

    return fn


def _packed_fn(run, packed, bias: torch.Tensor, relu: bool, **kw):
    p = clone_packed(packed)
    return lambda x: run(x, p, bias, relu, **kw)


def _tc_untuned(x: torch.Tensor, p, bias: torch.Tensor, relu: bool) -> torch.Tensor:
    return tc_op.tc_linear_triton(x, p, bias, relu, config=_untuned(x, p))


def _int4_fn(int4, bias: torch.Tensor, relu: bool):
    def fn(x: torch.Tensor) -> torch.Tensor:
        y = int4(x.bfloat16()) + bias
        return y.relu_() if relu else y

    return fn


def providers(layer: Layer, device: str, tuned: bool) -> dict:
    """``name -> make(copy_index) -> fn(x)``: each provider's call on its own copy of the weights."""
    L = layer
    out = {
        "fp16": lambda i: _dense_fn(L.w16, L.bias16, L.relu, torch.float16),
        "tc": lambda i: _packed_fn(_tc_untuned, L.tc, L.bias16, L.relu),
    }
    if tuned:
        out["tc_tuned"] = lambda i: _packed_fn(tc_op.tc_linear, L.tc, L.bias16, L.relu)
    if L.sparse is not None:
        out["sparse"] = lambda i: _packed_fn(sparse_op.eie_linear, L.sparse, L.bias16, L.relu)
    if device == "cuda":
        out["bf16"] = lambda i: _dense_fn(L.wbf, L.bias.bfloat16(), L.relu, torch.bfloat16)
        if L.int4 is not None:
            out["int4"] = lambda i: _int4_fn(L.int4 if i == 0 else L.int4.clone(), L.bias.bfloat16(), L.relu)
    return out


def _untuned(x: torch.Tensor, p) -> dict:
    """The heuristic configuration (ignores what autotune_tc recorded)."""
    key = tc_op.tc_tune_key(x.shape[0], p, x.dtype)
    saved = tc_op.TC_TUNED.pop(key, None)
    try:
        return tc_op.choose_tc_config(x.shape[0], p, x.dtype)
    finally:
        if saved is not None:
            tc_op.TC_TUNED[key] = saved


def bench_layer(layer: Layer, batches, device: str, tuned: bool, repeats: int) -> list[dict]:
    rows = []
    cfgs: dict[int, dict] = {}
    if tuned and device == "cuda":
        t = time.perf_counter()
        known = {b: CONFIGS_FROM[(layer.name, b)] for b in batches if (layer.name, b) in CONFIGS_FROM}
        for b, cfg in known.items():  # --configs-from: another run's picks (e.g. the H200's, replayed on an H100)
            tc_op.TC_TUNED[tc_op.tc_tune_key(b, layer.tc, torch.float16)] = dict(cfg)
            cfgs[b] = dict(cfg)
        todo = tuple(b for b in batches if b not in known)
        if todo:
            got = tc_op.autotune_tc(layer.tc, todo, torch.float16, layer.bias16, layer.relu, rep_ms=10)
            cfgs.update({b: {k: v for k, v in c.items() if k != "us"} for b, c in got.items()})
        if layer.sparse is not None:
            sparse_op.autotune(layer.sparse, tuple(b for b in batches if b <= SPARSE_TUNE_MAX[0]), torch.float16,
                               layer.bias16, layer.relu)  # fmt: skip
        print(f"  autotune {layer.name}: {time.perf_counter() - t:.1f} s", flush=True)
    makers = providers(layer, device, tuned)
    for b in batches:
        x = random_activations(b, layer.n_in, 0.35, device=device).half()
        ref = layer.ref(x)
        row = {"layer": layer.name, "out": layer.n_out, "in": layer.n_in, "density": layer.density, "batch": b}
        if b in cfgs:
            row["tc_cfg"] = cfgs[b]
        for name, make in makers.items():
            try:
                fn0 = make(0)
                err = rel_err(fn0(x).float(), ref)
                n = copies_for(layer.bytes(name)) if device == "cuda" else 2
                fns = [fn0] + [make(i) for i in range(1, n)]
                us = time_calls([lambda f=f, x=x: f(x) for f in fns], repeats=repeats, device=device)
                row[f"{name}_us"], row[f"{name}_err"] = us, err
                if name.startswith("tc") and not err <= TOL:
                    row[f"{name}_WRONG"] = err
            except Exception as e:  # noqa: BLE001 - recorded; the other providers still run
                row[f"{name}_fail"] = f"{type(e).__name__}: {str(e)[:200]}"
                traceback.print_exc(limit=2)
        tc_best = min((row.get(k, math.inf) for k in ("tc_us", "tc_tuned_us")), default=math.inf)
        cands = {"tc": (tc_best, layer.tc.nbytes)}
        if layer.sparse is not None and "sparse_us" in row:
            cands["sparse"] = (row["sparse_us"], layer.sparse.nbytes)
        path = min(cands, key=lambda k: cands[k][0])
        row["ours_path"], row["ours_us"] = path, cands[path][0]
        BEST_PATH[(layer.name, b)] = path
        row["ours_MB"] = sum(v[1] for v in cands.values()) / 1e6 if layer.sparse is not None else layer.tc.nbytes / 1e6
        row["tc_MB"], row["fp16_MB"] = layer.tc.nbytes / 1e6, layer.bytes("fp16") / 1e6
        if layer.sparse is not None:
            row["sparse_MB"] = layer.sparse.nbytes / 1e6
        for k in ("tc", "tc_tuned", "ours", "int4", "sparse"):
            if f"{k}_us" in row and "fp16_us" in row:
                row[f"{k}_vs_fp16"] = row["fp16_us"] / row[f"{k}_us"]
        rows.append(row)
        print("  " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                              if not k.endswith("_err")), flush=True)  # fmt: skip
    return rows


def summarize(rows: list[dict]) -> str:
    lines = []
    for b in sorted({r["batch"] for r in rows}):
        sel = [r for r in rows if r["batch"] == b and r["layer"] in {n for n, *_ in EIE_LAYERS} and "ours_vs_fp16" in r]
        if sel:
            gm = math.exp(sum(math.log(r["ours_vs_fp16"]) for r in sel) / len(sel))
            slower = [r["layer"] for r in sel if r["ours_vs_fp16"] < 1.0]
            beats_int4 = sum(1 for r in sel if r.get("int4_us", math.inf) > r["ours_us"])
            lines.append(f"batch {b}: EIE geomean ours/fp16 {gm:.2f}x over {len(sel)} layers; slower than fp16: "
                         f"{slower or 'none'}; faster than int4 on {beats_int4}/{len(sel)}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny layers on the CPU under the Triton interpreter")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--layers", default="eie,stacks,transformer", help="comma list of eie, stacks, transformer")
    ap.add_argument("--only", default="", help="comma list of layer names to keep")
    ap.add_argument("--no-tune", action="store_true", help="skip autotuning (tc_tuned and a tuned sparse)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--shared-table", action="store_true",
                    help="every layer the same 15 values (one compiled kernel per configuration instead of one per "
                         "layer: faster tuning; the speed does not depend on the values)")
    ap.add_argument("--sparse-tune-max", type=int, default=16,
                    help="tune the sparse kernel at batches up to this one (heuristic configuration above it)")
    ap.add_argument("--configs-from", default=None,
                    help="results.json of earlier runs (comma list): their tuned tc configurations are used instead of "
                         "autotuning")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new layers after this many seconds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    SHARED_TABLE[0] = bool(args.shared_table)
    SPARSE_TUNE_MAX[0] = args.sparse_tune_max
    for path in filter(None, (args.configs_from or "").split(",")):
        CONFIGS_FROM.update(load_configs(path))
    device = "cpu" if args.smoke else "cuda"
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "tc" if os.environ.get("OUT") else
                                           results_dir("tc"))  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    scale = 32 if args.smoke else 1
    specs = []  # (name, out, in, density, relu)
    kinds = set(args.layers.split(","))
    if "eie" in kinds:
        specs += [(n, o // scale, i // scale, d, True) for n, i, o, d, _a, _e in EIE_LAYERS]
    if "transformer" in kinds:
        specs += [(f"{n}@{d}", o // scale, i // scale, d, False) for n, o, i in TRANSFORMER for d in (0.5, 1.0)]
    if args.only:
        keep = set(args.only.split(","))
        specs = [s for s in specs if s[0] in keep]
    env = env_info(device)
    floor = floor_parts(device)
    results = {"env": env, "floor": floor, "args": vars(args), "rows": [], "compile_s": {}}
    print(env, floor, flush=True)
    for k, (name, n_out, n_in, d, relu) in enumerate(specs):
        if time.perf_counter() - t0 > args.budget_s:
            results.setdefault("skipped", []).append(name)
            continue
        print(f"{name} {n_out}x{n_in} density {d}", flush=True)
        layer = Layer(name, n_out, n_in, d, seed=k, device=device, relu=relu)
        if layer.int4 is not None:
            results["int4_contract"] = getattr(layer.int4, "contract", "failed")
        if device == "cuda":  # first launch = compile of this layer's table (one kernel per table and dtype)
            x = torch.zeros(16, n_in, device=device, dtype=torch.float16)
            t = time.perf_counter()
            tc_op.tc_linear_triton(x, layer.tc, None, False)
            torch.cuda.synchronize()
            results["compile_s"][name] = time.perf_counter() - t
        results["rows"] += bench_layer(layer, batches, device, not args.no_tune and not args.smoke, args.repeats)
        write_json(results, out / "results.json")
        write_csv(results["rows"], out / "layers.csv")
        del layer
        if device == "cuda":
            torch.cuda.empty_cache()
    if "stacks" in kinds and time.perf_counter() - t0 <= args.budget_s:
        results["stacks"] = bench_stacks(batches, device, scale, args.repeats)
    summary = summarize(results["rows"])
    results["summary"] = summary
    write_json(results, out / "results.json")
    write_csv(results["rows"], out / "layers.csv")
    cols = ["layer", "batch", *[(c, c, ".1f") for c in ("fp16_us", "int4_us", "sparse_us", "tc_us", "tc_tuned_us")],
            "ours_path", ("ours_us", "ours_us", ".1f"), ("ours/fp16", "ours_vs_fp16", ".2f"),
            ("ours_MB", "ours_MB", ".2f"), ("fp16_MB", "fp16_MB", ".2f")]  # fmt: skip
    md = markdown_table(results["rows"], cols)
    (out / "summary.md").write_text(f"{env}\n\n{summary}\n\n{md}\n")
    print(md)
    print(summary)
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s")
    return 0


def bench_stacks(batches, device: str, scale: int, repeats: int) -> list[dict]:
    """FC6 -> ReLU -> FC7 -> ReLU -> FC8 per network: the layers' fastest paths chained vs dense fp16."""
    by_name = {n: (o // scale, i // scale, d) for n, i, o, d, _a, _e in EIE_LAYERS}
    rows = []
    for net, names in STACKS.items():
        layers = [Layer(n, *by_name[n], seed=100 + k, device=device, relu=k < 2) for k, n in enumerate(names)]
        for L in layers:  # an earlier run's tuned configurations (the same shapes share a tune key)
            for b in batches:
                if (L.name, b) in CONFIGS_FROM:
                    tc_op.TC_TUNED[tc_op.tc_tune_key(b, L.tc, torch.float16)] = dict(CONFIGS_FROM[(L.name, b)])
        for b in batches:
            x = random_activations(b, layers[0].n_in, 0.35, device=device).half()
            total = sum(L.w16.numel() * 2 for L in layers)
            n = copies_for(total) if device == "cuda" else 2
            row = {"net": net, "batch": b}
            for name in ("fp16", "ours"):
                sets = [_stack_fns(layers, name, b) for _ in range(n)]
                row[f"{name}_us"] = time_calls([lambda s=s, x=x: _chain(x, s) for s in sets], repeats=repeats,
                                               device=device)  # fmt: skip
            row["ours_vs_fp16"] = row["fp16_us"] / row["ours_us"]
            rows.append(row)
            print("  stack", row, flush=True)
    return rows


def _chain(x: torch.Tensor, fns) -> torch.Tensor:
    for f in fns:
        x = f(x)
    return x


def _stack_fns(layers: list[Layer], name: str, batch: int) -> list:
    """One copy of a stack's calls: dense fp16, or per layer the path the layer's own rows measured fastest at this
    batch (``BEST_PATH``; without one, the sparse kernel at batch <= 4 for sparse layers, else tc), with the tuned
    configurations where recorded."""
    if name == "fp16":
        return [_dense_fn(L.w16, L.bias16, L.relu, torch.float16) for L in layers]
    def sparse(L: Layer) -> bool:
        return L.sparse is not None and BEST_PATH.get((L.name, batch), "sparse" if batch <= 4 else "tc") == "sparse"

    return [_packed_fn(sparse_op.eie_linear, L.sparse, L.bias16, L.relu) if sparse(L)
            else _packed_fn(tc_op.tc_linear, L.tc, L.bias16, L.relu) for L in layers]  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
