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
