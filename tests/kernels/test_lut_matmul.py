"""Correctness of the dense packed-code (LUT) layout and kernel (``dc_lightning.kernels.lut_*``) and of the layout
choice (``dc_lightning.kernels.layouts``) on the CPU.

As in ``test_eie_spmv.py``, the Triton-interpreter cases run in ONE child process (this file executed as a script,
``TRITON_INTERPRET=1`` set before triton is imported) that writes every case's relative error to JSON; the
parametrised tests assert on them. Packing, the reference (CPU fallback), validation and the op run in-process.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import zlib
from pathlib import Path

import pytest
import torch
from kernel_cases import reference, rel_err, run_interpreter_child
from torch import nn

HERE = Path(__file__).resolve()
# triton is a hard dependency on Linux (pyproject.toml): there a missing triton fails these tests, not skips them
HAS_TRITON = sys.platform == "linux" or importlib.util.find_spec("triton") is not None


def _case(cid: str, n: int, k: int, density: float = 0.4, bits: int = 4, batch: int = 1, **kw) -> dict:
    return {"id": cid, "n": n, "k": k, "density": density, "bits": bits, "batch": batch, **kw}


CASES = [
    *[_case(f"batch{b}", 21, 70, batch=b, bias=True, relu=True) for b in (1, 3, 16, 64)],
    *[_case(f"bits{b}", 19, 300, bits=b, batch=3) for b in range(1, 9)],
    *[_case(f"bits{b}_dense_b16", 17, 130, density=1.0, bits=b, batch=16) for b in (2, 4, 8)],
    _case("nnz0", 17, 23, density=0.0, batch=2, bias=True),
    _case("nnz0_b16", 17, 23, density=0.0, batch=16),
    _case("1x1", 1, 1, density=1.0, bits=1),
    _case("odd_1000x3", 1000, 3, density=0.5, bits=2, batch=5),
    _case("odd_3x1000", 3, 1000, density=0.1, batch=2),
    _case("bitmap_forced_3bit", 13, 90, bits=3, batch=4, bitmap=True),
    _case("zero_code_forced_4bit", 13, 90, bits=3, batch=4, bitmap=False),
    _case("split3_repeat", 45, 1100, batch=2, bias=True, relu=True, repeat=3, config={"split": 3}),
    _case("split2_dot_repeat", 45, 600, batch=20, bias=True, repeat=3, config={"split": 2, "block_n": 32}),
    _case("decode_gather_b1", 30, 200, bits=4, config={"decode": 1}),
    _case("decode_gather_dot", 30, 200, bits=2, batch=17, config={"decode": 1}),
    _case("fma_b16", 20, 40, batch=16, config={"use_dot": False, "block_b": 16, "block_n": 16}),
    _case("dot_b2", 20, 40, batch=2, config={"use_dot": True, "block_b": 16}),
    _case("block_b32_b33", 20, 130, batch=33, config={"block_b": 32}),
    _case("op_path", 21, 70, batch=3, bias=True, relu=True, via="op"),
    _case("gather_fails_falls_back", 21, 300, batch=16, bias=True, via="broken_gather"),
    _case("module_sparse_b1", 40, 300, density=0.05, batch=1, bias=True, via="module"),
    _case("module_sparse_batch_copy_b64", 40, 300, density=0.05, batch=64, bias=True, via="module", alternate=True),
    _case("module_lut_b3", 40, 300, density=0.7, batch=3, relu=True, via="module"),
    _case("module_dual_b2", 40, 300, density=0.4, batch=2, bias=True, via="module", alternate=True),
    _case("module_one_copy_b2", 40, 300, density=0.4, batch=2, bias=True, via="module"),
]


def _make_case(case: dict):
    g = torch.Generator().manual_seed(zlib.crc32(case["id"].encode()))
    n, k = case["n"], case["k"]
    mask = torch.rand(n, k, generator=g) < case["density"]
    rows, cols = mask.nonzero(as_tuple=True)
    n_cb = 2 ** case["bits"]
    codes = torch.randint(0, n_cb, (rows.numel(),), generator=g)
    codebook = torch.randn(n_cb, generator=g)
    x = torch.relu(torch.randn(case["batch"], k, generator=g))
    bias = torch.randn(n, generator=g) if case.get("bias") else None
    return rows, cols, codes, codebook, x, bias


def _linear_module(case: dict, rows, cols, codes, codebook, bias) -> nn.Linear:
    lin = nn.Linear(case["k"], case["n"], bias=bias is not None)
    assign = torch.zeros(case["n"], case["k"], dtype=torch.uint8)
    assign[rows, cols] = codes.to(torch.uint8)
    mask = torch.zeros(case["n"], case["k"], dtype=torch.bool)
    mask[rows, cols] = True
    lin.register_buffer("weight_mask", mask)
    lin.register_buffer("weight_codebook", codebook)
    lin.register_buffer("weight_assign", assign)
    with torch.no_grad():
        lin.weight.copy_(codebook[assign.long()] * mask)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _run_interpreter_cases(out_path: str) -> None:
    """Child-process entry point: TRITON_INTERPRET=1 is already in the environment."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from dc_lightning.inference.linear import CompressedLinear
    from dc_lightning.kernels.lut import layout as L
    from dc_lightning.kernels.lut import op as M

    results = {}
    for case in CASES:
        rows, cols, codes, codebook, x, bias = _make_case(case)
        relu = bool(case.get("relu"))
        ref = reference(case, rows, cols, codes, codebook, x, bias)
        errs, path = [], "lut"
        for _ in range(case.get("repeat", 1)):  # repeated calls: the split-K workspace must be zero again
            if case.get("via") == "module":
                lin = _linear_module(case, rows, cols, codes, codebook, bias)
                layer = CompressedLinear.from_linear(lin, relu=relu, alternate=bool(case.get("alternate")))
                y = layer(x)
                path = layer.layout_for(x.shape[0])
            else:
                p = L.pack_lut(case["n"], case["k"], rows, cols, codes, codebook, bitmap=case.get("bitmap"))
                if case.get("via") == "op":
                    y = M.lut_linear(x, p, bias, relu)
                elif case.get("via") == "broken_gather":
                    y, path = _with_broken_gather(M, x, p, bias, relu)
                else:
                    y = M.lut_linear_triton(x, p, bias, relu, config=case.get("config"))
            errs.append(rel_err(y, ref))
        results[case["id"]] = {"err": max(errs), "shape": list(y.shape), "dtype": str(y.dtype), "path": path}
    Path(out_path).write_text(json.dumps(results))


