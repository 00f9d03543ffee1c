"""Deep Compression pipeline entry point.

    python train.py                         # LeNet-300-100 on Fashion-MNIST, CPU, end to end (~3 min on 2 cores)
    python train.py recipe=lenet5           # other recipes: lenet300, lenet5, alexnet, vgg16
    python train.py recipe=vgg16 stage=prune baseline_ckpt=outputs/vgg16/.../checkpoints/baseline.ckpt
    python train.py --help                  # config groups and recipes

``train(cfg)`` is importable so tests run the pipeline without the CLI (see ``dc_lightning.pipeline.config.compose``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # recipes/ is found as pkg://recipes from any directory


def train(cfg: DictConfig) -> dict:
    """Run the recipe's pipeline stages; returns the summary (accuracies, ratio, timings, file paths)."""
    from dc_lightning.pipeline.stages import run_pipeline

    return run_pipeline(cfg)


#: Lightning lines every Trainer repeats word for word (the pipeline builds one per stage): shown once per run
_ONCE_PREFIXES = ("💡 Tip", "GPU available", "TPU available", "HPU available", "`Trainer(limit_", "`weights_only`")


class _OncePerRun(logging.Filter):
    """Let a repeated Lightning environment line or tip through once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if not record.name.startswith("lightning") or not msg.startswith(_ONCE_PREFIXES):
            return True
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


def one_line_per_message() -> None:
    """Hydra logs through the root logger; Lightning adds its own handler to ``lightning.pytorch`` /
    ``lightning.fabric`` when it is imported first, so every line appeared twice. Keep Hydra's handlers only and
    show Lightning's per-Trainer tips and environment lines once."""
    import lightning.pytorch  # noqa: F401  (its import adds the handlers removed here)

    root = logging.getLogger()
    if not root.handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
    for h in root.handlers:  # one filter per handler: Hydra's console and file handlers each show a line once
        if not any(isinstance(f, _OncePerRun) for f in h.filters):
            h.addFilter(_OncePerRun())


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    one_line_per_message()
    try:
        train(cfg)
    except (ValueError, TypeError, FileExistsError) as e:  # a config mistake: one line, no traceback
        logging.getLogger("train").error("%s: %s", type(e).__name__, " ".join(str(e).split()))
        sys.exit(2)


if __name__ == "__main__":
    main()
