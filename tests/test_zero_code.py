"""``zero_code=True``: pruned layers get ``2**bits - 1`` centroids plus an exact 0.0 entry (EIE's 4-bit table: 15
shared values + the zero of pruned positions), which stays 0.0 through codebook fine-tuning (any optimizer), and
a 4-bit pruned layer then converts to the ``tc`` tensor-core layout instead of ``lut`` + bitmap. The default
(``None``) does so at 4 bits only."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent / "callbacks"))
from nets import cpu_trainer, toy_loader  # noqa: E402
from test_trained_quantization import FC1, FC2, Module, prune_by_hand  # noqa: E402

from dc_lightning import load_compressed, save_compressed  # noqa: E402
from dc_lightning.buffers import get_codebook  # noqa: E402
from dc_lightning.callbacks.trained_quantization import TrainedQuantization  # noqa: E402
from dc_lightning.inference.conversion import to_compressed_inference  # noqa: E402
from dc_lightning.inference.linear import CompressedLinear  # noqa: E402
from dc_lightning.kernels import layouts  # noqa: E402
from dc_lightning.pruning.masks import prune_model  # noqa: E402
from dc_lightning.quantization.codebooks import decode_weight, quantize_layer, quantize_model  # noqa: E402

os.environ.setdefault("WANDB_MODE", "disabled")


def _pruned_linear(n: int = 64, k: int = 96, density: float = 0.5, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    prune_model(nn.Sequential(lin), densities=density)
    return lin


@pytest.mark.parametrize("bits", [1, 2, 4, 5])
def test_pruned_layer_gets_a_zero_entry_no_kept_weight_uses(bits: int) -> None:
    lin = _pruned_linear()
    info = quantize_layer(lin, bits, zero_code=True, name="fc")
    codebook, assign = get_codebook(lin)
    mask = lin.weight_mask
    assert codebook.numel() == 2**bits and float(codebook[-1]) == 0.0 and not torch.signbit(codebook[-1])
    assert int(assign[mask].max()) <= 2**bits - 2 and info["centroids_used"] <= 2**bits - 1
    assert torch.equal(lin.weight.detach(), decode_weight(lin)) and bool((lin.weight[~mask] == 0).all())


def test_defaults_reserve_only_at_four_bits_and_never_for_unpruned_layers() -> None:
    torch.manual_seed(1)
    dense = nn.Linear(40, 30)
    quantize_layer(dense, 4, zero_code=True)  # nothing pruned: no entry to reserve
    assert get_codebook(dense)[1].unique().numel() == 16
    for bits, zero_code, kept_codes, reserved in ((4, None, 15, True), (4, False, 16, False), (5, None, 32, False)):
        lin = _pruned_linear(seed=2)
        quantize_layer(lin, bits, zero_code=zero_code)
        codebook, assign = get_codebook(lin)
        assert int(assign[lin.weight_mask].unique().numel()) == kept_codes
        assert (float(codebook[-1]) == 0.0) == reserved


def test_bad_zero_code_names_the_layer() -> None:
    with pytest.raises(TypeError, match=r"zero_code for layer 'fc' must be True, False or None .*, got 'yes'"):
        quantize_layer(_pruned_linear(), 4, zero_code="yes", name="fc")
    with pytest.raises(TypeError, match="quantize_model: zero_code must be True, False or None .*, got 1"):
        quantize_model(nn.Sequential(_pruned_linear()), bits=4, zero_code=1)
    with pytest.raises(ValueError, match="zero_code"):
        TrainedQuantization(zero_code="no")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_zero_entry_stays_exactly_zero_through_fine_tuning(optimizer: str) -> None:
    module = Module(optimizer=optimizer)
    prune_by_hand(module)
    q = TrainedQuantization(bits={"*": 4}, zero_code=True, start_epoch=0, verbose=False, log_histograms=False)
    start = {}

    class Check(pl_callback()):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            for name in (FC1, FC2):
                layer = pl_module.get_submodule(name)
                codebook, assign = get_codebook(layer)
                start.setdefault(name, codebook[:-1].clone())
                assert float(codebook[-1]) == 0.0 and int(assign[layer.weight_mask].max()) <= 14

    cpu_trainer(2, [q, Check()]).fit(module, toy_loader())
    for name in (FC1, FC2):
        codebook = get_codebook(module.get_submodule(name))[0]
        assert not torch.equal(codebook[:-1], start[name])  # the other centroids did train
    # the 4-bit pruned fc layers now take the tc layout, exact on the CPU
    fc = module.get_submodule(FC1)
    conv = CompressedLinear.from_linear(fc)
    assert conv.layout_names == ("tc",)
    x = torch.randn(3, fc.in_features)
    torch.testing.assert_close(conv(x), fc(x), rtol=1e-5, atol=1e-6)


def pl_callback():
    from lightning.pytorch.callbacks import Callback

    return Callback


def test_new_user_resnet18_fc_converts_to_tc_and_round_trips(tmp_path) -> None:
    """As a new user: torchvision's resnet18 ``fc`` pruned to 50 % and quantized to 4 bits; without ``zero_code``
    it needs 17 table entries (lut + bitmap), with it the tensor-core layout; the file reloads bit for bit and the
    converted model computes what the quantized one does."""
    tv = pytest.importorskip("torchvision")
    layouts_of = {}
    for zero in (False, True):
        torch.manual_seed(0)
        model = tv.models.resnet18(num_classes=100).eval()
        prune_model(model, densities={"fc": 0.5}, include=["fc"])
        quantize_model(model, bits=4, include=["fc"], zero_code=zero, max_iter=20)
        layouts_of[zero] = CompressedLinear.from_linear(model.fc).layout_names
    assert layouts_of == {False: ("lut",), True: ("tc",)}
    path = tmp_path / "r18.dcz"
    save_compressed(model, path)
    back = load_compressed(path, model=tv.models.resnet18(num_classes=100).eval())
    assert torch.equal(back.fc.weight, model.fc.weight)
    conv = to_compressed_inference(back)
    assert isinstance(conv.fc, CompressedLinear) and conv.fc.layout_names == ("tc",)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), model(x), rtol=1e-4, atol=1e-4)


def test_used_codebook_drops_entries_no_kept_weight_uses() -> None:
    codes = torch.tensor([0, 2, 2, 5])
    cb = torch.arange(8.0)
    c2, cb2 = layouts.used_codebook(codes, cb)
    assert torch.equal(cb2, torch.tensor([0.0, 2.0, 5.0])) and torch.equal(c2, torch.tensor([0, 1, 1, 2]))
    assert torch.equal(cb2[c2], cb[codes])
    same = layouts.used_codebook(torch.tensor([1, 0]), torch.tensor([3.0, 4.0]))
    assert torch.equal(same[1], torch.tensor([3.0, 4.0]))


# ---------------------------------------------------------------------------------------------- per layer


def test_per_layer_patterns_last_match_wins_and_unmatched_layers_keep_the_default() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 24))
    prune_model(model, densities=0.5)
    quantize_model(model, bits={"*": 4, "4": 5}, zero_code={"*": False, "2": True, "4": True}, max_iter=20)
    reserved = {n: float(get_codebook(model.get_submodule(n))[0][-1]) == 0.0 for n in ("0", "2", "4")}
    used = {n: int(get_codebook(model.get_submodule(n))[1][model.get_submodule(n).weight_mask].unique().numel())
            for n in ("0", "2", "4")}
    assert reserved == {"0": False, "2": True, "4": True} and used == {"0": 16, "2": 15, "4": 31}
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 32))
    prune_model(model, densities=0.5)
    quantize_model(model, bits=4, zero_code={"0": False}, max_iter=20)  # "2" is unmatched: None = True at 4 bits
    assert [float(get_codebook(model.get_submodule(n))[0][-1]) == 0.0 for n in ("0", "2")] == [False, True]


def test_bad_per_layer_zero_code_names_the_pattern() -> None:
    model = nn.Sequential(_pruned_linear())
    with pytest.raises(TypeError, match=r"quantize_model: zero_code\['0'\] must be True, False or None .*got 'on'"):
        quantize_model(model, bits=4, zero_code={"0": "on"})
    with pytest.raises(ValueError, match=r"quantize_model.zero_code: pattern 'fc\*' matches no target layer"):
        quantize_model(model, bits=4, zero_code={"fc*": True})
    with pytest.raises(TypeError, match=r"non-empty \{pattern: one of those\}, got \{\}"):
        quantize_model(model, bits=4, zero_code={})
    with pytest.raises(ValueError, match=r"TrainedQuantization: zero_code\['\*'\] must be True, False or None"):
        TrainedQuantization(zero_code={"*": 1})
    q = TrainedQuantization(bits=4, zero_code={"model.99": True}, verbose=False, log_histograms=False)
    with pytest.raises(ValueError, match=r"TrainedQuantization.zero_code: pattern 'model.99'"):
        cpu_trainer(1, [q]).fit(Module(), toy_loader())


def test_a_fully_pruned_layer_and_one_bit() -> None:
    lin = _pruned_linear()
    lin.weight_mask.zero_()
    info = quantize_layer(lin, 4, zero_code=True, name="fc")
    assert info["members"] == 0 and info["centroids_used"] == 0 and bool((lin.weight == 0).all())
    lin = _pruned_linear(seed=4)
    quantize_layer(lin, 1, zero_code=True, name="fc")  # one centroid + the zero: the kept weights share one value
    codebook, assign = get_codebook(lin)
    assert float(codebook[1]) == 0.0 and float(codebook[0]) != 0.0 and bool((assign[lin.weight_mask] == 0).all())
    torch.testing.assert_close(codebook[0], lin.weight.detach()[lin.weight_mask].mean())


# ---------------------------------------------------------------------------------------------- resume


def _run_resumable(tmp_path, max_epochs: int, ckpt: str | None = None):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(5)
    module = Module("sgd")
    prune_by_hand(module)
    q = TrainedQuantization(bits=4, zero_code=True, start_epoch=1, verbose=False, log_histograms=False,
                            codebook_weight_decay=0.01)  # decay must not move the 0.0 either
    mc = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    cpu_trainer(max_epochs, [q, mc], enable_checkpointing=True).fit(module, toy_loader(), ckpt_path=ckpt)
    return module, q


def test_exact_resume_keeps_the_zero_entry(tmp_path) -> None:
    full, _ = _run_resumable(tmp_path / "a", 3)
    state = torch.load(tmp_path / "a" / "epoch=1.ckpt", weights_only=False)["state_dict"]
    for name in (FC1, FC2):
        saved = state[f"{name}.weight_codebook"]
        assert saved.numel() == 16 and float(saved[-1]) == 0.0
    resumed, q = _run_resumable(tmp_path / "b", 3, ckpt=str(tmp_path / "a" / "epoch=1.ckpt"))
    assert q.summary == {}  # restored, not clustered again
    sa, sb = full.state_dict(), resumed.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    for name in (FC1, FC2):
        codebook = get_codebook(resumed.get_submodule(name))[0]
        assert float(codebook[-1]) == 0.0 and not torch.equal(codebook[:-1], state[f"{name}.weight_codebook"][:-1])


# ---------------------------------------------------------------------------------------------- new user models


def _lightning_module(net: nn.Module):
    import lightning.pytorch as pl

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    return Net()


class _Encoder(nn.Module):
    """``nn.TransformerEncoderLayer`` with a flattening classifier: [B, 6, 32] -> [B, 10]."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(6 * 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).flatten(1))


