"""The weight-kind registry (dc_lightning/kinds.py): every kind's weight matrices, family and paper defaults, the rule
for unknown module types, and that the codebook-bits and index-bits defaults agree wherever they are read."""

from __future__ import annotations

import pytest
import torch
from nets import Table
from torch import nn

from dc_lightning import kinds
from dc_lightning.dcz import read_compressed
from dc_lightning.inference.attention import CompressedMultiheadAttention
from dc_lightning.inference.conversion import plan_conversion
from dc_lightning.inference.embedding import CompressedEmbedding
from dc_lightning.inference.linear import CompressedLinear
from dc_lightning.inference.recurrent import CompressedGRU, CompressedLSTM, CompressedRNN
from dc_lightning.io import save_compressed
from dc_lightning.kinds import DEFAULT_TARGET_TYPES
from dc_lightning.pruning.masks import prune_model
from dc_lightning.quantization.bits import bits_for_layers
from dc_lightning.quantization.codebooks import quantize_model
from dc_lightning.targets import select_targets


class MyConv(nn.Conv2d):
    """A user's conv subclass: a Conv2d."""


class MyLinear(nn.Linear):
    """A user's Linear subclass: a Linear."""


def _lstm_weights() -> list[str]:
    return [f"weight_{k}_l{layer}{sfx}" for layer in (0, 1) for sfx in ("", "_reverse") for k in ("ih", "hh", "hr")]


# (module, registry entry's torch type, weight matrices, family, default target, inference module or None)
REGISTERED = [
    (nn.Linear(3, 2), nn.Linear, ["weight"], "fc", True, CompressedLinear),
    (MyLinear(3, 2), nn.Linear, ["weight"], "fc", True, CompressedLinear),
    (nn.MultiheadAttention(8, 2).out_proj, nn.Linear, ["weight"], "fc", True, CompressedLinear),
    (nn.Conv1d(2, 2, 3), nn.Conv1d, ["weight"], "conv", True, None),
    (nn.Conv2d(1, 2, 3), nn.Conv2d, ["weight"], "conv", True, None),
    (MyConv(1, 2, 3), nn.Conv2d, ["weight"], "conv", True, None),
    (nn.Conv3d(1, 2, 1), nn.Conv3d, ["weight"], "conv", True, None),
    (nn.ConvTranspose2d(2, 2, 3), nn.modules.conv._ConvNd, ["weight"], "conv", False, None),
    (nn.Embedding(5, 2), nn.Embedding, ["weight"], "fc", True, CompressedEmbedding),
    (nn.MultiheadAttention(8, 2), nn.MultiheadAttention, ["in_proj_weight"], "fc", True, CompressedMultiheadAttention),
    (nn.MultiheadAttention(8, 2, kdim=4, vdim=3), nn.MultiheadAttention,
     ["q_proj_weight", "k_proj_weight", "v_proj_weight"], "fc", True, CompressedMultiheadAttention),
    (nn.LSTM(4, 3, num_layers=2, bidirectional=True, proj_size=2), nn.LSTM, _lstm_weights(), "fc", True,
     CompressedLSTM),
    (nn.GRU(4, 3, bias=False), nn.GRU, ["weight_ih_l0", "weight_hh_l0"], "fc", True, CompressedGRU),
    (nn.RNN(4, 3), nn.RNN, ["weight_ih_l0", "weight_hh_l0"], "fc", True, CompressedRNN),
    (nn.RNNBase("GRU", 4, 3), nn.RNNBase, ["weight_ih_l0", "weight_hh_l0"], "fc", True, None),
]
PAPER = {"fc": (5, 5), "conv": (8, 8)}  # [DC §2, §5]: (codebook bits, relative-index bits)


def test_the_table_covers_every_registered_kind():
    by_name = {k.torch_type for k in kinds.KINDS if hasattr(k.torch_type, "qualified")}  # kinds.named_type
    assert by_name == {kinds.HF_CONV1D}  # its entry is tested below and in tests/test_hf_models.py
    assert {k.torch_type for k in kinds.KINDS} - by_name == {t for _, t, *_ in REGISTERED}


@pytest.mark.parametrize(("module", "torch_type", "weights", "family", "default", "converter"), REGISTERED,
                         ids=[f"{type(r[0]).__name__}-{i}" for i, r in enumerate(REGISTERED)])
