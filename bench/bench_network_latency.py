"""Whole-network latency and accuracy of a compressed recipe model: EIE kernels vs dense fp16 (CUDA graphs).

    python bench/bench_network_latency.py outputs/vgg16/<run>/model.dcz --image-size 32 --channels 3 \
        --data-root <fashion-mnist folder> --out bench/out/latency_vgg16

Peers, side by side in one run, same input, each captured in a CUDA graph and replayed:
  * ``dense_fp16``: ``load_compressed(file)`` (the decoded pruned+quantized weights as dense tensors), fp16.
  * ``eie_fp16``:  ``to_compressed_inference(file)``: FC layers as ``CompressedLinear`` (Triton), convolutions dense,
    fp16 activations.
Reports the median time per inference over ``--repeats`` timings of ``--iters`` replays at each batch size, the
ratio, and the test top-1 of both on Fashion-MNIST (if ``--data-root`` is given). Writes CSV + JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn


def half_except(model: nn.Module, keep: tuple[type, ...]) -> nn.Module:
    """Cast floating parameters/buffers to fp16, except inside modules of type ``keep`` (they pick their dtypes)."""
    for mod in model.modules():
        if isinstance(mod, keep):
            continue
        for _, p in list(mod.named_parameters(recurse=False)):
            p.data = p.data.half()
        for name, b in list(mod.named_buffers(recurse=False)):
            if b.is_floating_point():
                mod._buffers[name] = b.half()
    return model


def graph_latency_us(model: nn.Module, x: torch.Tensor, iters: int, repeats: int) -> float:
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                model(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            model(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                g.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1000 / iters)
    return statistics.median(times)


@torch.no_grad()
def accuracy(model: nn.Module, dm, dtype: torch.dtype) -> float:
    correct = total = 0
    for batch in dm.test_dataloader():
        x, y = dm.on_after_batch_transfer((batch[0].cuda(), batch[1].cuda()), 0)
        correct += (model(x.to(dtype)).argmax(1) == y).sum().item()
        total += y.numel()
    return correct / total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", help="compressed .dcz file written by a recipe")
    ap.add_argument("--image-size", type=int, required=True)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--data-root", default=None, help="Fashion-MNIST folder for the accuracy column")
    ap.add_argument("--out", default="bench/out/latency")
    args = ap.parse_args(argv)

    from dc_lightning.inference.conversion import to_compressed_inference
    from dc_lightning.inference.linear import CompressedLinear
    from dc_lightning.io import load_compressed

    dense = half_except(load_compressed(args.file).cuda().eval(), ())
    t0 = time.perf_counter()
    eie = to_compressed_inference(args.file, device="cuda", autotune_batches=args.batches, dtype=torch.float16)
    convert_s = time.perf_counter() - t0
    eie = half_except(eie.eval(), (CompressedLinear,))
    rows = []
    for b in args.batches:
        x = torch.randn(b, args.channels, args.image_size, args.image_size, device="cuda", dtype=torch.float16)
        with torch.no_grad():
            err = (eie(x).float() - dense(x).float()).abs().max().item()
        t_dense = graph_latency_us(dense, x, args.iters, args.repeats)
        t_eie = graph_latency_us(eie, x, args.iters, args.repeats)
        rows.append({"batch": b, "dense_fp16_us": round(t_dense, 2), "eie_fp16_us": round(t_eie, 2),
                     "speedup": round(t_dense / t_eie, 3), "max_abs_diff": err})
    acc = {}
    if args.data_root:
        from dc_lightning.data.images import FashionMNISTDataModule

        dm = FashionMNISTDataModule(root=args.data_root, image_size=args.image_size, channels=args.channels,
                                    eval_batch_size=500, download=False)
        dm.setup()
        acc = {"dense_fp16": accuracy(dense, dm, torch.float16), "eie_fp16": accuracy(eie, dm, torch.float16)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "latency.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    result = {"file": args.file, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "convert_seconds": round(convert_s, 2), "rows": rows, "top1": acc}
    (out / "latency.json").write_text(json.dumps(result, indent=2))
    print(f"{'batch':>5} {'dense fp16 (us)':>16} {'EIE fp16 (us)':>14} {'speed-up':>9} {'max |diff|':>11}")
    for r in rows:
        print(f"{r['batch']:>5} {r['dense_fp16_us']:>16.2f} {r['eie_fp16_us']:>14.2f} {r['speedup']:>8.2f}x "
              f"{r['max_abs_diff']:>11.2e}")
    if acc:
        print(f"top-1: dense fp16 {100 * acc['dense_fp16']:.2f}%, EIE fp16 {100 * acc['eie_fp16']:.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
