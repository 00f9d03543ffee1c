"""``buffers.codes_of``: the one derivation of (mask, codes, codebook) from a parameter and its buffers, and its rule
for parameters without a mask or without a codebook; the packings built on it agree with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dc_lightning import buffers
from dc_lightning.inference.linear import CompressedLinear
from dc_lightning.inference.matrix import param_codes

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _decode(c: buffers.Codes) -> torch.Tensor:
    return torch.where(c.mask, c.codebook[c.codes], 0.0)


def test_quantized_without_mask_codes_every_weight_zeros_included():
    lin = nn.Linear(4, 3, bias=False)
    assign = torch.arange(12, dtype=torch.uint8).reshape(3, 4) % 3
    cb = torch.tensor([0.0, -0.5, 0.5])
    buffers.set_codebook(lin, cb, assign)
    lin.weight.data = cb[assign.long()]
    c = buffers.codes_of(lin)
    assert c.mask.all() and torch.equal(c.codes, assign.long()) and torch.equal(c.codebook, cb)
    assert torch.equal(_decode(c), lin.weight)


def test_quantized_with_mask_codes_zero_where_pruned():
    lin = nn.Linear(4, 3, bias=False)
    mask = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    buffers.set_mask(lin, mask)
    buffers.set_codebook(lin, torch.tensor([0.5, -0.5, 1.0, 2.0]), torch.full((3, 4), 3, dtype=torch.uint8))
    c = buffers.codes_of(lin)
    assert torch.equal(c.mask, mask) and c.codes.dtype == torch.int64
    assert c.codes[mask].tolist() == [3] * 4 and not c.codes[~mask].any()


def test_distinct_kept_values_become_the_codebook():
    lin = nn.Linear(6, 5, bias=False)
    values = torch.tensor([0.25, -1.0, 0.0, 3.0])
    lin.weight.data = values[torch.randint(0, 4, (5, 6), generator=torch.Generator().manual_seed(0))]
    mask = torch.rand(5, 6, generator=torch.Generator().manual_seed(1)) < 0.6
    lin.weight.data *= mask
    buffers.set_mask(lin, mask)  # pruned only: a kept weight that is exactly 0.0 is a codebook value too
    c = buffers.codes_of(lin)
    kept = lin.weight[mask]
    assert torch.equal(c.codebook, kept.unique()) and torch.equal(c.codebook, c.codebook.sort().values)
    assert torch.equal(_decode(c), lin.weight) and torch.equal(c.mask, mask)


def test_plain_parameter_keeps_its_non_zero_weights_as_the_linear_packing_does():
    """One rule for "no mask, no codebook": the non-zero weights are the kept ones (what CompressedLinear packs)."""
    lin = nn.Linear(20, 10)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([0.0, 0.5, -0.25, 1.0])[torch.randint(0, 4, (10, 20))])
    c = buffers.codes_of(lin)
    assert torch.equal(c.mask, lin.weight != 0) and c.codebook.tolist() == [-0.25, 0.5, 1.0]
    assert torch.equal(_decode(c), lin.weight)
    assert CompressedLinear.from_linear(lin).nnz == int(c.mask.sum())
    with pytest.raises(ValueError, match="carries no mask or codebook"):  # the inference modules refuse it
        param_codes(lin, "weight")


def test_rows_of_an_unquantized_parameter_get_their_own_codebook():
    mha = nn.MultiheadAttention(4, 1, bias=False)
    w = mha.in_proj_weight
    with torch.no_grad():
        w.copy_(torch.arange(3, dtype=torch.float32).repeat_interleave(4).reshape(3, 4).repeat_interleave(4, 0))
    buffers.set_mask(mha, torch.ones_like(w, dtype=torch.bool), "in_proj_weight")
    for i in range(3):
        c = buffers.codes_of(mha, "in_proj_weight", slice(4 * i, 4 * i + 4))
        assert c.codebook.tolist() == [float(i)] and c.mask.shape == (4, 4)
    assert buffers.codes_of(mha, "in_proj_weight").codebook.tolist() == [0.0, 1.0, 2.0]


def test_too_many_values_empty_and_mismatched_buffers():
    lin = nn.Linear(30, 30)
    buffers.set_mask(lin, torch.ones(30, 30, dtype=torch.bool))
    with pytest.raises(ValueError, match="Linear.weight is not quantized and keeps 900 distinct values"):
        buffers.codes_of(lin)
    buffers.set_mask(lin, torch.zeros(30, 30, dtype=torch.bool))
    assert buffers.codes_of(lin).codebook.tolist() == [0.0]
    lin.register_buffer(buffers.buffer_name("mask"), torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"Linear\.weight_mask has shape \(3, 3\); expected \(30, 30\)"):
        buffers.codes_of(lin)


def test_layer_codes_are_codes_of_on_the_host():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 2)
    mask = torch.rand(conv.weight.shape) < 0.5
    assign = torch.randint(0, 4, conv.weight.shape, dtype=torch.uint8)
    buffers.set_mask(conv, mask)
    buffers.set_codebook(conv, torch.tensor([-1.0, -0.5, 0.5, 1.0]), assign)
    rows, cols, codes, codebook, shape = buffers.layer_codes(conv)
    r, c = buffers.sparse_coordinates(shape, mask)
    assert np.array_equal(rows, r) and np.array_equal(cols, c) and shape == (3, 2, 2, 2)
    assert np.array_equal(codes, assign.reshape(3, -1).numpy()[r, c]) and codes.dtype == np.uint8


@needs_cuda
def test_codes_stay_on_the_parameters_device():
    lin = nn.Linear(8, 4).cuda()
    buffers.set_mask(lin, torch.rand(4, 8, device="cuda") < 0.5)
    with torch.no_grad():
        lin.weight.mul_(buffers.get_mask(lin)).mul_(8).round_()
    c = buffers.codes_of(lin)
    assert {t.device.type for t in c} == {"cuda"} and torch.equal(_decode(c), lin.weight)
