"""The tensor-core LUT layout (``kernels/tc``) on the CPU: packing and decode bit for bit, the register decode's PTX
bit for bit on an emulator (the interpreter cannot run inline asm), the kernel under ``TRITON_INTERPRET=1`` (its
codebook-load decode) against float64, the layout choice and the memory bounds of one-encoding layers."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
import zlib
from pathlib import Path

import pytest
import torch
from kernel_cases import rel_err, run_interpreter_child
from ptx_emulator import run as run_ptx
from torch import nn

from dc_lightning.kernels import layouts
from dc_lightning.kernels.tc.decode import decode_asm, table_bits
from dc_lightning.kernels.tc.layout import TCPacked, bytes_per_position, decode_dense_tc, fits, pack_tc, tc_rows

HERE = Path(__file__).resolve()
HAS_TRITON = sys.platform == "linux" or importlib.util.find_spec("triton") is not None


def _layer(n: int, k: int, density: float, n_cb: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if density >= 1.0:
        mask = torch.ones(n, k, dtype=torch.bool)
    else:
        mask = torch.rand(n, k, generator=g) < density
    rows, cols = mask.nonzero(as_tuple=True)
    perm = torch.randperm(rows.numel(), generator=g)
    rows, cols = rows[perm], cols[perm]
    codes = torch.randint(0, n_cb, (rows.numel(),), generator=g)
    codebook = torch.randn(n_cb, generator=g)
    dense = torch.zeros(n, k)
    dense[rows, cols] = codebook[codes]
    return rows, cols, codes, codebook, dense


@pytest.mark.parametrize("n,k,density,n_cb", [(1, 1, 1.0, 1), (7, 13, 0.0, 3), (19, 77, 0.3, 15), (33, 300, 0.05, 8),
                                              (40, 129, 1.0, 16), (130, 256, 0.5, 2)])  # fmt: skip
def test_pack_decode_rows_bit_exact(n: int, k: int, density: float, n_cb: int) -> None:
    rows, cols, codes, codebook, dense = _layer(n, k, density, n_cb, seed=n * k)
    p = pack_tc(n, k, rows, cols, codes, codebook)
    p.check()
    assert p.codes.dtype == torch.int16 and p.codes.shape == (-(-n // 16) * 16, -(-k // 256) * 64)
    assert p.table == tuple(float(v) for v in p.codebook) and len(p.table) == 16
    assert torch.equal(decode_dense_tc(p), dense)
    idx = torch.tensor([n - 1, 0, n // 2, 0])
    assert torch.equal(tc_rows(p, idx), dense[idx])
    assert torch.equal(tc_rows(p, torch.arange(n)), dense)
    # the word of quarter q of the group (r, k) sits at (r + 8 (q // 2), t*64 + k + q % 2); its nibble m is the code
    # of position (r + 8 (m // 2), k + m % 2) of quarter q (columns t*256 + 64 q + k)
    zero = n_cb if rows.numel() < n * k else 0
    full = torch.full((p.codes.shape[0], p.codes.shape[1] * 4), zero, dtype=torch.int32)
    full[rows, cols] = codes.to(torch.int32)
    words = p.codes.to(torch.int32) & 0xFFFF
    rnd = random.Random(n * k)
    for _ in range(200):
        r = 16 * rnd.randrange(p.codes.shape[0] // 16) + rnd.randrange(8)
        t, k0, q, m = rnd.randrange(p.codes.shape[1] // 64), 2 * rnd.randrange(32), rnd.randrange(4), rnd.randrange(4)
        word = int(words[r + 8 * (q // 2), t * 64 + k0 + q % 2])
        assert (word >> (4 * m)) & 15 == int(full[r + 8 * (m // 2), t * 256 + 64 * q + k0 + m % 2])


@pytest.mark.parametrize("native_decode", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("batch", [1, 2, 16, 17, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_product_every_path(batch: int, dtype: torch.dtype, native_decode: bool, monkeypatch) -> None:
    """The CPU product of a large layer: native row blocks, or without the native decode the storage order up to
    ``STORAGE_ORDER_MAX_BATCH`` rows and the row order above; all match float64 (bias and ReLU included), output in
    ``x``'s dtype, the decoded weight bit for bit either way; a small layer's product is the dense layer's
    ``F.linear`` bit for bit."""
    from dc_lightning.kernels import native
    from dc_lightning.kernels.tc.layout import BLOCKED_MIN, STORAGE_ORDER_MAX_BATCH, tc_linear_reference

    assert STORAGE_ORDER_MAX_BATCH == 16 and BLOCKED_MIN == 1 << 16
    monkeypatch.setenv(native.ENV, "1" if native_decode else "0")
    if native_decode and not native.available():
        pytest.skip(f"native decode unavailable: {native.status()}")
    n, k = 300, 900  # 270,000 positions: blocked
    rows, cols, codes, codebook, dense = _layer(n, k, 0.5, 15, seed=batch)
    p = pack_tc(n, k, rows, cols, codes, codebook)
    assert torch.equal(decode_dense_tc(p), dense)
    g = torch.Generator().manual_seed(batch)
    x, bias = torch.randn(batch, k, generator=g).to(dtype), torch.randn(n, generator=g)
    ref = (x.double() @ dense.double().T + bias.double()).relu()
    y = tc_linear_reference(x, p, bias, relu=True)
    assert y.dtype == dtype and y.shape == (batch, n)
    assert rel_err(y, ref) <= (1e-6 if dtype == torch.float32 else 1e-2)
    small = pack_tc(30, 70, *_layer(30, 70, 0.5, 15, seed=batch)[:4])
    xs = torch.randn(batch, 70, generator=g)
    dense_small = decode_dense_tc(small).contiguous()
    assert torch.equal(tc_linear_reference(xs, small), torch.nn.functional.linear(xs, dense_small))


def test_pack_rejects_codebooks_beyond_the_table() -> None:
    rows, cols, codes, codebook, _ = _layer(8, 20, 0.5, 16)
    with pytest.raises(ValueError, match=r"16 table entries .* this pruned layer has 16 centroids \(valid: <= 15"):
        pack_tc(8, 20, rows, cols, codes, codebook)
    rows, cols, codes, codebook, _ = _layer(8, 20, 1.0, 17)
    with pytest.raises(ValueError, match=r"this dense layer has 17 centroids \(valid: <= 16\)"):
        pack_tc(8, 20, rows, cols, codes, codebook)
    assert fits(15, dense=False) and fits(16, dense=True) and not fits(16, dense=False)


def test_check_names_the_bad_field() -> None:
    rows, cols, codes, codebook, _ = _layer(8, 20, 0.5, 4)
    p = pack_tc(8, 20, rows, cols, codes, codebook)
    bad = TCPacked(p.codes.to(torch.int32), p.codebook, p.table, 8, 20)
    with pytest.raises(ValueError, match=r"codes must be a contiguous int16 \[rows_padded, k_tiles\*64\] = \[16, 64\]"):
        bad.check()
    with pytest.raises(ValueError, match=r"codebook must be float32 \[16\], got torch.float64"):
        TCPacked(p.codes, p.codebook.double(), p.table, 8, 20).check()
    with pytest.raises(ValueError, match="table must hold 16 host floats"):
        TCPacked(p.codes, p.codebook, p.table[:3], 8, 20).check()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quarter", [0, 1, 2, 3])
def test_register_decode_is_the_table_bit_for_bit(dtype: torch.dtype, quarter: int) -> None:
    """The PTX of the register decode, run on an emulator of its instructions, gives the table's 16-bit patterns
    (rounded as torch rounds) for the four nibbles of 16-bit field ``quarter`` of random register pairs."""
    rnd = random.Random(zlib.crc32(f"{dtype}{quarter}".encode()))
    table = tuple(float(v) for v in torch.randn(16, generator=torch.Generator().manual_seed(3)) * 0.05)
    table = (0.0, -0.0, 65504.0, 1e-8) + table[4:]  # zero, a negative zero, the fp16 maximum, a subnormal
    bits = table_bits(table, dtype)
    assert bits[0] == 0 and bits[1] == 0x8000
    asm = decode_asm(table, dtype, quarter)
    for _ in range(3000):
        a, b = rnd.getrandbits(32), rnd.getrandbits(32)
        regs = run_ptx(asm, {"$2": a, "$3": b})
        got = [regs["$0"] & 0xFFFF, regs["$0"] >> 16, regs["$1"] & 0xFFFF, regs["$1"] >> 16]
        field = ((a if quarter < 2 else b) >> (16 * (quarter % 2))) & 0xFFFF
        assert got == [bits[(field >> (4 * i)) & 15] for i in range(4)], (hex(a), hex(b))
    with pytest.raises(ValueError, match="quarter must be 0, 1, 2 or 3, got 4"):
        decode_asm(table, dtype, 4)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("block_n,warps,block_b", [(16, 4, 16), (64, 4, 64), (128, 4, 16), (128, 8, 64)])
def test_register_decode_compiles_into_the_operand_layout(dtype: str, block_n: int, warps: int, block_b: int) -> None:
    """Compiled for Hopper (no GPU needed: Triton's own ``ptxas``), every quarter's decode stays in the tensor cores'
    operand layout, whose register groups the layout's word order assumes (``op.operand_layout_ok``; a launch that
    fails it falls back to the codebook load), and the row tiles of 64+ become ``wgmma``."""
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from dc_lightning.kernels.tc.jit import tc_matmul_kernel
    from dc_lightning.kernels.tc.op import operand_layout_ok

    table = tuple(float(v) for v in torch.linspace(-0.1, 0.1, 15)) + (0.0,)
    tdt = torch.float16 if dtype == "fp16" else torch.bfloat16
    sig = {"x_ptr": f"*{dtype}", "codes_ptr": "*i16", "codebook_ptr": "*fp32", "bias_ptr": "*fp32",
           "y_ptr": f"*{dtype}", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "B": "i32", "N": "i32", "K": "i32",
           "n_rows": "i32", "k_tiles": "i32", "tiles_per_split": "i32", "n_split": "i32"}  # fmt: skip
    consts = {"BLOCK_N": block_n, "BLOCK_B": block_b, "DECODE": 0, "HAS_BIAS": True, "RELU": False,
              "EVEN_N": block_n != 128, "EVEN_K": block_b == 16,
              **{f"ASM{q}": decode_asm(table, tdt, q) for q in range(4)}}  # fmt: skip
    sig.update({k: "constexpr" for k in consts})
    src = triton.compiler.ASTSource(fn=tc_matmul_kernel, signature=sig, constexprs=consts)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 3})
    assert operand_layout_ok(kernel)
    assert ("wgmma.mma_async" in kernel.asm["ptx"]) == (block_n >= 64)
    lines = [ln for ln in kernel.asm["ttgir"].splitlines() if "elementwise_inline_asm" in ln]
    bad = type("K", (), {"asm": {"ttgir": "\n".join(ln.replace("#ttg.dot_op", "#blocked") for ln in lines)}})()
    assert not operand_layout_ok(bad)


def test_layout_and_decode_agree_in_fragment_order() -> None:
    """End to end on the CPU: for every group of the tensor cores' fragment, ``(r, k), (r, k+1), (r+8, k),
    (r+8, k+1)``, the two registers a thread holds (its words, paired as Triton packs 16-bit elements) decoded by
    each quarter's PTX on the emulator give that quarter's four weights of the packed layer, bit for bit."""
    rows, cols, codes, codebook, dense = _layer(20, 300, 0.6, 15, seed=5)
    p = pack_tc(20, 300, rows, cols, codes, codebook)
    dt = torch.float16
    w16 = torch.zeros(p.rows_padded, p.k_tiles * 256)
    w16[:20, :300] = dense
    bits = w16.to(dt).view(torch.int16).to(torch.int32) & 0xFFFF
    words = p.codes.to(torch.int32) & 0xFFFF
    asms = [decode_asm(p.table, dt, q) for q in range(4)]
    for g in range(p.rows_padded // 16):
        for rho in range(8):
            r = 16 * g + rho
            for c in range(0, p.codes.shape[1], 2):
                t, k = divmod(c, 64)
                regs = {"$2": int(words[r, c]) | int(words[r, c + 1]) << 16,
                        "$3": int(words[r + 8, c]) | int(words[r + 8, c + 1]) << 16}  # fmt: skip
                for q in range(4):
                    out = run_ptx(asms[q], regs)
                    got = [out["$0"] & 0xFFFF, out["$0"] >> 16, out["$1"] & 0xFFFF, out["$1"] >> 16]
                    col = t * 256 + 64 * q + k
                    want = [int(bits[r, col]), int(bits[r, col + 1]), int(bits[r + 8, col]), int(bits[r + 8, col + 1])]
                    assert got == want, (r, c, q)


def test_table_bits_rejects_fp32() -> None:
    with pytest.raises(ValueError, match="makes float16 or bfloat16 operands, got torch.float32"):
        table_bits((0.0,) * 16, torch.float32)


# --------------------------------------------------------------------------------------------------------------
# The kernel under the Triton interpreter (a child process: TRITON_INTERPRET must precede the first triton import)
# --------------------------------------------------------------------------------------------------------------

CASES = [
    {"id": "b1", "n": 21, "k": 70, "d": 0.4, "ncb": 15, "batch": 1, "bias": True, "relu": True},
    {"id": "b17_split3_repeat", "n": 45, "k": 600, "d": 0.3, "ncb": 7, "batch": 17, "repeat": 3,
     "config": {"split": 3, "block_n": 32}},
    {"id": "b33_bn16", "n": 40, "k": 129, "d": 1.0, "ncb": 16, "batch": 33, "bias": True, "config": {"block_n": 16}},
    {"id": "b64_uneven_rows", "n": 70, "k": 256, "d": 0.1, "ncb": 15, "batch": 64, "relu": True,
     "config": {"block_n": 64, "split": 2}},
    {"id": "op_b3", "n": 19, "k": 300, "d": 0.5, "ncb": 4, "batch": 3, "bias": True, "via": "op"},
    {"id": "module_tc_b5", "n": 30, "k": 200, "d": 0.6, "ncb": 15, "batch": 5, "bias": True, "via": "module"},
]  # fmt: skip


def _run_interpreter_cases(out_path: str) -> None:
    """Child-process entry point: TRITON_INTERPRET=1 is already in the environment."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from dc_lightning.inference.linear import CompressedLinear
    from dc_lightning.kernels.tc import op as T

    results = {}
    for case in CASES:
        rows, cols, codes, codebook, dense = _layer(case["n"], case["k"], case["d"], case["ncb"], seed=len(case["id"]))
        g = torch.Generator().manual_seed(7)
        x = torch.relu(torch.randn(case["batch"], case["k"], generator=g))
        bias = torch.randn(case["n"], generator=g) if case.get("bias") else None
        relu = bool(case.get("relu"))
        ref = x.double() @ dense.double().T + (bias.double() if bias is not None else 0.0)
        ref = ref.relu() if relu else ref
        p = pack_tc(case["n"], case["k"], rows, cols, codes, codebook)
        errs, path = [], "tc"
        for _ in range(case.get("repeat", 1)):  # repeated calls: the split-K workspace must be zero again
            if case.get("via") == "op":
                y = T.tc_linear(x, p, bias, relu)
            elif case.get("via") == "module":
                lin = nn.Linear(case["k"], case["n"], bias=bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(dense)
                    if bias is not None:
                        lin.bias.copy_(bias)
                layer = CompressedLinear.from_linear(lin, relu=relu)
                y, path = layer(x), layer.layout_for(x.shape[0])
            else:
                y = T.tc_linear_triton(x, p, bias, relu, config=case.get("config"))
            errs.append(rel_err(y, ref))
        results[case["id"]] = {"err": max(errs), "shape": list(y.shape), "path": path,
                               "decode": T.choose_tc_config(case["batch"], p, x.dtype)["decode"]}  # fmt: skip
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory) -> dict:
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    return run_interpreter_child(HERE, tmp_path_factory.mktemp("tc_interp") / "results.json")


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_triton_interpreter_matches_float64(case: dict, interpreter_results: dict) -> None:
    res = interpreter_results[case["id"]]
    assert res["shape"] == [case["batch"], case["n"]]
    assert res["err"] <= 1e-5, f"{case['id']}: relative error {res['err']:.3e}"
    assert res["path"] == "tc" and res["decode"] == 1  # the interpreter runs the codebook-load decode


