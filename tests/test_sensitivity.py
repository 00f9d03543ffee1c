"""Tests of dc_lightning.pruning.sensitivity: one-layer-at-a-time sweep, suggestion rule, CSV/PNG, CLI."""

from __future__ import annotations

import copy
import csv
import json
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dc_lightning.buffers import get_mask
from dc_lightning.pruning.masks import prune_model
from dc_lightning.pruning.sensitivity import sensitivity_analysis, suggest_densities, write_sensitivity

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="module")
def trained():
    """A small MLP trained to high accuracy on separable synthetic data, and its data loader."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 20, generator=g) * 3
    y = torch.randint(0, 4, (512,), generator=g)
    x = centers[y] + torch.randn(512, 20, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, DataLoader(TensorDataset(x, y), batch_size=128, shuffle=False)


def _acc(model, loader) -> float:
    with torch.no_grad():
        c = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in loader)
    return 100.0 * c / len(loader.dataset)


def test_sweep_rows_match_a_reference_and_restore_weights(trained):
    model, loader = trained
    before = copy.deepcopy(model.state_dict())
    dens = (1.0, 0.5, 0.1, 0.02)
    rows = sensitivity_analysis(model, loader, densities=dens)
    assert [(r["layer"], r["density"]) for r in rows] == [(n, d) for n in ("0", "2", "4") for d in dens]
    base = _acc(model, loader)
    assert base > 95
    assert all(r["accuracy"] == base for r in rows if r["density"] == 1.0)
    # each row equals pruning that layer alone with prune_model on a copy
    for r in rows:
        ref = copy.deepcopy(model)
        prune_model(ref, densities=r["density"], include=[r["layer"]])
        assert r["accuracy"] == pytest.approx(_acc(ref, loader)), r
        assert r["kept"] == max(1, round(r["density"] * r["weights"]))
    # heavy pruning of the first layer hurts; weights restored bit for bit, no mask left behind
    assert min(r["accuracy"] for r in rows if r["layer"] == "0") < base - 5
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(get_mask(m) is None for m in model.modules())


def test_sweep_options(trained):
    model, loader = trained
    rows = sensitivity_analysis(model, loader, densities=(1.0, 0.3), include=["2", "4"], exclude=["4"], max_batches=1)
    assert {r["layer"] for r in rows} == {"2"}
    # max_batches=1: accuracy measured on the first 128 samples only
    first = DataLoader(TensorDataset(*loader.dataset[:128]), batch_size=128)
    assert rows[0]["accuracy"] == pytest.approx(_acc(model, first))
    with pytest.raises(ValueError, match="available layers"):
        sensitivity_analysis(model, loader, include=["fc6"])
    with pytest.raises(ValueError, match="got 0.0"):
        sensitivity_analysis(model, loader, densities=(1.0, 0.0))
    # batch_transform sees (x, y) on the device
    seen = []
    sensitivity_analysis(
        model,
        loader,
        densities=(1.0,),
        include=["4"],
        max_batches=2,
        batch_transform=lambda b: seen.append(b[0].shape) or b,
    )
    assert seen == [torch.Size([128, 20])] * 2


def test_sweep_respects_existing_masks(trained):
    model, loader = trained
    m = copy.deepcopy(model)
    prune_model(m, densities=0.2, include=["0"])
    mask = get_mask(m[0]).clone()
    rows = sensitivity_analysis(m, loader, densities=(1.0, 0.5, 0.1), include=["0"])
    assert [r["kept"] for r in rows] == [int(mask.sum())] * 2 + [round(0.1 * mask.numel())]
    assert torch.equal(get_mask(m[0]), mask) and (m[0].weight[~mask] == 0).all()


def test_suggest_densities_rule():
    rows = [
        {"layer": "a", "density": 1.0, "accuracy": 90.0},
        {"layer": "a", "density": 0.5, "accuracy": 89.8},
        {"layer": "a", "density": 0.2, "accuracy": 89.0},
        {"layer": "a", "density": 0.1, "accuracy": 89.9},  # noisy: below a failing point, not chosen
        {"layer": "b", "density": 1.0, "accuracy": 90.0},
        {"layer": "b", "density": 0.5, "accuracy": 89.5},  # exactly 0.5 points: allowed
        {"layer": "b", "density": 0.2, "accuracy": 89.4},
        {"layer": "c", "density": 1.0, "accuracy": 90.0},
        {"layer": "c", "density": 0.5, "accuracy": 80.0},
    ]
    assert suggest_densities(rows, max_drop=0.5) == {"a": 0.5, "b": 0.5, "c": 1.0}
    assert suggest_densities(rows, max_drop=1.0) == {"a": 0.1, "b": 0.2, "c": 1.0}
    with pytest.raises(ValueError, match="density 1.0"):
        suggest_densities([{"layer": "x", "density": 0.5, "accuracy": 1.0}])
    with pytest.raises(ValueError, match="max_drop"):
        suggest_densities(rows, max_drop=-1)


def test_write_sensitivity(tmp_path, trained):
    model, loader = trained
    rows = sensitivity_analysis(model, loader, densities=(1.0, 0.5, 0.1), max_batches=1)
    paths = write_sensitivity(rows, tmp_path / "out")
    with open(paths["csv"]) as f:
        back = list(csv.DictReader(f))
    assert [(r["layer"], float(r["density"]), float(r["accuracy"])) for r in back] == [
        (r["layer"], r["density"], pytest.approx(r["accuracy"])) for r in rows
    ]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 5000
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sensitivity.csv", "sensitivity.png"]
    with pytest.raises(ValueError, match="write_sensitivity: no rows to write"):
        write_sensitivity([], tmp_path)


def test_cli_sensitivity(tmp_path, capsys):
    from dc_lightning.cli.sensitivity import cli_sensitivity
    from dc_lightning.pipeline.config import build_module, compose

    cfg = compose("lenet300", ["data=fake", f"output_dir={tmp_path}"])
    module = build_module(cfg)
    prune_model(module, densities=0.5, include=["model.ip3"])  # the checkpoint carries a mask buffer
    torch.save({"state_dict": module.state_dict()}, tmp_path / "m.ckpt")
    out = tmp_path / "sens"
    rc = cli_sensitivity(
        [
            "--ckpt",
            str(tmp_path / "m.ckpt"),
            "--recipe",
            "lenet300",
            "--out",
            str(out),
            "--densities",
            "0.5,0.1",
            "--max-batches",
            "2",
            "--device",
            "cpu",
            "data=fake",
            f"output_dir={tmp_path}",
        ]
    )
    assert rc == 0
    with open(out / "sensitivity.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["layer"], float(r["density"])) for r in rows] == [
        (n, d) for n in ("model.ip1", "model.ip2", "model.ip3") for d in (1.0, 0.5, 0.1)
    ]
    assert int(rows[6]["kept"]) == 500  # ip3 was already at 50% of 1000 weights
    sugg = json.loads((out / "suggested_densities.json").read_text())
    assert set(sugg["densities"]) == {"model.ip1", "model.ip2", "model.ip3"}
    assert (out / "sensitivity.png").stat().st_size > 0
    # overrides right after --include are overrides, not layer patterns
    out2 = tmp_path / "sens2"
    rc = cli_sensitivity(
        ["--ckpt", str(tmp_path / "m.ckpt"), "--recipe", "lenet300", "--out", str(out2), "--densities", "0.5",
         "--max-batches", "1", "--device", "cpu", "--include", "model.ip3", "data=fake", f"output_dir={tmp_path}"]
    )
    assert rc == 0
    with open(out2 / "sensitivity.csv") as f:
        assert {r["layer"] for r in csv.DictReader(f)} == {"model.ip3"}
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
        cli_sensitivity(["--ckpt", "x", "--recipe", "lenet300", "--densities", "1.5"])
    assert r"--densities: [1.5] must be numbers in (0, 1]" in capsys.readouterr().err
