"""bench/bench_storage.py: the trained weights it accepts."""

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_bench_storage_reads_lightning_checkpoints(tmp_path):
    """bench_storage.py --state-dict takes .safetensors, a plain .pth or this project's Lightning .ckpt."""
    from safetensors.torch import save_file

    spec = importlib.util.spec_from_file_location("bench_storage", ROOT / "bench" / "bench_storage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sd = {"features.0.weight": torch.randn(4, 3), "classifier.6.bias": torch.randn(2)}
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()} | {"other.x": torch.zeros(1)},
                "epoch": 3}, tmp_path / "run.ckpt")
    torch.save(sd, tmp_path / "plain.pth")
    save_file(sd, str(tmp_path / "w.safetensors"))
    for name in ("run.ckpt", "plain.pth", "w.safetensors"):
        got = mod.load_weights(str(tmp_path / name))
        assert got.keys() == sd.keys(), name
        assert all(torch.equal(got[k], sd[k]) for k in sd), name
