"""dc_lightning.buffers: names, in-place updates, the one placeholder rule, the coordinates and codes of a layer."""

import numpy as np
import pytest
import torch
from torch import nn

from dc_lightning import buffers


def test_names_are_parameter_generic() -> None:
    assert buffers.buffer_name("mask") == buffers.MASK
    assert buffers.buffer_name("assign", "in_proj_weight") == "in_proj_weight_assign"
    assert buffers.buffer_keys("fc1.") == ("fc1.weight_mask", "fc1.weight_codebook", "fc1.weight_assign")
    assert buffers.parse_buffer_key("rnn.weight_hh_l0_codebook") == ("rnn", "weight_hh_l0", "codebook")
    assert buffers.parse_buffer_key("fc1.bias") is None
    with pytest.raises(ValueError, match="'scale'.*valid"):
        buffers.buffer_name("scale")


def test_set_buffer_updates_in_place_and_refuses_a_parameter() -> None:
    lin = nn.Linear(3, 2)
    first = buffers.set_mask(lin, torch.ones(2, 3, dtype=torch.bool))
    again = buffers.set_mask(lin, torch.tensor([[True, False, True], [False, False, True]]))
    assert again is first and int(first.sum()) == 3  # same tensor, new values
    with pytest.raises(ValueError, match="Linear.bias exists and is not a buffer"):
        buffers.set_buffer(lin, "bias", torch.zeros(2))


def test_register_placeholders_one_rule() -> None:
    src = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    buffers.set_mask(src[0], torch.rand(3, 4) > 0.5)
    buffers.set_codebook(src[2], torch.linspace(-1, 1, 4), torch.randint(0, 4, (2, 3), dtype=torch.uint8))
    attn = nn.Linear(2, 2)
    attn.register_buffer("causal_mask", torch.ones(2, 2, dtype=torch.bool))  # not a compression buffer
    src.append(attn)
    state = src.state_dict()

    fresh = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.Linear(2, 2))
    fresh[3].register_buffer("causal_mask", torch.zeros(2, 2, dtype=torch.bool))
    added = buffers.register_placeholders(fresh, state)
    assert added == ["0.weight_mask", "2.weight_codebook", "2.weight_assign"]
    assert buffers.get_mask(fresh[0]).dtype == torch.bool and not buffers.get_mask(fresh[0]).any()
    fresh.load_state_dict(state)
    assert torch.equal(buffers.get_mask(fresh[0]), buffers.get_mask(src[0]))
    assert buffers.register_placeholders(fresh, state) == []  # nothing left to add

    with pytest.raises(ValueError, match=r"'9\.weight_mask'.*no layer '9'"):
        buffers.register_placeholders(fresh, {"9.weight_mask": torch.ones(1, dtype=torch.bool)})


def test_layer_codes_row_major() -> None:
    lin = nn.Linear(4, 3, bias=False)
    mask = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    assign = torch.arange(12, dtype=torch.uint8).reshape(3, 4) % 4
    buffers.set_mask(lin, mask)
    buffers.set_codebook(lin, torch.tensor([0.5, -0.5, 1.0, 2.0]), assign)
    rows, cols, codes, codebook, shape = buffers.layer_codes(lin)
    assert rows.tolist() == [0, 0, 2, 2] and cols.tolist() == [1, 3, 0, 3]
    assert codes.tolist() == [1, 3, 0, 3] and shape == (3, 4)
    assert codebook.dtype == np.float32 and codebook.tolist() == [0.5, -0.5, 1.0, 2.0]
    r_all, c_all = buffers.sparse_coordinates((2, 3, 2), None)  # conv-like: (out, in*kh) matrix view
    assert r_all.tolist() == [0] * 6 + [1] * 6 and c_all.tolist() == list(range(6)) * 2
    with pytest.raises(ValueError, match="not quantized"):
        buffers.layer_codes(nn.Linear(2, 2))