@pytest.mark.parametrize("which", ["resnet18_fc", "transformer_encoder_layer"])
def test_new_user_lightning_run_prunes_quantizes_and_converts_to_tc(which: str, tmp_path) -> None:
    """MagnitudePruning then TrainedQuantization(bits=4, zero_code=True) in a short Lightning run on models this
    package did not write: every quantized matrix keeps its 0.0 entry and converts to ``tc``, exact on the CPU."""
    from torch.utils.data import DataLoader, TensorDataset

    from dc_lightning.callbacks.magnitude_pruning import MagnitudePruning

    torch.manual_seed(0)
    if which == "resnet18_fc":
        tv = pytest.importorskip("torchvision")
        net, include, shape = tv.models.resnet18(num_classes=10), ["net.fc"], (3, 32, 32)
    else:
        net, include, shape = _Encoder(), ["net.layer.*"], (6, 32)
    x, y = torch.randn(16, *shape), torch.randint(0, 10, (16,))
    module = _lightning_module(net)
    pruning = MagnitudePruning(densities=0.5, prune_epochs=[0], include=include, verbose=False)
    q = TrainedQuantization(bits=4, zero_code=True, include=include, verbose=False, log_histograms=False)
    cpu_trainer(2, [pruning, q]).fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    assert q.clustered and set(q.layer_bits.values()) == {4}
    for name in q.layer_bits:  # "net.fc" or "net.layer.self_attn.in_proj_weight", "net.layer.linear1", ...
        layer, _, param = name.rpartition(".") if name.endswith("_weight") else (name, "", "weight")
        codebook, assign = get_codebook(module.get_submodule(layer), param)
        mask = getattr(module.get_submodule(layer), f"{param}_mask")
        assert codebook.numel() == 16 and float(codebook[-1]) == 0.0 and 0.4 < float(mask.float().mean()) < 0.6
        assert int(assign[mask].max()) <= 14
    net.eval()
    conv = to_compressed_inference(net)
    held = {n: m.layout_names for n, m in conv.named_modules() if isinstance(m, CompressedLinear)}
    expect = ["fc"] if which == "resnet18_fc" else [f"layer.self_attn.{p}_proj" for p in "qkv"] + [
        "layer.self_attn.out_proj", "layer.linear1", "layer.linear2"]
    assert held == {n: ("tc",) for n in expect}
    with torch.no_grad():
        torch.testing.assert_close(conv(x[:3]), net(x[:3]), rtol=1e-5, atol=1e-5)
    if which == "transformer_encoder_layer":  # export / reload: the 0.0 entry travels in the file's codebooks
        save_compressed(net, tmp_path / "enc.dcz")
        back = load_compressed(tmp_path / "enc.dcz", model=_Encoder().eval())
        sa, sb = net.state_dict(), back.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert float(back.layer.linear1.weight_codebook[-1]) == 0.0


