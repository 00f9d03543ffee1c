"""Correctness of the EIE sparse kernels (``dc_lightning.kernels.sparse.op``) on the CPU.

Triton's interpreter (``TRITON_INTERPRET=1``) has to be set before triton is first imported, and another test file
may already have imported triton in this pytest process. So the interpreter cases run in ONE child process (this
file executed as a script) that writes every case's relative error to JSON; the parametrised tests below assert on
them. Everything else (packing, the reference path, validation, op registration) runs in-process.
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

HERE = Path(__file__).resolve()
# triton is a hard dependency on Linux (pyproject.toml): there a missing triton fails these tests, not skips them
HAS_TRITON = sys.platform == "linux" or importlib.util.find_spec("triton") is not None

# ---------------------------------------------------------------------------------------------------------------
# Interpreter cases: tiny shapes, fp32, each vs a float64 dense reference (relative error <= 1e-5)
# ---------------------------------------------------------------------------------------------------------------


def _case(cid: str, n: int, k: int, density: float = 0.3, bits: int = 4, batch: int = 1, **kw) -> dict:
    return {"id": cid, "n": n, "k": k, "density": density, "bits": bits, "batch": batch, **kw}


CASES = [
    _case("1x1", 1, 1, density=1.0, bits=1),
    _case("3x1000", 3, 1000, density=0.1, batch=2),
    _case("1000x3", 1000, 3, density=0.5, bits=2),
    *[_case(f"density{d}", 37, 129, density=d, chunk=32) for d in (0.01, 0.05, 0.2, 1.0)],
    *[_case(f"bits{b}", 45, 77, bits=b, batch=3, chunk=32) for b in (1, 2, 3, 5, 8)],
    *[_case(f"batch{b}", 20, 50, batch=b, chunk=16) for b in (2, 5, 8, 16, 33, 64)],
    _case("empty_rows_cols", 40, 60, density=0.5, empty_rows=(5, 15), empty_cols=(10, 30), chunk=16, batch=3),
    _case("nnz0", 17, 23, density=0.0, batch=2, bias=True),
    _case("x_all_zero", 19, 40, x="zero", batch=2),
    _case("x_all_nonzero", 19, 40, x="nonzero", batch=2),
    _case("x_zero_chunks_skip", 33, 96, x="zero_chunks", chunk=16, batch=2, config={"skip_zero_chunks": True}),
    _case("x_zero_chunks_skip_b1", 33, 96, x="zero_chunks", chunk=16, config={"skip_zero_chunks": True}),
    _case("int32_entries", 5, 1500, density=0.05, bits=8, chunk=1024, batch=2),
    _case("row_tile1", 9, 31, row_tile=1, chunk=16),
    _case("row_tile64", 70, 31, row_tile=64, chunk=16, batch=2),
    _case("bias_relu", 30, 50, bias=True, relu=True, batch=4, chunk=16),
    _case("relu_only_fused", 30, 50, relu=True, chunk=64),
    _case("reduce_cpp3", 30, 200, chunk=16, batch=2, bias=True, relu=True, config={"chunks_per_prog": 3}),
    _case("no_transpose", 30, 50, batch=6, chunk=16, config={"transpose_x": False}),
    _case("block_b2", 30, 50, batch=7, chunk=16, config={"block_b": 2, "block_k": 4, "num_warps": 2}),
    _case("op_path", 21, 70, batch=3, chunk=16, bias=True, via_op=True),
    # one-launch flat kernel: split-K with atomics into the self-resetting workspace (called 3x: reset must work)
    *[
        _case(
            f"flat_split{s}_b{b}",
            45,
            300,
            chunk=32,
            batch=b,
            bias=True,
            relu=True,
            repeat=3,
            config={"kernel": "flat", "split": s, "block_k": 4},
        )
        for s, b in ((1, 1), (2, 1), (3, 1), (5, 3), (16, 2))
    ],
    _case("flat_split4_rt1", 9, 200, row_tile=1, chunk=16, repeat=2, config={"kernel": "flat", "split": 4}),
    _case(
        "flat_split2_int32",
        5,
        1500,
        density=0.05,
        bits=8,
        chunk=1024,
        batch=2,
        repeat=2,
        config={"kernel": "flat", "split": 2, "block_k": 2},
    ),
    _case("flat_split4_nnz0", 17, 23, density=0.0, batch=2, bias=True, repeat=2, config={"kernel": "flat", "split": 4}),
    _case(
        "flat_empty_blocks",
        40,
        600,
        density=0.5,
        empty_cols=(0, 300),
        chunk=16,
        batch=2,
        repeat=2,
        config={"kernel": "flat", "split": 3, "block_k": 2},
    ),
    _case("two_kernel_b1", 30, 200, chunk=16, bias=True, config={"kernel": "split"}),
    _case("flat_via_op_split", 64, 500, chunk=32, batch=1, relu=True, via_op=True, repeat=2),
]


def _make_case(case: dict):
    """Random layer + input of a case; returns (rows, cols, codes, codebook, x, bias)."""
    g = torch.Generator().manual_seed(zlib.crc32(case["id"].encode()))
    n, k = case["n"], case["k"]
    mask = torch.rand(n, k, generator=g) < case["density"]
    if "empty_rows" in case:
        mask[slice(*case["empty_rows"])] = False
        mask[:, slice(*case["empty_cols"])] = False
    rows, cols = mask.nonzero(as_tuple=True)
    n_cb = 2 ** case["bits"]
    codes = torch.randint(0, n_cb, (rows.numel(),), generator=g)
    codebook = torch.randn(n_cb, generator=g)
    x = torch.randn(case["batch"], k, generator=g)
    kind = case.get("x", "relu")
    if kind == "relu":
        x = torch.relu(x)  # about half the activations are zero, as after a ReLU
    elif kind == "zero":
        x = torch.zeros_like(x)
    elif kind == "nonzero":
        x = x.abs() + 0.1
    elif kind == "zero_chunks":  # whole 16-column chunks at zero: exercises the chunk skip
        x = x.abs() + 0.1
        x[:, 16:48] = 0.0
        x[:, 80:] = 0.0
    bias = torch.randn(n, generator=g) if case.get("bias") else None
    return rows, cols, codes, codebook, x, bias


def _run_interpreter_cases(out_path: str) -> None:
    """Child-process entry point: TRITON_INTERPRET=1 is already in the environment."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from dc_lightning.kernels.sparse import op as E
    results = {}
    for case in CASES:
        rows, cols, codes, codebook, x, bias = _make_case(case)
        p = L.pack(
            case["n"],
            case["k"],
            rows,
            cols,
            codes,
            codebook,
            row_tile=case.get("row_tile"),
            chunk=case.get("chunk"),
        )
        relu = bool(case.get("relu"))
        ref = reference(case, rows, cols, codes, codebook, x, bias)
        errs = []
        for _ in range(case.get("repeat", 1)):  # repeated calls: the flat kernel's workspace must be zero again
            if case.get("via_op"):
                y = E.eie_linear(x, p, bias, relu)
            else:
                y = E.eie_linear_triton(x, p, bias, relu, config=case.get("config"))
            errs.append(rel_err(y, ref))
        results[case["id"]] = {"err": max(errs), "shape": list(y.shape), "dtype": str(y.dtype)}
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory) -> dict:
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    return run_interpreter_child(HERE, tmp_path_factory.mktemp("eie_interp") / "results.json")


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_triton_interpreter_matches_float64(case: dict, interpreter_results: dict) -> None:
    res = interpreter_results[case["id"]]
    assert res["shape"] == [case["batch"], case["n"]]
    assert res["dtype"] == "torch.float32"
    assert res["err"] <= 1e-5, f"{case['id']}: relative error {res['err']:.3e}"


