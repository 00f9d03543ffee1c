"""The EIE kernels at real sizes on CUDA (skipped without CUDA; run on the H200 with ``pytest tests/gpu``; the CPU
suite runs the tiny interpreter cases of ``tests/kernels``).

Each check against a float64 reference of the decoded dense layer, relative error ||y - ref|| / ||ref||:

* EIE's nine layers [EIE Table III] at batch 1, 4, 16, 64 with bias + ReLU: fp32 <= 1e-5, fp16 <= 2e-3, bf16 <= 1e-2
  (inputs rounded to the dtype first, so the tolerance covers the output rounding only);
* every output written: the caching allocator's free blocks are filled with NaN before each call;
* odd sizes (4097 x 25089, 1 x 1, 8791 x 3), nnz = 0, an 8-bit codebook (int32 entries), a 1-bit codebook, three
  packings each; the zero-chunk skip; every config branch of ``choose_config`` with forced variants;
* after load-time autotuning the op looks the tuned configuration up and stays exact;
* ``to_compressed_inference`` of a VGG-16-sized classifier vs its dense decode, ``torch.compile(fullgraph=True)`` of
  it, and CUDA-graph capture + replay with new inputs (fp32, fp16) (the ``module`` tests).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from dc_lightning.inference.conversion import to_compressed_inference
from dc_lightning.inference.linear import CompressedLinear
from dc_lightning.kernels.sparse import layout as L
from dc_lightning.kernels.sparse import op as E

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: needs a CUDA device")

# [EIE Table III]: name, in, out, weight density, activation density
EIE_LAYERS = [
    ("Alex-6", 9216, 4096, 0.09, 0.351),
    ("Alex-7", 4096, 4096, 0.09, 0.353),
    ("Alex-8", 4096, 1000, 0.25, 0.375),
    ("VGG-6", 25088, 4096, 0.04, 0.183),
    ("VGG-7", 4096, 4096, 0.04, 0.375),
    ("VGG-8", 4096, 1000, 0.23, 0.411),
    ("NT-We", 4096, 600, 0.10, 1.0),
    ("NT-Wd", 600, 8791, 0.11, 1.0),
    ("NT-LSTM", 1201, 2400, 0.10, 1.0),
]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def random_layer(n_in: int, n_out: int, density: float, bits: int = 4, seed: int = 0):
    """Random pruned, ``bits``-bit weight-shared layer on CUDA: ``(rows, cols, codes, codebook, bias)``."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    mask = torch.rand(n_out, n_in, generator=g, device="cuda") < density
    rows, cols = mask.nonzero(as_tuple=True)
    codes = torch.randint(0, 2**bits, (rows.numel(),), generator=g, device="cuda")
    codebook = torch.randn(2**bits, generator=g, device="cuda") * 0.05
    bias = torch.randn(n_out, generator=g, device="cuda") * 0.01
    return rows, cols, codes, codebook, bias


