"""Benchmark: 1-D k-means of a pruned VGG-16 (all 16 layers) with ``dc_lightning.quantization.kmeans.kmeans_1d``.

VGG-16 (torchvision, 138M weights, *untrained* random init: kaiming-normal conv, N(0, 0.01) fc) is magnitude-pruned
per layer to the densities of [DC] Table 5 (10.3M surviving weights), then every layer is clustered with 8 bits
(conv) / 5 bits (fc) as in [DC §5.3]. Reported:

* time to cluster all layers (after one warm-up pass; CUDA synchronised), for ``refine`` on and off;
* quality: WCSS of ours (refined, and plain Lloyd from the linear init = the paper's procedure) vs scikit-learn
  ``KMeans(init="k-means++", n_init=10)`` on a random sample of at most ``--sample`` surviving weights of each chosen
  layer, side by side, with the ratio ours / sklearn (< 1 = ours better).

Usage::

    python -m bench.kernels.bench_kmeans --device cpu               # all layers timed, quality on the default layers
    python -m bench.kernels.bench_kmeans --device cuda --no-sklearn # timing only (no scikit-learn on the GPU box)
    python -m bench.kernels.bench_kmeans --quality-layers conv4_2,fc6 --sample 1000000

Writes ``timing.csv``, ``quality.csv`` and ``results.json`` under ``--out`` (default
``bench/results/<date>/kmeans``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.harness.report import env_info, results_dir, write_csv, write_json
from bench.harness.timing import sync
from dc_lightning.quantization.kmeans import kmeans_1d, wcss

# [DC] Table 5: VGG-16 layer -> fraction of weights kept after pruning
TABLE5 = {
    "conv1_1": 0.58, "conv1_2": 0.22, "conv2_1": 0.34, "conv2_2": 0.36, "conv3_1": 0.53, "conv3_2": 0.24,
    "conv3_3": 0.42, "conv4_1": 0.32, "conv4_2": 0.27, "conv4_3": 0.34, "conv5_1": 0.35, "conv5_2": 0.29,
    "conv5_3": 0.36, "fc6": 0.04, "fc7": 0.04, "fc8": 0.23,
}  # fmt: skip
TORCHVISION_NAMES = [
    "features.0", "features.2", "features.5", "features.7", "features.10", "features.12", "features.14",
    "features.17", "features.19", "features.21", "features.24", "features.26", "features.28",
    "classifier.0", "classifier.3", "classifier.6",
]  # fmt: skip
DEFAULT_QUALITY = "conv1_2,conv3_1,conv4_2,conv5_3,fc6,fc7,fc8"


def pruned_vgg16_layers(seed: int) -> dict[str, torch.Tensor]:
    """Surviving weights of each VGG-16 layer after magnitude pruning to the Table 5 density (1-D float32)."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.vgg16(weights=None)
    mods = dict(model.named_modules())
    out = {}
    for (name, density), tv in zip(TABLE5.items(), TORCHVISION_NAMES, strict=True):
        w = mods[tv].weight.detach().reshape(-1)
        keep = round(density * w.numel())
        out[name] = w[w.abs().topk(keep, sorted=False).indices].clone()
    del model
    return out


def bits_of(name: str) -> int:
    return 5 if name.startswith("fc") else 8  # [DC §5.3]


