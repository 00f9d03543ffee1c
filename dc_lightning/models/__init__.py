"""The paper's four networks: LeNet-300-100, LeNet-5 (Caffe layouts) and torchvision's AlexNet and VGG-16.

Parameter counts (weights only, as in [DC] Tables 2-5): LeNet-300-100 266,200; LeNet-5 430,500;
AlexNet 61.1M; VGG-16 138.4M (with biases: 61,100,840 and 138,357,544 for 1000 classes).

AlexNet and VGG-16 end in ``nn.AdaptiveAvgPool2d``, so small inputs (Fashion-MNIST resized to 64 px or 32 px)
still feed the paper's FC shapes: 256*6*6 = 9216 -> 4096 -> 4096 -> 1000 and 512*7*7 = 25088 -> 4096 -> 4096 ->
1000. At 32 px VGG-16's last feature map is 1x1, so the pool repeats each of the 512 channels 49 times; the FC
layer keeps its 103M weights (which is what the compression numbers measure) but sees 512 distinct inputs.
``num_classes`` defaults to 1000 for both so their fc8 keeps the paper's 4096x1000 shape; with a 10-class data set
the extra 990 logits are simply never the target.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dc_lightning.models.lm import LM_DEFAULTS, build_lm

log = logging.getLogger(__name__)

MODEL_NAMES = ("lenet300", "lenet5", "alexnet", "vgg16", "lstm_lm", "transformer_lm")

#: the paper's layer names -> qualified names inside our models (for reports and recipe densities)
PAPER_LAYER_NAMES: dict[str, dict[str, str]] = {
    "lenet300": {"ip1": "ip1", "ip2": "ip2", "ip3": "ip3"},
    "lenet5": {"conv1": "conv1", "conv2": "conv2", "ip1": "ip1", "ip2": "ip2"},
    "alexnet": {
        "conv1": "features.0", "conv2": "features.3", "conv3": "features.6", "conv4": "features.8",
        "conv5": "features.10", "fc6": "classifier.1", "fc7": "classifier.4", "fc8": "classifier.6",
    },
    "vgg16": {
        "conv1_1": "features.0", "conv1_2": "features.2", "conv2_1": "features.5", "conv2_2": "features.7",
        "conv3_1": "features.10", "conv3_2": "features.12", "conv3_3": "features.14", "conv4_1": "features.17",
        "conv4_2": "features.19", "conv4_3": "features.21", "conv5_1": "features.24", "conv5_2": "features.26",
        "conv5_3": "features.28", "fc6": "classifier.0", "fc7": "classifier.3", "fc8": "classifier.6",
    },
    # EIE's benchmark layers (Table III of [EIE]); NT-LSTM is the gate matrix [W_ih | W_hh | b] of the LSTM
    "lstm_lm": {"NT-We": "embed", "NT-LSTM": "lstm", "NT-Wd": "decoder"},
    "transformer_lm": {},  # no paper counterpart: densities from a sensitivity sweep
}


class LeNet300100(nn.Module):
    """LeNet-300-100 as in Caffe's ``examples/mnist`` MLP used by [NIPS]/[DC]: 784 -> 300 -> 100 -> 10, ReLU between.

    Layer names follow the paper's Table 2 (``ip1``, ``ip2``, ``ip3``); 266,200 weights.
    """

    def __init__(self, num_classes: int = 10, in_features: int = 784) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.ip1 = nn.Linear(in_features, 300)
        self.relu1 = nn.ReLU(inplace=True)
        self.ip2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU(inplace=True)
        self.ip3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)  # [B, 1, 28, 28] -> [B, 784]
        return self.ip3(self.relu2(self.ip2(self.relu1(self.ip1(x)))))


class LeNet5(nn.Module):
    """LeNet-5 in Caffe's ``examples/mnist/lenet_train_test.prototxt`` layout, the one [DC] Table 3 compresses.

    conv1 20@5x5 -> maxpool 2 -> conv2 50@5x5 -> maxpool 2 -> ip1 800->500 -> ReLU -> ip2 500->10. As in Caffe
    there is no non-linearity after the convolutions. 500 + 25,000 + 400,000 + 5,000 = 430,500 weights.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.ip1 = nn.Linear(50 * 4 * 4, 500)
        self.relu = nn.ReLU(inplace=True)
        self.ip2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))  # [B, 1, 28, 28] -> [B, 50, 4, 4]
        return self.ip2(self.relu(self.ip1(self.flatten(x))))


