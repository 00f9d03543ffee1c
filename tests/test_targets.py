"""Tests of parameter-level targets: which weight matrices are targets, their names, what a pattern selects."""

from __future__ import annotations

import pytest
import torch
from nets import LSTM_WEIGHTS, MIXED_TARGETS, Mixed, MyLinear, lstm_reference
from torch import nn

from dc_lightning import buffers
from dc_lightning.dcz import CorruptFileError, build_file, read_compressed
from dc_lightning.dcz.container import load_payloads, read_header, write_container
from dc_lightning.io import load_compressed, save_compressed
from dc_lightning.kinds import DEFAULT_TARGET_TYPES, weight_params
from dc_lightning.pruning.masks import apply_masks, prune_model
from dc_lightning.pruning.sensitivity import sensitivity_analysis
from dc_lightning.quantization.codebooks import decode_weight, quantize_model
from dc_lightning.report import compression_report
from dc_lightning.targets import Target, select_targets


def test_weight_params_of_each_module_type():
    assert weight_params(nn.MultiheadAttention(8, 2)) == ["in_proj_weight"]
    assert weight_params(nn.MultiheadAttention(8, 2, kdim=4, vdim=3)) == ["q_proj_weight", "k_proj_weight",
                                                                        "v_proj_weight"]
    lstm = nn.LSTM(4, 3, num_layers=2, bidirectional=True)
    assert sorted(weight_params(lstm)) == sorted(n.removeprefix("lstm.") for n in LSTM_WEIGHTS)
    assert weight_params(nn.LSTM(4, 3, proj_size=2)) == ["weight_ih_l0", "weight_hh_l0", "weight_hr_l0"]
    assert weight_params(nn.GRU(4, 3)) == ["weight_ih_l0", "weight_hh_l0"]
    assert weight_params(nn.RNN(4, 3, bias=False)) == ["weight_ih_l0", "weight_hh_l0"]
    for m in (nn.Linear(3, 2), MyLinear(3, 2), nn.Embedding(5, 2), nn.Conv1d(2, 2, 3), nn.Conv3d(1, 2, 1)):
        assert weight_params(m) == ["weight"], m
    assert weight_params(nn.LayerNorm(3)) == ["weight"]  # a weight, but LayerNorm is not a default type
    assert not isinstance(nn.LayerNorm(3), DEFAULT_TARGET_TYPES)
    assert weight_params(nn.ReLU()) == []


def test_default_targets_and_names_of_a_mixed_model():
    targets = select_targets(Mixed())
    assert list(targets) == MIXED_TARGETS  # norms, biases, 1-D parameters are no targets
    t = targets["attn.q_proj_weight"]
    assert (t.module_name, t.param, t.full_name) == ("attn", "q_proj_weight", "attn.q_proj_weight")
    assert targets["head"].full_name == "head.weight" and targets["head"].weight is targets["head"].module.weight
    assert targets["lstm.weight_hh_l1_reverse"].weight.shape == (24, 6)