def _with_broken_gather(M, x, p, bias, relu):
    """The default (gather) decode made to fail at launch: the launcher must fall back to tl.load once."""
    real = M.lut_matmul_kernel
    decodes = []

    class Broken:
        def __getitem__(self, grid):
            def run(*args, **meta):
                decodes.append(meta["DECODE"])
                if meta["DECODE"] == 1:
                    raise RuntimeError("simulated compiler failure")
                return real[grid](*args, **meta)

            return run

    M.lut_matmul_kernel = Broken()
    try:
        assert M.choose_lut_config(x.shape[0], p, x.dtype)["decode"] == 1
        y = M.lut_linear_triton(x, p, bias, relu)
        assert M.choose_lut_config(x.shape[0], p, x.dtype)["decode"] == 0  # remembered
        y2 = M.lut_linear_triton(x, p, bias, relu)
    finally:
        M.lut_matmul_kernel = real
        M._GATHER_FAILED.clear()
    assert torch.equal(y, y2)
    return y, "lut" if decodes == [1, 0, 0] else f"decodes {decodes}"


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory) -> dict:
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    return run_interpreter_child(HERE, tmp_path_factory.mktemp("lut_interp") / "results.json")


EXPECTED_PATH = {
    "module_sparse_b1": "sparse",
    "module_sparse_batch_copy_b64": "lut",
    "module_lut_b3": "lut",
    "module_dual_b2": "sparse",  # a LUT layer's sparse copy (alternate=True) serves small batches
}


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_triton_interpreter_matches_float64(case: dict, interpreter_results: dict) -> None:
    res = interpreter_results[case["id"]]
    assert res["shape"] == [case["batch"], case["n"]]
    assert res["dtype"] == "torch.float32"
    assert res["err"] <= 1e-5, f"{case['id']}: relative error {res['err']:.3e}"
    assert res["path"] == EXPECTED_PATH.get(case["id"], "lut")


# ---------------------------------------------------------------------------------------------------------------
# In-process tests: packing, encoding choice, reference (CPU fallback), validation, op, layout choice, module
# ---------------------------------------------------------------------------------------------------------------