def alexnet(num_classes: int = 1000, dropout: float = 0.5, in_channels: int = 3) -> nn.Module:
    """torchvision's AlexNet (61.1M parameters); fc6/fc7/fc8 are ``classifier.1/.4/.6``."""
    from torchvision.models import AlexNet

    model = AlexNet(num_classes=num_classes, dropout=dropout)
    if in_channels != 3:
        old = model.features[0]
        model.features[0] = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    return model


def vgg16(num_classes: int = 1000, dropout: float = 0.5, in_channels: int = 3) -> nn.Module:
    """torchvision's VGG-16 without batch norm (138.4M parameters); fc6/fc7/fc8 are ``classifier.0/.3/.6``."""
    from torchvision.models import vgg16 as _vgg16

    model = _vgg16(weights=None, num_classes=num_classes, dropout=dropout)
    if in_channels != 3:
        old = model.features[0]
        model.features[0] = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    return model


def load_pretrained(model: nn.Module, path: str | Path, name: str = "model") -> nn.Module:
    """Load a local state dict (torchvision ``.pth``, a ``{"state_dict": ...}`` file or ``.safetensors``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file's keys or shapes do not fit the model (the message lists the first mismatches).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{name}.pretrained: no file at {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{name}.pretrained: {str(path)!r} holds a {type(state).__name__}, not a state dict")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"{name}.pretrained: {str(path)!r} does not fit {type(model).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {bad_shape[:5]}"
        )
    model.load_state_dict(state)
    log.info("loaded pretrained weights from %s", path)
    return model


def build_model(
    name: str,
    num_classes: int | None = None,
    in_channels: int | None = None,
    dropout: float | None = None,
    pretrained: str | None = None,
    **lm_kwargs: Any,
) -> nn.Module:
    """Build one of the paper's networks by name; the result carries ``dc_builder`` for ``load_compressed``.

    Args:
        name: one of ``lenet300``, ``lenet5``, ``alexnet``, ``vgg16``, or a language model of
            :mod:`dc_lightning.models.lm`: ``lstm_lm``, ``transformer_lm``.
        num_classes: output classes (default 10 for the LeNets, 1000 for AlexNet/VGG-16 to keep the paper's fc8).
        in_channels: input channels (default 1 for the LeNets, 3 otherwise).
        dropout: dropout rate of AlexNet/VGG-16's classifier (default 0.5; the LeNets have none).
        pretrained: optional path to a local state dict to load (no download ever happens).
        lm_kwargs: sizes of a language model (``vocab_size``, ``embed_dim``, ``hidden_size``, ``width``,
            ``num_layers``, ``num_heads``, ``max_len``; :data:`dc_lightning.models.lm.LM_DEFAULTS` lists each one's).

    Raises:
        ValueError: unknown ``name`` or an argument the network does not take.

    Example::

        net = build_model("vgg16", num_classes=1000, pretrained="~/weights/vgg16-397923af.pth")
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"model.name: unknown network {name!r}; valid names: {list(MODEL_NAMES)}")
    kwargs: dict[str, Any] = {}
    if lm_kwargs and name not in LM_DEFAULTS:
        raise ValueError(f"model: {name} takes no argument {sorted(lm_kwargs)} (language-model sizes)")
    if name in LM_DEFAULTS:
        if num_classes is not None or in_channels is not None:
            raise ValueError(f"model: {name} takes vocab_size, not num_classes/in_channels (got {num_classes}, "
                             f"{in_channels}); leave them null")
        model = build_lm(name, dropout=dropout, **lm_kwargs)
    elif name in ("lenet300", "lenet5"):
        if dropout not in (None, 0, 0.0):
            raise ValueError(f"model.dropout: {name} has no dropout layer (got {dropout}); leave it null")
        kwargs["num_classes"] = 10 if num_classes is None else num_classes
        if name == "lenet300":
            model = LeNet300100(in_features=784 * (in_channels or 1), **kwargs)
        else:
            model = LeNet5(in_channels=in_channels or 1, **kwargs)
    else:
        if dropout is not None and not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout: {dropout} is not a rate in [0, 1)")
        kwargs = {"num_classes": 1000 if num_classes is None else num_classes,
                  "dropout": 0.5 if dropout is None else dropout, "in_channels": in_channels or 3}
        model = (alexnet if name == "alexnet" else vgg16)(**kwargs)
    if pretrained:
        load_pretrained(model, pretrained)
    # the recipe of this network, without the weights file (a compressed file must not depend on it)
    model.dc_builder = {
        "callable": "dc_lightning.models:build_model",
        "kwargs": {"name": name, "num_classes": num_classes, "in_channels": in_channels, "dropout": dropout,
                   **lm_kwargs},
    }
    return model


def count_weights(model: nn.Module) -> int:
    """Number of weights of the Linear/Conv layers (the paper's #W column: biases excluded)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)))