def test_names_in_a_transformer_encoder():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    model = nn.Sequential(nn.Embedding(10, 8), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    names = list(select_targets(model))
    assert names[:5] == ["0", "1.layers.0.self_attn.in_proj_weight", "1.layers.0.self_attn.out_proj",
                         "1.layers.0.linear1", "1.layers.0.linear2"]
    assert len(names) == 1 + 2 * 4


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("attn", ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight"]),  # module name: not out_proj
        ("attn*", ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.out_proj"]),
        ("attn.out_proj", ["attn.out_proj"]),
        ("attn.out_proj.weight", ["attn.out_proj"]),  # the full name of a weight target
        ("lstm", LSTM_WEIGHTS),
        ("lstm.weight_hh_*", [n for n in LSTM_WEIGHTS if "_hh_" in n]),
        ("*_reverse", [n for n in LSTM_WEIGHTS if n.endswith("_reverse")]),
        ("*.weight", ["embedding", "attn.out_proj", "key", "value", "head"]),
    ],
)
def test_what_a_pattern_selects(pattern, expected):
    assert list(select_targets(Mixed(), include=[pattern])) == expected
    assert list(select_targets(Mixed(), exclude=[pattern])) == [n for n in MIXED_TARGETS if n not in expected]


def test_a_pattern_matching_nothing_is_an_error_listing_the_targets():
    with pytest.raises(ValueError, match="matches no layer") as err:
        select_targets(Mixed(), include=["lstm.weight_xx"])
    assert "lstm.weight_hh_l1_reverse" in str(err.value) and "attn.q_proj_weight" in str(err.value)
    with pytest.raises(ValueError, match="matches no target layer") as err:
        prune_model(Mixed(), densities={"gru.weight_hx*": 0.5})
    assert "gru.weight_hh_l0" in str(err.value)


def test_types_keeps_working_and_tied_weights_are_one_target():
    assert list(select_targets(Mixed(), types=(nn.Linear,))) == ["attn.out_proj", "key", "value", "head"]
    assert list(select_targets(Mixed(), types=[nn.GRU])) == ["gru.weight_ih_l0", "gru.weight_hh_l0"]
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    tied[1].weight = tied[0].weight
    assert list(select_targets(tied)) == ["0"]
    with pytest.raises(ValueError, match="no layer of type"):
        select_targets(nn.Sequential(nn.ReLU()))


def test_target_equality_ignores_the_module_object():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    assert Target("fc", "weight", a) == Target("fc", "weight", b) and Target("fc", "weight", a).name == "fc"
    assert Target("", "weight", a).name == "" and Target("", "in_proj_weight", a).name == "in_proj_weight"


def test_prune_and_quantize_every_target_of_a_mixed_model():
    torch.manual_seed(0)
    model = Mixed()
    rows = prune_model(model, densities={"*": 0.4, "lstm": 0.25, "attn.k_proj_weight": 0.5})
    assert [r["layer"] for r in rows] == MIXED_TARGETS
    targets = select_targets(model)
    for r in rows:
        d = 0.5 if r["layer"] == "attn.k_proj_weight" else 0.25 if r["layer"].startswith("lstm") else 0.4
        assert r["kept"] == round(d * r["weights"]), r
        t = targets[r["layer"]]
        mask = buffers.get_mask(t.module, t.param)
        assert int(mask.sum()) == r["kept"] and (t.weight[~mask] == 0).all()
    assert buffers.get_mask(model.lstm, "weight_hh_l1_reverse") is model.lstm.weight_hh_l1_reverse_mask
    assert buffers.get_mask(model.gru) is None and buffers.get_mask(model.norm) is None  # 'weight' of none
    summary = quantize_model(model, bits={"*": 3, "embedding": 2})
    assert list(summary) == MIXED_TARGETS
    for name, t in targets.items():
        bits = 2 if name == "embedding" else 3
        nz = t.weight[t.weight != 0].unique()
        assert nz.numel() <= 2**bits and torch.equal(t.weight, decode_weight(t.module, t.param)), name
    tokens = torch.randint(0, 11, (2, 5))
    assert model(tokens).shape == (2, 5, 11)


def test_masked_lstm_runs_with_the_masked_weights():
    torch.manual_seed(1)
    lstm = nn.LSTM(5, 4, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 6, 5)
    dense = lstm(x)[0].detach()
    model = nn.Sequential(lstm)
    prune_model(model, densities=0.3)
    opt = torch.optim.SGD(lstm.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for _ in range(2):  # weight decay and momentum move pruned weights; apply_masks zeroes them in place
        lstm(x)[0].sum().backward()
        opt.step()
        apply_masks(model)
        out = lstm(x)[0]
        assert torch.allclose(out.double(), lstm_reference(lstm, x), atol=1e-6)
    assert not torch.allclose(out, dense, atol=1e-3)  # the masks changed what the LSTM computes
    for name in LSTM_WEIGHTS:
        p = name.removeprefix("lstm.")
        assert (getattr(lstm, p)[~buffers.get_mask(lstm, p)] == 0).all()
    assert buffers.compressed_params(lstm) == [n for n in weight_params(lstm)]


# ------------------------------------------------------------------------------------------- file and report


def compressed_mixed() -> Mixed:
    torch.manual_seed(2)
    model = Mixed()
    prune_model(model, densities={"*": 0.5, "lstm": 0.3}, exclude=["gru"])
    quantize_model(model, bits=3, exclude=["head"])  # head: pruned only; gru: quantized only
    return model


def test_file_records_name_the_parameter_and_reload_bit_exact(tmp_path):
    model = compressed_mixed()
    report = save_compressed(model, tmp_path / "m.dcz")
    cf = read_compressed(tmp_path / "m.dcz")
    assert list(cf.layers) == MIXED_TARGETS
    layer = cf.layers["lstm.weight_hh_l1_reverse"]
    assert (layer.module_name, layer.param, layer.key, layer.kind) == ("lstm", "weight_hh_l1_reverse",
                                                                     "lstm.weight_hh_l1_reverse", "pq")
    assert layer.record["param"] == "weight_hh_l1_reverse" and layer.record["module"] == "lstm"
    assert (cf.layers["gru.weight_ih_l0"].kind, cf.layers["head"].kind) == ("q", "p")
    assert [r.name for r in report.layers] == MIXED_TARGETS  # every matrix compressed: no dense weight row
    fresh = Mixed()
    load_compressed(tmp_path / "m.dcz", model=fresh)
    sa, sb = model.state_dict(), fresh.state_dict()
    assert set(sa) == set(sb) and "lstm.weight_hh_l1_reverse_assign" in sb
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    tokens = torch.randint(0, 11, (2, 5))
    assert torch.equal(model(tokens), fresh(tokens))


def rewrite_records(data: bytes, edit) -> bytes:
    """The file's bytes with ``edit(record)`` applied to every layer record (the payloads unchanged)."""
    _, doc = read_header(data, "f")
    for rec in doc["layers"]:
        edit(rec)
    return write_container(load_payloads(data, "f"), doc)


def test_files_without_param_fields_load_and_bad_keys_are_rejected(tmp_path):
    lin = nn.Sequential(nn.Linear(6, 4), nn.LSTM(4, 3))
    prune_model(lin, densities=0.5)
    data = build_file(lin)[1]
    # a file written before parameter-level targets: no "param" field, every record a module's weight
    old = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    prune_model(old, densities=0.5)
    (tmp_path / "old.dcz").write_bytes(rewrite_records(build_file(old)[1], lambda rec: rec.pop("param")))
    fresh = load_compressed(tmp_path / "old.dcz", model=nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3)))
    assert torch.equal(fresh[1].weight_mask, old[1].weight_mask) and torch.equal(fresh[0].weight, old[0].weight)
    assert [r.name for r in compression_report(tmp_path / "old.dcz").layers] == ["0", "1"]
    # a record whose key is not <module>.<param>, or a param with a dot, is corrupt
    for edit in (lambda rec: rec.update(param="weight_ih_l1"), lambda rec: rec.update(param="a.b", key="1.a.b")):
        (tmp_path / "bad.dcz").write_bytes(rewrite_records(data, edit))
        with pytest.raises(CorruptFileError, match="module/param/key"):
            read_compressed(tmp_path / "bad.dcz")


