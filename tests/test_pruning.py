"""Tests of dc_lightning.pruning.masks: masks, thresholds, schedules, dropout rule (no Lightning involved)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nets import Nested
from torch import nn

from dc_lightning.buffers import get_mask
from dc_lightning.pruning.dropout import (
    adjust_dropouts_to_masks,
    adjusted_dropout,
    dropout_rates,
    find_feeding_dropouts,
    set_dropout_rates,
)
from dc_lightning.pruning.masks import apply_masks, attach_mask, magnitude_mask, prune_model
from dc_lightning.pruning.schedules import geometric_schedule, quality_schedule

PRUNABLE = ["features.0", "seq1d", "head.block.0", "head.block.4"]


def test_density_keeps_exactly_k_largest():
    torch.manual_seed(0)
    w = torch.randn(37, 11)
    for d in (1.0, 0.5, 0.09, 0.013):
        mask, thr = magnitude_mask(w, density=d)
        k = max(1, round(d * w.numel()))
        assert mask.dtype == torch.bool and mask.shape == w.shape
        assert int(mask.sum()) == k
        # every kept magnitude >= every pruned magnitude, threshold = smallest kept magnitude
        assert w.abs()[mask].min() >= (w.abs()[~mask].max() if (~mask).any() else 0)
        assert thr == pytest.approx(float(w.abs()[mask].min()))


def test_density_ties_broken_by_lower_index():
    w = torch.tensor([1.0, -2.0, 2.0, 2.0, 0.5, -2.0])
    mask, thr = magnitude_mask(w, density=0.5)  # k = 3 among four |w| = 2
    assert mask.tolist() == [False, True, True, True, False, False]
    assert thr == 2.0
    # deterministic: same answer again and on a copy
    assert torch.equal(magnitude_mask(w.clone(), density=0.5)[0], mask)


def test_quality_threshold_is_quality_times_std():
    torch.manual_seed(1)
    w = torch.randn(50, 40)
    mask, thr = magnitude_mask(w, quality=0.7)
    std = float(w.double().std(correction=0))
    assert thr == pytest.approx(0.7 * std, rel=1e-6)
    assert torch.equal(mask, w.abs() >= thr)
    # std over the survivors is larger than over all entries once zeros are in the tensor
    cur = w.abs() > 0.5
    w2 = w * cur
    _, thr_all = magnitude_mask(w2, quality=1.0, current_mask=cur, std_of="all")
    _, thr_kept = magnitude_mask(w2, quality=1.0, current_mask=cur, std_of="kept")
    assert thr_all == pytest.approx(float(w2.double().std(correction=0)), rel=1e-6)
    assert thr_kept == pytest.approx(float(w2[cur].double().std(correction=0)), rel=1e-6)
    assert thr_kept > thr_all


def test_never_revive():
    torch.manual_seed(2)
    w = torch.randn(100)
    cur = torch.zeros(100, dtype=torch.bool)
    cur[::3] = True  # keep 34 arbitrary weights, including small ones
    # asking for more than survive keeps exactly the survivors
    mask, _ = magnitude_mask(w, density=0.8, current_mask=cur)
    assert torch.equal(mask, cur)
    # asking for fewer keeps the largest survivors only
    mask, _ = magnitude_mask(w, density=0.1, current_mask=cur)
    assert int(mask.sum()) == 10 and not (mask & ~cur).any()
    surv = w.abs()[cur]
    assert torch.allclose(w.abs()[mask].sort().values, surv.sort().values[-10:])
    mask_q, _ = magnitude_mask(w, quality=0.0, current_mask=cur)
    assert torch.equal(mask_q, cur)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"density": 0.0}, "density"),
        ({"density": 1.5}, "density"),
        ({"density": -0.1}, "density"),
        ({"density": True}, "density"),
        ({"quality": -1.0}, "quality"),
        ({"quality": float("inf")}, "quality"),
        ({}, "exactly one"),
        ({"density": 0.5, "quality": 1.0}, "exactly one"),
    ],
)
def test_magnitude_mask_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        magnitude_mask(torch.randn(4, 4), **kwargs)
    for v in kwargs.values():
        assert repr(v) in str(err.value)


def test_magnitude_mask_bad_current_mask():
    with pytest.raises(ValueError, match="current_mask"):
        magnitude_mask(torch.randn(4, 4), density=0.5, current_mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="current_mask"):
        magnitude_mask(torch.randn(4, 4), density=0.5, current_mask=torch.ones(4, 4))


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    density=st.floats(0.001, 1.0),
    seed=st.integers(0, 2**16),
)
def test_density_count_property(shape, density, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    w[w.abs() < 0.3] = 0.25  # plenty of ties
    mask, thr = magnitude_mask(w, density=density)
    n = w.numel()
    assert int(mask.sum()) == min(n, max(1, round(density * n)))
    assert (w.abs()[mask] >= thr).all()
    assert not (w.abs()[~mask] > thr).any()


def test_attach_get_apply_masks():
    lin = nn.Linear(6, 4)
    assert get_mask(lin) is None
    mask = torch.rand(4, 6) > 0.5
    buf = attach_mask(lin, mask)
    assert get_mask(lin) is buf and buf.dtype == torch.bool and torch.equal(buf, mask)
    assert "weight_mask" in lin.state_dict()
    # updating keeps the same tensor object (DDP and optimizer hooks hold references)
    buf2 = attach_mask(lin, torch.zeros(4, 6, dtype=torch.bool))
    assert buf2 is buf and not buf.any()
    attach_mask(lin, mask)
    with torch.no_grad():
        lin.weight.copy_(-torch.rand(4, 6) - 0.1)  # negative weights: a multiply would leave -0.0
    assert apply_masks(nn.Sequential(lin, nn.ReLU())) == 1
    pruned = lin.weight[~mask]
    assert (pruned == 0).all() and not torch.signbit(pruned).any(), "pruned weights must be exactly +0.0"
    assert (lin.weight[mask] != 0).all()
    with pytest.raises(ValueError, match=r"shape \(4, 6\)"):
        attach_mask(lin, torch.ones(6, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no weight"):
        attach_mask(nn.ReLU(), mask)


def test_prune_model_nested_layers_and_untouched_types():
    torch.manual_seed(3)
    model = Nested()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = prune_model(model, densities={"*": 0.3, "head.block.4": 0.5})
    assert [r["layer"] for r in rows] == PRUNABLE
    modules = dict(model.named_modules())
    for r in rows:
        target = 0.5 if r["layer"] == "head.block.4" else 0.3
        # within 0.5 points, or within rounding to a whole weight for tiny layers
        assert abs(r["density"] - target) <= max(0.005, 0.5 / r["weights"]), r
        assert r["kept"] == round(target * r["weights"])
        m = modules[r["layer"]]
        mask = get_mask(m)
        assert int(mask.sum()) == r["kept"] and (m.weight[~mask] == 0).all()
        assert torch.equal(m.weight[mask], before[f"{r['layer']}.weight"][mask])  # survivors unchanged
        if m.bias is not None:
            assert torch.equal(m.bias, before[f"{r['layer']}.bias"])  # biases are not pruned
    for name in ("features.1", "head.block.1", "emb"):  # BatchNorm, LayerNorm, a non-target type
        assert get_mask(modules[name]) is None
        assert torch.equal(modules[name].weight, before[f"{name}.weight"])
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_prune_model_include_exclude_and_errors():
    model = Nested()
    rows = prune_model(model, densities=0.5, include=["head.*"], exclude=["head.block.4"])
    assert [r["layer"] for r in rows] == ["head.block.0"]
    assert get_mask(model.head.block[4]) is None and get_mask(model.seq1d) is None
    # a dict prunes only the layers it names
    rows = prune_model(Nested(), densities={"seq1d": 0.2})
    assert [r["layer"] for r in rows] == ["seq1d"]
    with pytest.raises(ValueError, match="available layers") as err:
        prune_model(Nested(), densities=0.5, include=["head.blok.*"])
    assert "head.block.0" in str(err.value) and "head.blok.*" in str(err.value)
    with pytest.raises(ValueError, match="matches no target layer") as err:
        prune_model(Nested(), densities={"fc6": 0.1})
    assert "seq1d" in str(err.value)
    with pytest.raises(ValueError, match="exactly one"):
        prune_model(Nested())
    with pytest.raises(ValueError, match=r"densities\['seq1d'\]: got 1.5"):
        prune_model(Nested(), densities={"seq1d": 1.5})


def test_prune_model_quality_and_iterating_never_revives():
    torch.manual_seed(4)
    model = Nested()
    w0 = model.head.block[0].weight.detach().clone()
    rows = prune_model(model, quality=1.0, include=["head.block.0"])
    assert rows[0]["threshold"] == pytest.approx(float(w0.std(correction=0)), rel=1e-6)
    first = get_mask(model.head.block[0]).clone()
    with torch.no_grad():  # pruned weights drift away from zero (e.g. a training step without masks)
        model.head.block[0].weight.add_(5.0)
    prune_model(model, densities=0.9, include=["head.block.0"])
    second = get_mask(model.head.block[0])
    assert not (second & ~first).any()
    assert (model.head.block[0].weight[~second] == 0).all()


def test_geometric_schedule():
    for target, rounds in ((0.09, 3), (0.3, 1), (0.05, 5), (1.0, 4), (0.123456789, 7)):
        s = geometric_schedule(target, rounds)
        assert len(s) == rounds and s[-1] == target  # exactly, not approximately
        assert all(b <= a for a, b in zip([1.0, *s], s, strict=False))
        # geometric: equal ratios between consecutive rounds, first ratio from 1.0
        ratios = [b / a for a, b in zip([1.0, *s], s, strict=False)]
        assert all(r == pytest.approx(ratios[0], rel=1e-9) for r in ratios)
    assert geometric_schedule(0.09, 2)[0] == pytest.approx(0.3)
    q = quality_schedule(1.2, 3)
    assert q[-1] == 1.2 and q[0] == pytest.approx(0.4)
    for bad, match in (((0.0, 3), r"target: got 0.0; expected a number in \(0, 1\]"),
                       ((1.5, 3), r"target: got 1.5; expected a number in \(0, 1\]"),
                       ((0.5, 0), "rounds: got 0; expected an integer >= 1"),
                       ((0.5, 1.5), "rounds: got 1.5; expected an integer >= 1")):
        with pytest.raises(ValueError, match=match):
            geometric_schedule(*bad)


def test_adjusted_dropout_formula():
    # [NIPS §3.2]: D_r = D_o * sqrt(C_ir / C_io); 9% of fc7 kept -> 0.5 * 0.3
    assert adjusted_dropout(0.5, 4096 * 4096, round(0.09 * 4096 * 4096)) == pytest.approx(0.15, rel=1e-6)
    assert adjusted_dropout(0.5, 100, 25) == pytest.approx(0.25)
    assert adjusted_dropout(0.3, 100, 100) == pytest.approx(0.3)
    assert adjusted_dropout(0.5, 100, 0) == 0.0
    for bad, match in (((1.5, 10, 5), r"adjusted_dropout: p_orig=1.5; expected a number in \[0, 1\]"),
                       ((0.5, 0, 0), "adjusted_dropout: c_io=0; expected an integer > 0"),
                       ((0.5, 10, 11), r"adjusted_dropout: c_ir=11; expected an integer in \[0, c_io=10\]"),
                       ((0.5, 10, -1), r"adjusted_dropout: c_ir=-1; expected an integer in \[0, c_io=10\]")):
        with pytest.raises(ValueError, match=match):
            adjusted_dropout(*bad)


def test_find_feeding_dropouts():
    # torchvision VGG classifier layout: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear
    model = nn.Module()
    model.classifier = nn.Sequential(
        nn.Linear(8, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 4)
    )
    model.other = nn.Sequential(nn.Dropout(), nn.ReLU(), nn.Linear(8, 8), nn.Dropout2d(), nn.Linear(8, 8))
    names = ["classifier.0", "classifier.3", "classifier.6", "other.2", "other.4"]
    assert find_feeding_dropouts(model, names) == {"classifier.3": "classifier.2", "classifier.6": "classifier.5"}
    assert find_feeding_dropouts(model, ["classifier.3"]) == {"classifier.3": "classifier.2"}
    top = nn.Sequential(nn.Dropout(0.2), nn.Linear(3, 3))
    assert find_feeding_dropouts(top, ["1"]) == {"1": "0"}


def test_adjust_dropouts_to_masks():
    """A model restored from a pruned checkpoint gets the [NIPS §3.2] rates back from its masks."""
    model = nn.Sequential(
        nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 8), nn.Dropout(0.4), nn.Linear(8, 4)
    )
    attach_mask(model[3], torch.rand(8, 8).argsort(1) < 2)  # 16 of 64 kept
    attach_mask(model[0], torch.ones(8, 8, dtype=torch.bool))  # masked, but fed by nothing
    assert adjust_dropouts_to_masks(model) == {"2": pytest.approx(0.25)}
    assert model[2].p == pytest.approx(0.25) and model[4].p == 0.4  # model[5] carries no mask: untouched


def test_prune_model_density_within_half_percent_on_odd_sizes():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(333, 77), nn.Conv2d(3, 7, 5), nn.Conv1d(5, 3, 2))
    for d in (0.08, 0.26, 0.66):
        m = nn.Sequential(*[type(x)(*_args(x)) for x in model])
        rows = prune_model(m, densities=d)
        for r in rows:
            assert abs(r["density"] - d) <= 0.005 or r["weights"] * 0.005 < 1, r
            assert r["kept"] == round(d * r["weights"])
    assert math.isfinite(rows[0]["threshold"])


def _args(m: nn.Module) -> tuple:
    if isinstance(m, nn.Linear):
        return (m.in_features, m.out_features)
    return (m.in_channels, m.out_channels, m.kernel_size)


def test_dropout_rates_round_trip():
    """Dropout rates are not in a state_dict: dropout_rates/set_dropout_rates carry them (e.g. in a checkpoint)."""
    def net():
        return nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Sequential(nn.Dropout2d(0.2), nn.Linear(4, 2)))

    pruned = net()
    pruned[1].p = 0.15
    assert dropout_rates(pruned) == {"1": 0.15, "2.0": 0.2}
    fresh = net()
    set_dropout_rates(fresh, dropout_rates(pruned))
    assert fresh[1].p == 0.15 and fresh[2][0].p == 0.2
    with pytest.raises(ValueError, match=r"'0' is not a dropout module.*\['1', '2.0'\]"):
        set_dropout_rates(fresh, {"0": 0.1})
    with pytest.raises(ValueError, match="'2.0' has rate 1.5"):
        set_dropout_rates(fresh, {"1": 0.3, "2.0": 1.5})
    assert fresh[1].p == 0.15  # a rejected call writes nothing
