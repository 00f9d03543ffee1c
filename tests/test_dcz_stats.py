"""dc_lightning.dcz.stats: the entropy floors and tail ratios it reports are the ones of the file's layers."""

import numpy as np
import pytest
import torch
from torch import nn

from dc_lightning.dcz import CorruptFileError, read_compressed
from dc_lightning.dcz.stats import entropy, file_stats, gap_bits, layer_stats
from dc_lightning.io import save_compressed


def _conv_with(mask: torch.Tensor, assign: torch.Tensor, codebook: torch.Tensor) -> nn.Conv2d:
    conv = nn.Conv2d(mask.shape[1], mask.shape[0], mask.shape[2], bias=False)
    conv.register_buffer("weight_mask", mask)
    conv.register_buffer("weight_codebook", codebook)
    conv.register_buffer("weight_assign", torch.where(mask, assign, 0).to(torch.uint8))
    conv.weight.data.copy_(torch.where(mask, codebook[conv.weight_assign.long()], 0.0))
    return conv


def test_entropy_and_gap_bits():
    assert entropy(np.array([], dtype=np.int64)) == 0.0 and entropy(np.full(7, 3)) == 0.0
    assert entropy(np.arange(8).repeat(5)) == pytest.approx(3.0)
    assert gap_bits(np.zeros(10, dtype=bool)) == 0.0
    # every position kept: every gap is 0 at any width, a constant stream, 0 bits
    assert gap_bits(np.ones(50, dtype=bool)) == 0.0
    # one non-zero per 4 positions: gaps of 3 at any width >= 2 bits, constant again
    assert gap_bits(np.arange(40) % 4 == 3) == 0.0


def test_entropy_and_scan_orders(tmp_path):
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
    rows = {r["layer"]: r for r in file_stats(path)}
    assert rows == {r["layer"]: r for r in file_stats(read_compressed(path))}  # a path or a read file

    rnd, st = rows["0"], rows["1"]
    assert rnd["nnz"] == int(random_mask.sum()) and rnd["density"] == pytest.approx(random_mask.float().mean().item())
    assert rnd["shape"] == list(shape)
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


def test_linear_layer_has_one_scan_order(tmp_path):
    lin = nn.Linear(40, 12, bias=False)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(12, 40, generator=g) < 0.25
    codebook = torch.tensor([-0.5, -0.25, 0.25, 0.5])
    assign = torch.randint(0, 4, (12, 40), generator=g, dtype=torch.uint8) * mask
    for name, t in (("weight_mask", mask), ("weight_codebook", codebook), ("weight_assign", assign)):
        lin.register_buffer(name, t)
    lin.weight.data.copy_(torch.where(mask, codebook[assign.long()], 0.0))
    save_compressed(nn.Sequential(lin), tmp_path / "l.dcz")
    (row,) = file_stats(tmp_path / "l.dcz")
    assert set(row["gap_bits"]) == {"oihw"} and row["max_over_thr"] == pytest.approx(2.0)


def test_file_without_compressed_layers(tmp_path):
    lin = nn.Linear(4, 3)
    lin.register_buffer("weight_mask", torch.ones(3, 4, dtype=torch.bool))  # pruned only: no codebook
    path = tmp_path / "p.dcz"
    save_compressed(nn.Sequential(lin), path)
    assert file_stats(path) == []
    (layer,) = read_compressed(path).layers.values()
    with pytest.raises(ValueError, match=r"layer '0': kind 'p'.*kind 'pq'"):
        layer_stats(layer)


def test_unreadable_file(tmp_path):
    with pytest.raises(OSError):
        file_stats(tmp_path / "missing.dcz")
    bad = tmp_path / "bad.dcz"
    bad.write_bytes(b"not a compressed file")
    with pytest.raises(CorruptFileError, match="bad.dcz"):
        file_stats(bad)