def test_sensitivity_sweeps_parameter_level_targets():
    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(4, 8, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.lstm(x)[0][:, -1])

    torch.manual_seed(0)
    model = Classifier()
    x = torch.randn(32, 5, 4)
    y = model(x).argmax(1)  # the dense model is 100 % right
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = sensitivity_analysis(model, [(x, y)], densities=(1.0, 0.05), include=["lstm"])
    assert [(r["layer"], r["density"]) for r in rows] == [
        ("lstm.weight_ih_l0", 1.0), ("lstm.weight_ih_l0", 0.05), ("lstm.weight_hh_l0", 1.0), ("lstm.weight_hh_l0", 0.05)
    ]
    assert rows[0]["accuracy"] == 100.0 and rows[1]["accuracy"] < 100.0 and rows[1]["kept"] == round(0.05 * 128)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # restored bit for bit


def test_compressed_params_ignores_a_module_buffer_that_only_looks_like_a_mask():
    m = nn.Linear(3, 4)
    m.register_parameter("causal", nn.Parameter(torch.ones(4, 4)))
    m.register_buffer("causal_mask", torch.triu(torch.ones(4, 4)))  # float: the module's own, not a pruning mask
    assert buffers.compressed_params(m) == []
    buffers.set_mask(m, torch.ones(4, 3, dtype=torch.bool))
    buffers.set_codebook(m, torch.zeros(4), torch.zeros(4, 4, dtype=torch.uint8), "causal")
    assert buffers.compressed_params(m) == ["weight", "causal"]


def test_a_bare_layer_as_the_model_is_told_to_wrap_it() -> None:
    with pytest.raises(ValueError, match=r"the model itself is a LSTM: wrap it \(e.g. nn.Sequential\(model\)\)"):
        select_targets(nn.LSTM(4, 6))
    assert list(select_targets(nn.Sequential(nn.LSTM(4, 6)))) == ["0.weight_ih_l0", "0.weight_hh_l0"]