# --------------------------------------------------------------------------------------------------------------
# The layout choice and the memory of one-encoding layers (issue 23's bounds)
# --------------------------------------------------------------------------------------------------------------


def _quantized_linear(n: int, k: int, density: float, n_cb: int, seed: int = 0) -> nn.Linear:
    rows, cols, codes, codebook, dense = _layer(n, k, density, n_cb, seed)
    lin = nn.Linear(k, n)
    assign = torch.zeros(n, k, dtype=torch.uint8)
    assign[rows, cols] = codes.to(torch.uint8)
    mask = dense != 0 if density < 1.0 else torch.ones(n, k, dtype=torch.bool)
    mask[rows, cols] = True
    lin.register_buffer("weight_mask", mask)
    lin.register_buffer("weight_codebook", codebook)
    lin.register_buffer("weight_assign", assign)
    with torch.no_grad():
        lin.weight.copy_(dense)
    return lin


def _held_bytes(layer: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for n, t in layer.named_buffers() if n != "bias")


@pytest.mark.parametrize("density,n_cb,layout,bound", [
    (1.0, 16, "tc", ("per_weight", 0.6)), (0.5, 15, "tc", ("per_weight", 0.6)), (0.7, 8, "tc", ("per_weight", 0.6)),
    (0.1, 16, "sparse", ("per_nnz", 2.6)), (0.04, 16, "sparse", ("per_nnz", 2.6)),
    (0.04, 15, "sparse", ("per_nnz", 2.6)),
])  # fmt: skip
def test_one_encoding_per_layer_within_the_memory_bounds(density, n_cb, layout, bound) -> None:
    """A converted 1024x2048 4-bit layer holds one encoding: <= 0.6 B per weight at density >= 0.5 (4-bit codes with
    the zero code), <= 2.6 B per non-zero at density <= 0.1; ``alternate=True`` adds the other one."""
    from dc_lightning.inference.linear import CompressedLinear

    lin = _quantized_linear(1024, 2048, density, n_cb)
    layer = CompressedLinear.from_linear(lin)
    assert layer.layout_names == (layout,)
    nbytes, nnz = _held_bytes(layer), layer.nnz
    kind, limit = bound
    per = nbytes / (1024 * 2048) if kind == "per_weight" else nbytes / nnz
    assert per <= limit, f"{per:.3f} B {kind} > {limit}"
    both = CompressedLinear.from_linear(lin, alternate=True)
    if layout == "sparse":
        assert both.layout_names == ("sparse", "tc" if n_cb <= 15 else "lut")
        assert _held_bytes(both) > nbytes
    x = torch.randn(3, 2048)
    assert torch.equal(layer(x), both(x)) or rel_err(layer(x), both(x).double()) <= 1e-6