# ---------------------------------------------------------------------------------------------- conversion hint


def test_conversion_names_the_layers_zero_code_would_put_on_tc(caplog) -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    prune_model(model, densities={"0": 0.5, "2": 0.5, "4": 0.1})
    quantize_model(model, bits={"*": 4, "2": 5}, zero_code=False, max_iter=20)
    with caplog.at_level("INFO", logger="dc_lightning.inference"):
        conv = to_compressed_inference(model)
    assert [conv[i].layout_names for i in (0, 2, 4)] == [("lut",), ("lut",), ("sparse",)]
    hints = [r.getMessage() for r in caplog.records if "zero_code=True" in r.getMessage()]
    assert len(hints) == 1 and "1 pruned layer(s)" in hints[0] and ": 0; quantized with zero_code=True" in hints[0]
    assert [layouts.misses_tc_by_one(conv[i].packed()) for i in (0, 2, 4)] == [True, False, False]
    caplog.clear()
    quantize_model(model, bits={"*": 4, "2": 5}, zero_code={"0": True}, max_iter=20)
    with caplog.at_level("INFO", logger="dc_lightning.inference"):
        assert to_compressed_inference(model)[0].layout_names == ("tc",)
    assert not [r for r in caplog.records if "zero_code=True" in r.getMessage()]
    forced = CompressedLinear.from_linear(model[0], layout="lut").packed()  # 15 values + a zero code, 4 bits
    assert forced.cbits == 4 and forced.mask is None and not layouts.misses_tc_by_one(forced)


def test_recipe_key_takes_a_per_layer_mapping() -> None:
    from dc_lightning.pipeline.config import compose
    from dc_lightning.utils import instantiate

    over = "pipeline.quantize.callback.zero_code={model.fc*: true, model.fc3: false}"
    cfg = compose("lenet300", ["logger=none", "pipeline.quantize.callback.bits=4", over])
    q = instantiate(cfg.pipeline.quantize.callback, verbose=False)
    assert isinstance(q, TrainedQuantization) and q.zero_code == {"model.fc*": True, "model.fc3": False}
    assert type(q.zero_code) is dict and compose("lenet300").pipeline.quantize.callback.zero_code is None