from dc_lightning.inference.linear import CompressedLinear  # noqa: E402
from dc_lightning.kernels import layouts  # noqa: E402
from dc_lightning.kernels.lut import layout as L  # noqa: E402
from dc_lightning.kernels.lut import op as M  # noqa: E402


def _layer(n=30, k=300, density=0.4, bits=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, k, generator=g) < density
    rows, cols = mask.nonzero(as_tuple=True)
    codes = torch.randint(0, 2**bits, (rows.numel(),), generator=g)
    codebook = torch.randn(2**bits, generator=g)
    return rows, cols, codes, codebook


def _dense(n, k, rows, cols, codes, cb) -> torch.Tensor:
    w = torch.zeros(n, k)
    w[rows, cols] = cb[codes]
    return w


@pytest.mark.parametrize(
    "n_centroids,dense,expected",
    [(16, True, (4, False)), (16, False, (4, True)), (15, False, (4, False)), (8, False, (4, False)),
     (4, False, (2, True)), (2, False, (2, False)), (1, False, (2, False)), (200, False, (8, False)),
     (256, False, (8, True)), (256, True, (8, False))],
)  # fmt: skip
def test_lut_encoding_picks_fewest_bits(n_centroids: int, dense: bool, expected: tuple) -> None:
    assert L.lut_encoding(n_centroids, dense) == expected


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_pack_lut_roundtrip(bits: int, density: float) -> None:
    rows, cols, codes, cb = _layer(n=7, k=77, density=density, bits=bits, seed=bits)
    p = L.pack_lut(7, 77, rows, cols, codes, cb)
    assert torch.equal(L.decode_dense_lut(p), _dense(7, 77, rows, cols, codes, cb))
    assert p.nnz == rows.numel()
    assert p.codes.shape == (7, p.n_groups * 32) and p.codes.dtype == torch.int32
    assert (p.mask is not None) == L.lut_encoding(2**bits, density == 1.0)[1]


def test_pack_lut_bytes_below_int4_at_4_bits() -> None:
    rows, cols, codes, cb = _layer(n=64, k=1024, density=1.0)
    p = L.pack_lut(64, 1024, rows, cols, codes, cb)
    assert p.cbits == 4 and p.mask is None
    assert p.nbytes - p.codebook.numel() * 4 == 64 * 1024 // 2  # 4 bits per weight, no scales


def test_pack_lut_rejects_bad_input() -> None:
    rows, cols, codes, cb = _layer()
    with pytest.raises(ValueError, match="cols must lie in"):
        L.pack_lut(30, 10, rows, cols, codes, cb)
    with pytest.raises(ValueError, match="duplicate"):
        L.pack_lut(30, 300, torch.tensor([1, 1]), torch.tensor([2, 2]), torch.tensor([0, 1]), cb)
    with pytest.raises(ValueError, match=r"cbits=4 cannot hold 17 codes"):
        L.pack_lut(30, 300, rows, cols, codes, cb, cbits=4, bitmap=False)
    with pytest.raises(ValueError, match="codebook must be 1-D with 1..256"):
        L.pack_lut(30, 300, rows, cols, codes % 2, torch.randn(300))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 16, 64])
def test_reference_path_matches_float64(dtype: torch.dtype, batch: int) -> None:
    rows, cols, codes, cb = _layer()
    p = L.pack_lut(30, 300, rows, cols, codes, cb)
    x = torch.relu(torch.randn(batch, 300)).to(dtype)
    bias = torch.randn(30)
    y = M.lut_linear(x, p, bias, relu=True)  # the op's CPU fallback
    ref = torch.relu(x.double() @ _dense(30, 300, rows, cols, codes, cb).double().T + bias.double())
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert y.dtype == dtype and y.shape == (batch, 30)
    assert ((y.double() - ref).norm() / ref.norm()).item() <= tol


