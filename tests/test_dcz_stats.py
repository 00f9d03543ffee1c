"""bench/dcz_stats.py: the entropy floors and tail ratios it reports are the ones of the file's layers."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dc_lightning.io import save_compressed

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("dcz_stats", ROOT / "bench" / "dcz_stats.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _conv_with(mask: torch.Tensor, assign: torch.Tensor, codebook: torch.Tensor) -> nn.Conv2d:
    conv = nn.Conv2d(mask.shape[1], mask.shape[0], mask.shape[2], bias=False)
    conv.register_buffer("weight_mask", mask)
    conv.register_buffer("weight_codebook", codebook)
    conv.register_buffer("weight_assign", torch.where(mask, assign, 0).to(torch.uint8))
    conv.weight.data.copy_(torch.where(mask, codebook[conv.weight_assign.long()], 0.0))
    return conv


def test_entropy_and_scan_orders(tmp_path):
    stats = _load_script()
    g = torch.Generator().manual_seed(0)
    shape = (32, 16, 3, 3)
    codebook = torch.linspace(-1.0, 1.0, 16)
    codebook = codebook[codebook.abs() > 0.1]  # no centroid near zero, as after pruning
    assign = torch.randint(0, codebook.numel(), shape, generator=g)
    random_mask = torch.rand(shape, generator=g) < 0.3
    # every weight from input channels 0..7 pruned: long runs in (in, kh, kw, out) order, short ones row-major
    structured = torch.rand(shape, generator=g) < 0.6
    structured[:, :8] = False
    net = nn.Sequential(_conv_with(random_mask, assign, codebook), _conv_with(structured, assign, codebook))
    path = tmp_path / "m.dcz"
    save_compressed(net, path)
    out = tmp_path / "stats.json"
    assert stats.main([str(path), "--json", str(out)]) == 0
    rows = {r["layer"]: r for r in json.loads(out.read_text())}

    rnd, st = rows["0"], rows["1"]
    assert rnd["nnz"] == int(random_mask.sum()) and rnd["density"] == pytest.approx(random_mask.float().mean().item())
    # codes are uniform over 14 centroids: entropy close to log2(14), never above it
    assert np.log2(14) - 0.1 < rnd["code_bits"] <= np.log2(14) + 1e-9
    assert rnd["code_bits_per_row_table"] <= rnd["code_bits"] + 1e-9
    # a random mask costs the same in every scan order; the channel-structured one is cheaper input-major
    orders = rnd["gap_bits"]
    assert set(orders) == {"oihw", "ihwo", "hwio"}
    assert max(orders.values()) - min(orders.values()) < 0.1
    assert st["gap_bits"]["ihwo"] < st["gap_bits"]["oihw"]
    # max/thr of the stored magnitudes, and a Gaussian reference above 1
    mags = codebook.abs()
    assert rnd["max_over_thr"] == pytest.approx((mags.max() / mags.min()).item(), rel=1e-6)
    assert rnd["gaussian_max_over_thr"] > 1


def test_file_without_compressed_layers(tmp_path, capsys):
    stats = _load_script()
    lin = nn.Linear(4, 3)
    lin.register_buffer("weight_mask", torch.ones(3, 4, dtype=torch.bool))  # pruned only: no codebook
    path = tmp_path / "p.dcz"
    save_compressed(nn.Sequential(lin), path)
    assert stats.main([str(path)]) == 1
    assert "no pruned + quantized layers" in capsys.readouterr().err


def test_unreadable_file(tmp_path, capsys):
    stats = _load_script()
    assert stats.main([str(tmp_path / "missing.dcz")]) == 2
    bad = tmp_path / "bad.dcz"
    bad.write_bytes(b"not a compressed file")
    assert stats.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "missing.dcz" in err and "bad.dcz" in err