def test_every_kind_its_weights_family_defaults_and_converter(module, torch_type, weights, family, default, converter):
    kind = kinds.kind_of(module)
    assert kind is not None and kind.torch_type is torch_type and kind.name == torch_type.__name__
    assert kinds.weight_params(module) == weights
    assert all(getattr(module, w).dim() == 2 or family == "conv" for w in weights)  # matrices (conv: a view)
    assert kinds.family_of(module) == kind.family == family
    assert (kinds.paper_bits(module), kinds.paper_index_bits(module)) == PAPER[family]
    assert isinstance(module, DEFAULT_TARGET_TYPES) is default
    got = kind.converter().module_type if kind.converter is not None else None
    assert got is converter


def test_codebook_bits_and_index_bits_defaults_agree_for_every_kind_and_unknown_types():
    modules = [m for m, *_ in REGISTERED] + [Table(3, 4), nn.Bilinear(2, 3, 4), nn.LayerNorm(3)]
    for m in modules:
        family = kinds.family_of(m)
        assert kinds.paper_bits(m) == kinds.PAPER_BITS[family] and kinds.paper_index_bits(m) == kinds.PAPER_INDEX_BITS[
            family], type(m).__name__
    assert kinds.PAPER_BITS == kinds.PAPER_INDEX_BITS == {"fc": 5, "conv": 8}


class Zoo(nn.Module):
    """One layer of every default kind plus an unknown module type with a 2-D weight (a target only via types=)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.attn = nn.MultiheadAttention(8, 2)
        self.gru = nn.GRU(8, 8)
        self.fc = nn.Linear(8, 4)
        self.table = Table(6, 8)


def test_defaults_flow_to_the_codebook_and_the_file_alike(tmp_path):
    torch.manual_seed(0)
    model = Zoo()
    types = (*DEFAULT_TARGET_TYPES, Table)
    prune_model(model, densities=0.5, types=types)
    quantize_model(model, types=types, max_iter=0)
    save_compressed(model, tmp_path / "zoo.dcz")
    layers = read_compressed(tmp_path / "zoo.dcz").layers
    targets = select_targets(model, types=types)
    assert set(layers) == set(targets)
    for name, t in targets.items():
        family = kinds.family_of(t.module)
        assert (layers[name].bits, layers[name].index_bits) == PAPER[family], name
    assert layers["conv"].index_bits == 8 and layers["fc"].index_bits == 5
    assert layers["table"].bits == layers["table"].index_bits == 5  # unknown: fc family, both defaults
    assert bits_for_layers(targets, None) == {n: PAPER[kinds.family_of(t.module)][0] for n, t in targets.items()}


def test_unknown_module_types_one_rule():
    """Not a registered kind: never a default target; named in types=, its `weight` is its one matrix, fc family;
    no inference module, so the conversion keeps it dense and says why."""
    for m in (Table(3, 4), nn.Bilinear(2, 3, 4)):
        assert kinds.kind_of(m) is None and not isinstance(m, DEFAULT_TARGET_TYPES)
        assert kinds.weight_params(m) == ["weight"] and kinds.family_of(m) == kinds.UNKNOWN_FAMILY == "fc"
        assert (kinds.paper_bits(m), kinds.paper_index_bits(m)) == (5, 5)
        assert kinds.held_weights(m) == [(m, "weight", "weight")]
    assert kinds.weight_params(nn.ReLU()) == []
    model = nn.Sequential(nn.Linear(4, 4), Table(3, 4))
    assert list(select_targets(model)) == ["0"]
    assert list(select_targets(model, types=(Table,))) == ["1"]
    prune_model(model, densities=0.5, types=(nn.Linear, Table))
    decisions = {d.name: d for d in plan_conversion(model)}
    assert decisions["0"].action == "convert"
    assert decisions["1"].action == "skip" and "no compressed inference module for Table" in decisions["1"].reason


def test_subclasses_take_the_nearest_registered_kind():
    assert kinds.kind_of(nn.LSTM(2, 2)).torch_type is nn.LSTM  # not the broader RNNBase entry
    assert kinds.kind_of(nn.ConvTranspose1d(2, 2, 1)).family == "conv"
    assert kinds.kind_of(MyConv(1, 1, 1)).torch_type is nn.Conv2d
    assert DEFAULT_TARGET_TYPES == (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.MultiheadAttention,
                                    nn.RNNBase, kinds.HF_CONV1D)


def test_what_a_replacement_holds_and_removes():
    mha = nn.MultiheadAttention(8, 2)
    held = kinds.held_weights(mha)
    assert [(label, owner is mha.out_proj) for owner, _, label in held] == [("in_proj_weight", False),
                                                                           ("out_proj.weight", True)]
    kind = kinds.kind_of(mha)
    assert kind.parts == ("out_proj",) and ("out_proj", "weight") in kind.removes(mha)
    assert (None, "q_proj_weight") in kind.removes(mha)  # None on this module, but gone once replaced
    gru = nn.GRU(3, 2)
    assert kinds.kind_of(gru).removes(gru) >= {(None, "bias_hh_l0"), (None, "_flat_weights"), (None, "all_weights")}
    assert kinds.kind_of(nn.Linear(2, 2)).removes(nn.Linear(2, 2)) == {(None, "weight")}
    assert kinds.kind_of(nn.Linear(2, 2)).fuses_relu and not kinds.kind_of(nn.Embedding(2, 2)).fuses_relu


def test_embedding_with_max_norm_is_refused_by_its_kind():
    kind = kinds.kind_of(nn.Embedding(4, 2))
    assert kind.refuses(nn.Embedding(4, 2)) == ""
    assert "max_norm=1.0" in kind.refuses(nn.Embedding(4, 2, max_norm=1.0))


def test_a_kind_needs_a_known_family():
    with pytest.raises(ValueError, match=r"family 'dense' is unknown; valid: \['fc', 'conv'\]"):
        kinds.Kind(nn.Linear, "dense")


class Conv1D(nn.Module):
    """A stand-in written here for ``transformers.pytorch_utils.Conv1D`` (``y = x @ W + b``, ``W [nx, nf]``), under
    that qualified name, so that the by-name registration is tested without transformers installed."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, self.nx), self.weight).reshape(*x.shape[:-1], self.nf)