def test_opcheck_and_compile() -> None:
    rows, cols, codes, cb = _layer(n=20, k=40)
    for bitmap in (True, False):
        p = L.pack_lut(20, 40, rows, cols, codes, cb, bitmap=bitmap, cbits=8)
        for bias in (None, torch.randn(20)):
            torch.library.opcheck(torch.ops.dc_lightning.lut_linear.default, p.op_args(torch.randn(3, 40), bias))
    x = torch.randn(2, 40)
    fn = torch.compile(lambda t: M.lut_linear(t, p), backend="eager", fullgraph=True)
    assert torch.allclose(fn(x), x @ L.decode_dense_lut(p).T, atol=1e-5)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(x=torch.randn(3, 299)), ValueError, r"x.shape\[1\] must equal in_features=300"),
        (lambda a: a.update(x=torch.randn(3, 300, dtype=torch.float64)), TypeError, "x dtype must be one of"),
        (lambda a: a.update(codes=a["codes"][:, :-1]), ValueError, "codes must be a contiguous int32"),
        (lambda a: a.update(mask=a["mask"][:1]), ValueError, "mask must be None or a contiguous int32"),
        (lambda a: a.update(codebook=a["codebook"][:3]), ValueError, r"codebook must be float32 \[2\*\*cbits\]"),
        (lambda a: a.update(cbits=3), ValueError, "cbits must be one of"),
        (lambda a: a.update(bias=torch.randn(7)), ValueError, r"bias must be a floating-point \[out_features\]"),
    ],
    ids=["in_features", "float64", "codes", "mask", "codebook", "cbits", "bias"],
)
def test_validation_errors(mutate, exc, match) -> None:
    rows, cols, codes, cb = _layer()
    p = L.pack_lut(30, 300, rows, cols, codes, cb)
    assert p.mask is not None
    a = dict(x=torch.randn(3, 300), codes=p.codes, mask=p.mask, codebook=p.codebook, cbits=p.cbits, bias=None)
    mutate(a)
    layer = dataclasses.replace(p, codes=a["codes"], mask=a["mask"], codebook=a["codebook"], cbits=a["cbits"])
    with pytest.raises(exc, match=match):
        M.lut_linear(a["x"], layer, a["bias"])


def test_choose_lut_config() -> None:
    rows, cols, codes, cb = _layer(n=4096, k=64, density=1.0)
    p = L.pack_lut(4096, 64, rows, cols, codes, cb)
    assert M.choose_lut_config(1, p, torch.float16)["use_dot"] is False
    cfg = M.choose_lut_config(64, p, torch.float16)
    assert cfg["use_dot"] and cfg["block_b"] == 64 and cfg["split"] == 1  # one group: nothing to split
    with pytest.raises(ValueError, match="unknown config keys"):
        M.choose_lut_config(1, p, torch.float16, {"blok_n": 8})
    with pytest.raises(ValueError, match="use_dot needs block_b >= 16"):
        M.choose_lut_config(1, p, torch.float16, {"use_dot": True})
    assert all(c["block_b"] >= 16 for c in M.lut_candidates(16, p) if c["use_dot"])


@pytest.mark.parametrize(
    "density,n_centroids,layout",
    [(0.04, 16, "sparse"), (0.1, 16, "sparse"), (0.299, 16, "sparse"), (0.3, 16, "lut"), (0.5, 15, "tc"),
     (1.0, 16, "tc"), (1.0, 17, "lut"), (0.5, 32, "lut")],
)
def test_choose_layout_by_density(density: float, n_centroids: int, layout: str) -> None:
    got, why = layouts.choose_layout(1000, 1000, int(density * 1e6), n_centroids)
    assert got.value == layout
    assert f"{density:.1%}" in why


def test_pack_layer_rejects_unknown_layout() -> None:
    rows, cols, codes, cb = _layer()
    with pytest.raises(ValueError, match=r"layout must be one of \['auto', 'sparse', 'lut', 'tc', 'ell', 'codes'\]"):
        layouts.pack_layer(30, 300, rows, cols, codes, cb, "bitmap")


def _quantized_linear(n=24, k=200, density=0.4, bits=4, seed=0) -> nn.Linear:
    rows, cols, codes, cb = _layer(n, k, density, bits, seed)
    lin = nn.Linear(k, n)
    assign = torch.zeros(n, k, dtype=torch.uint8)
    assign[rows, cols] = codes.to(torch.uint8)
    mask = torch.zeros(n, k, dtype=torch.bool)
    mask[rows, cols] = True
    lin.register_buffer("weight_mask", mask)
    lin.register_buffer("weight_codebook", cb)
    lin.register_buffer("weight_assign", assign)
    with torch.no_grad():
        lin.weight.copy_(cb[assign.long()] * mask)
    return lin


