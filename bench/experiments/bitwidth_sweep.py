"""Accuracy vs bits on the pruned LeNet-5 recipe ([DC] Table 6 and Fig. 8) on Fashion-MNIST.

    python -m bench.experiments.bitwidth_sweep --pruned-ckpt outputs/lenet5/<run>/checkpoints/prune.ckpt

From one pruned LeNet-5 checkpoint, each configuration clusters the surviving weights (trained quantization,
`TrainedQuantization`), fine-tunes the centroids for ``--epochs`` epochs at the recipe's quantize LR, and reports
test top-1:
  * conv/fc bits 8/5, 8/4, 4/2 (Table 6's rows; "32/32" = the pruned model unquantized);
  * fc bits 2..8 (conv at 8 bits) with linear, density and random (Forgy) initialisation (Fig. 8).
Writes ``bits.csv``, ``bits.json`` and ``bits.png`` (accuracy vs fc bits, one line per initialisation) under ``--out``
(default ``bench/results/<date>/bits``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.harness.report import print_table, results_dir, write_csv, write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pruned-ckpt", required=True)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--fc-bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7, 8])
    ap.add_argument("--inits", nargs="+", default=["linear", "density", "random"])
    ap.add_argument("--out", type=Path, default=results_dir("bits"))
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for the lenet5 recipe")
    args = ap.parse_args(argv)

    import torch

    from dc_lightning.pipeline.config import build_datamodule, compose, load_module_checkpoint
    from dc_lightning.pipeline.stages import measure_accuracy, stage_quantize

    torch.set_num_threads(1)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    base = ["logger=none", "trainer.enable_progress_bar=false", f"output_dir={out / 'runs'}",
            f"pipeline.quantize.epochs={args.epochs}", *args.overrides]
    cfg = compose("lenet5", base)
    dm = build_datamodule(cfg)
    rows = []
    pruned = load_module_checkpoint(cfg, args.pruned_ckpt)
    rows.append({"experiment": "table6", "conv_bits": 32, "fc_bits": 32, "init": "-",
                 "top1": measure_accuracy(cfg, pruned, dm, "pruned")["acc1"], "seconds": 0.0})
    runs = [("table6", c, f, "linear") for c, f in ((8, 5), (8, 4), (4, 2))]
    runs += [("fig8", 8, f, init) for init in args.inits for f in args.fc_bits]
    for exp, conv_bits, fc_bits, init in runs:
        t0 = time.perf_counter()
        # a dict replaces the recipe's per-layer bits only once they are deleted (~), then added (+)
        bits = ["~pipeline.quantize.callback.bits",
                f"+pipeline.quantize.callback.bits={{model.conv*: {conv_bits}, model.ip*: {fc_bits}}}"]
        cfg = compose("lenet5", [*base, *bits, f"pipeline.quantize.callback.init={init}"])
        module = stage_quantize(cfg, dm, load_module_checkpoint(cfg, args.pruned_ckpt), None)
        acc = measure_accuracy(cfg, module, dm, "bits")["acc1"]
        rows.append({"experiment": exp, "conv_bits": conv_bits, "fc_bits": fc_bits, "init": init, "top1": acc,
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{exp} conv {conv_bits} fc {fc_bits} {init:8s} top-1 {100 * acc:.2f}%", flush=True)
    write_csv(rows, out / "bits.csv")
    write_json(rows, out / "bits.json")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for init in args.inits:
        pts = [(r["fc_bits"], 100 * r["top1"]) for r in rows if r["experiment"] == "fig8" and r["init"] == init]
        ax.plot(*zip(*pts, strict=True), marker="o", label=init)
    ax.axhline(100 * rows[0]["top1"], color="grey", ls="--", label="pruned, unquantized")
    ax.set_xlabel("bits per fc weight (conv 8 bits)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("LeNet-5 on Fashion-MNIST: accuracy vs bits ([DC] Fig. 8 view)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bits.png", dpi=120)
    print_table(rows, ["experiment", ("conv bits", "conv_bits", ""), ("fc bits", "fc_bits", ""), "init",
                       ("top-1 %", lambda r: 100 * r["top1"], ".2f")])  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