# ---------------------------------------------------------------------------------------------------------------
# In-process tests: packing, reference path, validation, op registration (no interpreter needed)
# ---------------------------------------------------------------------------------------------------------------

from dc_lightning.kernels import runtime as R  # noqa: E402
from dc_lightning.kernels.sparse import layout as L  # noqa: E402
from dc_lightning.kernels.sparse import op as E  # noqa: E402
from dc_lightning.kernels.sparse import tuning as T  # noqa: E402


def _layer(n=50, k=300, density=0.2, bits=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, k, generator=g) < density
    rows, cols = mask.nonzero(as_tuple=True)
    codes = torch.randint(0, 2**bits, (rows.numel(),), generator=g)
    codebook = torch.randn(2**bits, generator=g)
    return rows, cols, codes, codebook


@pytest.mark.parametrize("row_tile,chunk", [(1, 16), (8, 64), (32, None), (64, 2048)])
def test_pack_roundtrip(row_tile: int, chunk: int | None) -> None:
    rows, cols, codes, cb = _layer()
    p = L.pack(50, 300, rows, cols, codes, cb, row_tile=row_tile, chunk=chunk)
    r2, c2, k2 = L.unpack(p)
    key = lambda r, c: r * 300 + c
    o1, o2 = torch.argsort(key(rows, cols)), torch.argsort(key(r2, c2))
    assert torch.equal(rows[o1], r2[o2]) and torch.equal(cols[o1], c2[o2]) and torch.equal(codes[o1], k2[o2])
    assert p.nnz == rows.numel()
    assert p.entries.numel() >= p.nnz and p.padding >= 0
    dense = torch.zeros(50, 300)
    dense[rows, cols] = cb[codes]
    assert torch.equal(L.decode_dense(p), dense)


