"""The tensor-core LUT kernel (``kernels/tc``) at real sizes on CUDA (skipped without CUDA; run on the H200 with
``pytest tests/gpu``; CPU CI runs the interpreter cases of ``tests/kernels/test_tc.py``, which cannot run the
register decode).

Against a float64 product of the decoded layer, relative error ||y - ref|| / ||ref||: fp16 <= 2e-3, bf16 <= 1e-2,
fp32 <= 1e-5, at every batch 1..64 (and 65, 130: several batch tiles), with and without bias / ReLU, every decode
(register ``prmt`` decode, codebook load), row tile and split (no output may stay NaN); K and rows that are not
multiples of 128; autotuning; CUDA-graph capture and replay."""

from __future__ import annotations

import pytest
import torch

from dc_lightning.kernels.tc import op as T
from dc_lightning.kernels.tc.layout import decode_dense_tc, pack_tc

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: needs a CUDA device")
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


def _layer(n_out: int, n_in: int, density: float, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dense = density >= 1.0
    n_cb = 16 if dense else 15
    mask = torch.ones(n_out, n_in, dtype=torch.bool, device="cuda") if dense else (
        torch.rand(n_out, n_in, generator=g, device="cuda") < density)  # fmt: skip
    rows, cols = mask.nonzero(as_tuple=True)
    codes = torch.randint(0, n_cb, (rows.numel(),), generator=g, device="cuda")
    cb = torch.randn(n_cb, generator=g, device="cuda") * 0.05
    return pack_tc(n_out, n_in, rows, cols, codes, cb), torch.randn(n_out, generator=g, device="cuda") * 0.01


@pytest.fixture(scope="module")
def layers():
    return {"VGG-7": _layer(4096, 4096, 0.04), "odd": _layer(1000, 1201, 0.1, 1), "dense": _layer(600, 4096, 1.0, 2)}


def _check(p, bias, x, relu, cfg=None):
    w = decode_dense_tc(p).double()
    ref = x.double() @ w.T + (bias.double() if bias is not None else 0)
    if relu:
        ref = ref.relu()
    y = T.tc_linear_triton(x, p, bias.to(x.dtype) if bias is not None else None, relu, config=cfg)
    assert not torch.isnan(y).any(), "unwritten outputs"
    err = float((y.double() - ref).norm() / ref.norm())
    assert err <= TOL[x.dtype], (x.shape, x.dtype, cfg, err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 8, 16, 17, 32, 33, 64, 65, 130])
@pytest.mark.parametrize("name", ["VGG-7", "odd", "dense"])
def test_every_batch(layers, name, batch, dtype):
    p, bias = layers[name]
    x = torch.randn(batch, p.in_features, device="cuda").relu_().to(dtype)
    _check(p, bias, x, relu=name != "dense")


@pytest.mark.parametrize("cfg", [
    {"block_n": 64, "num_warps": 4, "split": 1}, {"block_n": 128, "num_warps": 8, "split": 7},
    {"block_n": 128, "num_warps": 4, "split": 32}, {"block_n": 64, "decode": 1, "split": 3},
    {"block_n": 32, "num_warps": 4, "split": 2, "num_stages": 3}, {"block_n": 16, "num_warps": 4, "split": 5},
    {"block_n": 128, "num_warps": 8, "split": 2, "num_stages": 2}], ids=str)  # fmt: skip
@pytest.mark.parametrize("batch", [1, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_configs(layers, cfg, batch, dtype):
    p, bias = layers["odd"]
    x = torch.randn(batch, p.in_features, device="cuda").to(dtype)
    _check(p, bias, x, relu=False, cfg=cfg)
    assert T.asm_failures() == []  # the register decode ran (it is never given up silently)


def test_autotune_then_exact(layers):
    p, bias = layers["odd"]
    got = T.autotune_tc(p, (1, 16, 64), torch.float16, bias.half(), True, rep_ms=5)
    assert set(got) == {1, 16, 64}
    for b in (1, 16, 64):
        _check(p, bias, torch.randn(b, p.in_features, device="cuda").half(), relu=True)


def test_cuda_graph_capture(layers):
    p, bias = layers["VGG-7"]
    x = torch.randn(16, p.in_features, device="cuda").half()
    y0 = T.tc_linear(x, p, bias.half(), True)  # warm-up: compile + workspace outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = T.tc_linear(x, p, bias.half(), True)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    ref = T.tc_linear(x, p, bias.half(), True)
    assert torch.allclose(y.float(), ref.float(), atol=1e-3, rtol=1e-3)
    assert y0.shape == y.shape
