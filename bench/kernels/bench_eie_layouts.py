"""Issue 16 benchmark: compressed layouts (sparse ELL, dense packed-code LUT on tensor cores) vs dense and int4 peers.

One command, one process, every provider side by side in the same run:

* EIE's nine layers [EIE Table III] (random masks at the paper's densities, 4-bit codebooks, ReLU-like inputs) at
  batch 1/4/16/64 in fp16 and batch 1 in fp32; transformer decode shapes (4096x4096, 11008x4096, 4096x11008 as
  out x in) at 10/30/50/100 % density, 4-bit, batch 1 and 16 in fp16; the AlexNet and VGG-16 FC6-8 stacks.
* providers: ``sparse`` (EIE sliced-ELL kernels), ``lut`` (packed codes + tensor cores), ``ours`` (what
  ``CompressedLinear`` runs by default: layout by density, a sparse layer's LUT copy from batch 8), their autotuned
  variants (``*_tuned``), dense fp16 / bf16 cuBLAS, int4 weight-only (``_weight_int4pack_mm``, group 128, bf16),
  torch CSR fp16 (cuSPARSE) and 2:4 semi-structured fp16 at batch >= 16 (on a 2:4-pruned copy of the weight: a
  speed peer only).
* timing (:mod:`bench.harness.timing`): each provider captured in ONE CUDA graph that rotates through enough copies
  of the layer to exceed the 60 MB L2 (every call reads its weights from HBM, as in a network pass, no launch gaps);
  median of 15 replays, divided by the copies. Floor = bytes moved (weights + x + y) / measured copy bandwidth + one
  graph node.
* correctness: every provider's output vs a float64 dense product of the same weights, every shape/batch/dtype.
* autotuning: the layers' kernels are tuned once per batch (the chosen configs are written to ``configs.json``).

A time budget (``--budget-s``) orders the work: EIE layers, stacks, the torch.compile check, autotuning at batch
16/64 + re-timed stacks, transformer shapes, autotuning at batch 1 and of the transformer shapes; what does not fit
is recorded as skipped. Results are rewritten after every phase under ``--out``: ``layers.csv``, ``results.json``,
``configs.json``, ``summary.md``, ``speedup.png``.

Run from the repository root with the package importable (on the GPU machine: ``source bench/gpu/device_env.sh``)::

    python -m bench.kernels.bench_eie_layouts            # writes bench/results/<date>/eie_layouts/ ($OUT/... if set)

``--smoke`` runs the plumbing on the CPU under the Triton interpreter (tiny layers, wall-clock timing).
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

from bench.harness.eie import EIE_LAYERS, STACKS, clone_packed, make_int4  # noqa: E402
from bench.harness.report import env_info, results_dir, write_csv, write_json  # noqa: E402
from bench.harness.timing import capture, copies_for, floor_parts, time_calls  # noqa: E402
from dc_lightning.kernels import layouts  # noqa: E402
from dc_lightning.kernels.lut import op as lut_matmul  # noqa: E402
from dc_lightning.kernels.lut.layout import pack_lut  # noqa: E402
from dc_lightning.kernels.sparse import op as eie_spmv  # noqa: E402
from dc_lightning.kernels.sparse.layout import pack  # noqa: E402

# name, out_features, in_features (LLaMA-7B attention projection, MLP up/gate, MLP down)
TRANSFORMER = [("T-4096x4096", 4096, 4096), ("T-11008x4096", 11008, 4096), ("T-4096x11008", 4096, 11008)]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
OURS = ("sparse", "lut", "sparse_tuned", "lut_tuned")
BATCH_MIN = 8  # CompressedLinear's default: a sparse layer runs its LUT copy from this batch on
DUAL_BELOW = 0.3  # CompressedLinear's default: a lut layer below this density keeps a sparse copy


def default_path(layout: str, batch: int) -> str:
    """What CompressedLinear runs by default: the layer's layout, a sparse layer's LUT copy from BATCH_MIN on."""
    return "lut" if layout == "lut" or batch >= BATCH_MIN else "sparse"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dev = "cpu" if args.smoke else "cuda"
        self.t0 = time.time()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.configs: list[dict] = []
        self.failures: list[dict] = []
        self.skipped: list[str] = []
        self.stacks: list[dict] = []
        self.env = env_info(self.dev)
        if args.smoke:
            self.env["device"] += " (interpreter smoke)"
        self.repeats = 1 if args.smoke else 15  # the interpreter is slow: one timed round in --smoke

    # ------------------------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.args.budget_s - (time.time() - self.t0)

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)

    def fail(self, where: str, err: BaseException) -> None:
        self.failures.append({"where": where, "error": f"{type(err).__name__}: {err}"[:500]})
        self.log(f"FAILED {where}: {type(err).__name__}: {str(err)[:200]}")
        if self.args.verbose:
            traceback.print_exc()

    def time_graph(self, calls: list) -> float:
        """µs per call: the calls (one per weight copy) in one CUDA graph, median of replays / copies."""
        return time_calls(calls, repeats=self.repeats, device=self.dev)

    def copies(self, weight_bytes: int) -> int:
        return 2 if self.dev == "cpu" else copies_for(weight_bytes, l2_mb=self.args.l2_mb)

    def floor_setup(self) -> None:
        parts = floor_parts(self.dev)
        self.bw, self.node_us = parts["copy_bw_Bps"], parts["graph_node_us"]
        if self.dev == "cuda":
            self.env.update(copy_bw_tb_s=self.bw / 1e12, graph_node_us=self.node_us)
            self.log(f"copy {self.bw / 1e12:.2f} TB/s (read+write), one graph node {self.node_us:.2f} us")

    # ------------------------------------------------------------------------------------------------------
    def make_layer(self, n_in: int, n_out: int, density: float, seed: int) -> dict:
        g = torch.Generator(device=self.dev).manual_seed(seed)
        mask = torch.rand(n_out, n_in, generator=g, device=self.dev) < density
        rows, cols = mask.nonzero(as_tuple=True)
        del mask
        codes = torch.randint(0, 16, (rows.numel(),), generator=g, device=self.dev)
        codebook = torch.randn(16, generator=g, device=self.dev) * 0.05
        bias = torch.randn(n_out, generator=g, device=self.dev) * 0.01
        # the sparse packer sorts on the CPU: skip it for big dense-ish layers, which get the lut layout anyway
        sp = pack(n_out, n_in, rows, cols, codes, codebook, device=self.dev) if rows.numel() <= 6e6 else None
        lut = pack_lut(n_out, n_in, rows, cols, codes, codebook, device=self.dev)
        # nominal density: a random mask at exactly 10 % must not flip the layout from run to run
        layout, why = layouts.choose_layout(n_out, n_in, round(density * n_out * n_in), 16)
        w = torch.zeros(n_out, n_in, dtype=torch.float32, device=self.dev)
        w[rows, cols] = codebook[codes]
        return {"n_in": n_in, "n_out": n_out, "density": density, "nnz": rows.numel(), "sparse": sp, "lut": lut,
                "layout": layout.value, "why": why, "w": w, "bias": bias}  # fmt: skip

    def providers(self, L: dict, batch: int, dtype: torch.dtype, relu: bool = False) -> dict:
        """name -> (factory(copy) -> fn(x), input dtype, weight bytes, exact); ``relu``: ours fuse it, peers add one."""
        act = torch.relu if relu else (lambda t: t)
        w, bias = L["w"], L["bias"]
        sp, lut = L["sparse"], L["lut"]
        default = default_path(L["layout"], batch)

        def ours(kind):
            p0 = sp if kind == "sparse" else lut
            op = eie_spmv.eie_linear if kind == "sparse" else lut_matmul.lut_linear

            def factory(i):
                p = p0 if i == 0 else clone_packed(p0)
                return lambda x: op(x, p, bias, relu)

            return factory, dtype, p0.nbytes, True

        out = {k: ours(k) for k in ("sparse", "lut") if L[k] is not None}
        if default in out:
            out["ours"] = out[default]
        if self.dev == "cpu":
            return out
        w16, wbf = w.half(), w.bfloat16()
        b16, bbf = bias.half(), bias.bfloat16()

        def dense(m0, b0):
            def factory(i):
                m = m0 if i == 0 else m0.clone()
                return lambda x: act(F.linear(x, m, b0))

            return factory, m0.dtype, m0.nbytes, True

        out["dense_fp16"] = dense(w16, b16)
        out["dense_bf16"] = dense(wbf, bbf)
        if dtype == torch.float32:
            out["dense_fp32"] = dense(w, bias)

        def int4(i):
            fn = make_int4(w)
            return lambda x: act(fn(x) + bbf)

        out["int4_bf16"] = (int4, torch.bfloat16, w.numel() // 2 + w.numel() // 128 * 4, False)

        def csr(i):
            m = w16.to_sparse_csr()
            return lambda x: act((m @ x.t()).t() + b16)

        out["csr_fp16"] = (csr, torch.float16, L["nnz"] * 6 + 4 * L["n_out"], True)
        if batch >= 16:

            def semi(i):
                from torch.sparse import to_sparse_semi_structured

                v = w16.view(w16.shape[0], -1, 4)
                keep = v.abs().argsort(dim=-1, descending=True)[..., :2]
                pruned = torch.zeros_like(v).scatter(-1, keep, v.gather(-1, keep)).view_as(w16)
                m = to_sparse_semi_structured(pruned)
                return lambda x: act(F.linear(x, m, b16))

            out["semi24_fp16"] = (semi, torch.float16, w16.nbytes // 2 + w16.nbytes // 8, False)
        return out

    def check_only(self, name: str, L: dict, batch: int, dtype: torch.dtype) -> None:
        """Our kernels' outputs vs float64 in ``dtype`` (no timing): bf16 coverage at a small compile cost."""
        g = torch.Generator(device=self.dev).manual_seed(batch)
        x = torch.randn(batch, L["n_in"], generator=g, device=self.dev).abs().to(dtype)
        ref = x.double() @ L["w"].double().T + L["bias"].double()
        for prov, (factory, _, _, _) in self.providers(L, batch, dtype).items():
            if prov not in OURS:
                continue
            rec = {"layer": name, "batch": batch, "dtype": str(dtype).replace("torch.", ""), "provider": prov,
                   "layout": L["layout"], "density": L["density"], "check_only": True}  # fmt: skip
            try:
                y = factory(0)(x)
                rec["rel_err"] = ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                rec["ok"] = bool(rec["rel_err"] <= TOL[dtype])
                if not rec["ok"]:
                    self.failures.append({"where": f"{name} B={batch} {prov} {dtype}", "error": str(rec["rel_err"])})
            except Exception as err:  # noqa: BLE001
                self.fail(f"{name} B={batch} {rec['dtype']} {prov} (check)", err)
                rec["error"] = f"{type(err).__name__}: {err}"[:300]
            self.rows.append(rec)

    def measure_layer(self, name: str, L: dict, batch: int, dtype: torch.dtype, only: tuple | None = None,
                      tag: str = "") -> None:  # fmt: skip
        g = torch.Generator(device=self.dev).manual_seed(batch)
        x32 = torch.randn(batch, L["n_in"], generator=g, device=self.dev).abs()
        x32 = torch.where(torch.rand(x32.shape, generator=g, device=self.dev) < 0.4, x32, 0.0)
        ref = (x32.double() @ L["w"].double().T + L["bias"].double()).float()
        for prov, (factory, in_dtype, wbytes, exact) in self.providers(L, batch, dtype).items():
            if prov == "ours" or (only is not None and prov not in only):
                continue  # "ours" is one of sparse / lut (default_path); the stacks time it
            rec = {"layer": name, "out": L["n_out"], "in": L["n_in"], "density": L["density"], "batch": batch,
                   "dtype": str(dtype).replace("torch.", ""), "provider": prov + tag,
                   "layout": L["layout"]}  # fmt: skip
            try:
                x = x32.to(in_dtype if prov not in OURS else dtype)
                fns = [factory(i) for i in range(self.copies(wbytes))]
                y = fns[0](x)
                err = ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
                io = x.numel() * x.element_size() + y.numel() * y.element_size()
                rec.update(rel_err=err, weight_bytes=int(wbytes), bytes=int(wbytes + io))
                rec["ok"] = bool(err <= TOL[x.dtype]) if exact else None
                if rec["ok"] is False:
                    self.failures.append({"where": f"{name} B={batch} {prov}{tag}", "error": f"rel err {err:.2e}"})
                rec["us"] = self.time_graph([lambda f=f, x=x: f(x) for f in fns])
                rec["floor_us"] = self.node_us + rec["bytes"] / self.bw * 1e6
                del fns
            except Exception as err:  # noqa: BLE001 - one provider failing must not stop the run
                self.fail(f"{name} B={batch} {rec['dtype']} {prov}{tag}", err)
                rec["error"] = f"{type(err).__name__}: {err}"[:300]
            self.rows.append(rec)
        if self.dev == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------------------
    def layer_set(self) -> list[tuple[str, int, int, float]]:
        if self.args.smoke:  # chained shapes: the smoke run also builds the "tiny" stack
            return [("tiny-4%", 300, 40, 0.04), ("tiny-25%", 40, 33, 0.25), ("tiny-100%", 33, 20, 1.0)]
        return [(n, i, o, d) for n, i, o, d, _, _ in EIE_LAYERS]

    def transformer_set(self) -> list[tuple[str, int, int, float]]:
        if self.args.smoke:
            return [("T-tiny@30%", 256, 48, 0.3)]
        return [(f"{n}@{int(d * 100)}%", i, o, d) for n, o, i in TRANSFORMER for d in (0.1, 0.3, 0.5, 1.0)]

    def run_layers(self, layer_set, batches, fp32_b1: bool, phase: str) -> dict:
        built = {}
        for li, (name, n_in, n_out, dens) in enumerate(layer_set):
            if self.left() < 30:
                self.skipped.append(f"{phase}: {name} and later (budget)")
                break
            try:
                L = self.make_layer(n_in, n_out, dens, seed=li)
            except Exception as err:  # noqa: BLE001
                self.fail(f"{name} pack", err)
                continue
            built[name] = L
            sp_mb = L["sparse"].nbytes / 1e6 if L["sparse"] is not None else float("nan")
            self.log(f"{phase} {name} {n_out}x{n_in} d={dens} nnz={L['nnz']} layout={L['layout']} "
                     f"sparse {sp_mb:.2f} MB lut {L['lut'].nbytes / 1e6:.2f} MB ({L['why']})")  # fmt: skip
            for b in batches:
                self.measure_layer(name, L, b, torch.float16)
            if fp32_b1:
                self.measure_layer(name, L, 1, torch.float32)
                for b in (1, 16) if not self.args.smoke else ():  # the interpreter's tl.dot mis-reads bf16
                    self.check_only(name, L, b, torch.bfloat16)
            self.write()
        return built

    def autotune(self, built: dict, batches) -> None:
        """Tune the LUT kernel per layer and batch (batches in the given order, all layers per batch, so that the
        budget cuts the least important work), then re-time it as ``lut_tuned``. The sparse kernels' heuristics
        were tuned in earlier rounds (bench/RESULTS.md: within 1-5 % of autotune at batch 1-16); ``--tune-sparse``
        tunes them too."""
        for b in batches:
            for name, L in built.items():
                if self.left() < 45:
                    self.skipped.append(f"autotune: {name} B={b} and later (budget)")
                    return
                kinds = ["lut"]
                if self.args.tune_sparse and L["sparse"] is not None and L["layout"] == "sparse" and b <= 16:
                    kinds.append("sparse")
                for kind in kinds:
                    try:
                        t = time.time()
                        if kind == "lut":
                            got = lut_matmul.autotune_lut(L["lut"], (b,), torch.float16, L["bias"], rep_ms=5)
                        else:
                            got = eie_spmv.autotune(L["sparse"], (b,), torch.float16, L["bias"], rep_ms=5)
                        cfg = got.get(b)
                        self.configs.append({"layer": name, "batch": b, "kind": kind, "config": cfg,
                                             "tune_s": round(time.time() - t, 1)})  # fmt: skip
                        self.log(f"tuned {name} B={b} {kind} in {time.time() - t:.1f}s: {cfg}")
                    except Exception as err:  # noqa: BLE001
                        self.fail(f"autotune {name} B={b} {kind}", err)
                self.measure_layer(name, L, b, torch.float16, only=tuple(kinds), tag="_tuned")
            self.write()

    def stack_path(self, name: str, batch: int, prov: str) -> str:
        """The provider a stack uses for a layer: after tuning, ours = the layout CompressedLinear would pick."""
        if prov != "ours" or not any(r.get("provider", "").endswith("_tuned") for r in self.rows):
            return prov
        ps = self.table().get((name, batch, "float16"))
        return self.ours(name, batch, ps)[0].removesuffix("_tuned") if ps else prov

    def run_stacks(self, built: dict, batches, tag: str = "") -> None:
        """FC6 -> ReLU -> FC7 -> ReLU -> FC8, one graph per provider rotating through copies of the whole stack."""
        stacks = {"tiny": [n for n, *_ in self.layer_set()]} if self.args.smoke else STACKS
        for stack, names in stacks.items():
            if not all(n in built for n in names):
                self.skipped.append(f"stack {stack}: layers not built")
                continue
            Ls = [built[n] for n in names]
            for b in batches:
                if self.left() < 20:
                    self.skipped.append(f"stack {stack} B={b} and later (budget)")
                    return
                x = torch.randn(b, Ls[0]["n_in"], device=self.dev).abs().half()
                provs = ("ours",) if self.args.smoke or tag else ("ours", "dense_fp16", "int4_bf16")
                for prov in provs:
                    try:
                        per_layer = [
                            self.providers(L, b, torch.float16, relu=j < len(Ls) - 1)[self.stack_path(n, b, prov)]
                            for j, (n, L) in enumerate(zip(names, Ls, strict=True))
                        ]
                        copies = self.copies(sum(p[2] for p in per_layer))
                        chains = [[p[0](i) for p in per_layer] for i in range(copies)]
                        xi = x.to(per_layer[0][1])

                        def run(chain, xi=xi):
                            h = xi
                            for fn in chain:
                                h = fn(h)
                            return h

                        us = self.time_graph([lambda c=c, run=run: run(c) for c in chains])
                        self.stacks.append({"stack": stack, "batch": b, "provider": prov + tag, "us": us,
                                            "copies": copies})  # fmt: skip
                        del chains
                    except Exception as err:  # noqa: BLE001
                        self.fail(f"stack {stack} B={b} {prov}", err)
            self.write()

    def compile_check(self) -> None:
        """``torch.compile(fullgraph=True)`` and CUDA-graph replay of a CompressedLinear stack holding every path
        (sparse layer + its LUT batch copy, bitmap LUT, dense LUT), vs eager and float64."""
        from torch import nn

        from dc_lightning.inference.linear import CompressedLinear

        def quantized(n_in, n_out, density, seed):
            g = torch.Generator(device=self.dev).manual_seed(seed)
            lin = nn.Linear(n_in, n_out, device=self.dev)
            cb = torch.randn(16, generator=g, device=self.dev) * 0.05
            assign = torch.randint(0, 16, (n_out, n_in), generator=g, device=self.dev, dtype=torch.uint8)
            mask = torch.rand(n_out, n_in, generator=g, device=self.dev) < density
            for k, v in (("weight_mask", mask), ("weight_codebook", cb), ("weight_assign", assign)):
                lin.register_buffer(k, v)
            with torch.no_grad():
                lin.weight.copy_(cb[assign.long()] * mask)
            return lin

        dims = [(96, 64, 0.05), (64, 48, 0.3), (48, 40, 1.0)] if self.args.smoke else \
            [(4096, 4096, 0.04), (4096, 1000, 0.25), (1000, 512, 1.0)]  # fmt: skip
        lins = [quantized(i, o, d, s) for s, (i, o, d) in enumerate(dims)]
        model = nn.Sequential(*[CompressedLinear.from_linear(m, relu=j < 2) for j, m in enumerate(lins)]).eval()
        self.env["compile_check_model"] = repr(model)
        compiled = torch.compile(model, fullgraph=True, backend="eager" if self.args.smoke else "inductor")
        for b in (1, 16):
            rec = {"batch": b}
            try:
                x = torch.randn(b, dims[0][0], device=self.dev).abs().half()
                ref = x.double()
                for j, m in enumerate(lins):
                    ref = ref @ m.weight.double().T + m.bias.double()
                    ref = torch.relu(ref) if j < 2 else ref
                eager, comp = model(x), compiled(x)
                scale = ref.norm().item()
                rec["eager_err"] = ((eager.double() - ref).norm() / scale).item()
                rec["compiled_err"] = ((comp.double() - ref).norm() / scale).item()
                if self.dev == "cuda":
                    static = x.clone()
                    g, (out,) = capture([lambda static=static: compiled(static)])
                    static.copy_(x.flip(0))
                    g.replay()
                    ref2 = model(x.flip(0))
                    rec["graph_replay_err"] = ((out.double() - ref2.double()).norm() / ref2.double().norm()).item()
                rec["ok"] = all(v <= 3e-3 for k, v in rec.items() if k.endswith("_err"))
                if not rec["ok"]:
                    self.failures.append({"where": f"compile check B={b}", "error": str(rec)})
            except Exception as err:  # noqa: BLE001
                self.fail(f"compile check B={b}", err)
                rec["error"] = f"{type(err).__name__}: {err}"[:300]
            self.env.setdefault("compile_check", []).append(rec)
            self.log(f"compile check {rec}")
        self.write()

    # ------------------------------------------------------------------------------------------------------
    def write(self) -> None:
        keys = ["layer", "out", "in", "density", "layout", "batch", "dtype", "provider", "us", "floor_us", "bytes",
                "weight_bytes", "rel_err", "ok", "error"]  # fmt: skip
        write_csv(self.rows, self.out / "layers.csv", fields=keys)
        doc = {"env": self.env, "args": vars(self.args), "rows": self.rows, "stacks": self.stacks,
               "configs": self.configs, "failures": self.failures, "skipped": self.skipped}  # fmt: skip
        write_json(doc, self.out / "results.json")
        write_json(self.configs, self.out / "configs.json")
        (self.out / "summary.md").write_text(self.summary())

    def table(self) -> dict:
        t: dict = {}
        for r in self.rows:
            if "us" in r:
                t.setdefault((r["layer"], r["batch"], r["dtype"]), {})[r["provider"]] = r
        return t

    def ours(self, layer: str, b: int, ps: dict) -> tuple[str, float]:
        """What CompressedLinear runs: after tuning the faster of the paths the module holds (its ``autotune``
        moves a sparse layer's switch to where the LUT copy wins), before it the default path."""
        first = next(iter(ps.values()))
        layout = first["layout"]
        # CompressedLinear.from_linear: a lut layer below 30 % density keeps a sparse copy too
        held = ("lut",) if layout == "lut" and first["density"] >= DUAL_BELOW else ("sparse", "lut")
        if any(k + "_tuned" in ps for k in held):
            got = {}
            for k in held:
                for name in (k + "_tuned", k):
                    if name in ps:
                        got[name] = ps[name]["us"]
                        break
            k = min(got, key=got.get)
            return k, got[k]
        path = default_path(layout, b)
        return path, ps[path]["us"] if path in ps else float("nan")

    def summary(self) -> str:
        t = self.table()
        lines = [f"# bench_eie_layouts ({self.env['date']}, {self.env['device']}, torch {self.env['torch']}, "
                 f"triton {self.env['triton']})", "",
                 "µs per call (CUDA graph rotating through copies > L2, median of 15 replays). ours = what "
                 f"CompressedLinear runs: untuned, its layout by density (a sparse layer's LUT copy from batch "
                 f"{BATCH_MIN}); tuned, the faster of the layouts it holds (a lut layer below {DUAL_BELOW:.0%} "
                 "density keeps a sparse copy); best = fastest of all our kernels; floor = bytes / copy bw + one "
                 "graph node.", "",
                 "| layer | B | dtype | layout | ours | ours path | best | best path | dense fp16 | dense bf16 | int4 "
                 "| csr | 2:4 | floor | ours/floor | ours x fp16 | ours x int4 | checks |",
                 "|" + "---|" * 18]  # fmt: skip
        geo: dict = {}
        for (layer, b, dt), ps in t.items():
            mine = {k: v["us"] for k, v in ps.items() if k in OURS}
            if not mine:
                continue
            best_k = min(mine, key=mine.get)
            path, ours = self.ours(layer, b, ps)

            def us(k, ps=ps):
                return ps[k]["us"] if k in ps else float("nan")

            fl = ps[path]["floor_us"] if path in ps else float("nan")
            ok = all(v.get("ok") is not False for v in ps.values())
            x16, x4 = us("dense_fp16") / ours, us("int4_bf16") / ours
            geo.setdefault((b, dt, layer.startswith("T-")), []).append((x16, us("dense_fp16") / mine[best_k]))
            lines.append(f"| {layer} | {b} | {dt} | {ps[path]['layout'] if path in ps else '?'} | {ours:.2f} "
                         f"| {path} | {mine[best_k]:.2f} | {best_k} | {us('dense_fp16'):.2f} | {us('dense_bf16'):.2f} "
                         f"| {us('int4_bf16'):.2f} | {us('csr_fp16'):.2f} | {us('semi24_fp16'):.2f} | {fl:.2f} "
                         f"| {ours / fl:.2f} | {x16:.2f} | {x4:.2f} | {'ok' if ok else 'FAIL'} |")  # fmt: skip
        lines += ["", "Geomean speed-up vs dense fp16 (ours / best of ours):", ""]
        for (b, dt, tr), v in sorted(geo.items()):
            g1, g2 = (math.exp(sum(math.log(max(p[i], 1e-9)) for p in v) / len(v)) for i in (0, 1))
            lines.append(f"- {'transformer' if tr else 'EIE'} B={b} {dt}: {g1:.2f}x / {g2:.2f}x over {len(v)} layers")
        if self.stacks:
            lines += ["", "| stack | B | provider | µs per batch |", "|---|---|---|---|"]
            lines += [f"| {s['stack']} | {s['batch']} | {s['provider']} | {s['us']:.2f} |" for s in self.stacks]
        lines += ["", f"failures: {len(self.failures)}", *[f"- {f['where']}: {f['error']}" for f in self.failures]]
        lines += ["", f"skipped: {len(self.skipped)}", *[f"- {s}" for s in self.skipped]]
        return "\n".join(lines) + "\n"

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        t = self.table()
        layers = sorted({k[0] for k in t if not k[0].startswith("T-")}, key=lambda s: s)
        fig, ax = plt.subplots(figsize=(8, 5))
        for layer in layers:
            bs = sorted(b for (la, b, dt) in t if la == layer and dt == "float16")
            ys = []
            for b in bs:
                ps = t[(layer, b, "float16")]
                ys.append(ps["dense_fp16"]["us"] / self.ours(layer, b, ps)[1] if "dense_fp16" in ps else float("nan"))
            if any(y == y for y in ys):  # NaN != NaN: a layer without a dense peer is left out
                ax.plot(bs, ys, marker="o", label=layer)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("speed-up of ours vs dense fp16 (fp16, per layer)")
        ax.legend(fontsize=7)
        fig.savefig(self.out / "speedup.png", dpi=120, bbox_inches="tight")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=results_dir("eie_layouts"))
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new work after this many seconds")
    ap.add_argument("--l2-mb", type=float, default=60.0)
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--tune-sparse", action="store_true", help="also autotune the sparse kernels (slow: compiles)")
    ap.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny layers (plumbing only)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    bench = Bench(args)
    bench.log(f"env {bench.env}")
    try:
        bench.floor_setup()
    except Exception as err:  # noqa: BLE001
        bench.fail("floor setup", err)
        bench.bw, bench.node_us = 4.0e12, 1.0
    batches = (1, 3) if args.smoke else (1, 4, 16, 64)
    stack_batches = (1, 3) if args.smoke else (1, 16, 64)
    tune = not args.no_tune  # smoke: the tuning flow on the interpreter (timings meaningless)
    # priority order: the budget cuts the tail (recorded under "skipped")
    eie = bench.run_layers(bench.layer_set(), batches, fp32_b1=True, phase="eie")
    bench.run_stacks(eie, stack_batches)
    try:
        bench.compile_check()
    except Exception as err:  # noqa: BLE001
        bench.fail("compile check", err)
    if tune:
        bench.autotune(eie, (3,) if args.smoke else (16, 64))
        bench.run_stacks(eie, stack_batches, tag="_tuned")
    tr = bench.run_layers(bench.transformer_set(), (1, 16), fp32_b1=False, phase="transformer")
    if tune:
        bench.autotune(eie, (1,))
        bench.autotune(tr, (16, 1))
    bench.write()
    try:
        bench.plot()
    except Exception as err:  # noqa: BLE001
        bench.fail("plot", err)
    bench.write()
    print(bench.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