@pytest.mark.parametrize("density,layout", [(0.05, "sparse"), (0.4, "lut"), (0.7, "lut"), (1.0, "tc")])
def test_compressed_linear_layout_cpu_fallback(density: float, layout: str) -> None:
    lin = _quantized_linear(density=density)
    layer = CompressedLinear.from_linear(lin, relu=True)
    assert layer.layout == layout
    assert f"layout={layout}" in repr(layer) and "why='density" in repr(layer)
    for batch in (1, 3, 16, 64):
        x = torch.randn(batch, 200)
        ref = torch.relu(x.double() @ lin.weight.double().T + lin.bias.double())
        assert ((layer(x).double() - ref).norm() / ref.norm()).item() <= 1e-5
    assert torch.equal(layer.dense_weight(), lin.weight.detach())


def test_compressed_linear_sparse_batch_copy_and_state_dict() -> None:
    lin = _quantized_linear(density=0.05)
    layer = CompressedLinear.from_linear(lin, batch_min=4, alternate=True)
    assert layouts.layout_of(layer.path(3)) == "sparse" and layouts.layout_of(layer.path(4)) == "lut"
    assert "layouts=[sparse codebook_bits=4, lut code_bits=4 bitmap=True], lut from batch 4" in repr(layer)
    assert torch.equal(layouts.decode_dense(layer.path(4)), layouts.decode_dense(layer.path(1)))
    lean = CompressedLinear.from_linear(lin, alternate=False)
    assert lean.batch_min == 0 and "lut_codes" not in dict(lean.named_buffers())
    with pytest.raises(ValueError, match=r"holds no lut layout \(it holds \['sparse'\]\)"):
        lean.packed("lut")
    clone = CompressedLinear.from_linear(lin, batch_min=16, alternate=True)
    clone.lut_codes.zero_()
    clone.entries.zero_()
    clone.load_state_dict(layer.state_dict())  # buffers and the extra state (batch_min) come back
    assert clone.batch_min == 4
    for batch in (1, 5):
        x = torch.randn(batch, 200)
        assert torch.equal(clone(x), layer(x))
    with pytest.raises(ValueError, match="alternate must be in the other layout than packed"):
        CompressedLinear(layer.packed("sparse"), alternate=lean.packed("sparse"))
    with pytest.raises(ValueError, match="they must hold the same weights"):
        other = CompressedLinear.from_linear(_quantized_linear(k=100), layout="lut", alternate=False)
        CompressedLinear(layer.packed("sparse"), alternate=other.packed("lut"))


def test_autotune_moves_batch_min_to_where_lut_wins(monkeypatch) -> None:
    """CompressedLinear.autotune times both paths of a sparse layer and switches where the LUT copy wins."""
    layer = CompressedLinear.from_linear(_quantized_linear(density=0.05), batch_min=8, alternate=True)
    us = {("sparse", 1): 5.0, ("lut", 1): 7.0, ("sparse", 4): 9.0, ("lut", 4): 8.0, ("sparse", 16): 30.0,
          ("lut", 16): 10.0, ("sparse", 64): 90.0, ("lut", 64): 12.0}  # fmt: skip
    calls = []

    def fake_autotune(packed, batch_sizes, dtype, bias, relu):
        path = layouts.layout_of(packed)
        calls.append((path, batch_sizes))
        return {b: {"us": us[(path, b)], "block_n": 1} for b in batch_sizes}

    monkeypatch.setattr(layouts, "autotune", fake_autotune)
    got = layer.autotune((64, 1, 16, 4), torch.float16)
    assert layer.batch_min == 4
    assert {b: c["path"] for b, c in got.items()} == {1: "sparse", 4: "lut", 16: "lut", 64: "lut"}
    assert len(calls) == 8
    us[("lut", 4)] = 10.0  # sparse wins at 4 again: the switch moves to 16
    layer.autotune((1, 4, 16, 64), torch.float16)
    assert layer.batch_min == 16
    dual = CompressedLinear.from_linear(_quantized_linear(density=0.4), alternate=True)  # lut + sparse below 16
    assert dual.batch_min == 16 and dual.layout == "sparse"
    us.update({("sparse", 1): 5.0, ("lut", 1): 7.0, ("lut", 4): 8.0})
    dual.autotune((1, 4), torch.float16)
    assert dual.batch_min == 4 and dual.layout == "sparse"  # the copy now serves batch 1-3
    lut_only = CompressedLinear.from_linear(_quantized_linear(density=0.7))
    calls.clear()
    assert lut_only.autotune((1,), torch.float16)[1]["path"] == "lut" and calls == [("lut", (1,))]
    assert lut_only.batch_min == 0


if __name__ == "__main__":
    _run_interpreter_cases(sys.argv[1])
