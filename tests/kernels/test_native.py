"""The native CPU decode (``kernels/native.py`` + ``kernels/cpu_decode.c``): bit for bit against the PyTorch lookups
(``tc`` and ``lut`` codes, ``ell`` embedding rows) on every path (AVX-512, AVX2 and scalar builds where the CPU
allows), products and gradients against float64, bounds and errors, the cache, and the fallback when no compiler is
found or the decode is turned off."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
from dc_lightning.kernels import native
from dc_lightning.kernels.tc.layout import _bytes_in_row_order, decode_dense_tc, pack_tc, tc_linear_reference

needs_native = pytest.mark.skipif(native._compiler() is None, reason="no C compiler: the native decode cannot build")


def _lookup(src: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return table[torch.stack([src & 15, src >> 4], -1).reshape(*src.shape[:-1], -1).long()]


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A fresh library state in a cache folder of its own; restored afterwards."""
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(native.ENV, "1")
    native._reset()
    yield tmp_path
    native._reset()


@needs_native
@pytest.mark.parametrize("n", [0, 1, 7, 8, 15, 16, 17, 33, 1000])
def test_decode_bytes_bit_exact(n: int) -> None:
    assert native.available(), native.status()
    g = torch.Generator().manual_seed(n)
    src = torch.randint(0, 256, (3, n), dtype=torch.uint8, generator=g)
    table = torch.randn(16, generator=g)
    assert torch.equal(native.decode(src, table), _lookup(src, table))


@needs_native
def test_decode_segments_with_strides_and_bounds() -> None:
    src = torch.randint(0, 256, (500,), dtype=torch.uint8)
    table = torch.randn(16)
    out = torch.full((2 * 4 * 37,), float("nan"))
    native.decode_segments(src, 11, 4, 37, 100, table, out)
    expected = torch.cat([_lookup(src[11 + 100 * s : 11 + 100 * s + 37], table) for s in range(4)])
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match=r"runs of 37 bytes at 200 \+ s \* 100 for s < 4 end past src's 500 bytes"):
        native.decode_segments(src, 200, 4, 37, 100, table, out)
    with pytest.raises(ValueError, match=r"out holds 296 floats, the runs decode to 370"):
        native.decode_segments(src, 0, 5, 37, 37, table, out)
    with pytest.raises(ValueError, match=r"table must be a contiguous float32 CPU tensor of 16 values, got .*\(15,\)"):
        native.decode_segments(src, 0, 1, 4, 4, table[:15], out)
    with pytest.raises(ValueError, match=r"src must be a contiguous uint8 CPU tensor, got torch.int32"):
        native.decode(src.int(), table)


@needs_native
@pytest.mark.parametrize("n,k", [(1, 1), (17, 300), (40, 512), (64, 1000)])
def test_tc_rows_bit_exact(n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n + k)
    mask = torch.rand(n, k, generator=g) < 0.5
    rows, cols = mask.nonzero(as_tuple=True)
    p = pack_tc(n, k, rows, cols, torch.randint(0, 15, (rows.numel(),), generator=g), torch.randn(15, generator=g))
    expected = _lookup(_bytes_in_row_order(p.codes), p.codebook)
    assert torch.equal(native.decode_tc_rows(p.codes, 0, p.rows_padded, p.codebook), expected)
    r0 = min(5, p.rows_padded - 1)
    assert torch.equal(native.decode_tc_rows(p.codes, r0, p.rows_padded - r0, p.codebook), expected[r0:])
    with pytest.raises(ValueError, match=rf"rows \[{r0}, {p.rows_padded + r0}\) are outside the layer's"):
        native.decode_tc_rows(p.codes, r0, p.rows_padded, p.codebook)
    with pytest.raises(ValueError, match=r"codes must be a contiguous int16 \[rows_padded, k_tiles\*64\] CPU tensor"):
        native.decode_tc_rows(p.codes.int(), 0, 1, p.codebook)


