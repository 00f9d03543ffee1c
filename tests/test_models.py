import pytest
import torch
from torch import nn

from dc_lightning.models import MODEL_NAMES, PAPER_LAYER_NAMES, build_model, count_weights, load_pretrained

# [DC] Tables 2-5: #weights (LeNets exact; AlexNet 61M / VGG-16 138M with the 61.1M / 138.4M parameters)
PAPER_WEIGHTS = {"lenet300": 266_200, "lenet5": 430_500}
PAPER_PARAMS = {"alexnet": 61.1e6, "vgg16": 138.4e6}


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_lenet_weight_counts(name):
    assert count_weights(build_model(name)) == PAPER_WEIGHTS[name]


@pytest.mark.parametrize("name", ["alexnet", "vgg16"])
def test_imagenet_param_counts(name):
    n = sum(p.numel() for p in build_model(name).parameters())
    assert round(n / 1e5) / 10 == pytest.approx(PAPER_PARAMS[name] / 1e6)


@pytest.mark.parametrize(
    "name,size,shapes",
    [
        ("alexnet", 64, [(9216, 4096), (4096, 4096), (4096, 1000)]),
        ("vgg16", 32, [(25088, 4096), (4096, 4096), (4096, 1000)]),
    ],
)
def test_fc_shapes_at_small_inputs(name, size, shapes):
    model = build_model(name).eval()
    seen = []
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((i[0].shape[1], o.shape[1]))) for m in fcs]
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    for h in hooks:
        h.remove()
    assert seen == shapes
    assert out.shape == (2, 1000)
    # the paper's layer names point at the right modules
    mods = dict(model.named_modules())
    assert [mods[PAPER_LAYER_NAMES[name][f]].weight.shape[::-1] for f in ("fc6", "fc7", "fc8")] == [
        torch.Size(s) for s in shapes
    ]


def test_lenet_forward_shapes():
    x = torch.randn(3, 1, 28, 28)
    for name in ("lenet300", "lenet5"):
        assert build_model(name)(x).shape == (3, 10)


def test_pretrained_roundtrip_and_errors(tmp_path):
    src = build_model("lenet5")
    path = tmp_path / "lenet5.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    dst = build_model("lenet5", pretrained=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k])
    torch.save(build_model("lenet300").state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="does not fit LeNet5"):
        load_pretrained(build_model("lenet5"), tmp_path / "wrong.pth")
    with pytest.raises(FileNotFoundError, match="no file at"):
        build_model("lenet5", pretrained=str(tmp_path / "missing.pth"))


def test_build_model_errors_and_builder():
    with pytest.raises(ValueError, match="valid names"):
        build_model("resnet50")
    with pytest.raises(ValueError, match="dropout"):
        build_model("lenet300", dropout=0.5)
    m = build_model("alexnet", num_classes=10, dropout=0.3)
    assert m.dc_builder["kwargs"] == {"name": "alexnet", "num_classes": 10, "in_channels": None, "dropout": 0.3}
    assert set(MODEL_NAMES) == set(PAPER_LAYER_NAMES)