def test_pack_uses_16bit_entries_for_4bit_codebooks() -> None:
    rows, cols, codes, cb = _layer(bits=4)
    assert L.pack(50, 300, rows, cols, codes, cb, chunk=2048).entries.dtype == torch.int16
    rows, cols, codes, cb = _layer(bits=8)
    assert L.pack(50, 300, rows, cols, codes, cb, chunk=2048).entries.dtype == torch.int32


def test_pack_rejects_bad_input() -> None:
    rows, cols, codes, cb = _layer()
    with pytest.raises(ValueError, match="cols must lie in"):
        L.pack(50, 10, rows, cols, codes, cb)
    with pytest.raises(ValueError, match="duplicate"):
        L.pack(50, 300, torch.tensor([1, 1]), torch.tensor([2, 2]), torch.tensor([0, 1]), cb)
    with pytest.raises(ValueError, match="codebook must be 1-D with 1..256"):
        L.pack(50, 300, rows, cols, codes, torch.randn(300))
    with pytest.raises(ValueError, match="row_tile must be a power of two"):
        L.pack(50, 300, rows, cols, codes, cb, row_tile=3)
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        L.pack(50, 300, rows, cols, codes, cb, chunk=100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_path_matches_float64(dtype: torch.dtype) -> None:
    rows, cols, codes, cb = _layer()
    p = L.pack(50, 300, rows, cols, codes, cb)
    x = torch.relu(torch.randn(5, 300)).to(dtype)
    bias = torch.randn(50)
    y = L.eie_linear_reference(x, p, bias, relu=True)
    w = torch.zeros(50, 300, dtype=torch.float64)
    w[rows, cols] = cb.double()[codes]
    ref = torch.relu(x.double() @ w.T + bias.double())
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert y.dtype == dtype
    assert ((y.double() - ref).norm() / ref.norm()).item() <= tol


def _args(p, x, bias=None):
    return p.op_args(x, bias)


def test_op_registered_and_cpu_fallback() -> None:
    rows, cols, codes, cb = _layer()
    p = L.pack(50, 300, rows, cols, codes, cb)
    x = torch.randn(3, 300)
    assert hasattr(torch.ops.dc_lightning, "eie_linear")
    y = torch.ops.dc_lightning.eie_linear(*_args(p, x))
    ref = x @ L.decode_dense(p).T
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_opcheck() -> None:
    rows, cols, codes, cb = _layer(n=20, k=40)
    p = L.pack(20, 40, rows, cols, codes, cb)
    for bias in (None, torch.randn(20)):
        torch.library.opcheck(torch.ops.dc_lightning.eie_linear.default, _args(p, torch.randn(3, 40), bias))


def test_torch_compile_cpu() -> None:
    rows, cols, codes, cb = _layer(n=20, k=40)
    p = L.pack(20, 40, rows, cols, codes, cb)
    x = torch.randn(2, 40)
    fn = torch.compile(lambda t: E.eie_linear(t, p), backend="eager", fullgraph=True)
    assert torch.allclose(fn(x), x @ L.decode_dense(p).T, atol=1e-5)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(x=torch.randn(3, 299)), ValueError, r"x.shape\[1\] must equal in_features=300"),
        (lambda a: a.update(x=torch.randn(300)), ValueError, "x must be 2-D"),
        (lambda a: a.update(x=torch.randn(3, 300, dtype=torch.float64)), TypeError, "x dtype must be one of"),
        (lambda a: a.update(x=torch.randn(300, 3).t()), ValueError, "x must be contiguous"),
        (lambda a: a.update(entries=a["entries"].to(torch.int64)), ValueError, "entries must be a contiguous"),
        (lambda a: a.update(block_ptr=a["block_ptr"][:-1]), ValueError, "block_ptr must be int32"),
        (lambda a: a.update(codebook=a["codebook"].double()), ValueError, "codebook must be float32"),
        (lambda a: a.update(bias=torch.randn(7)), ValueError, r"bias must be a floating-point \[out_features\]"),
        (lambda a: a.update(bias=torch.randn(50, device="meta")), ValueError, "bias is on meta but x is on cpu"),
    ],
    ids=["in_features", "1d", "float64", "noncontig", "entries_dtype", "block_ptr", "codebook", "bias", "device"],
)
def test_validation_errors(mutate, exc, match) -> None:
    rows, cols, codes, cb = _layer()
    p = L.pack(50, 300, rows, cols, codes, cb)
    a = dict(x=torch.randn(3, 300), entries=p.entries, block_ptr=p.block_ptr, codebook=p.codebook, bias=None)
    mutate(a)
    layer = dataclasses.replace(p, entries=a["entries"], block_ptr=a["block_ptr"], codebook=a["codebook"])
    with pytest.raises(exc, match=match):
        E.eie_linear(a["x"], layer, a["bias"])


