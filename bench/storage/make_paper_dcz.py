"""Write a ``.dcz`` of AlexNet or VGG-16 pruned and quantized to a recipe's per-layer schedule, without training.

For latency benchmarks (``bench.kernels.bench_network_latency``) where only the shapes, densities and bit widths
matter: the model is built as the recipe builds it (random init), magnitude-pruned once to the recipe's densities
(``pipeline.prune.callback.densities``) and k-means quantized to its bits, then saved. Needs PyYAML, not Hydra, so
it runs on the GPU machine too. Accuracy numbers of such a file mean nothing; use a recipe run for those.

    python -m bench.storage.make_paper_dcz vgg16 /tmp/vgg16.dcz
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from dc_lightning.io import save_compressed
from dc_lightning.models import build_model
from dc_lightning.pruning.masks import prune_model
from dc_lightning.quantization.codebooks import quantize_model

ROOT = Path(__file__).resolve().parents[2]


def _strip(d: dict) -> dict:
    # the recipe's patterns name layers inside ClassifierModule (``model.features.0``); here the model is bare
    return {k.removeprefix("model."): v for k, v in d.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe", choices=["alexnet", "vgg16"])
    ap.add_argument("out")
    ap.add_argument("--num-classes", type=int, default=10, help="the Fashion-MNIST recipes' head")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    cfg = yaml.safe_load((ROOT / "recipes" / args.recipe / "recipe.yaml").read_text())
    prune = cfg["pipeline"]["prune"]["callback"]
    bits = cfg["pipeline"]["quantize"]["callback"]["bits"]
    torch.manual_seed(0)
    model = build_model(args.recipe, num_classes=args.num_classes).to(args.device)
    t0 = time.perf_counter()
    prune_model(model, densities=_strip(prune["densities"]))
    quantize_model(model, bits=_strip(bits) if isinstance(bits, dict) else bits, max_iter=0)
    report = save_compressed(model.cpu(), args.out, overwrite=True)
    size = Path(args.out).stat().st_size
    print(f"{args.out}: {size:,} bytes, P+Q+H {report.total.ratio_pqh:.1f}x (weights), "
          f"{report.ratio_file:.1f}x (file), {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
