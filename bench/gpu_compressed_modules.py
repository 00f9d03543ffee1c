"""GPU check of the compressed inference modules: every weight kind converted, on CUDA, fp32/fp16/bf16, eager,
``torch.compile(fullgraph=True)`` and CUDA graphs, each against the dense model.

The model zoo (:func:`build_cases`) is also what ``tests/test_compressed_modules.py`` runs on the CPU:
nn.TransformerEncoder / Decoder (batch_first both ways), nn.Transformer, Lightning's demo Transformer, 2-layer
bidirectional LSTM / GRU / RNN, an LSTM with proj_size, nn.Embedding with padding_idx, a Linear subclass and a
model mixing them. Every weight matrix is pruned (random mask) and quantized (uniform codebook) by
:func:`compress_all`, so ``weight == where(mask, codebook[assign], 0)`` holds exactly as after training with the
callbacks.

Reference per dtype: the dense model cast to that dtype, then run in float32 (the exact answer for those rounded
weights; torch's fused attention fast paths off, so padded positions follow the slow-path semantics). A case passes
when the converted model's relative L2 error is at most ``max(tol[dtype], 2 * dense error)`` where the dense error
is the same dense model run in the dtype itself (the peer: what plain PyTorch gets). Compile and CUDA-graph cases run
the converted model and are checked the same way. Every case is try/except'ed and recorded.

Run on a CUDA machine (torch >= 2.4, Triton, Lightning; no Hydra/omegaconf/wandb needed)::

    OUT=/tmp/out python bench/gpu_compressed_modules.py            # writes $OUT/compressed_modules.{json,md}

``--budget`` (seconds, default 90) bounds the whole run: compile cases (the first variant of each case, fp16 first,
the mixed models first) that would start after it are recorded as skipped.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dc_lightning import buffers  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
COMPILE_FIRST = ["mixed", "demo_transformer", "encoder_bf", "decoder_sf", "lstm", "gru", "embedding", "transformer"]


# ------------------------------------------------------------------------------------------------------- the zoo


@torch.no_grad()
def compress_all(model: nn.Module, density: float = 0.5, bits: int = 4, seed: int = 0) -> nn.Module:
    """Prune (random mask of ``density``) and quantize (``2**bits`` evenly spaced levels over the kept weights'
    range) every 2-D parameter of ``model``, in place, through ``dc_lightning.buffers``. Returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            if p.dim() != 2:
                continue
            mask = torch.rand(p.shape, generator=g) < density
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                mask[m.padding_idx] = False  # the padding row stays zero, as torch initialises it
            w = p.detach().float().cpu()
            kept = w[mask] if bool(mask.any()) else w.reshape(-1)
            codebook = torch.linspace(float(kept.min()), float(kept.max()), 2**bits)
            assign = (w.unsqueeze(-1) - codebook).abs().argmin(dim=-1).to(torch.uint8)
            buffers.set_mask(m, mask, name)
            buffers.set_codebook(m, codebook, assign, name)
            p.copy_(torch.where(mask, codebook[assign.long()], 0.0).to(p.dtype))
    return model