def time_all(layers: dict[str, torch.Tensor], device: torch.device, refine: bool) -> tuple[float, dict[str, float]]:
    per_layer = {}
    sync(device)
    t0 = time.perf_counter()
    for name, x in layers.items():
        t = time.perf_counter()
        kmeans_1d(x, 2 ** bits_of(name), refine=refine)
        sync(device)
        per_layer[name] = time.perf_counter() - t
    return time.perf_counter() - t0, per_layer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", type=Path, default=results_dir("kmeans"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample", type=int, default=1_000_000, help="max surviving weights per layer for the quality run")
    p.add_argument("--quality-layers", default=DEFAULT_QUALITY, help="comma list of Table 5 names, or 'all'")
    p.add_argument("--no-sklearn", action="store_true", help="skip the scikit-learn comparison")
    p.add_argument("--no-plain", action="store_true", help="skip timing refine=False (plain Lloyd)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = args.out

    layers = {n: x.to(device) for n, x in pruned_vgg16_layers(args.seed).items()}
    total = sum(x.numel() for x in layers.values())
    print(f"VGG-16 (untrained, random init) pruned to [DC] Table 5: {total:,} surviving weights, device {device}")

    time_all(layers, device, refine=True)  # warm-up (allocator, kernels, lazy imports)
    results: dict = {"env": env_info(device), "surviving_weights": total, "timing": {}}
    rows = []
    for refine in [True] if args.no_plain else [True, False]:
        tot, per = time_all(layers, device, refine)
        key = "refined" if refine else "plain_lloyd"
        results["timing"][key] = {"total_s": tot, "per_layer_s": per}
        rows += [{"mode": key, "layer": n, "members": layers[n].numel(), "bits": bits_of(n), "seconds": s}
                 for n, s in per.items()]  # fmt: skip
        print(f"  {key:12s} all 16 layers: {tot:8.2f} s")
    write_csv(rows, out / "timing.csv")

    names = list(TABLE5) if args.quality_layers == "all" else [s.strip() for s in args.quality_layers.split(",") if s]
    qrows = []
    if names:
        try:
            from sklearn.cluster import KMeans
        except ImportError:
            KMeans = None  # noqa: N806
            if not args.no_sklearn:
                print("scikit-learn not installed: quality run without the sklearn column (use --no-sklearn)")
        g = torch.Generator().manual_seed(args.seed)
        hdr = f"{'layer':8s} {'sample':>9s} {'k':>4s} {'ours':>12s} {'plain':>12s} {'sklearn':>12s} {'ours/skl':>9s} " \
              f"{'plain/skl':>9s} {'t_ours':>7s} {'t_skl':>7s}"  # fmt: skip
        print(hdr)
        for name in names:
            x_all = layers[name].cpu()
            idx = torch.randperm(x_all.numel(), generator=g)[: args.sample]
            x = x_all[idx].to(device)
            k = 2 ** bits_of(name)
            t = time.perf_counter()
            c, a = kmeans_1d(x, k)
            sync(device)
            t_ours = time.perf_counter() - t
            ours = wcss(x, c, a)
            pc, pa = kmeans_1d(x, k, refine=False)
            plain = wcss(x, pc, pa)
            skl, t_skl = float("nan"), float("nan")
            if KMeans is not None and not args.no_sklearn:
                t = time.perf_counter()
                km = KMeans(n_clusters=k, init="k-means++", n_init=10, random_state=args.seed)
                km.fit(x.cpu().double().numpy().reshape(-1, 1))
                t_skl = time.perf_counter() - t
                skl = float(km.inertia_)
            row = {"layer": name, "sample": x.numel(), "k": k, "wcss_ours": ours, "wcss_plain_lloyd": plain,
                   "wcss_sklearn": skl, "ratio_ours": ours / skl, "ratio_plain": plain / skl,
                   "seconds_ours": t_ours, "seconds_sklearn": t_skl}  # fmt: skip
            qrows.append(row)
            print(f"{name:8s} {x.numel():9,d} {k:4d} {ours:12.5g} {plain:12.5g} {skl:12.5g} {ours / skl:9.4f} "
                  f"{plain / skl:9.4f} {t_ours:7.2f} {t_skl:7.1f}", flush=True)  # fmt: skip
        write_csv(qrows, out / "quality.csv")
    results["quality"] = qrows
    write_json(results, out / "results.json")
    print(f"wrote {out}/timing.csv" + (", quality.csv" if qrows else "") + ", results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
