"""recipe=lstm_lm and recipe=transformer_lm end to end on the CPU, stage by stage, on a slice of the fortunes corpus.

Tiny widths and schedules (the transformer keeps the 6 blocks its densities name; the recipes' densities, bits and
index widths are kept): each stage is its own run that starts from the previous stage's checkpoint, the compressed
file is reloaded, converted to the compressed inference modules (their CPU reference path) and its perplexity must
be finite and below the untrained model's.
"""

import csv
import json
import math

import pytest
import torch
from conftest import needs_fortunes

from dc_lightning.inference.conversion import to_compressed_inference
from dc_lightning.io import load_compressed
from dc_lightning.pipeline.config import build_datamodule, build_module, compose, load_module_checkpoint
from dc_lightning.pipeline.stages import measure_accuracy, run_pipeline

TINY = {
    "lstm_lm": ["model.embed_dim=32", "model.hidden_size=32"],
    "transformer_lm": ["model.width=32", "model.num_layers=6", "model.num_heads=2", "model.max_len=64"],
}


def _cfg(recipe, tmp_path, *extra):
    return compose(recipe, [
        "logger=none", "trainer=cpu", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
        "data.max_bytes=40000", "data.seq_len=64", "data.batch_size=16", "data.eval_batch_size=64", "num_threads=1",
        "pipeline.baseline.epochs=2", "pipeline.prune.epochs=2", "pipeline.prune.callback.rounds=1",
        "pipeline.quantize.epochs=1", f"output_dir={tmp_path}", "overwrite=true", *TINY[recipe], *extra])


@needs_fortunes
@pytest.mark.parametrize("recipe", ["lstm_lm", "transformer_lm"])
def test_lm_recipe_stage_by_stage(recipe, tmp_path):
    ckpts = tmp_path / "checkpoints"
    steps = [
        ["stage=baseline", "stages=[baseline]"],
        ["stage=prune", "stages=[prune]", f"baseline_ckpt={ckpts / 'baseline.ckpt'}"],
        ["stage=quantize", "stages=[quantize]", f"pruned_ckpt={ckpts / 'prune.ckpt'}"],
        ["stage=export", "stages=[export,evaluate]", f"quantized_ckpt={ckpts / 'quantize.ckpt'}"],
    ]
    for step in steps:
        summary = run_pipeline(_cfg(recipe, tmp_path, *step))
        if step[0] == "stage=baseline" and recipe == "transformer_lm":
            _check_sensitivity_sweep(recipe, tmp_path, ckpts / "baseline.ckpt")
    cfg = _cfg(recipe, tmp_path)
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    untrained = measure_accuracy(cfg, build_module(cfg), dm, "untrained")["ppl"]
    reloaded = summary["accuracy"]["reloaded"]["ppl"]
    assert math.isfinite(reloaded) and reloaded < 0.5 * untrained, (reloaded, untrained)
    # the file holds the recipe's sparsity and the [DC] accounting ratio of a compressed model
    report = summary["report"]
    densities = cfg.pipeline.prune.callback.densities  # per module; an LSTM's or attention's rows name the param too
    for layer in report["layers"]:
        name = layer["name"] if layer["name"] in densities else layer["name"].rsplit(".", 1)[0]
        assert layer["kept_pct"] == pytest.approx(100 * densities[name], abs=1.0), layer["name"]
    assert len(report["layers"]) == len(densities) + (recipe == "lstm_lm")  # every matrix, none left dense
    assert report["total"]["ratio_pqh"] > 8
    # through the compressed inference modules (their CPU reference path): the same perplexity
    module = load_compressed(tmp_path / "model.dcz")
    compressed = measure_accuracy(cfg, to_compressed_inference(module), dm, "compressed")["ppl"]
    assert compressed == pytest.approx(reloaded, rel=1e-4)


def _check_sensitivity_sweep(recipe, tmp_path, ckpt):
    """``dc-lightning sensitivity`` on the LM: next-token accuracy per (layer, density), embeddings and attention in."""
    from dc_lightning.cli.sensitivity import cli_sensitivity

    out = tmp_path / "sensitivity"
    rc = cli_sensitivity(["--ckpt", str(ckpt), "--recipe", recipe, "--out", str(out), "--densities", "0.5",
                          "--max-batches", "1", "--device", "cpu", *TINY[recipe], "data.max_bytes=40000",
                          "data.seq_len=64", "data.eval_batch_size=64"])
    assert rc == 0
    rows = list(csv.DictReader((out / "sensitivity.csv").open()))
    layers = {r["layer"] for r in rows}
    assert {"model.embed", "model.pos", "model.layers.0.self_attn.in_proj_weight", "model.decoder"} <= layers
    # the dense rows are the next-byte accuracy of the checkpoint on the first validation batch
    cfg = _cfg(recipe, tmp_path)
    dm = build_datamodule(cfg)
    dm.setup("validate")
    x, y = next(iter(dm.val_dataloader()))
    module = load_module_checkpoint(cfg, ckpt).eval()
    with torch.no_grad():
        expected = 100.0 * (module(x).argmax(-1) == y).float().mean().item()
    dense = {float(r["accuracy"]) for r in rows if float(r["density"]) == 1.0}
    assert len(dense) == 1 and dense.pop() == pytest.approx(expected, abs=1e-3)
    assert set(json.loads((out / "suggested_densities.json").read_text())["densities"]) == layers