class ScaledLinear(nn.Linear):
    """A Linear subclass that only adds state (its forward is nn.Linear's)."""

    def __init__(self, *args: Any, tag: str = "head", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tag = tag


class Mixed(nn.Module):
    """Embedding -> bidirectional LSTM -> self-attention with a key padding mask -> GRU -> Linear subclass head."""

    def __init__(self, vocab: int = 40, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.lstm = nn.LSTM(dim, dim // 2, num_layers=2, bidirectional=True, batch_first=True)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Sequential(ScaledLinear(dim, 24), nn.ReLU(), nn.Linear(24, 5))

    def forward(self, tokens: Tensor) -> Tensor:
        pad = tokens == 0
        x = self.emb(tokens)
        x, _ = self.lstm(x)
        a, _ = self.attn(x, x, x, key_padding_mask=pad, need_weights=False)
        x, _ = self.gru(x + a)
        return self.head(x)


def _causal(n: int) -> Tensor:
    return nn.Transformer.generate_square_subsequent_mask(n)


def _kpm(batch: int, length: int, pad_last: int = 2) -> Tensor:
    """Bool key padding mask: the last ``pad_last`` positions of every other sequence are padding."""
    m = torch.zeros(batch, length, dtype=torch.bool)
    m[::2, length - pad_last :] = True
    return m


def build_cases(seed: int = 0) -> dict[str, tuple[nn.Module, dict[str, tuple[tuple, dict]]]]:
    """``{name: (compressed dense model in eval mode, {variant: (args, kwargs)})}`` on the CPU, float32."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    d, h, ff, B, L, S = 16, 4, 32, 3, 6, 5
    cases: dict[str, tuple[nn.Module, dict[str, tuple[tuple, dict]]]] = {}

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g)

    for bf in (True, False):
        tag = "bf" if bf else "sf"
        enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, h, ff, dropout=0.0, batch_first=bf), 2)
        src = randn(B, L, d) if bf else randn(L, B, d)
        cases[f"encoder_{tag}"] = (enc, {
            "plain": ((src,), {}),
            "key_padding": ((src,), {"src_key_padding_mask": _kpm(B, L)}),
            "causal": ((src,), {"mask": _causal(L), "is_causal": True}),
            "bool_mask+padding": ((src,), {"mask": torch.rand(L, L, generator=g) < 0.3,
                                           "src_key_padding_mask": _kpm(B, L)}),
        })
        dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(d, h, ff, dropout=0.0, batch_first=bf), 2)
        tgt, mem = (randn(B, L, d), randn(B, S, d)) if bf else (randn(L, B, d), randn(S, B, d))
        cases[f"decoder_{tag}"] = (dec, {
            "plain": ((tgt, mem), {}),
            "causal+padding": ((tgt, mem), {"tgt_mask": _causal(L), "tgt_is_causal": True,
                                            "tgt_key_padding_mask": _kpm(B, L),
                                            "memory_key_padding_mask": _kpm(B, S, 1)}),
        })
    tr = nn.Transformer(d, h, 1, 1, ff, dropout=0.0, batch_first=True)
    src, tgt = randn(B, S, d), randn(B, L, d)
    cases["transformer"] = (tr, {
        "masks": ((src, tgt), {"tgt_mask": _causal(L), "src_key_padding_mask": _kpm(B, S, 1),
                               "memory_key_padding_mask": _kpm(B, S, 1)}),
    })
    from lightning.pytorch.demos import Transformer as DemoTransformer

    demo = DemoTransformer(vocab_size=64, ninp=d, nhead=2, nhid=ff, nlayers=1, dropout=0.0)
    tokens = torch.randint(0, 64, (B, L), generator=g)
    cases["demo_transformer"] = (demo, {"lm": ((tokens, tokens.roll(1, 1)), {})})
    lstm = nn.LSTM(12, 10, num_layers=2, bidirectional=True, batch_first=True)
    x = randn(B, L, 12)
    cases["lstm"] = (lstm, {
        "zeros": ((x,), {}),
        "h0c0": ((x, (randn(4, B, 10), randn(4, B, 10))), {}),
        "unbatched": ((x[0],), {}),
    })
    cases["lstm_proj"] = (nn.LSTM(12, 10, proj_size=6), {"seq_first": ((randn(L, B, 12),), {})})
    cases["gru"] = (nn.GRU(12, 10, num_layers=2, bidirectional=True), {
        "seq_first": ((randn(L, B, 12),), {}),
        "h0": ((randn(L, B, 12), randn(4, B, 10)), {}),
    })
    cases["rnn"] = (nn.RNN(12, 10, num_layers=2, nonlinearity="relu", bidirectional=True, batch_first=True),
                    {"relu": ((x,), {})})
    ids = torch.randint(0, 50, (B, L), generator=g)
    ids[0, :2] = 0  # padding_idx rows
    cases["embedding"] = (nn.Embedding(50, 24, padding_idx=0), {"ids": ((ids,), {})})
    cases["linear_subclass"] = (nn.Sequential(ScaledLinear(12, 20), nn.ReLU(), ScaledLinear(20, 7, bias=False)),
                                {"x": ((randn(B, L, 12),), {})})
    tok = torch.randint(1, 40, (B, L), generator=g)
    tok[::2, -2:] = 0
    cases["mixed"] = (Mixed(), {"tokens": ((tok,), {})})
    for i, (model, _) in enumerate(cases.values()):
        compress_all(model, seed=seed + i).eval()
    return cases


# ---------------------------------------------------------------------------------------------------- the check


def rel_err(out: Any, ref: Any) -> float:
    """Largest relative L2 error over the floating-point tensors of two (nested) outputs."""
    if isinstance(out, (tuple, list)):
        return max((rel_err(o, r) for o, r in zip(out, ref, strict=True)), default=0.0)
    if isinstance(out, Tensor) and out.is_floating_point():
        r = ref.double()
        return float((out.double() - r).norm() / r.norm().clamp_min(1e-30))
    return 0.0 if (not isinstance(out, Tensor) or torch.equal(out, ref)) else math.inf


def cast_inputs(obj: Any, device: str, dtype: torch.dtype) -> Any:
    if isinstance(obj, (tuple, list)):
        return type(obj)(cast_inputs(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: cast_inputs(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, Tensor):
        return obj.to(device=device, dtype=dtype if obj.is_floating_point() else obj.dtype)
    return obj


def _cuda_graph(fn: Any, args: tuple, kwargs: dict) -> Any:
    """Capture ``fn(*args, **kwargs)`` in a CUDA graph (after a warm-up on a side stream) and replay it once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn(*args, **kwargs)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*args, **kwargs)
    graph.replay()
    torch.cuda.synchronize()
    return out


def _check(model: Any, args: tuple, kwargs: dict, ref: Any, tol: float, peer: float, graph: bool = False) -> dict:
    """Run ``model`` (eagerly or replayed from a CUDA graph) and compare with ``ref``."""
    t = time.perf_counter()
    with torch.no_grad():
        out = _cuda_graph(model, args, kwargs) if graph else model(*args, **kwargs)
    err = rel_err(out, ref)
    return {"rel_err": err, "dense_rel_err": peer, "tol": tol, "seconds": time.perf_counter() - t,
            "status": "ok" if err <= tol else "MISMATCH"}


def full_demo_memory(dev: str, density: float = 0.1, bits: int = 4) -> dict:
    """Lightning's demo Transformer at its default size (vocab 33278, ninp 200), every weight matrix pruned to
    ``density`` and quantized to ``bits`` (synthetic codes): bytes the converted model's compressed layers hold, and
    the device memory the converted and the dense fp16 models take (``torch.cuda.memory_allocated`` deltas)."""
    from lightning.pytorch.demos import Transformer as DemoTransformer

    from dc_lightning.inference.conversion import to_compressed_inference
    from dc_lightning.inference.memory import compressed_memory

    model = compress_all(DemoTransformer(dropout=0.0), density=density, bits=bits).eval()
    conv = to_compressed_inference(model)
    report = compressed_memory(conv)
    out = {k: report[k] for k in ("bytes", "dense_fp16_bytes", "ratio")}
    out["layers"] = len(report["layers"])
    if dev == "cuda":
        for key, m in (("device_bytes_converted", conv), ("device_bytes_dense_fp16", copy.deepcopy(model).half())):
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            moved = m.to(dev)
            torch.cuda.synchronize()
            out[key] = torch.cuda.memory_allocated() - before
            del moved
            m.to("cpu")
    return out


def main(argv: list[str] | None = None) -> int:
    from dc_lightning.inference.conversion import to_compressed_inference
    from dc_lightning.inference.memory import compressed_memory

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="output folder (default: $OUT)")
    p.add_argument("--budget", type=float, default=90.0, help="seconds; compile cases past it are skipped")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (no CUDA graphs; a dry run)")
    p.add_argument("--compile-dtypes", default="float16,float32,bfloat16", help="dtypes compiled, in this order")
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dev = args.device
    torch.backends.mha.set_fastpath_enabled(False)  # dense references follow the slow-path semantics
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows: list[dict] = []
    memory: dict[str, dict] = {}

    def record(case: str, variant: str, dtype: torch.dtype, mode: str, fn: Any) -> None:
        row = {"case": case, "variant": variant, "dtype": str(dtype).replace("torch.", ""), "mode": mode}
        try:
            row.update(fn())
        except Exception as err:  # every case is recorded, whatever fails
            row.update(status="error", error=f"{type(err).__name__}: {err}"[:400],
                       trace=traceback.format_exc(limit=3)[-600:])
        rows.append(row)

    cases = build_cases()
    converted: dict[tuple[str, torch.dtype], tuple[nn.Module, dict]] = {}
    for name, (model, variants) in cases.items():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            dense = copy.deepcopy(model).to(device=dev, dtype=dtype)
            exact = copy.deepcopy(dense).float()
            conv = to_compressed_inference(dense)
            converted[(name, dtype)] = (conv, {})
            if dtype == torch.float32:
                memory[name] = compressed_memory(conv)
            for vname, (a, kw) in variants.items():
                a_d, kw_d = cast_inputs(a, dev, dtype), cast_inputs(kw, dev, dtype)
                try:
                    with torch.no_grad():
                        ref = exact(*cast_inputs(a, dev, torch.float32), **cast_inputs(kw, dev, torch.float32))
                        peer = rel_err(dense(*a_d, **kw_d), ref)
                except Exception as err:  # plain PyTorch fails on this dtype: record it, the check has no reference
                    for mode in ("eager", "cuda_graph", "compile_fullgraph"):
                        rows.append({"case": name, "variant": vname, "dtype": str(dtype).replace("torch.", ""),
                                     "mode": mode, "status": "dense model fails too",
                                     "error": f"{type(err).__name__}: {err}"[:300]})
                    continue
                converted[(name, dtype)][1][vname] = (a_d, kw_d, ref, peer)
                check = functools.partial(_check, conv, a_d, kw_d, ref, max(TOL[dtype], 2 * peer), peer)
                record(name, vname, dtype, "eager", check)
                if dev == "cuda":
                    record(name, vname, dtype, "cuda_graph", functools.partial(check, graph=True))
                if dtype != torch.float32 and len(converted[(name, dtype)][1]) == 1:  # fp32 conversion, .to(dtype)
                    cast = copy.deepcopy(converted[(name, torch.float32)][0]).to(dtype)
                    record(name, vname, dtype, "converted_then_cast",
                           functools.partial(_check, cast, a_d, kw_d, ref, max(TOL[dtype], 2 * peer), peer))
    try:
        memory["demo_transformer_full"] = full_demo_memory(dev)
    except Exception as err:  # recorded like every case
        memory["demo_transformer_full"] = {"error": f"{type(err).__name__}: {err}"[:400]}
    # compile cost dominates (inductor + Triton): the first variant of every case, the mixed models first
    compile_dtypes = [getattr(torch, s.strip()) for s in args.compile_dtypes.split(",") if s.strip()]
    order = sorted(cases, key=lambda n: (n not in COMPILE_FIRST, COMPILE_FIRST.index(n) if n in COMPILE_FIRST else 0))
    for dtype in compile_dtypes:
        for name in order:
            conv, variants = converted[(name, dtype)]
            if not variants:
                continue
            vname, (a_d, kw_d, ref, peer) = next(iter(variants.items()))
            if time.perf_counter() - t0 > args.budget:
                rows.append({"case": name, "variant": vname, "dtype": str(dtype).replace("torch.", ""),
                             "mode": "compile_fullgraph", "status": "skipped (time budget)"})
                continue
            torch._dynamo.reset()
            compiled = torch.compile(conv, fullgraph=True)
            record(name, vname, dtype, "compile_fullgraph",
                   functools.partial(_check, compiled, a_d, kw_d, ref, max(TOL[dtype], 2 * peer), peer))
    device_name = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    env = {"torch": torch.__version__, "device": device_name, "seconds": time.perf_counter() - t0}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    (out_dir / "compressed_modules.json").write_text(json.dumps({"env": env, "rows": rows, "memory": memory}, indent=1))
    lines = [f"# compressed modules on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
             f"{env['seconds']:.0f} s)", "", "| case | variant | dtype | mode | status | rel err | dense rel err |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['variant']} | {r['dtype']} | {r['mode']} | {r['status']} | "
                     f"{r.get('rel_err', float('nan')):.2e} | {r.get('dense_rel_err', float('nan')):.2e} |")
    lines += ["", "| case | compressed bytes | dense fp16 bytes | ratio |", "|---|---|---|---|"]
    for name, m in memory.items():
        if "error" in m:
            lines.append(f"| {name} | error: {m['error']} | | |")
            continue
        lines.append(f"| {name} | {m['bytes']} | {m['dense_fp16_bytes']} | {m['ratio']:.2f}x |")
    full = memory.get("demo_transformer_full", {})
    if "device_bytes_converted" in full:
        conv_b, dense_b = full["device_bytes_converted"], full["device_bytes_dense_fp16"]
        lines.append(f"\ndemo Transformer (default size, density 0.1, 4 bits): whole converted model {conv_b} B on "
                     f"the device vs dense fp16 {dense_b} B")
    errors = [r for r in rows if r["status"] not in ("ok", "dense model fails too") and "skipped" not in r["status"]]
    lines += ["", f"{len(rows)} cases, {len(errors)} not ok"]
    for r in errors:
        lines.append(f"- {r['case']}/{r['variant']}/{r['dtype']}/{r['mode']}: {r.get('error', r['status'])}")
    (out_dir / "compressed_modules.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