def random_activations(batch: int, n: int, density: float, seed: int = 1) -> torch.Tensor:
    """ReLU-like input ``[batch, n]`` on CUDA: ``density`` of the values non-zero (positive)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(batch, n, generator=g, device="cuda").abs()
    return torch.where(torch.rand(batch, n, generator=g, device="cuda") < density, x, torch.zeros((), device="cuda"))


def poison_allocator() -> None:
    """Fill cached free memory with NaN so an unwritten output element shows up as NaN."""
    free = torch.empty(64 * 2**20, device="cuda").fill_(float("nan"))
    del free


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("nan")
    d = (y.double() - ref).norm().item()
    s = ref.norm().item()
    return d / s if s > 0 else (0.0 if d == 0 else float("inf"))


def ref_linear(x, rows, cols, codes, codebook, bias, n_out, n_in, relu):
    w = torch.zeros(n_out, n_in, dtype=torch.float64, device=x.device)
    w[rows, cols] = codebook.double()[codes]
    y = x.double() @ w.T
    if bias is not None:
        y = y + bias.double()
    return torch.relu(y) if relu else y


def run_op(p, x, bias, relu, config=None):
    if config is None:
        return E.eie_linear(x, p, bias, relu)
    return E.eie_linear_triton(x, p, bias, relu, config=config)


def check(err: float, tol: float, record) -> None:
    record("rel_err", err)
    assert err == err and err <= tol, f"rel err {err:.2e} > tol {tol:.0e}"  # NaN fails


@functools.lru_cache(maxsize=1)
def eie_layer(li: int):
    """Layer ``li`` of EIE_LAYERS (seed ``li``) and its packing, kept while its tests run."""
    name, n_in, n_out, wd, ad = EIE_LAYERS[li]
    layer = random_layer(n_in, n_out, wd, seed=li)
    return layer, L.pack(n_out, n_in, *layer[:4], device="cuda")


# ------------------------------------------------------------------------------------------------ EIE's nine layers


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("batch", (1, 4, 16, 64))
@pytest.mark.parametrize("li", range(len(EIE_LAYERS)), ids=[n for n, *_ in EIE_LAYERS])
def test_layer(li: int, batch: int, dtype: torch.dtype, record_property) -> None:
    name, n_in, n_out, wd, ad = EIE_LAYERS[li]
    (rows, cols, codes, codebook, bias), p = eie_layer(li)
    x = random_activations(batch, n_in, ad, seed=10 + batch).to(dtype)
    ref = ref_linear(x, rows, cols, codes, codebook, bias, n_out, n_in, True)
    poison_allocator()
    y = run_op(p, x, bias, True)
    torch.cuda.synchronize()
    assert y.dtype == dtype and y.shape == (batch, n_out)
    check(rel(y, ref), TOL[dtype], record_property)


# -------------------------------------------------------------------------------------------------------- odd shapes

ODD = [
    ("4097x25089 d=4%", 4097, 25089, 0.04, 4, 3),
    ("1x1 d=100%", 1, 1, 1.0, 1, 2),
    ("8791x3 d=50%", 8791, 3, 0.5, 2, 5),
    ("nnz=0 300x500", 300, 500, 0.0, 4, 4),
    ("8-bit codebook 1000x4096 (int32 entries)", 1000, 4096, 0.1, 8, 7),
    ("1-bit codebook 513x1025 B=64", 513, 1025, 0.3, 1, 64),
]


@pytest.mark.parametrize(("row_tile", "chunk"), [(32, None), (16, 2048), (64, 256)])
@pytest.mark.parametrize("case", ODD, ids=[c[0] for c in ODD])
def test_odd_sizes(case: tuple, row_tile: int, chunk: int | None, record_property) -> None:
    _, n_out, n_in, d, bits, batch = case
    rows, cols, codes, codebook, bias = random_layer(n_in, n_out, d, bits=bits, seed=5)
    p = L.pack(n_out, n_in, rows, cols, codes, codebook, row_tile=row_tile, chunk=chunk, device="cuda")
    record_property("packing", f"rt={row_tile} chunk={p.chunk} {p.entries.dtype}")
    x = random_activations(batch, n_in, 0.4, seed=9)
    poison_allocator()
    y = run_op(p, x, bias, False)
    check(rel(y, ref_linear(x, rows, cols, codes, codebook, bias, n_out, n_in, False)), 1e-5, record_property)


@functools.lru_cache(maxsize=1)
def vgg6():
    """A VGG-6-sized layer (25088 -> 4096, 4 %) and its packing."""
    layer = random_layer(25088, 4096, 0.04, seed=3)
    return layer, L.pack(4096, 25088, *layer[:4], device="cuda")


@pytest.mark.parametrize("batch", (1, 16))
def test_zero_chunk_skip(batch: int, record_property) -> None:
    (rows, cols, codes, codebook, bias), p = vgg6()
    x = random_activations(batch, 25088, 0.3, seed=4)
    x[:, (torch.arange(25088, device="cuda") // p.chunk) % 2 == 0] = 0.0  # every other chunk all zero
    y = run_op(p, x, bias, True, config={"skip_zero_chunks": True})
    check(rel(y, ref_linear(x, rows, cols, codes, codebook, bias, 4096, 25088, True)), 1e-5, record_property)


CONFIGS = [
    {"chunks_per_prog": 1},
    {"chunks_per_prog": 1000},
    {"transpose_x": False},
    {"num_warps": 8},
    {"kernel": "split"},
    {"kernel": "flat", "split": 1},
    {"kernel": "flat", "split": 3},
    {"kernel": "flat", "split": 16, "block_k": 16},
]


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c) for c in CONFIGS])
@pytest.mark.parametrize("batch", (1, 4, 16, 64))
def test_config_branches(batch: int, config: dict, record_property) -> None:
    """Every config branch of choose_config at a large layer, with forced variants."""
    (rows, cols, codes, codebook, bias), p = vgg6()
    x = random_activations(batch, 25088, 0.18, seed=6)
    ref = ref_linear(x, rows, cols, codes, codebook, bias, 4096, 25088, False)
    check(rel(run_op(p, x, bias, False, config=config), ref), 1e-5, record_property)


# ---------------------------------------------------------------------------------------------------------- autotuned

TUNED_LAYERS = [li for li, (name, *_) in enumerate(EIE_LAYERS) if name in ("VGG-6", "Alex-8", "NT-LSTM")]


@functools.lru_cache(maxsize=1)
def tuned_layer(li: int):
    (rows, cols, codes, codebook, bias), p = eie_layer(li)
    return E.autotune(p, (1, 16), torch.float32, bias=bias, relu=True)


@pytest.mark.parametrize("batch", (1, 16))
@pytest.mark.parametrize("li", TUNED_LAYERS, ids=[EIE_LAYERS[li][0] for li in TUNED_LAYERS])
def test_autotuned(li: int, batch: int, record_property) -> None:
    """After load-time autotuning the op looks the tuned configuration up: results must stay exact."""
    name, n_in, n_out, wd, ad = EIE_LAYERS[li]
    tuned = tuned_layer(li)
    (rows, cols, codes, codebook, bias), p = eie_layer(li)
    record_property("config", str(tuned.get(batch)))
    x = random_activations(batch, n_in, ad, seed=40 + batch)
    poison_allocator()
    y = run_op(p, x, bias, True)
    check(rel(y, ref_linear(x, rows, cols, codes, codebook, bias, n_out, n_in, True)), 1e-5, record_property)


# ------------------------------------------------------------------------------------------------ modules (-k module)


def _quantized_linear(n_in, n_out, density, seed, bits=4):
    rows, cols, codes, codebook, bias = random_layer(n_in, n_out, density, bits=bits, seed=seed)
    lin = nn.Linear(n_in, n_out).cuda()
    mask = torch.zeros(n_out, n_in, dtype=torch.bool, device="cuda")
    mask[rows, cols] = True
    assign = torch.zeros(n_out, n_in, dtype=torch.uint8, device="cuda")
    assign[rows, cols] = codes.to(torch.uint8)
    lin.register_buffer("weight_mask", mask)
    lin.register_buffer("weight_codebook", codebook)
    lin.register_buffer("weight_assign", assign)
    with torch.no_grad():
        lin.weight.copy_(torch.where(mask, codebook[assign.long()], torch.zeros((), device="cuda")))
        lin.bias.copy_(bias)
    return lin


@pytest.fixture(scope="module")
def vgg_classifier() -> tuple[nn.Module, nn.Module]:
    """A VGG-16-sized classifier (25088 -> 4096 -> 4096 -> 1000 at 4/4/23 %, 4 bits) and its conversion."""
    dense = nn.Sequential(
        nn.Flatten(),
        _quantized_linear(25088, 4096, 0.04, 1),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        _quantized_linear(4096, 4096, 0.04, 2),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        _quantized_linear(4096, 1000, 0.23, 3),
    ).eval()
    return dense, to_compressed_inference(dense, device="cuda")


def _classifier_input(batch: int, seed: int) -> torch.Tensor:
    return random_activations(batch, 25088, 0.2, seed=seed).view(batch, 512, 7, 7)


@pytest.mark.parametrize("batch", (1, 16))
def test_module_to_compressed_inference(vgg_classifier, batch: int, record_property) -> None:
    dense, fast = vgg_classifier
    assert sum(isinstance(m, CompressedLinear) for m in fast.modules()) == 3
    x = _classifier_input(batch, seed=batch)
    with torch.no_grad():
        ref = copy.deepcopy(dense).double()(x.double())
        check(rel(fast(x), ref), 1e-5, record_property)


@pytest.fixture(scope="module")
def compiled_classifier(vgg_classifier) -> nn.Module:
    return torch.compile(vgg_classifier[1], fullgraph=True)


@pytest.mark.parametrize("batch", (1, 8))
def test_module_compile_fullgraph(vgg_classifier, compiled_classifier, batch: int, record_property) -> None:
    """torch.compile (inductor, fullgraph) over the custom op."""
    _, fast = vgg_classifier
    compiled = compiled_classifier
    x = _classifier_input(batch, seed=20 + batch)
    with torch.no_grad():
        check(rel(compiled(x), fast(x).double()), 1e-6, record_property)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=lambda d: str(d)[6:])
def test_module_cuda_graph_replay(vgg_classifier, dtype: torch.dtype, record_property) -> None:
    """CUDA-graph capture, then replays with fresh inputs copied into the static input."""
    _, model = vgg_classifier
    static_x = _classifier_input(4, seed=30).to(dtype)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(2):
            model(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g), torch.no_grad():
        static_y = model(static_x)
    # not bit for bit: the flat kernel's split-K atomics add fp32 partials in arrival order
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    for seed in (31, 32):
        static_x.copy_(_classifier_input(4, seed=seed).to(dtype))
        g.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            eager = model(static_x)
        check(rel(static_y, eager.double()), tol, record_property)
