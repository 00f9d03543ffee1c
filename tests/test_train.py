"""The Hydra entry point: every recipe composes, instantiates and runs a smoke pipeline on FakeData."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dc_lightning.pipeline.config import RECIPES, build_datamodule, build_module, build_trainer, compose

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from conftest import needs_fashion_mnist  # noqa: E402

from train import train  # noqa: E402

# network input each recipe needs from FakeData (AlexNet needs >= 63 px to survive its strided stem)
SMOKE = {
    "lenet300": [],
    "lenet5": [],
    "alexnet": ["data.image_size=64", "data.channels=3"],
    "vgg16": ["data.image_size=32", "data.channels=3"],
}


def test_recipes_listed():
    assert set(RECIPES) == {"lenet300", "lenet5", "alexnet", "vgg16", "lstm_lm", "transformer_lm"}
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                         cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "recipe: alexnet, lenet300, lenet5, lstm_lm, transformer_lm, vgg16" in out.stdout


# recipe densities that differ from the paper's table on purpose (the recipe's README says why)
DENSITY_DEVIATIONS = {"lenet5": {"model.conv2": 0.20, "model.ip2": 0.50}}


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
    densities = cfg.pipeline.prune.callback.densities
    names = {n for n, _ in module.named_modules()}
    assert set(densities) <= names, f"{recipe}: densities name layers the model lacks"
    for row in cfg.paper.layers:  # the paper's table points at real layers with the density the recipe uses
        assert row.name in names
        expected = DENSITY_DEVIATIONS.get(recipe, {}).get(row.name, row.kept / 100)
        assert densities[row.name] == pytest.approx(expected)


def test_fashion_mnist_recipe_data():
    cfg = compose("vgg16", ["logger=none"])
    assert (cfg.data.image_size, cfg.data.channels) == (32, 3)
    cfg = compose("alexnet", ["logger=none"])
    assert (cfg.data.image_size, cfg.data.channels) == (64, 3)
    assert compose("lenet300").pipeline.prune.lr_scale == pytest.approx(0.1)


def test_compose_from_outside_the_repository(tmp_path):
    """The dc-lightning console script composes recipes from any folder (recipes/ is not on sys.path there)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "from dc_lightning.pipeline.config import compose; print(compose('vgg16', ['output_dir=x']).recipe_name)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "vgg16"


