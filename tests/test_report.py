"""The compression report (DC Tables 2-5 columns) on a hand-checkable layer, its renderings and the CLI."""

import json

import pytest
import torch
from torch import nn

from dc_lightning.cli.inspect import cli_inspect
from dc_lightning.io import save_compressed
from dc_lightning.report import compression_report


def hand_layer() -> nn.Linear:
    """10x10 layer, kept row-major positions 0, 1, 20, 99, 2-bit codebook, codes [0, 0, 0, 1]."""
    lin = nn.Linear(10, 10, bias=False)
    mask = torch.zeros(100, dtype=torch.bool)
    mask[[0, 1, 20, 99]] = True
    mask = mask.reshape(10, 10)  # row-major positions -> (row, col)
    assign = torch.zeros(10, 10, dtype=torch.uint8)
    assign[9, 9] = 1  # position 99 = row 9, col 9
    cb = torch.tensor([0.5, -1.0, 2.0, 3.0])
    lin.register_buffer("weight_mask", mask)
    lin.register_buffer("weight_codebook", cb)
    lin.register_buffer("weight_assign", assign)
    with torch.no_grad():
        lin.weight.copy_(torch.where(mask, cb[assign.long()], 0.0))
    return lin


def test_hand_checked_columns(tmp_path):
    rep = save_compressed(hand_layer(), tmp_path / "h.dcz", index_bits=3)
    (row,) = rep.layers
    assert row.weights == 100 and row.kept == 4 and row.kept_pct == pytest.approx(4.0)
    # gaps z = 0, 0, 18, 78 with filler M = 7: 18 = 2 fillers + 4, 78 = 11 fillers + 1 -> 13 fillers, 17 gap symbols
    assert row.fillers == 13
    assert row.weight_bits_pq == 2 and row.index_bits_pq == 3
    # P: 4*32 + 17*3 = 179 bits; P+Q: 4*2 + 17*3 + 4*32 (codebook) = 187 bits
    assert row.size_p_bytes == pytest.approx(179 / 8)
    assert row.size_pq_bytes == pytest.approx(187 / 8)
    assert row.cr_pq_pct == pytest.approx(100 * 187 / 8 / 400)
    # Huffman would code the codes {0: 3, 1: 1} in 1 bit each (4 bits) and the gaps {7: 13, 0: 2, 4: 1, 1: 1} in
    # 23 bits, but its length tables (4 and 8 bytes) outweigh that: both streams go fixed-width (2 and 3 bits) with a
    # one-byte table, 1 + 1 and 7 + 1 bytes instead of 1 + 4 and 3 + 8
    assert row.weight_bits_pqh == pytest.approx(2.0)
    assert row.index_bits_pqh == pytest.approx(17 * 3 / 4)
    # payload: codebook 16 + code table 1 + sync 2 + 1 data byte + gap table 1 + sync 2 + 7 data bytes = 30
    assert row.size_pqh_bytes == 30
    assert row.cr_pqh_pct == pytest.approx(7.5)
    assert rep.total.ratio_pqh == pytest.approx(400 / 30)
    assert rep.other is None


def test_model_and_file_reports_agree(tmp_path):
    net = nn.Sequential(hand_layer(), nn.ReLU(), nn.Linear(10, 3))
    rep_file = save_compressed(net, tmp_path / "n.dcz", index_bits=3)
    rep_model = compression_report(net, index_bits=3)
    rep_path = compression_report(tmp_path / "n.dcz")
    assert rep_model.to_dict()["total"] == rep_path.to_dict()["total"] == rep_file.to_dict()["total"]
    names = [r.name for r in rep_path.layers]
    assert names == ["0", "2"]  # the dense Linear gets its own row, its bias goes to "other tensors"
    assert rep_path.other is not None and rep_path.other.weights == 3
    dense = rep_path.layers[1]
    assert dense.kind == "dense" and dense.cr_pqh_pct == pytest.approx(100.0)
    tot = rep_path.total
    assert tot.size_dense_bytes == 4 * (100 + 30 + 3)
    assert tot.size_pqh_bytes == 30 + 120 + 12


