"""Whole-network latency and accuracy of a compressed recipe model: EIE kernels vs dense fp16 (CUDA graphs).

    python -m bench.kernels.bench_network_latency outputs/vgg16/<run>/model.dcz --image-size 32 --channels 3 \
        --data-root <fashion-mnist folder> --out bench/results/<date>/latency_vgg16

Peers, side by side in one run, same input, each timed by :func:`bench.harness.timing.time_calls` (one CUDA graph
rotating through enough copies of the model to exceed the L2 cache):
  * ``dense_fp16``: ``load_compressed(file)`` (the decoded pruned+quantized weights as dense tensors), fp16.
  * ``eie_fp16``:  ``to_compressed_inference(file)``: FC layers as ``CompressedLinear`` (Triton), convolutions dense,
    fp16 activations.
Reports the median time per forward pass over ``--repeats`` replays at each batch size, the ratio, and the test top-1
of both on Fashion-MNIST (if ``--data-root`` is given). Writes CSV + JSON to ``--out`` (default
``bench/results/<date>/latency``).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
from pathlib import Path

import torch
from torch import nn

from bench.harness.report import env_info, print_table, results_dir, write_csv, write_json
from bench.harness.timing import copies_for, time_calls


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


def graph_latency_us(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """µs per forward pass: copies of ``model`` (together more than the L2 cache) called in turn in one graph."""
    nbytes = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    models = [model] + [copy.deepcopy(model) for _ in range(copies_for(nbytes, minimum=1) - 1)]
    with torch.no_grad():
        return time_calls([lambda m=m: m(x) for m in models], repeats=repeats)


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
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--data-root", default=None, help="Fashion-MNIST folder for the accuracy column")
    ap.add_argument("--out", type=Path, default=results_dir("latency"))
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
        t_dense = graph_latency_us(dense, x, args.repeats)
        t_eie = graph_latency_us(eie, x, args.repeats)
        rows.append({"batch": b, "dense_fp16_us": round(t_dense, 2), "eie_fp16_us": round(t_eie, 2),
                     "speedup": round(t_dense / t_eie, 3), "max_abs_diff": err})
    acc = {}
    if args.data_root:
        from dc_lightning.data.images import FashionMNISTDataModule

        dm = FashionMNISTDataModule(root=args.data_root, image_size=args.image_size, channels=args.channels,
                                    eval_batch_size=500, download=False)
        dm.setup()
        acc = {"dense_fp16": accuracy(dense, dm, torch.float16), "eie_fp16": accuracy(eie, dm, torch.float16)}
    out = args.out
    write_csv(rows, out / "latency.csv")
    result = {"file": args.file, "env": env_info("cuda"), "convert_seconds": round(convert_s, 2), "rows": rows,
              "top1": acc}  # fmt: skip
    write_json(result, out / "latency.json")
    print_table(rows, ["batch", ("dense fp16 (us)", "dense_fp16_us", ".2f"), ("EIE fp16 (us)", "eie_fp16_us", ".2f"),
                       ("speed-up", "speedup", ".2f"), ("max abs diff", "max_abs_diff", ".2e")])  # fmt: skip
    if acc:
        print(f"top-1: dense fp16 {100 * acc['dense_fp16']:.2f}%, EIE fp16 {100 * acc['eie_fp16']:.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