def test_default_4bit_quantization_of_a_pruned_layer_meets_the_bound() -> None:
    """The library's own path, as a user takes it: prune a 1024x2048 layer to 50 %, ``quantize_model(bits=4)`` with
    its defaults (the zero code reserved at 4 bits), convert: ``tc``, <= 0.6 bytes per weight, exact."""
    from dc_lightning.inference.linear import CompressedLinear
    from dc_lightning.pruning.masks import prune_model
    from dc_lightning.quantization.codebooks import quantize_model

    torch.manual_seed(0)
    lin = nn.Linear(2048, 1024)
    prune_model(nn.Sequential(lin), densities=0.5)
    quantize_model(nn.Sequential(lin), bits=4, max_iter=5)
    layer = CompressedLinear.from_linear(lin)
    assert layer.layout_names == ("tc",)
    assert _held_bytes(layer) / (1024 * 2048) <= 0.6
    x = torch.randn(2, 2048)
    assert rel_err(layer(x), (x.double() @ lin.weight.double().T + lin.bias.double())) <= 1e-6


def test_choose_layout_prefers_tc_for_16_entry_tables() -> None:
    assert layouts.dense_layout(15, dense=False) is layouts.Layout.TC
    assert layouts.dense_layout(16, dense=False) is layouts.Layout.LUT  # needs 17 entries: the lut layout's bitmap
    assert layouts.dense_layout(16, dense=True) is layouts.Layout.TC
    assert layouts.dense_layout(32, dense=True) is layouts.Layout.LUT
    got, why = layouts.choose_layout(1024, 2048, 1024 * 1024, 15)
    assert got is layouts.Layout.TC and "4-bit codes (16-entry table), 0.50 B/position" in why
    assert bytes_per_position(1000, 600) == pytest.approx(1008 * 768 / 2 / 600000)


