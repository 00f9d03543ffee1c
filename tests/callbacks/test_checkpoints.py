"""Lightning checkpoints and compressed files written at any point of training hold exactly the model's weights
(issue 14, points 1 and 6): no placeholder codebooks before clustering, load_from_checkpoint and dense resume."""

import re

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dc_lightning import CompressedCheckpoint, MagnitudePruning, TrainedQuantization, load_from_checkpoint
from dc_lightning.buffers import get_buffer, get_mask
from dc_lightning.checkpoint import read_checkpoint, restore_checkpoint
from dc_lightning.cli.export import cli_export
from dc_lightning.dcz import read_compressed
from dc_lightning.io import load_compressed, save_compressed
from dc_lightning.pruning.dropout import dropout_rates, set_dropout_rates


class Net(pl.LightningModule):
    def __init__(self, hidden: int = 24):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4))

    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)  # momentum: pruned weights must stay 0

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        return DataLoader(TensorDataset(torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)),
                          batch_size=16)


def _trainer(root, callbacks, max_epochs=4, **kw):
    return pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, default_root_dir=root, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1, **kw)


def _weights(sd):
    return {k: v for k, v in sd.items() if k.endswith(("weight", "bias"))}


def test_files_written_before_clustering_hold_the_models_weights(tmp_path):
    # issue 14 point 1: this exact trainer crashed at the first epoch end (zero placeholder codebooks)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    callbacks = [MagnitudePruning(densities=0.3, rounds=2, verbose=False), TrainedQuantization(verbose=False),
                 CompressedCheckpoint(dirpath=tmp_path / "dcz", every_checkpoint=True), ckpt_cb]
    _trainer(tmp_path, callbacks).fit(Net())  # rounds at epochs 0 and 1, clustering at epoch 2
    ckpts = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(ckpts) == 4
    kinds = []
    for ckpt in ckpts:
        epoch, step = map(int, re.findall(r"epoch=(\d+)-step=(\d+)", ckpt.name)[0])
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        dcz = tmp_path / "dcz" / f"compressed-epoch={epoch}-step={step}.dcz"
        loaded = load_compressed(dcz, model=Net())
        for k, v in _weights(state).items():  # the file holds exactly the weights the model had then
            assert torch.equal(loaded.state_dict()[k], v), (ckpt.name, k)
        quantized = any(k.endswith("weight_codebook") for k in state)
        assert quantized == (epoch >= 2), ckpt.name  # a codebook only once clustered
        kinds.append(sorted({layer.kind for layer in read_compressed(dcz).layers.values()}))
    assert kinds == [["p"], ["p"], ["pq"], ["pq"]]
    # the CLI exports a pre-quantization checkpoint to the same weights
    out = tmp_path / "early.dcz"
    assert cli_export([str(ckpts[1]), str(out), "--model-class", f"{Net.__module__}:Net"]) == 0
    state = torch.load(ckpts[1], map_location="cpu", weights_only=True)["state_dict"]
    loaded = load_compressed(out, model=Net())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in _weights(state).items())


def test_unfilled_placeholder_codebooks_never_zero_the_weights(tmp_path):
    # a checkpoint of an older version carries all-zero codebook/assign placeholders; strict or not, the file must
    # store the real weights (strict=False wrote an all-zero model before)
    net = nn.Sequential(nn.Linear(10, 8), nn.Linear(8, 3))
    mask = net[0].weight.abs() > 0.1
    with torch.no_grad():
        net[0].weight.masked_fill_(~mask, 0.0)
    net[0].register_buffer("weight_mask", mask)
    for lin in net:
        lin.register_buffer("weight_codebook", torch.zeros(32))
        lin.register_buffer("weight_assign", torch.zeros(lin.weight.shape, dtype=torch.uint8))
    for strict in (True, False):
        path = tmp_path / f"s{strict}.dcz"
        save_compressed(net, path, strict=strict)
        fresh = nn.Sequential(nn.Linear(10, 8), nn.Linear(8, 3))
        loaded = load_compressed(path, model=fresh)
        for a, b in zip(loaded, net, strict=True):
            assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
        assert get_buffer(loaded[0], "codebook") is None and get_mask(loaded[0]) is not None


