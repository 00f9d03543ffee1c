"""The Hydra entry point: every recipe composes, instantiates and runs a smoke pipeline on FakeData."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dc_lightning.config import RECIPES, build_datamodule, build_module, build_trainer, compose

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train import train  # noqa: E402

# network input each recipe needs from FakeData (AlexNet needs >= 63 px to survive its strided stem)
SMOKE = {
    "lenet300": [],
    "lenet5": [],
    "alexnet": ["data.image_size=64", "data.channels=3"],
    "vgg16": ["data.image_size=32", "data.channels=3"],
}


def test_recipes_listed():
    assert set(RECIPES) == {"lenet300", "lenet5", "alexnet", "vgg16"}
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                         cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "recipe: alexnet, lenet300, lenet5, vgg16" in out.stdout


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_instantiates(recipe, tmp_path):
    cfg = compose(recipe, ["data=fake", "logger=none", f"output_dir={tmp_path}"])
    assert cfg.recipe_name == recipe and cfg.model.name == recipe
    dm = build_datamodule(cfg)
    module = build_module(cfg)
    trainer = build_trainer(cfg, "baseline", max_epochs=1, accelerator="cpu")
    assert trainer.max_epochs == 1
    assert module.hparams.model["name"] == recipe
    assert type(dm).__name__ == "FakeDataModule"
    densities = cfg.pipeline.prune.densities
    names = {n for n, _ in module.named_modules()}
    assert set(densities) <= names, f"{recipe}: densities name layers the model lacks"
    for row in cfg.paper.layers:  # the paper's table points at real layers with the density the recipe uses
        assert row.name in names
        assert densities[row.name] == pytest.approx(row.kept / 100)


def test_fashion_mnist_recipe_data():
    cfg = compose("vgg16", ["logger=none"])
    assert (cfg.data.image_size, cfg.data.channels) == (32, 3)
    cfg = compose("alexnet", ["logger=none"])
    assert (cfg.data.image_size, cfg.data.channels) == (64, 3)
    assert compose("lenet300").pipeline.prune.lr_scale == pytest.approx(0.1)


def test_unknown_recipe():
    with pytest.raises(ValueError, match="valid recipes"):
        compose("resnet")


@pytest.mark.parametrize("recipe", ["lenet300", "lenet5", "alexnet", "vgg16"])
def test_smoke_baseline(recipe, tmp_path):
    cfg = compose(recipe, ["data=fake", "logger=csv", "trainer=cpu", "trainer.precision=32-true",
                           "stages=[baseline]", "pipeline.baseline.epochs=1", "trainer.limit_train_batches=2",
                           "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "data.num_samples=32",
                           "data.batch_size=8", "data.eval_batch_size=8", f"output_dir={tmp_path}", *SMOKE[recipe]])
    summary = train(cfg)
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "baseline.ckpt").is_file()
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["recipe"] == recipe and 0.0 <= saved["accuracy"]["baseline"]["acc1"] <= 1.0
    assert summary["seconds"]["baseline"] > 0
    ckpt = torch.load(tmp_path / "checkpoints" / "baseline.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["model"]["name"] == recipe
