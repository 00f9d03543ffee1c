"""The codebook step of trained quantization on VGG-16 alone: fused Triton vs the float64 reference, time and match.

VGG-16 (torchvision, 138M weights, random init) with every layer magnitude-pruned to ``--density`` and quantized
with ``max_iter=0`` (8 bits conv, 5 bits fc [DC §5]); random gradients. Providers, in the same process:

* ``reference``: ``CodebookStep(backend="reference")``: per layer ``codebook_grad`` (gather into cluster order,
  float64 prefix sums) and ``decode_weight`` + copy (the path before the fused kernels);
* ``triton``: ``CodebookStep(backend="triton")``: two launches for all codebook gradients, one for the rewrite.

Reported per provider: median ms of ``codebook_grads`` and of ``rewrite`` over ``--iters`` calls (CUDA events), and
for Triton its match with the reference: the largest error relative to the sum of |gradient| of a cluster's
members, the fraction of bitwise-equal codebook gradients, whether the rewrite equals ``decode_weight`` bit for bit,
and whether two calls give bitwise-identical results (determinism, hence identical DDP ranks).

    python -m bench.kernels.bench_codebook_step          # CUDA; writes bench/results/<date>/codebook_step/
    TRITON_INTERPRET=1 python -m bench.kernels.bench_codebook_step --model tiny --device cpu --iters 2   # plumbing

Plain argparse, no Hydra, no wandb. Timing: :func:`bench.harness.timing.eager_us` (CUDA events per call).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from bench.harness.report import env_info, print_table, results_dir, write_csv, write_json
from bench.harness.timing import eager_us
from dc_lightning.buffers import get_codebook
from dc_lightning.quantization.codebooks import codebook_grad, decode_weight, quantize_layer
from dc_lightning.quantization.step import CodebookStep


def quantized_layers(model_name: str, density: float, device: torch.device) -> list[nn.Module]:
    torch.manual_seed(0)
    if model_name == "vgg16":
        from torchvision.models import vgg16

        model = vgg16(weights=None).to(device)
    else:  # a few odd-sized layers: a smoke test of this script on the CPU under TRITON_INTERPRET=1
        model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Linear(37, 11), nn.Linear(11, 3)).to(device)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    for m in layers:
        w = m.weight.detach()
        keep = max(1, round(density * w.numel()))
        mask = torch.zeros(w.numel(), dtype=torch.bool, device=device)
        mask[w.abs().reshape(-1).topk(keep, sorted=False).indices] = True
        m.register_buffer("weight_mask", mask.view_as(w))
        with torch.no_grad():
            w.mul_(m.weight_mask)
        quantize_layer(m, 5 if isinstance(m, nn.Linear) else 8, max_iter=0)
    return layers


def timed_ms(fn, iters: int, device: torch.device) -> float:
    """Median ms of ``fn()`` over ``iters`` calls (the kernels are already compiled by a warm-up call)."""
    return eager_us(fn, repeats=iters, warmup=0, device=device) / 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg16", choices=["vgg16", "tiny"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: only with TRITON_INTERPRET=1")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", type=Path, default=results_dir("codebook_step"))
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_codebook_step --device cuda: no CUDA device is available")
    device = torch.device(args.device)
    layers = quantized_layers(args.model, args.density, device)
    g = torch.Generator(device=device).manual_seed(1)
    grads = [torch.randn(m.weight.shape, generator=g, device=device) for m in layers]
    members = sum(int(m.weight_mask.sum()) for m in layers)
    weights = sum(m.weight.numel() for m in layers)
    print(f"{args.model}: {weights:,} weights, {members:,} kept, {len(layers)} layers, density {args.density}")

    rows, result = [], {"weights": weights, "members": members, "model": args.model}
    result["env"] = env_info(device)
    outputs = {}
    for backend in ("reference", "triton"):
        row = {"provider": backend}
        try:
            step = CodebookStep(layers, backend=backend)
            outputs[backend] = step.codebook_grads(grads)[0]  # warm-up (compiles the kernels)
            step.rewrite()
            row["grads_ms"] = round(timed_ms(lambda s=step: s.codebook_grads(grads), args.iters, device), 4)
            row["rewrite_ms"] = round(timed_ms(step.rewrite, args.iters, device), 4)
            row["step_ms"] = round(row["grads_ms"] + row["rewrite_ms"], 4)
            if backend == "triton":
                again = step.codebook_grads(grads)[0]
                row["deterministic"] = all(torch.equal(a, b) for a, b in zip(outputs[backend], again, strict=True))
                errs, same = [], 0
                for m, gr, got, ref in zip(layers, grads, outputs["triton"], outputs["reference"], strict=True):
                    _, assign = get_codebook(m)
                    scale = codebook_grad(gr.abs(), assign, m.weight_mask, ref.numel()).double() + 1e-30
                    errs.append(float(((got.double() - ref.double()).abs() / scale).max()))
                    same += int(torch.equal(got, ref))
                row["max_rel_err"] = max(errs)
                row["layers_bitwise_equal"] = f"{same}/{len(layers)}"
                for m in layers:
                    get_codebook(m)[0].add_(1e-3)  # new codebooks, then one fused rewrite vs decode_weight
                step.rewrite()
                row["rewrite_bitwise"] = all(torch.equal(m.weight.detach(), decode_weight(m)) for m in layers)
        except Exception as err:  # noqa: BLE001 - record it, keep the other provider
            row["error"] = repr(err)
        print(row, flush=True)
        rows.append(row)
    result["rows"] = rows
    out = args.out
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k != "provider", k))
    write_csv(rows, out / "codebook_step.csv", fields=fields)
    write_json(result, out / "codebook_step.json")
    print_table(rows, ["provider", "grads_ms", "rewrite_ms", "step_ms", "max_rel_err", "layers_bitwise_equal",
                       "rewrite_bitwise", "deterministic", "error"])  # fmt: skip
    print(f"wrote {out}/codebook_step.csv/.json")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