def test_strict_false_warns_when_it_changes_weights(tmp_path):
    lin = nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(24.0).reshape(4, 6) - 12)
    lin.register_buffer("weight_codebook", torch.tensor([-5.0, 5.0]))
    lin.register_buffer("weight_assign", (lin.weight > 0).to(torch.uint8))
    with pytest.raises(ValueError, match="differ from weight_codebook"):
        save_compressed(lin, tmp_path / "a.dcz")
    with pytest.warns(UserWarning, match="strict=False"):
        save_compressed(lin, tmp_path / "a.dcz", strict=False)


def test_load_from_checkpoint_of_a_compressed_module(tmp_path):
    # issue 14 point 6: MyModule.load_from_checkpoint failed with "Unexpected key(s) ... weight_mask"
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trained = Net()
    _trainer(tmp_path, [MagnitudePruning(densities=0.3, rounds=2, verbose=False), TrainedQuantization(verbose=False),
                        ckpt_cb]).fit(trained)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        Net.load_from_checkpoint(tmp_path / "last.ckpt")  # Lightning's own call: why the helper exists
    model = load_from_checkpoint(Net, tmp_path / "last.ckpt")
    assert type(model) is Net
    for k, v in trained.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert get_buffer(model.net[0], "codebook") is not None and get_mask(model.net[2]) is not None


def test_resume_a_dense_checkpoint_after_adding_pruning(tmp_path):
    # issue 14 point 6: fit(ckpt_path=<dense checkpoint>) under MagnitudePruning failed with "Missing key(s)"
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "dense", save_last=True)
    _trainer(tmp_path, [ckpt_cb], max_epochs=1).fit(Net())
    pruning = MagnitudePruning(densities=0.25, prune_epochs=[1], verbose=False)
    model = Net()
    _trainer(tmp_path, [pruning], max_epochs=3).fit(model, ckpt_path=tmp_path / "dense" / "last.ckpt")
    assert pruning.finished
    for m in (model.net[0], model.net[2]):
        mask = get_mask(m)
        assert abs(mask.float().mean().item() - 0.25) < 0.05
        assert torch.equal(m.weight[~mask], torch.zeros(int((~mask).sum())))


class DropNet(Net):
    """Net with a dropout layer whose rate travels in the checkpoint, as ``ClassifierModule`` does it."""

    def __init__(self, hidden: int = 24):
        super().__init__(hidden)
        self.net.insert(2, nn.Dropout(0.5))

    def on_save_checkpoint(self, checkpoint):
        checkpoint["dropout_rates"] = dropout_rates(self)

    def on_load_checkpoint(self, checkpoint):
        set_dropout_rates(self, checkpoint.get("dropout_rates", {}))


def test_every_loader_restores_buffers_and_dropout_rates(tmp_path):
    trained = DropNet()
    trainer = _trainer(tmp_path, [MagnitudePruning(densities=0.3, rounds=1, verbose=False)], max_epochs=1)
    trainer.fit(trained)
    trained.net[2].p = 0.2  # as MagnitudePruning(adjust_dropout=True) would lower it
    trainer.save_checkpoint(tmp_path / "pruned.ckpt")
    ckpt = read_checkpoint(tmp_path / "pruned.ckpt")
    for model in (load_from_checkpoint(DropNet, tmp_path / "pruned.ckpt"), restore_checkpoint(DropNet(), ckpt)):
        assert type(model) is DropNet and model.net[2].p == 0.2
        assert torch.equal(get_mask(model.net[0]), get_mask(trained.net[0]))
        assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.state_dict().items())
    with pytest.raises(ValueError, match="has no layer 'net.3'"):  # a checkpoint of another model
        restore_checkpoint(Net(), ckpt)
    with pytest.raises(RuntimeError, match="size mismatch"):  # strict load_state_dict
        restore_checkpoint(DropNet(hidden=8), ckpt)


def test_read_checkpoint_says_what_the_file_is(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint: no file at"):
        read_checkpoint(tmp_path / "missing.ckpt")
    torch.save(Net().state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="not a Lightning checkpoint \\(no state_dict\\)"):
        read_checkpoint(tmp_path / "bare.pt")
    save_compressed(Net(), tmp_path / "m.dcz")
    with pytest.raises(ValueError, match="is a compressed .dcz file"):
        read_checkpoint(tmp_path / "m.dcz")
    (tmp_path / "junk.ckpt").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="torch.load failed"):
        read_checkpoint(tmp_path / "junk.ckpt")
