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
from dc_lightning.pruning.masks import prune_model
from dc_lightning.quantization.bits import bits_for_layers
from dc_lightning.quantization.codebooks import quantize_model
from dc_lightning.targets import DEFAULT_TARGET_TYPES, select_targets


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
    assert {k.torch_type for k in kinds.KINDS} == {t for _, t, *_ in REGISTERED}


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
                                    nn.RNNBase)


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
