"""GPU correctness suite of the EIE kernels at real sizes (run on the H200; CI runs the tiny CPU interpreter suite).

Checks, each against a float64 reference of the decoded dense layer, relative error ||y - ref|| / ||ref||:

* EIE's nine layers [EIE Table III] at batch 1, 4, 16, 64 with bias + ReLU: fp32 <= 1e-5, fp16 <= 2e-3, bf16 <= 1e-2
  (inputs rounded to the dtype first, so the tolerance covers the output rounding only);
* every output written: the caching allocator's free blocks are filled with NaN before each call;
* odd sizes (4097 x 25089, 1 x 1, 8791 x 3), nnz = 0, an 8-bit codebook (int32 entries), the zero-chunk skip;
* ``torch.compile(fullgraph=True)`` of a CompressedLinear stack, and CUDA-graph capture + replay with new inputs;
* ``to_compressed_inference`` of a VGG-16-sized classifier vs its dense decode.

Run: ``python bench/gpu_eie_suite.py --out bench/out`` (exit code 1 if any check fails).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_eie import EIE_LAYERS, random_activations, random_layer  # noqa: E402

from dc_lightning.inference.conversion import to_compressed_inference  # noqa: E402
from dc_lightning.inference.linear import CompressedLinear  # noqa: E402
from dc_lightning.kernels.sparse import op as E  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
RESULTS: list[dict] = []


def _poison_allocator() -> None:
    """Fill cached free memory with NaN so an unwritten output element shows up as NaN."""
    free = torch.empty(64 * 2**20, device="cuda").fill_(float("nan"))
    del free


def check(name: str, err: float, tol: float, **extra) -> None:
    ok = err == err and err <= tol  # NaN fails
    RESULTS.append({"check": name, "rel_err": err, "tol": tol, "ok": ok, **extra})
    print(f"{'PASS' if ok else 'FAIL'} {name:55s} rel_err={err:.2e} (tol {tol:.0e})", flush=True)


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("nan")
    d = (y.double() - ref).norm().item()
    s = ref.norm().item()
    return d / s if s > 0 else (0.0 if d == 0 else float("inf"))


def ref_linear(x, rows, cols, codes, codebook, bias, n_out, n_in, relu):
    w = torch.zeros(n_out, n_in, dtype=torch.float64, device=x.device)
    w[rows, cols] = codebook.double()[codes]
    y = x.double() @ w.T
    if bias is not None:
        y = y + bias.double()
    return torch.relu(y) if relu else y


def run_op(p, x, bias, relu, config=None):
    if config is None:
        return E.eie_linear(x, p, bias, relu)
    return E.eie_linear_triton(x, p, bias, relu, config=config)


def layer_checks(batches) -> None:
    for li, (name, n_in, n_out, wd, ad, _) in enumerate(EIE_LAYERS):
        rows, cols, codes, codebook, bias = random_layer(n_in, n_out, wd, seed=li)
        p = E.pack(n_out, n_in, rows, cols, codes, codebook, device="cuda")
        for B in batches:
            x32 = random_activations(B, n_in, ad, seed=10 + B)
            for dt in (torch.float32, torch.float16, torch.bfloat16):
                x = x32.to(dt)
                ref = ref_linear(x, rows, cols, codes, codebook, bias, n_out, n_in, True)
                _poison_allocator()
                y = run_op(p, x, bias, True)
                torch.cuda.synchronize()
                ok_dtype = y.dtype == dt and y.shape == (B, n_out)
                check(f"{name} B={B} {str(dt)[6:]}", rel(y, ref) if ok_dtype else float("nan"), TOL[dt])


def odd_checks() -> None:
    cases = [
        ("4097x25089 d=4%", 4097, 25089, 0.04, 4, 3),
        ("1x1 d=100%", 1, 1, 1.0, 1, 2),
        ("8791x3 d=50%", 8791, 3, 0.5, 2, 5),
        ("nnz=0 300x500", 300, 500, 0.0, 4, 4),
        ("8-bit codebook 1000x4096 (int32 entries)", 1000, 4096, 0.1, 8, 7),
        ("1-bit codebook 513x1025 B=64", 513, 1025, 0.3, 1, 64),
    ]
    for name, n_out, n_in, d, bits, B in cases:
        rows, cols, codes, codebook, bias = random_layer(n_in, n_out, d, bits=bits, seed=5)
        for rt, ch in ((32, None), (16, 2048), (64, 256)):
            p = E.pack(n_out, n_in, rows, cols, codes, codebook, row_tile=rt, chunk=ch, device="cuda")
            x = random_activations(B, n_in, 0.4, seed=9)
            _poison_allocator()
            y = run_op(p, x, bias, False)
            check(
                f"{name} rt={rt} chunk={p.chunk} {p.entries.dtype}",
                rel(y, ref_linear(x, rows, cols, codes, codebook, bias, n_out, n_in, False)),
                1e-5,
            )
    # zero-chunk skip: VGG-6-sized, half of the chunks all zero
    rows, cols, codes, codebook, bias = random_layer(25088, 4096, 0.04, seed=3)
    p = E.pack(4096, 25088, rows, cols, codes, codebook, device="cuda")
    for B in (1, 16):
        x = random_activations(B, 25088, 0.3, seed=4)
        x[:, (torch.arange(25088, device="cuda") // p.chunk) % 2 == 0] = 0.0  # every other chunk all zero
        y = run_op(p, x, bias, True, config={"skip_zero_chunks": True})
        check(
            f"VGG-6 skip_zero_chunks B={B}",
            rel(y, ref_linear(x, rows, cols, codes, codebook, bias, 4096, 25088, True)),
            1e-5,
        )
    for B in (1, 4, 16, 64):  # every config branch of choose_config at a large layer, with forced variants
        x = random_activations(B, 25088, 0.18, seed=6)
        ref = ref_linear(x, rows, cols, codes, codebook, bias, 4096, 25088, False)
        for cfg in (
            {"chunks_per_prog": 1},
            {"chunks_per_prog": 1000},
            {"transpose_x": False},
            {"num_warps": 8},
            {"kernel": "split"},
            {"kernel": "flat", "split": 1},
            {"kernel": "flat", "split": 3},
            {"kernel": "flat", "split": 16, "block_k": 16},
        ):
            check(f"VGG-6 B={B} {cfg}", rel(run_op(p, x, bias, False, config=cfg), ref), 1e-5)


def tuned_checks() -> None:
    """After load-time autotuning the op looks the tuned configuration up: results must stay exact."""
    for li, (name, n_in, n_out, wd, ad, _) in enumerate(EIE_LAYERS):
        if name not in ("VGG-6", "Alex-8", "NT-LSTM"):
            continue
        rows, cols, codes, codebook, bias = random_layer(n_in, n_out, wd, seed=li)
        p = E.pack(n_out, n_in, rows, cols, codes, codebook, device="cuda")
        tuned = E.autotune(p, (1, 16), torch.float32, bias=bias, relu=True)
        for B in (1, 16):
            x = random_activations(B, n_in, ad, seed=40 + B)
            _poison_allocator()
            y = run_op(p, x, bias, True)
            check(
                f"{name} B={B} autotuned {tuned.get(B)}",
                rel(y, ref_linear(x, rows, cols, codes, codebook, bias, n_out, n_in, True)),
                1e-5,
            )


def _quantized_linear(n_in, n_out, density, seed, bits=4):
    rows, cols, codes, codebook, bias = random_layer(n_in, n_out, density, bits=bits, seed=seed)
    lin = nn.Linear(n_in, n_out).cuda()
    mask = torch.zeros(n_out, n_in, dtype=torch.bool, device="cuda")
    mask[rows, cols] = True
    assign = torch.zeros(n_out, n_in, dtype=torch.uint8, device="cuda")
    assign[rows, cols] = codes.to(torch.uint8)
    lin.register_buffer("weight_mask", mask)
    lin.register_buffer("weight_codebook", codebook)
    lin.register_buffer("weight_assign", assign)
    with torch.no_grad():
        lin.weight.copy_(torch.where(mask, codebook[assign.long()], torch.zeros((), device="cuda")))
        lin.bias.copy_(bias)
    return lin


def module_checks() -> None:
    dense = nn.Sequential(
        nn.Flatten(),
        _quantized_linear(25088, 4096, 0.04, 1),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        _quantized_linear(4096, 4096, 0.04, 2),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        _quantized_linear(4096, 1000, 0.23, 3),
    ).eval()
    fast = to_compressed_inference(dense, device="cuda")
    dense64 = copy.deepcopy(dense).double()
    n_dense = sum(isinstance(m, CompressedLinear) for m in fast.modules())
    for B in (1, 16):
        x = random_activations(B, 25088, 0.2, seed=B).view(B, 512, 7, 7)
        with torch.no_grad():
            ref = dense64(x.double())
            check(f"to_compressed_inference VGG-16 classifier B={B} ({n_dense} layers)", rel(fast(x), ref), 1e-5)

    # torch.compile (inductor, fullgraph) over the custom op
    compiled = torch.compile(fast, fullgraph=True)
    for B in (1, 8):
        x = random_activations(B, 25088, 0.2, seed=20 + B).view(B, 512, 7, 7)
        with torch.no_grad():
            check(f"torch.compile(fullgraph) B={B}", rel(compiled(x), fast(x).double()), 1e-6)

    # CUDA graph capture and replay with fresh inputs, fp32 and fp16
    for dt in (torch.float32, torch.float16):
        model = fast
        static_x = random_activations(4, 25088, 0.2, seed=30).view(4, 512, 7, 7).to(dt)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.no_grad():
            for _ in range(2):
                model(static_x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g), torch.no_grad():
            static_y = model(static_x)
        for seed in (31, 32):
            static_x.copy_(random_activations(4, 25088, 0.2, seed=seed).view(4, 512, 7, 7).to(dt))
            g.replay()
            torch.cuda.synchronize()
            with torch.no_grad():
                eager = model(static_x)
            # not bit for bit: the flat kernel's split-K atomics add fp32 partials in arrival order
            tol = 1e-6 if dt == torch.float32 else 1e-3
            check(f"CUDA graph replay {str(dt)[6:]} seed={seed}", rel(static_y, eager.double()), tol)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--groups", default="layer,odd,tuned,module", help="comma-separated subset of the check groups")
    args = ap.parse_args(argv)
    groups = set(args.groups.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(info))
    named = {
        "layer": lambda: layer_checks([int(b) for b in args.batches.split(",")]),
        "odd": odd_checks,
        "tuned": tuned_checks,
        "module": module_checks,
    }
    for gname, fn in named.items():
        if gname not in groups:
            continue
        try:
            fn()
        except Exception as err:  # a crash is a failed check, and the remaining groups still run
            import traceback

            traceback.print_exc()
            RESULTS.append(
                {"check": f"crash in {getattr(fn, '__name__', 'group')}", "ok": False, "error": repr(err)[:300]}
            )
    n_fail = sum(not r["ok"] for r in RESULTS)
    summary = {**info, "checks": len(RESULTS), "failed": n_fail, "seconds": round(time.time() - t0, 1)}
    (out / "eie_suite.json").write_text(json.dumps({"summary": summary, "results": RESULTS}, indent=1))
    print(json.dumps(summary))
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