@needs_native
@pytest.mark.parametrize("march", ["x86-64-v4", "x86-64-v3", "x86-64"])
def test_every_vector_path_matches(march: str, fresh, monkeypatch) -> None:
    """The same source built for AVX-512, AVX2 and no vector extension (where this CPU runs them): each passes the
    load-time check (every byte value and a tail; a tc block in row order) and decodes a layer bit for bit."""
    cc = native._compiler()
    probe = subprocess.run([*cc, f"-march={march}", "-E", "-x", "c", os.devnull], capture_output=True)
    flags = subprocess.run([*cc, "-march=native", "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{cc[0]} does not know -march={march}")
    if (
        march == "x86-64-v4"
        and "__AVX512F__" not in flags.stdout
        or march == "x86-64-v3"
        and "__AVX2__" not in flags.stdout
    ):
        pytest.skip(f"this CPU cannot run -march={march}")
    monkeypatch.setattr(native, "_FLAGS", (["-O3", f"-march={march}"],))
    assert native.available(), native.status()
    assert native.status().startswith({"x86-64-v4": "AVX-512", "x86-64-v3": "AVX2", "x86-64": "scalar"}[march])
    g = torch.Generator().manual_seed(3)
    rows, cols = (torch.rand(50, 700, generator=g) < 0.4).nonzero(as_tuple=True)
    p = pack_tc(50, 700, rows, cols, torch.randint(0, 15, (rows.numel(),), generator=g), torch.randn(15, generator=g))
    assert torch.equal(
        native.decode_tc_rows(p.codes, 0, 64, p.codebook), _lookup(_bytes_in_row_order(p.codes), p.codebook)
    )


@needs_native
def test_cache_reuse_and_a_broken_cached_file(fresh, monkeypatch) -> None:
    assert native.available()
    (lib,) = list(fresh.glob("cpu_decode-*.so"))
    stamp = lib.stat().st_mtime_ns
    native._reset()
    assert native.available() and lib.stat().st_mtime_ns == stamp  # loaded from the cache, not built again
    # a truncated or foreign file under the name a build would take (another folder: a loaded library's file is
    # never rewritten in place, builds replace it atomically): built again, then loaded
    other = fresh / "other"
    other.mkdir()
    (other / lib.name).write_bytes(b"not a shared library")
    monkeypatch.setenv(native.CACHE_ENV, str(other))
    native._reset()
    assert native.available(), native.status()
    assert (other / lib.name).stat().st_size > 1000
    assert not list(other.glob(".cpu_decode-*"))  # no temporary file left behind


def test_no_compiler_or_turned_off_falls_back(fresh, monkeypatch) -> None:
    """Without a compiler (or with DC_LIGHTNING_NATIVE=0) the decode is unavailable, says why, and the tc reference
    gives the same results through PyTorch gathers."""
    g = torch.Generator().manual_seed(0)
    rows, cols = (torch.rand(300, 600, generator=g) < 0.5).nonzero(as_tuple=True)
    p = pack_tc(300, 600, rows, cols, torch.randint(0, 15, (rows.numel(),), generator=g), torch.randn(15, generator=g))
    x = torch.randn(3, 600, generator=g)
    dense = decode_dense_tc(p).contiguous()
    ref = x.double() @ dense.double().T
    monkeypatch.setenv("CC", "/nonexistent/cc")
    native._reset()
    assert not native.available()
    assert native.status().startswith("no C compiler found (install cc or set CC)")
    with pytest.raises(RuntimeError, match="native decode unavailable: no C compiler"):
        native.decode(torch.zeros(4, dtype=torch.uint8), torch.zeros(16))
    assert torch.equal(decode_dense_tc(p), dense)
    assert ((tc_linear_reference(x, p).double() - ref).abs().max() / ref.abs().max()) < 1e-6
    monkeypatch.delenv("CC")
    monkeypatch.setenv(native.CACHE_ENV, str(fresh / "off"))
    native._reset()
    monkeypatch.setenv(native.ENV, "0")
    assert not native.available() and native.status() == f"off ({native.ENV}=0)"
    assert torch.equal(decode_dense_tc(p), dense)
    assert not (fresh / "off").exists()  # nothing was built
    if shutil.which("cc") or shutil.which("gcc"):
        monkeypatch.setenv(native.ENV, "1")
        assert native.available()


@pytest.mark.parametrize("native_decode", [True, False], ids=["native", "torch"])
def test_gradients_through_the_blocked_products(native_decode: bool, monkeypatch) -> None:
    """The block buffers are reused only without autograd: the input gradient through a large tc layer (several
    blocks) equals the dense layer's on both paths."""
    from dc_lightning.kernels import runtime
    from dc_lightning.kernels.tc import layout

    monkeypatch.setenv(native.ENV, "1" if native_decode else "0")
    if native_decode and not native.available():
        pytest.skip(f"native decode unavailable: {native.status()}")
    monkeypatch.setattr(runtime, "ROW_BLOCK_BYTES", 64 * 1024)
    monkeypatch.setattr(layout, "BLOCK_BYTES", 64 * 1024)
    g = torch.Generator().manual_seed(1)
    rows, cols = (torch.rand(400, 300, generator=g) < 0.5).nonzero(as_tuple=True)
    p = pack_tc(400, 300, rows, cols, torch.randint(0, 15, (rows.numel(),), generator=g), torch.randn(15, generator=g))
    dense = decode_dense_tc(p).contiguous()
    x = torch.randn(3, 300, generator=g, requires_grad=True)
    tc_linear_reference(x, p).square().sum().backward()
    xd = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(xd, dense).square().sum().backward()
    assert (x.grad - xd.grad).abs().max() <= 1e-5 * xd.grad.abs().max()


def _lut_layer(n: int, k: int, n_cb: int, density: float, bitmap: bool | None, seed: int = 0):
    from dc_lightning.kernels.lut.layout import pack_lut

    g = torch.Generator().manual_seed(seed)
    rows, cols = (torch.rand(n, k, generator=g) < density).nonzero(as_tuple=True)
    codes = torch.randint(0, n_cb, (rows.numel(),), generator=g)
    return pack_lut(n, k, rows, cols, codes, torch.randn(n_cb, generator=g), bitmap=bitmap)


@needs_native
@pytest.mark.parametrize(
    "n,k,n_cb,density,bitmap",
    [(5, 70, 16, 0.5, True), (40, 300, 15, 0.5, None), (33, 1000, 4, 0.6, True), (17, 129, 3, 1.0, None),
     (64, 512, 16, 1.0, None)],
)  # fmt: skip
def test_lut_rows_bit_exact(n: int, k: int, n_cb: int, density: float, bitmap, monkeypatch) -> None:
    """The native lut decode gives the PyTorch decode's values, signed zeros of pruned positions included, for 2- and
    4-bit codes with a bitmap, a zero code or neither."""
    from dc_lightning.kernels.lut.layout import decode_dense_lut

    p = _lut_layer(n, k, n_cb, density, bitmap, seed=n * k)
    assert p.cbits in (2, 4)
    got = decode_dense_lut(p)
    monkeypatch.setenv(native.ENV, "0")
    expected = decode_dense_lut(p)
    assert torch.equal(got, expected) and torch.equal(got.signbit(), expected.signbit())
    monkeypatch.setenv(native.ENV, "1")
    r0 = n // 3
    part = native.decode_lut_rows(
        p.codes, p.mask, r0, n - r0, p.cbits, torch.nn.functional.pad(p.codebook, (0, 16 - p.codebook.numel()))
    )
    assert torch.equal(part[:, :k], expected[r0:])
    with pytest.raises(ValueError, match=r"cbits must be 2 or 4 for the native decode, got 8"):
        native.decode_lut_rows(p.codes, p.mask, 0, 1, 8, torch.zeros(16))


@pytest.mark.parametrize("native_decode", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("n_cb,bitmap", [(16, True), (15, None), (4, True)])
@pytest.mark.parametrize("batch", [1, 16, 65])
def test_lut_reference_product_every_path(batch: int, n_cb: int, bitmap, native_decode: bool, monkeypatch) -> None:
    """A large lut layer's CPU product (native row blocks, or PyTorch word order) matches float64 with bias and ReLU;
    the input gradient matches the dense layer's."""
    from dc_lightning.kernels.lut.layout import BLOCKED_MIN, decode_dense_lut, lut_linear_reference

    monkeypatch.setenv(native.ENV, "1" if native_decode else "0")
    if native_decode and not native.available():
        pytest.skip(f"native decode unavailable: {native.status()}")
    p = _lut_layer(300, 900, n_cb, 0.5, bitmap, seed=batch + n_cb)
    assert 300 * 900 >= BLOCKED_MIN
    dense = decode_dense_lut(p).contiguous()
    g = torch.Generator().manual_seed(batch)
    x, bias = torch.randn(batch, 900, generator=g, requires_grad=True), torch.randn(300, generator=g)
    ref = (x.detach().double() @ dense.double().T + bias.double()).relu()
    y = lut_linear_reference(x, p, bias, relu=True)
    assert (y.detach().double() - ref).abs().max() <= 1e-6 * ref.abs().max()
    y.square().sum().backward()
    xd = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(xd, dense, bias).relu().square().sum().backward()
    assert (x.grad - xd.grad).abs().max() <= 1e-5 * xd.grad.abs().max()


@needs_native
@pytest.mark.parametrize("n,k,dtype", [(50, 200, torch.uint8), (40, 300, torch.int16), (3, 40000, torch.int32)])
def test_ell_rows_match_the_pytorch_lookup(n: int, k: int, dtype: torch.dtype, monkeypatch) -> None:
    """The native embedding-row lookup gives the PyTorch lookup's rows (repeats, an empty row, every entries dtype);
    an index outside the table and a damaged table are refused with their value named."""
    from dc_lightning.kernels.rows.layout import ell_rows, pack_ell

    g = torch.Generator().manual_seed(k)
    mask = torch.rand(n, k, generator=g) < 0.1
    mask[1] = False  # an empty row
    rows, cols = mask.nonzero(as_tuple=True)
    p = pack_ell(n, k, rows, cols, torch.randint(0, 15, (rows.numel(),), generator=g), torch.randn(15, generator=g))
    assert p.entries.dtype == dtype
    idx = torch.tensor([n - 1, 1, 0, n - 1, 2])
    got = ell_rows(p, idx)
    monkeypatch.setenv(native.ENV, "0")
    expected = ell_rows(p, idx)
    assert torch.equal(got, expected) and torch.equal(got[1], torch.zeros(k))
    monkeypatch.setenv(native.ENV, "1")
    with pytest.raises(IndexError, match=rf"index {n} is out of range for a table of {n} rows \(valid: 0..{n - 1}\)"):
        ell_rows(p, torch.tensor([0, n]))
    with pytest.raises(IndexError, match=rf"index -1 is out of range for a table of {n} rows"):
        ell_rows(p, torch.tensor([-1]))
    damaged = p.entries.clone()
    damaged[1, 0, 0] = 16 if dtype == torch.uint8 else 1000  # a code past the 16-value codebook
    with pytest.raises(ValueError, match=r"row 0 of the table holds an entry outside its .* x 16 codebook values"):
        native.ell_rows(damaged, p.codebook, torch.tensor([0]), k)


@needs_native
@pytest.mark.parametrize("n,k,chunk", [(1, 5, None), (37, 300, None), (200, 1000, 128), (64, 5000, None)])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_sparse_product_matches_float64(n: int, k: int, chunk, batch: int, monkeypatch) -> None:
    """The native product from the sparse layout's entries (several tiles and chunks, padded rows) matches float64
    and the PyTorch product; an input that requires a gradient keeps the PyTorch product (and its gradient)."""
    from dc_lightning.kernels.sparse.layout import decode_dense, eie_linear_reference, pack

    g = torch.Generator().manual_seed(n * k + batch)
    rows, cols = (torch.rand(n, k, generator=g) < 0.1).nonzero(as_tuple=True)
    codes = torch.randint(0, 16, (rows.numel(),), generator=g)
    p = pack(n, k, rows, cols, codes, torch.randn(16, generator=g), chunk=chunk)
    dense = decode_dense(p)
    x, bias = torch.randn(batch, k, generator=g), torch.randn(n, generator=g)
    ref = x.double() @ dense.double().T + bias.double()
    y = eie_linear_reference(x, p, bias)
    assert (y.double() - ref).abs().max() <= 1e-5 * max(ref.abs().max(), 1e-30)
    monkeypatch.setenv(native.ENV, "0")
    assert (eie_linear_reference(x, p, bias) - y).abs().max() <= 1e-5 * max(float(ref.abs().max()), 1e-30)
    monkeypatch.setenv(native.ENV, "1")
    xg = x.clone().requires_grad_(True)
    eie_linear_reference(xg, p).sum().backward()
    assert torch.allclose(xg.grad, dense.sum(0).expand(batch, -1), rtol=1e-5, atol=1e-5)
    if p.entries.numel():
        damaged = p.entries.clone()
        # a code past the codebook
        damaged[0] = (damaged[0] >> p.code_shift << p.code_shift) | ((1 << p.code_shift) - 1)
        with pytest.raises(ValueError, match=r"entry 0 of the sparse layer points outside its"):
            native.sparse_product(x, damaged, p.block_ptr, (p.block_ptr.numel() - 1) // -(-n // p.row_tile),
                                  p.row_tile, p.chunk, p.code_shift, p.codebook, n)  # fmt: skip


@needs_native
def test_status_follows_the_switch(fresh, monkeypatch) -> None:
    """Turning the decode off and on again in one process: ``status`` says which holds now."""
    assert native.available()
    monkeypatch.setenv(native.ENV, "0")
    assert not native.available() and native.status() == f"off ({native.ENV}=0)"
    monkeypatch.setenv(native.ENV, "1")
    assert native.available() and "build" in native.status()
    for word in ("false", "No", "off"):
        monkeypatch.setenv(native.ENV, word)
        assert not native.available()
