"""Each stage's object comes from its ``pipeline.<stage>.callback`` node: any argument from the command line."""

import pytest
import torch

import dc_lightning.pipeline.stages as pipeline
from dc_lightning import CompressedCheckpoint, MagnitudePruning, TrainedQuantization, load_compressed
from dc_lightning.pipeline.config import compose
from dc_lightning.pipeline.stages import build_stage_callback, run_pipeline

# arguments the pipeline never copied from the recipe before the callbacks became config nodes
NEW_ARGS = [
    "+pipeline.prune.callback.prune_fraction=0.25",
    "+pipeline.prune.callback.std_of=kept",
    "+pipeline.quantize.callback.codebook_weight_decay=1e-4",
    "+pipeline.quantize.callback.seed=3",
    "+pipeline.export.callback.codebook_dtype=float16",
]


def _smoke(tmp_path, *extra):
    return ["data=fake", "logger=none", "trainer=cpu", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
            "data.num_samples=16", "data.batch_size=8", "data.eval_batch_size=8", "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "pipeline.baseline.epochs=1",
            "pipeline.prune.epochs=1", "pipeline.prune.callback.rounds=1", "pipeline.quantize.epochs=1",
            f"output_dir={tmp_path}", *extra]


def test_any_callback_argument_from_an_override(tmp_path):
    cfg = compose("lenet5", [f"output_dir={tmp_path}", *NEW_ARGS])
    prune, quantize, export = (build_stage_callback(cfg, s) for s in ("prune", "quantize", "export"))
    assert type(prune) is MagnitudePruning and type(quantize) is TrainedQuantization
    assert type(export) is CompressedCheckpoint
    assert (prune.prune_fraction, prune.std_of, prune.rounds) == (0.25, "kept", 4)
    assert (quantize.codebook_weight_decay, quantize.seed, quantize.max_iter) == (1e-4, 3, 0)
    assert export.save_kwargs["codebook_dtype"] == "float16" and export.save_kwargs["index_bits"] == "auto"
    assert type(quantize.bits) is dict  # plain containers, not OmegaConf nodes
    assert quantize.bits == {"model.conv*": 8, "model.ip1": 4, "model.ip2": 5}


def test_the_stages_use_the_built_callbacks(tmp_path, monkeypatch):
    """End to end: the stages train with, and export through, the objects the overrides configured."""
    seen = {}
    real_fit = pipeline._fit

    def fit(cfg, module, dm, stage, epochs, callbacks, resume):
        seen[stage] = callbacks
        return real_fit(cfg, module, dm, stage, epochs, callbacks, resume)

    monkeypatch.setattr(pipeline, "_fit", fit)
    dirpath = f"+pipeline.export.callback.dirpath={tmp_path}/dcz"
    summary = run_pipeline(compose("lenet300", _smoke(tmp_path, *NEW_ARGS, dirpath)))
    (prune,), (quantize,) = seen["prune"], seen["quantize"]
    assert prune.prune_fraction == 0.25 and prune.std_of == "kept" and prune.finished
    assert quantize.codebook_weight_decay == 1e-4 and quantize.clustered
    assert quantize.codebook_optimizers()[0].param_groups[0]["weight_decay"] == 1e-4
    # codebook_dtype=float16: every stored weight is an fp16 value (float32 centroids almost never are)
    path = tmp_path / "dcz" / "model.dcz"  # dirpath: where the export stage writes and the evaluate stage reads
    weights = [m.weight for m in load_compressed(path).modules() if isinstance(m, torch.nn.Linear)]
    assert all(torch.equal(w, w.half().float()) for w in weights)
    assert not (tmp_path / "model.dcz").exists() and "reloaded" in summary["accuracy"]


def test_float32_codebooks_are_not_fp16_values(tmp_path):
    """Control for the fp16 check above: with the default codebook dtype the stored weights are not all fp16 values."""
    run_pipeline(compose("lenet300", _smoke(tmp_path, "stages=[baseline,prune,quantize,export]")))
    weights = [m.weight for m in load_compressed(tmp_path / "model.dcz").modules() if isinstance(m, torch.nn.Linear)]
    assert not all(torch.equal(w, w.half().float()) for w in weights)


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ("+pipeline.prune.callback.prune_fraction=2.0", ValueError,
         r"pipeline\.prune\.callback \(dc_lightning\.MagnitudePruning\): .*prune_fraction=2\.0"),
        ("+pipeline.quantize.callback.max_iters=5", TypeError,
         r"pipeline\.quantize\.callback \(dc_lightning\.TrainedQuantization\): .*max_iters"),
        ("+pipeline.export.callback.codebook_dtype=int8", ValueError, r"pipeline\.export\.callback .*int8"),
        ("~pipeline.prune.callback._target_", ValueError, r"pipeline\.prune\.callback: expected a node with _target_"),
    ],
)
def test_a_bad_callback_node_fails_before_any_training(tmp_path, override, error, match):
    cfg = compose("lenet300", _smoke(tmp_path, override))
    with pytest.raises(error, match=match):
        run_pipeline(cfg)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.yaml").exists()


def test_export_needs_a_writer(tmp_path):
    cfg = compose("lenet300", _smoke(tmp_path, "pipeline.export.callback._target_=builtins.dict"))
    with pytest.raises(TypeError, match=r"pipeline\.export\.callback: builtins\.dict built a dict, which has no write"):
        pipeline.export(cfg, torch.nn.Linear(2, 2), tmp_path / "x.dcz")
