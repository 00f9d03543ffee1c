"""CPU time of every converted weight kind against the dense torch module it replaces.

On the CPU the converted modules run the layouts' pure-PyTorch references: a sparse ``CompressedLinear`` /
``CompressedConv1D`` multiplies small batches straight from its entries (``F.embedding_bag`` over the ELL entries,
``kernels/sparse/layout.sparse_product``) and decodes its matrix once per call for larger ones (then ``F.linear``);
``CompressedLSTM`` / ``CompressedGRU`` step a call of at most ``recurrent.STEP_MAX`` timesteps through those products
and decode every matrix once for longer ones (then ``torch._VF.lstm``...); ``CompressedMultiheadAttention`` decodes
(then SDPA); ``CompressedEmbedding`` decodes only the rows it is asked for. A LUT matrix of 2- or 4-bit codes with at
least ``lut.layout.WORD_ORDER_MIN`` positions decodes in word order (one gather per code byte, ``x`` permuted to
match, no transpose) instead of column order. The ``path`` column says which ran.
Providers, side by side in one process, same weights (pruned to ``--density``, quantized to ``--bits``) and inputs:

* ``dense``: the torch module with the masked, quantized weights (the reference).
* ``converted``: ``dc_lightning.to_compressed_inference`` of it.
* ``decode``: decoding every compressed matrix of the converted module once (the layout the call's batch runs on) per
  call (for an embedding: its lookup, which is all it does), what a decode-once path pays on top of ``dense``;
  ``floor`` = (dense + decode) / dense is the least converted/dense ratio a decode-once path can reach (the rows
  whose ``path`` is ``entries`` or ``steps`` do not decode, and go below it).
* ``decode_lut``: the same from the LUT copy of each matrix (``layouts.decode_dense(lut_packed())``), for comparison.
* ``kernel_path`` (with ``--kernel-path``): the per-step path CUDA takes, on the CPU reference of the compressed
  kernels (what the CPU ran before issue 22); one repeat, it is slow.

Cases: ``nn.Linear`` 1024 x 1024 at density 0.1 and 0.5, batch 1, 16 and 64 (quantized with ``quantize_model``'s
default ``zero_code``: at 4 bits 15 centroids + the zero, so the d0.5 layer takes the ``tc`` layout; ``d0.5 16c``:
the same with ``zero_code=False``, 16 centroids, the ``lut`` layout with its bitmap); a GPT-2 MLP ``Conv1D`` (768 -> 3072,
transformers' class) at batch 1 and 64 (skipped without transformers); ``nn.Embedding`` 50257 x 256 looking up 64
tokens; EIE's NT-LSTM shape (2 layers, input 600, hidden 600) over a sequence of 64 at batch 1 and 16, the same
stepping one token at a time for 64 steps (sampling: one call per token, the state carried), the GRU alike, and
``nn.MultiheadAttention`` (embed 384, 6 heads) self-attention over 128 positions at batch 1 and 16, and the report of
issue 22: ``models.lm.sample`` of 64 tokens from the ``lstm_lm`` recipe's network (Embedding, LSTM 600, Linear; the
whole context re-run per token) after a 16-token prompt. The time of a case is the median of ``--repeats`` runs
(after one warm-up run; the providers take turns within each repeat), ``torch.set_num_threads(--threads)``.

    python -m bench.kernels.cpu_paths                      # table + bench/out/cpu_paths.json
    python -m bench.kernels.cpu_paths --kernel-path        # also the per-step compressed-kernel path (slow)
    python -m bench.kernels.cpu_paths --threads 1 --out bench/out/cpu_paths_1thread.json
    python -m bench.kernels.cpu_paths --threads 1 --native off   # the PyTorch gathers instead of the native decode
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dc_lightning import to_compressed_inference  # noqa: E402
from dc_lightning.inference import attention, recurrent  # noqa: E402
from dc_lightning.inference.linear import CompressedLinear  # noqa: E402
from dc_lightning.kernels import layouts, native  # noqa: E402
from dc_lightning.kernels.lut.layout import WORD_ORDER_MIN  # noqa: E402
from dc_lightning.kernels.sparse.layout import unpack, use_product  # noqa: E402
from dc_lightning.kernels.lut import layout as lut_layout  # noqa: E402
from dc_lightning.kernels.tc import layout as tc_layout  # noqa: E402
from dc_lightning.models.lm import build_lm, sample  # noqa: E402
from dc_lightning.pruning.masks import prune_model  # noqa: E402
from dc_lightning.quantization.codebooks import quantize_model  # noqa: E402


def compressed(
    module: nn.Module, density: float, bits: int, zero_code: bool | None = None
) -> tuple[nn.Module, nn.Module]:
    """``(dense, converted)``: ``module`` pruned and quantized in place (``zero_code`` as ``quantize_model``'s), and
    its converted copy."""
    holder = nn.Sequential(module).eval()
    prune_model(holder, densities=density)
    quantize_model(holder, bits=bits, max_iter=20, zero_code=zero_code)
    return holder[0], to_compressed_inference(holder)[0].eval()


def median_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each provider; the providers run in turn within each repeat, so that a load change on a
    shared machine hits them alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def sequence(m: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    return lambda: m(x)


def stepping(m: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """One call per timestep of ``x`` [T, B, I], the state carried (how a sampler drives an RNN)."""

    def run() -> None:
        hx = None
        for t in range(x.shape[0]):
            _, hx = m(x[t : t + 1], hx)

    return run


def self_attention(m: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    return lambda: m(x, x, x, need_weights=False)


def sampling(m: nn.Module, prompt: torch.Tensor) -> Callable[[], object]:
    """``dc_lightning.models.lm.sample``: 64 greedy tokens, the whole context re-run per token (issue 22's report)."""
    return lambda: sample(m, prompt, 64, temperature=0)


def lookup(m: nn.Module, idx: torch.Tensor) -> Callable[[], object]:
    return lambda: m(idx)


def matrices(m: nn.Module) -> list[CompressedLinear]:
    return [c for c in m.modules() if isinstance(c, CompressedLinear)]


def decode_all(m: nn.Module, lut: bool, batch: int | None = None) -> Callable[[], object]:
    """Decode every matrix of ``m`` once: the layout a ``batch``-row call runs on (``None``: what the recurrent and
    attention modules decode, ``dense_weight()``), or its LUT copy (``lut``)."""
    mats = matrices(m)
    if lut:
        luts = [lut_copy(c) for c in mats]
        return lambda: [layouts.decode_dense(p) for p in luts]
    if batch is not None:
        return lambda: [layouts.decode_dense(c.path(batch)) for c in mats]
    return lambda: [c.dense_weight() for c in mats]


def lut_copy(c: CompressedLinear) -> layouts.PackedLayer:
    """The matrix's dense-code layout (``lut`` or ``tc``): the one it holds, or a LUT packed from its sparse layout
    (built once, outside timing)."""
    for name in ("lut", "tc"):
        if name in c.layout_names:
            return c.packed(name)
    p = c.packed("sparse")
    rows, cols, codes = unpack(p)
    n_centroids = 1 << (p.code_shift - 1)
    return layouts.pack_lut(p.out_features, p.in_features, rows, cols, codes, p.codebook[:n_centroids])


def uses_word_order(p: layouts.LUTPacked) -> bool:
    """Whether ``lut_linear_reference`` decodes this LUT layer in word order (its size and code width)."""
    return p.cbits < 8 and p.out_features * p.n_groups * p.group_cols >= WORD_ORDER_MIN


def cpu_path(name: str, conv: nn.Module, batch: int) -> str:
    """What the converted CPU path does for the case: ``entries`` (a sparse product, no decode; ``native entries``: one
    native pass over them, batch 1), ``steps`` (a
    recurrent call stepped through such products), ``words`` (a LUT matrix decoded in word order), ``native rows``
    (a ``tc`` or 2/4-bit ``lut`` matrix decoded a block of rows at a time by the native decode, each block
    multiplied), ``native lookup`` (an embedding's rows looked up by the native decode in one call), ``storage`` (a
    ``tc`` matrix multiplied in its words' storage order, PyTorch gathers), ``decode`` (every matrix decoded once)
    or ``rows``."""
    if name.startswith("Embedding"):
        return "native lookup" if native.available() else "rows"
    if name.startswith(("Linear", "Conv1D")):
        (c,) = matrices(conv)
        layout = c.layout_for(batch)
        p = c.packed(layout)
        if layout == "sparse" and use_product(p, batch):
            return "native entries" if batch == 1 and native.available() else "entries"
        if layout == "tc" and p.out_features * p.in_features >= tc_layout.BLOCKED_MIN:
            if native.available():
                return "native rows"
            if batch <= tc_layout.STORAGE_ORDER_MAX_BATCH:
                return "storage"
        if layout == "lut" and p.cbits in lut_layout.NATIVE_CBITS and native.available() and (
            p.out_features * p.in_features >= lut_layout.BLOCKED_MIN
        ):  # fmt: skip
            return "native rows"
        return "words" if layout == "lut" and uses_word_order(p) else "decode"
    if isinstance(conv, recurrent.CompressedRNNBase) and "steps" in name:
        return "steps" if recurrent.STEP_MAX >= 1 else "decode"  # one timestep per call
    return "decode"


def hf_conv1d(nx: int, nf: int) -> nn.Module | None:
    """transformers' GPT-2 ``Conv1D(nf, nx)`` (``None`` without transformers)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D(nf, nx)


def kernel_path(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with the converted modules forced onto their compressed-kernel branch (CPU reference kernels)."""

    def run() -> object:
        saved = recurrent.use_triton, attention.use_triton
        recurrent.use_triton = attention.use_triton = lambda x: True
        try:
            return fn()
        finally:
            recurrent.use_triton, attention.use_triton = saved

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kernel-path", action="store_true", help="also time the per-step compressed-kernel path")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/out"), "cpu_paths.json"))
    ap.add_argument("--native", choices=("on", "off"), default="on",
                    help="the native CPU decode (kernels/native.py) on, or off (PyTorch gathers)")  # fmt: skip
    args = ap.parse_args()
    os.environ[native.ENV] = "1" if args.native == "on" else "0"
    print(f"native decode: {native.status()}")
    logging.disable(logging.WARNING)  # the conversion logs one line per layer
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cases = []
    for density, zero_code, tag in ((0.1, None, ""), (0.5, None, ""), (0.5, False, " 16c")):
        lin = compressed(nn.Linear(1024, 1024), density, args.bits, zero_code)
        for batch in (1, 16, 64):
            cases.append((f"Linear 1024 d{density}{tag}", batch, lin, sequence, torch.randn(batch, 1024), 1))
    conv = hf_conv1d(768, 3072)
    if conv is not None:
        conv = compressed(conv, args.density, args.bits)
        for batch in (1, 64):
            cases.append(("Conv1D 768->3072", batch, conv, sequence, torch.randn(batch, 768), 1))
    emb = compressed(nn.Embedding(50257, 256), args.density, args.bits)
    cases.append(("Embedding 50257x256", 64, emb, lookup, torch.randint(0, 50257, (64,)), 1))
    lstm = compressed(nn.LSTM(600, 600, num_layers=2), args.density, args.bits)
    gru = compressed(nn.GRU(600, 600, num_layers=2), args.density, args.bits)
    mha = compressed(nn.MultiheadAttention(384, 6), args.density, args.bits)
    lm = compressed(build_lm("lstm_lm"), args.density, args.bits)
    for kind, pair in (("LSTM", lstm), ("GRU", gru)):
        for batch in (1, 16):
            x = torch.randn(64, batch, 600)
            cases.append((f"{kind} 2x600 seq 64", batch, pair, sequence, x, 1))
        cases.append((f"{kind} 2x600 64 steps", 1, pair, stepping, torch.randn(64, 1, 600), 64))
    for batch in (1, 16):
        cases.append(("MHA 384/6 seq 128", batch, mha, self_attention, torch.randn(128, batch, 384), 1))
    cases.append(("lstm_lm sample 64 tok", 1, lm, sampling, torch.randint(0, 256, (16,)), 64))

    rows = []
    header = (
        f"{'case':<22} {'batch':>5} {'dense ms':>9} {'conv ms':>9} {'ratio':>6} {'path':>8} {'decode ms':>10} "
        f"{'floor':>6} {'lut dec':>8}"
    )
    if args.kernel_path:
        header += f" {'kernel ms':>10}"
    print(header)
    with torch.no_grad():
        for name, batch, (dense, conv), drive, x, calls in cases:
            per_batch = name.startswith(("Linear", "Conv1D"))  # one matrix, called with `batch` rows
            providers = {
                "dense": drive(dense, x),
                "converted": drive(conv, x),
                # a Linear / Conv1D call decodes the layout its batch runs on; an embedding's decode is its lookup
                "decode": drive(conv, x) if drive is lookup else decode_all(conv, False, batch if per_batch else None),
                "decode_lut": decode_all(conv, lut=True),
            }
            ms = median_ms(providers, args.repeats)
            row = {"case": name, "batch": batch, "calls": calls, "dense_ms": ms["dense"]}
            row["path"] = cpu_path(name, conv, batch)
            row["converted_ms"] = ms["converted"]
            row["ratio"] = ms["converted"] / ms["dense"]
            # every matrix is decoded once per call: the floor of the ratio is (dense + calls * decode) / dense
            row["decode_ms"] = calls * ms["decode"]
            row["floor"] = (ms["dense"] + row["decode_ms"]) / ms["dense"]
            row["decode_lut_ms"] = calls * ms["decode_lut"]
            line = (
                f"{name:<22} {batch:>5} {row['dense_ms']:>9.2f} {row['converted_ms']:>9.2f} {row['ratio']:>6.2f} "
                f"{row['path']:>8} {row['decode_ms']:>10.2f} {row['floor']:>6.2f} {row['decode_lut_ms']:>8.2f}"
            )
            if args.kernel_path:
                row["kernel_path_ms"] = median_ms({"k": kernel_path(drive(conv, x))}, 1)["k"]
                line += f" {row['kernel_path_ms']:>10.1f}"
            print(line, flush=True)
            rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "density": args.density, "bits": args.bits, "repeats": args.repeats, "threads": args.threads,
        "torch": torch.__version__, "machine": platform.platform(), "processor": platform.processor(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "native": native.status(),
    }  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