def test_renderings(tmp_path, capsys):
    rep = save_compressed(hand_layer(), tmp_path / "h.dcz", index_bits=3)
    md = rep.to_markdown()
    assert md.splitlines()[0].startswith("| layer | #W | W% (P)")
    assert "| 7.50% (13.3x) |" in md
    doc = json.loads(rep.to_json())
    assert doc["layers"][0]["fillers"] == 13 and doc["total"]["ratio_pqh"] == pytest.approx(400 / 30)
    png = rep.plot(tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep.print()
    assert "total" in capsys.readouterr().out
    assert cli_inspect([str(tmp_path / "h.dcz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["kept"] == 4
    assert cli_inspect([str(tmp_path / "h.dcz"), "--markdown"]) == 0
    assert "| total |" in capsys.readouterr().out
    (tmp_path / "bad.dcz").write_bytes(b"nope")
    assert cli_inspect([str(tmp_path / "bad.dcz")]) == 1


def test_log_wandb_with_fake_run(tmp_path):
    import wandb

    rep = save_compressed(hand_layer(), tmp_path / "h.dcz", index_bits=3)
    calls = {}

    class Run:
        def log(self, d):
            calls["log"] = d

        def log_artifact(self, a):
            calls["artifact"] = a

    class Logger:
        experiment = Run()

    rep.log_wandb(Logger())
    assert calls["log"]["compression/ratio"] == pytest.approx(400 / 30)
    assert calls["log"]["compression/report"].columns[0] == "layer"
    assert isinstance(calls["artifact"], wandb.Artifact) and calls["artifact"].type == "report"


def test_inspect_memory_reports_disk_device_and_dense_bytes(tmp_path, capsys):
    """``inspect --memory``: bytes on disk, bytes the converted layers hold, dense fp16 bytes (issue 15)."""
    import json

    from dc_lightning.cli import main
    from dc_lightning.io import save_compressed
    from dc_lightning.models import build_model
    from dc_lightning.pruning.masks import prune_model
    from dc_lightning.quantization.codebooks import quantize_model

    torch.manual_seed(0)
    model = build_model("lenet300")
    prune_model(model, densities=0.1)
    quantize_model(model, bits=4, max_iter=0)
    path = tmp_path / "m.dcz"
    save_compressed(model, path)
    capsys.readouterr()
    assert main(["inspect", str(path), "--memory", "--json"]) == 0
    mem = json.loads(capsys.readouterr().out)["memory"]
    assert mem["file_bytes"] == path.stat().st_size and mem["device"] == "cpu"
    assert [r["name"] for r in mem["layers"]] == ["ip1", "ip2", "ip3"]
    dense = sum(2 * m.weight.numel() + 2 * m.bias.numel() for m in (model.ip1, model.ip2, model.ip3))
    assert mem["dense_fp16_bytes"] == dense
    # the sparse layout (~0.23 B/position at 10 %) plus the 4-bit packed-code copy for batches (0.625 B/position) and
    # fp32 biases: below dense fp16 (2 B/position), and exactly what the rows add up to
    assert 0 < mem["bytes"] < dense * 0.6
    assert mem["bytes"] == sum(r["bytes"] for r in mem["layers"])


def test_inspect_memory_takes_the_file_before_or_after_it(tmp_path, capsys):
    from dc_lightning.cli import main
    from dc_lightning.models import build_model
    from dc_lightning.pruning.masks import prune_model

    net = build_model("lenet300")
    prune_model(net, densities=0.1)
    path = tmp_path / "m.dcz"
    save_compressed(net, path)
    assert main(["inspect", str(path), "--memory", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["memory"]
    assert main(["inspect", "--memory", str(path), "--json"]) == 0  # argparse would read the file as --memory's DEVICE
    assert json.loads(capsys.readouterr().out)["memory"] == first and first["device"] == "cpu"
    assert main(["inspect", "--memory", "cpu"]) == 2
    assert "give the .dcz file" in capsys.readouterr().err