def test_triton_launcher_refuses_cpu_without_interpreter() -> None:
    if not HAS_TRITON or R.interpret_mode():
        pytest.skip("needs triton without the interpreter")
    rows, cols, codes, cb = _layer()
    p = L.pack(50, 300, rows, cols, codes, cb)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        E.eie_linear_triton(torch.randn(2, 300), p)


def test_choose_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown config keys"):
        T.choose_config(1, 100, 4, 32, {"blok_k": 8})


if __name__ == "__main__":
    _run_interpreter_cases(sys.argv[1])


def test_flat_kernel_workspace_not_used_while_tracing() -> None:
    """Inductor lowers the triton_op with fake tensors: the shared real workspace must not be handed to it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert R.can_use_workspace(torch.zeros(2, 3))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.zeros(2, 3))
        assert not R.can_use_workspace(fake)
        assert not R.can_use_workspace(torch.empty(2, 3))


def test_choose_config_kernels() -> None:
    cfg = T.choose_config(1, 4096, 25, 32, n_entries=4_000_000)
    assert cfg["kernel"] == "flat" and cfg["split"] > 1
    assert T.choose_config(64, 4096, 25, 32, n_entries=4_000_000)["kernel"] == "split"
    assert T.choose_config(1, 4096, 25, 32, {"chunks_per_prog": 2}, n_entries=4_000_000)["kernel"] == "split"
    assert T.choose_config(1, 4096, 100, 32, n_entries=4_000_000)["kernel"] == "split"  # block pointers too many