if __name__ == "__main__":
    _run_interpreter_cases(sys.argv[1])


def test_to_compressed_inference_alternate_keeps_a_second_encoding() -> None:
    """``to_compressed_inference(alternate=True)`` gives a sparse layer its ``tc`` codes for large batches (the
    user's choice, at its memory cost); the default holds one encoding per matrix, and both compute the same."""
    from dc_lightning.inference.conversion import to_compressed_inference
    from dc_lightning.inference.memory import compressed_memory

    net = nn.Sequential(_quantized_linear(64, 256, 0.05, 15, seed=1), nn.ReLU(), _quantized_linear(32, 64, 0.7, 8))
    lean = to_compressed_inference(net)
    both = to_compressed_inference(net, alternate=True)
    assert lean[0].layout_names == ("sparse",) and both[0].layout_names == ("sparse", "tc")
    assert lean[2].layout_names == both[2].layout_names == ("tc",)  # above 60 %: no sparse copy either way
    assert compressed_memory(both)["bytes"] > compressed_memory(lean)["bytes"]
    x = torch.randn(9, 256)
    for b in (1, 9):
        assert rel_err(both(x[:b]), lean(x[:b]).double()) <= 1e-6


def test_alternate_must_be_a_bool() -> None:
    from dc_lightning.inference.conversion import to_compressed_inference
    from dc_lightning.inference.linear import CompressedLinear

    lin = _quantized_linear(8, 32, 0.5, 4)
    with pytest.raises(TypeError, match="to_compressed_inference: alternate must be True or False, got 'yes'"):
        to_compressed_inference(nn.Sequential(lin), alternate="yes")
    with pytest.raises(TypeError, match="from_linear: alternate must be True, False or None, got 1"):
        CompressedLinear.from_linear(lin, alternate=1)
