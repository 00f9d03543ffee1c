"""CompressedLinear / to_compressed_inference / cli_predict on the CPU (reference path of the EIE op)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from dc_lightning.cli.predict import cli_predict
from dc_lightning.inference.conversion import to_compressed_inference
from dc_lightning.inference.linear import CompressedLinear


def _quantize(linear: nn.Linear, density: float = 0.3, bits: int = 4, seed: int = 0) -> nn.Linear:
    """Give ``linear`` the docs/DESIGN.md buffers and make its weight obey the invariant."""
    g = torch.Generator().manual_seed(seed)
    shape = linear.weight.shape
    mask = torch.rand(shape, generator=g) < density
    codebook = torch.randn(2**bits, generator=g) * 0.1
    assign = torch.randint(0, 2**bits, shape, generator=g).to(torch.uint8)
    assign[~mask] = 0  # meaningless at pruned positions
    linear.register_buffer("weight_mask", mask)
    linear.register_buffer("weight_codebook", codebook)
    linear.register_buffer("weight_assign", assign)
    with torch.no_grad():
        linear.weight.copy_(torch.where(mask, codebook[assign.long()], torch.zeros(())))
    return linear


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 13), (100, 33), (1, 1)])
def test_compressed_linear_matches_dense(shape: tuple[int, int], bias: bool) -> None:
    torch.manual_seed(0)
    lin = _quantize(nn.Linear(shape[1], shape[0], bias=bias), density=0.5 if shape != (1, 1) else 1.0)
    layer = CompressedLinear.from_linear(lin)
    assert not any(t.shape == lin.weight.shape for t in layer.buffers()), "no dense weight may be stored"
    assert "weight" not in dict(layer.named_parameters()) and "weight" not in dict(layer.named_buffers())
    x = torch.randn(5, shape[1])
    assert _rel(layer(x), lin(x)) <= 1e-5
    assert torch.equal(layer.dense_weight(), lin.weight.detach())


def test_compressed_linear_leading_dims_and_noncontiguous() -> None:
    lin = _quantize(nn.Linear(16, 8))
    layer = CompressedLinear.from_linear(lin)
    x = torch.randn(2, 3, 16)
    assert layer(x).shape == (2, 3, 8)
    assert _rel(layer(x), lin(x)) <= 1e-5
    xt = torch.randn(16, 4).t()  # non-contiguous input: the module makes it contiguous
    assert _rel(layer(xt), lin(xt)) <= 1e-5


def test_from_plain_linear_builds_codebook_from_distinct_values() -> None:
    lin = nn.Linear(20, 10)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([0.0, 0.5, -0.25, 1.0])[torch.randint(0, 4, (10, 20))])
    layer = CompressedLinear.from_linear(lin)
    assert layer.nnz == int((lin.weight != 0).sum())
    x = torch.randn(3, 20)
    assert _rel(layer(x), lin(x)) <= 1e-5


def test_from_linear_rejects_too_many_values() -> None:
    with pytest.raises(ValueError, match="distinct non-zero weights"):
        CompressedLinear.from_linear(nn.Linear(30, 30))
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        CompressedLinear.from_linear(nn.Conv2d(1, 1, 1))


def test_forward_validation() -> None:
    layer = CompressedLinear.from_linear(_quantize(nn.Linear(16, 8)))
    with pytest.raises(ValueError, match="in_features=16"):
        layer(torch.randn(2, 15))
    with pytest.raises(TypeError, match="x dtype must be one of"):
        layer(torch.randn(2, 16, dtype=torch.float64))


class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten())
        self.head = nn.ModuleDict(
            {
                "mlp": nn.Sequential(
                    _quantize(nn.Linear(4 * 6 * 6, 32), seed=1),
                    nn.ReLU(inplace=True),
                    _quantize(nn.Linear(32, 16), seed=2),
                    nn.ReLU(),
                ),
            }
        )
        self.out = _quantize(nn.Linear(16, 5, bias=False), density=0.8, seed=3)
        self.plain = nn.Linear(5, 3)  # no codebook: stays as it is

    def forward(self, x):
        return self.plain(self.out(self.head["mlp"](self.features(x))))


def test_to_compressed_inference_nested_model() -> None:
    torch.manual_seed(0)
    model = _Nested().eval()
    fast = to_compressed_inference(model)
    assert isinstance(fast.head["mlp"][0], CompressedLinear) and fast.head["mlp"][0].relu
    assert isinstance(fast.head["mlp"][1], nn.Identity)  # ReLU folded into the kernel epilogue
    assert isinstance(fast.head["mlp"][2], CompressedLinear) and fast.head["mlp"][2].relu
    assert isinstance(fast.out, CompressedLinear) and not fast.out.relu
    assert isinstance(fast.plain, nn.Linear) and isinstance(fast.features[0], nn.Conv2d)
    assert isinstance(model.head["mlp"][0], nn.Linear), "the input model must not be modified"
    x = torch.randn(4, 1, 8, 8)
    assert _rel(fast(x), model(x)) <= 1e-5
    unfused = to_compressed_inference(model, fuse_relu=False)
    assert isinstance(unfused.head["mlp"][1], nn.ReLU)
    assert _rel(unfused(x), model(x)) <= 1e-5


def test_state_dict_roundtrip() -> None:
    model = _Nested().eval()
    fast = to_compressed_inference(model)
    other = to_compressed_inference(_Nested())
    other.load_state_dict(fast.state_dict())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(other(x), fast(x))


def test_to_compressed_inference_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="nn.Module or a path"):
        to_compressed_inference(42)


def test_cli_predict_reports_both_paths(monkeypatch, capsys) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(),
        _quantize(nn.Linear(12, 10), density=0.6),
        nn.ReLU(),
        _quantize(nn.Linear(10, 3), density=0.9, seed=5),
    )
    xs, ys = torch.randn(40, 12), torch.randint(0, 3, (40,))

    class _DM:
        def setup(self, stage):
            self.stage = stage

        def test_dataloader(self):
            return [(xs[i : i + 8], ys[i : i + 8]) for i in range(0, 40, 8)]

    fake_io = types.ModuleType("dc_lightning.io")
    fake_io.load_compressed = lambda path: model
    monkeypatch.setitem(sys.modules, "dc_lightning.io", fake_io)
    import dc_lightning.pipeline.config as config

    composed = []
    monkeypatch.setattr(config, "compose", lambda recipe, overrides: composed.append(overrides) or {"recipe": recipe})
    monkeypatch.setattr(config, "build_datamodule", lambda cfg: _DM())
    # overrides may come after the options (they used to be rejected there)
    rc = cli_predict(["model.dcz", "--recipe", "lenet300", "--device", "cpu", "data.batch_size=8"])
    assert composed == [["data.batch_size=8"]]
    out = capsys.readouterr().out
    acc = float((model(xs).argmax(1) == ys).float().mean()) * 100
    assert rc == 0
    assert f"top-1 dense decode         : {acc:.2f}%" in out
    assert f"{acc:.2f}%" in out.split("compressed")[1]
    assert "prediction agreement       : 100.00%" in out


def test_cli_predict_on_a_recipe_datamodule(tmp_path, capsys) -> None:
    """End to end on the recipe's own DataModule, whose uint8 batches are normalised in ``on_after_batch_transfer``:
    predict used to feed them to the network raw ("Input type (unsigned char) and bias type (float)")."""
    from dc_lightning.io import save_compressed
    from dc_lightning.pipeline.config import build_datamodule, build_module, compose
    from dc_lightning.pruning.masks import prune_model
    from dc_lightning.quantization.codebooks import quantize_model

    overrides = ["data=fake", "data.num_samples=48", f"output_dir={tmp_path}"]
    cfg = compose("lenet300", overrides)
    module = build_module(cfg)
    prune_model(module, densities=0.3)
    quantize_model(module, bits=4)
    path = tmp_path / "m.dcz"
    save_compressed(module, path)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("test")
    correct = total = 0
    with torch.no_grad():
        for batch in dm.test_dataloader():
            x, y = dm.on_after_batch_transfer(batch, 0)
            correct += int((module(x).argmax(-1) == y).sum())
            total += int(y.numel())
    rc = cli_predict([str(path), "--recipe", "lenet300", "--device", "cpu", *overrides])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"{total} test samples on cpu" in out
    assert f"top-1 dense decode         : {correct / total * 100:.2f}%" in out


@pytest.mark.parametrize("layout", ["sparse", "lut"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_after_conversion_keeps_fp32_codebooks(layout: str, dtype: torch.dtype) -> None:
    """``converted.half()`` / ``.to(bf16)`` (what users do to a whole model) must not narrow the codebooks."""
    from dc_lightning import buffers

    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    mask = torch.rand(32, 64) < 0.5
    cb = torch.linspace(-1, 1, 16)
    assign = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    buffers.set_mask(lin, mask)
    buffers.set_codebook(lin, cb, assign)
    with torch.no_grad():
        lin.weight.copy_(torch.where(mask, cb[assign.long()], 0.0))
    layer = CompressedLinear.from_linear(lin, layout=layout).to(dtype)
    assert all(b.dtype == torch.float32 for n, b in layer.named_buffers() if "codebook" in n or n == "bias")
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = lin(x.to(dtype).float())
        got = layer(x.to(dtype))
    assert got.dtype == dtype
    assert ((got.float() - ref).norm() / ref.norm()).item() <= 1e-2


# the text, state-dict keys and extra state (as written before the layout registry) of four layers: the format saved
_SAVED = [
    ((0.05, 4, True, {"batch_min": 4, "alternate": True}),
     "in_features=40, out_features=24, nnz=53, layout=sparse, layouts=[sparse codebook_bits=4, lut code_bits=4 "
     "bitmap=True], lut from batch 4, bias=True, relu=False, why='density 5.5% < 30%: sparse ~0.13 B/position vs lut "
     "0.62'",
     ["entries", "block_ptr", "codebook", "lut_codes", "lut_mask", "lut_codebook", "bias", "_extra_state"],
     {"in_features": 40, "out_features": 24, "row_tile": 8, "chunk": 1024, "code_shift": 5, "nnz": 53, "relu": 0,
      "lut_cbits": 4, "batch_min": 4}),
    ((0.45, 3, True, {"layout": "lut", "alternate": True}),
     "in_features=40, out_features=24, nnz=440, layout=sparse, layouts=[sparse codebook_bits=3, lut code_bits=4 "
     "bitmap=False], lut from batch 16, bias=True, relu=False, why='requested'",
     ["entries", "block_ptr", "codebook", "lut_codes", "lut_codebook", "bias", "_extra_state"],
     {"in_features": 40, "out_features": 24, "row_tile": 8, "chunk": 256, "code_shift": 4, "nnz": 440, "relu": 0,
      "lut_cbits": 4, "batch_min": 16}),
    ((0.9, 5, False, {}),
     "in_features=40, out_features=24, nnz=851, layout=lut, layouts=[lut code_bits=8 bitmap=False], bias=False, "
     "relu=False, why='density 88.6% >= 30%: 8-bit codes, 1.00 B/position'",
     ["lut_codes", "lut_codebook", "_extra_state"],
     {"in_features": 40, "out_features": 24, "code_shift": 0, "nnz": 851, "relu": 0, "lut_cbits": 8, "batch_min": 0}),
    ((1.0, 4, True, {"layout": "sparse", "alternate": False}),
     "in_features=40, out_features=24, nnz=960, layout=sparse, layouts=[sparse codebook_bits=4], bias=True, "
     "relu=False, why='requested'",
     ["entries", "block_ptr", "codebook", "bias", "_extra_state"],
     {"in_features": 40, "out_features": 24, "row_tile": 8, "chunk": 256, "code_shift": 5, "nnz": 960, "relu": 0,
      "lut_cbits": 0, "batch_min": 0}),
]  # fmt: skip


def test_repr_state_dict_keys_and_saved_extra_state_are_stable() -> None:
    """What a converted layer prints and saves is unchanged, and state dicts saved before load into it."""
    torch.manual_seed(0)
    for (density, bits, bias, kw), text, keys, old_extra in _SAVED:
        layer = CompressedLinear.from_linear(_quantize(nn.Linear(40, 24, bias=bias), density=density, bits=bits), **kw)
        assert layer.extra_repr() == text
        sd = layer.state_dict()
        assert list(sd) == keys
        # the extra state now leaves out the layouts a layer does not hold (code_shift / lut_cbits 0)
        assert sd["_extra_state"] == {k: v for k, v in old_extra.items() if v or k not in ("code_shift", "lut_cbits")}
        fresh = CompressedLinear.from_linear(_quantize(nn.Linear(40, 24, bias=bias), density, bits), **kw)
        for t in fresh.buffers():
            t.zero_()
        fresh.load_state_dict({**sd, "_extra_state": dict(old_extra, relu=1)})
        x = torch.randn(3, 40)
        assert fresh.relu and torch.equal(fresh(x), torch.relu(layer(x)))