def test_compose_is_not_shadowed_by_another_recipes_package(tmp_path):
    """An unrelated installed package named ``recipes`` must not replace the repository's recipe folder."""
    fake = tmp_path / "site" / "recipes"
    (fake / "lenet300").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "lenet300" / "recipe.yaml").write_text("# @package _global_\nrecipe_name: impostor\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    code = "from dc_lightning.pipeline.config import compose; print(compose('lenet300', ['output_dir=x']).recipe_name)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "lenet300"
    # already imported: a clear error instead of silently composing the impostor's configs
    code = "import recipes; from dc_lightning.pipeline.config import compose; compose('lenet300', ['output_dir=x'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "not dc_lightning's recipe folder" in out.stderr and str(fake) in out.stderr


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


def _pipeline_overrides(tmp_path, *extra):
    return ["logger=none", "trainer=cpu", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
            f"output_dir={tmp_path}", *extra]


@needs_fashion_mnist
def test_lenet300_pipeline_reduced_schedule(tmp_path):
    """The default recipe end to end on real Fashion-MNIST with a short schedule: compression ratio and accuracy."""
    cfg = compose("lenet300", _pipeline_overrides(
        tmp_path, "pipeline.baseline.epochs=2", "pipeline.prune.epochs=2", "pipeline.prune.callback.rounds=1",
        "pipeline.quantize.epochs=1", "data.download=false"))
    summary = train(cfg)
    acc = summary["accuracy"]
    assert acc["baseline"]["acc1"] > 0.84
    assert acc["reloaded"]["acc1"] > 0.85  # measured 87.42 %
    # the reloaded file evaluates exactly like the in-memory quantized model (same weights, bit for bit)
    assert acc["reloaded"]["acc1"] == pytest.approx(acc["quantize"]["acc1"], abs=1e-9)
    total = summary["report"]["total"]
    assert total["ratio_pqh"] > 38 and total["ratio_pq"] > 25  # measured 42.5x / 26.8x (2-core CPU, 2026-11-29)
    assert {r["name"]: round(r["kept_pct"]) for r in summary["report"]["layers"]} == {
        "model.ip1": 8, "model.ip2": 9, "model.ip3": 26}
    assert (tmp_path / "model.dcz").is_file() and (tmp_path / "report.md").is_file()
    assert "paper" in (tmp_path / "report.md").read_text()
    # a later run can start at any stage from the previous stage's checkpoint
    out2 = tmp_path / "again"
    cfg2 = compose("lenet300", _pipeline_overrides(
        out2, "stage=quantize", f"pruned_ckpt={tmp_path}/checkpoints/prune.ckpt", "pipeline.quantize.epochs=1",
        "data.download=false"))
    again = train(cfg2)
    assert set(again["seconds"]) == {"quantize", "export", "evaluate"}
    assert again["accuracy"]["reloaded"]["acc1"] > 0.80


@needs_fashion_mnist
def test_lenet5_recipe_trains_on_a_seed_that_used_to_diverge(tmp_path):
    """LR 0.05 without warm-up turned LeNet-5's loss to NaN within 50 steps for seed=1; the recipe warms up."""
    cfg = compose("lenet5", _pipeline_overrides(
        tmp_path, "seed=1", "stages=[baseline]", "pipeline.baseline.epochs=1", "trainer.limit_train_batches=80",
        "trainer.limit_val_batches=2", "trainer.limit_test_batches=4", "data.download=false"))
    assert cfg.module.warmup_epochs == 1
    summary = train(cfg)
    assert summary["accuracy"]["baseline"]["acc1"] > 0.5  # a NaN model scores 10 %


def test_stage_needs_checkpoint(tmp_path):
    cfg = compose("lenet5", _pipeline_overrides(tmp_path, "data=fake", "stage=prune"))
    with pytest.raises(ValueError, match="baseline_ckpt"):
        train(cfg)
    cfg = compose("lenet5", _pipeline_overrides(tmp_path, "data=fake", "stage=nonsense"))
    with pytest.raises(ValueError, match="valid stages"):
        train(cfg)


def test_imagenet_shapes_every_stage(tmp_path):
    """ImageNet readiness: the AlexNet recipe's ImageNet schedule on FakeData with 224 px, 1000 classes."""
    cfg = compose("alexnet", _pipeline_overrides(
        tmp_path, "data=fake", "data.image_size=224", "data.num_classes=1000", "data.num_samples=8",
        "data.batch_size=4", "data.eval_batch_size=4", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "pipeline.baseline.epochs=1", "pipeline.prune.epochs=2",
        "pipeline.prune.callback.rounds=1", "pipeline.quantize.epochs=1"))
    imagenet = compose("alexnet", ["data=imagenet", "data.root=/nonexistent"])
    assert imagenet.pipeline.prune.lr_scale == pytest.approx(0.01) and imagenet.data.image_size == 224
    # ImageNet keeps the paper's k-means; the Fashion-MNIST schedule uses uniform centroids (recipes/alexnet/README.md)
    assert imagenet.pipeline.quantize.callback.max_iter == 300 and imagenet.pipeline.prune.callback.adjust_dropout
    assert compose("alexnet", ["data.root=/nonexistent"]).pipeline.quantize.callback.max_iter == 0
    summary = train(cfg)
    kept = {r["name"]: r["kept_pct"] for r in summary["report"]["layers"]}
    assert kept["model.classifier.1"] == pytest.approx(9, abs=0.01)  # fc6 at [DC] Table 4's 9%
    assert summary["report"]["total"]["ratio_pq"] > 20
    assert set(summary["seconds"]) == {"baseline", "prune", "quantize", "export", "evaluate"}


def test_quantize_restart_reapplies_the_dropout_adjustment(tmp_path, monkeypatch):
    """stage=quantize from a pruned checkpoint retrains with [NIPS] §3.2's rates, as the in-process pipeline does."""
    import dc_lightning.pipeline.stages as pipeline

    base = _pipeline_overrides(
        tmp_path, "data=fake", "data.num_samples=16", "data.batch_size=8", "data.eval_batch_size=8",
        "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
        "pipeline.baseline.epochs=1", "pipeline.prune.epochs=1", "pipeline.prune.callback.rounds=1",
        "pipeline.quantize.epochs=1")
    seen = {}
    real_fit = pipeline._fit

    def fit(cfg, module, dm, stage, *args):
        seen[stage] = [m.p for m in module.modules() if isinstance(m, torch.nn.Dropout)]
        return real_fit(cfg, module, dm, stage, *args)

    monkeypatch.setattr(pipeline, "_fit", fit)
    train(compose("alexnet", [*base, "stages=[baseline,prune]"]))
    restarted = train(compose("alexnet", [*base, "stages=[quantize]", "stage=quantize", "overwrite=true",
                                          f"pruned_ckpt={tmp_path}/checkpoints/prune.ckpt"]))
    # fc6/fc7 pruned to 9 % ([DC] Table 4): 0.5 * sqrt(0.09) = 0.15, as during pruning
    assert seen["baseline"] == [0.5, 0.5]
    assert seen["quantize"] == pytest.approx([0.15, 0.15], abs=1e-3)
    assert "quantize" in restarted["seconds"]


def test_refuses_to_overwrite_another_run(tmp_path):
    base = _pipeline_overrides(tmp_path, "data=fake", "stages=[baseline]", "pipeline.baseline.epochs=1",
                               "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                               "trainer.limit_test_batches=1")
    train(compose("lenet300", base))
    before = (tmp_path / "checkpoints" / "baseline.ckpt").read_bytes()
    with pytest.raises(FileExistsError, match="holds another run"):
        train(compose("lenet300", [*base, "seed=1"]))
    assert (tmp_path / "checkpoints" / "baseline.ckpt").read_bytes() == before  # nothing was touched
    train(compose("lenet300", [*base, "seed=1", "overwrite=true"]))  # explicit consent