Conv1D.__module__ = "transformers.pytorch_utils"


class MyConv1D(Conv1D):
    """A subclass, defined in this module."""


def test_a_kind_registered_by_name_matches_the_class_and_its_subclasses_without_importing_it():
    import pickle
    import sys

    assert kinds.qualified_name(Conv1D) == "transformers.pytorch_utils.Conv1D"
    conv, sub = Conv1D(6, 4), MyConv1D(6, 4)
    for m in (conv, sub):
        assert isinstance(m, kinds.HF_CONV1D) and isinstance(m, DEFAULT_TARGET_TYPES)
        kind = kinds.kind_of(m)
        assert kind.name == "Conv1D" and kind.torch_type is Conv1D and kind.family == "fc"  # the real class
        assert kinds.weight_params(m) == ["weight"] and (kinds.paper_bits(m), kinds.paper_index_bits(m)) == (5, 5)
    assert issubclass(MyConv1D, kinds.HF_CONV1D) and not issubclass(nn.Linear, kinds.HF_CONV1D)
    assert not isinstance(nn.Linear(4, 6), kinds.HF_CONV1D)
    assert pickle.loads(pickle.dumps((nn.Linear, kinds.HF_CONV1D))) == (nn.Linear, kinds.HF_CONV1D)  # ddp_spawn
    with pytest.raises(TypeError, match="only stands in for transformers.pytorch_utils.Conv1D"):
        kinds.HF_CONV1D()
    if "transformers" not in sys.modules:  # nothing above imported it
        assert "transformers.pytorch_utils" not in sys.modules


class ScaledConv1D(Conv1D):
    """A subclass with its own forward: the replacement would drop it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_a_kind_registered_by_name_is_selected_and_converted():
    from dc_lightning.inference.conv1d import CompressedConv1D
    from dc_lightning.inference.conversion import to_compressed_inference

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 8), nn.ReLU(), MyConv1D(5, 12), ScaledConv1D(5, 5))
    assert list(select_targets(model)) == ["0", "2", "3"]
    prune_model(model, densities=0.4)
    quantize_model(model, bits=4, max_iter=3)
    decisions = {d.name: d for d in plan_conversion(model)}
    assert [decisions[n].action for n in "023"] == ["convert", "convert", "skip"]
    assert decisions["0"].kind == "Conv1D" and "ScaledConv1D overrides Conv1D.forward" in decisions["3"].reason
    x = torch.randn(3, 2, 8)
    converted = to_compressed_inference(model, example_inputs=x, tolerance=1e-5)
    assert [type(converted[i]) for i in (0, 2, 3)] == [CompressedConv1D, CompressedConv1D, ScaledConv1D]
    with torch.no_grad():
        want, got = model(x), converted(x)
    assert float((got - want).norm() / want.norm()) <= 1e-5
    assert torch.equal(converted[0].dense_weight(), model[0].weight)  # W [nx, nf], Conv1D's orientation
    assert converted[0].nf == 12 and converted[0].nx == 8 and torch.equal(converted[0].bias, model[0].bias)
    with pytest.raises(TypeError, match=r"expects a transformers Conv1D \(weight \[nx, nf\]\), got Linear"):
        CompressedConv1D.from_module(nn.Linear(8, 12))
