"""Probe: does distillation from the dense baseline recover LeNet-300-100's pruning loss on Fashion-MNIST?

Not a library feature: this script patches the pipeline for one experiment. It runs the default recipe's prune ->
quantize -> export -> evaluate stages from a trained dense baseline, adding to the training loss a distillation term
from that (frozen, dense) baseline: ``(1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T)``.

    python -m bench.experiments.distill_probe --baseline-ckpt <run>/checkpoints/baseline.ckpt --alpha 0.5 \
        --temperature 4 --out /tmp/distill_a [hydra overrides...]

Prints the stage accuracies and P+Q+H; the run folder holds the usual summary/report. Results:
recipes/lenet300/README.md ("What was tried").
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-ckpt", required=True)
    ap.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation term, in [0, 1]")
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--recipe", default="lenet300")
    ap.add_argument("--out", required=True, help="run folder")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0 or args.temperature <= 0:
        ap.error(f"--alpha {args.alpha} must be in [0, 1] and --temperature {args.temperature} > 0")

    import dc_lightning.module as module_lib
    import dc_lightning.pipeline.stages as pipeline
    from dc_lightning.pipeline.config import compose

    teacher: dict[str, torch.nn.Module] = {}
    plain_step = module_lib.ClassifierModule._step
    alpha, T = args.alpha, args.temperature

    def step(self, batch, split):
        if split != "train" or "model" not in teacher:
            return plain_step(self, batch, split)
        x, y = batch
        logits = self(x)
        with torch.no_grad():
            t_logits = teacher["model"].to(x.device)(x)
        kd = (
            F.kl_div(
                F.log_softmax(logits / T, 1), F.log_softmax(t_logits / T, 1), log_target=True, reduction="batchmean"
            )
            * T
            * T
        )
        loss = (1 - alpha) * F.cross_entropy(logits, y) + alpha * kd
        self.log("train/loss", loss, batch_size=y.shape[0])
        return loss

    plain_prune = pipeline.stage_prune

    def stage_prune(cfg, dm, module, resume):
        module = module or pipeline.load_module_checkpoint(cfg, cfg.baseline_ckpt)
        teacher["model"] = copy.deepcopy(module.model).eval().requires_grad_(False)  # dense, before any mask
        return plain_prune(cfg, dm, module, resume)

    module_lib.ClassifierModule._step = step
    pipeline.stage_prune = stage_prune
    cfg = compose(
        args.recipe,
        ["logger=csv", "stage=prune", f"baseline_ckpt={args.baseline_ckpt}", f"output_dir={args.out}", *args.overrides],
    )
    summary = pipeline.run_pipeline(cfg)
    acc = {k: round(v["acc1"] * 100, 2) for k, v in summary["accuracy"].items()}
    print(f"alpha {alpha} T {T}: top-1 {acc}, P+Q+H {summary['report']['total']['ratio_pqh']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
