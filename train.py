"""Deep Compression pipeline entry point.

    python train.py                         # LeNet-300-100 on Fashion-MNIST, CPU, end to end (~3 min on 2 cores)
    python train.py recipe=lenet5           # other recipes: lenet300, lenet5, alexnet, vgg16
    python train.py recipe=vgg16 stage=prune baseline_ckpt=outputs/vgg16/.../checkpoints/baseline.ckpt
    python train.py --help                  # config groups and recipes

``train(cfg)`` is importable so tests run the pipeline without the CLI (see ``dc_lightning.config.compose``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # recipes/ is found as pkg://recipes from any directory


def train(cfg: DictConfig) -> dict:
    """Run the recipe's pipeline stages; returns the summary (accuracies, ratio, timings, file paths)."""
    from dc_lightning.pipeline import run_pipeline

    return run_pipeline(cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
