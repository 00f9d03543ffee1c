"""The model zoo of the compressed-inference tests: every weight kind, pruned and quantized as after training.

nn.TransformerEncoder / Decoder (batch_first both ways), nn.Transformer, Lightning's demo Transformer, 2-layer
bidirectional LSTM / GRU / RNN, an LSTM with proj_size, nn.Embedding with padding_idx, a Linear subclass and a
model mixing them (:func:`build_cases`). Every weight matrix is pruned (random mask) and quantized (uniform codebook)
by :func:`compress_all`, so ``weight == where(mask, codebook[assign], 0)`` holds exactly as after training with the
callbacks. ``tests/test_compressed_modules.py`` runs the zoo on the CPU, ``tests/gpu/test_gpu_compressed_modules.py``
on CUDA in fp32/fp16/bf16, eager, in CUDA graphs and compiled.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from dc_lightning import buffers


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


def causal_mask(n: int) -> Tensor:
    return nn.Transformer.generate_square_subsequent_mask(n)


def padding_mask(batch: int, length: int, pad_last: int = 2) -> Tensor:
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
            "key_padding": ((src,), {"src_key_padding_mask": padding_mask(B, L)}),
            "causal": ((src,), {"mask": causal_mask(L), "is_causal": True}),
            "bool_mask+padding": ((src,), {"mask": torch.rand(L, L, generator=g) < 0.3,
                                           "src_key_padding_mask": padding_mask(B, L)}),
        })
        dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(d, h, ff, dropout=0.0, batch_first=bf), 2)
        tgt, mem = (randn(B, L, d), randn(B, S, d)) if bf else (randn(L, B, d), randn(S, B, d))
        cases[f"decoder_{tag}"] = (dec, {
            "plain": ((tgt, mem), {}),
            "causal+padding": ((tgt, mem), {"tgt_mask": causal_mask(L), "tgt_is_causal": True,
                                            "tgt_key_padding_mask": padding_mask(B, L),
                                            "memory_key_padding_mask": padding_mask(B, S, 1)}),
        })
    tr = nn.Transformer(d, h, 1, 1, ff, dropout=0.0, batch_first=True)
    src, tgt = randn(B, S, d), randn(B, L, d)
    cases["transformer"] = (tr, {
        "masks": ((src, tgt), {"tgt_mask": causal_mask(L), "src_key_padding_mask": padding_mask(B, S, 1),
                               "memory_key_padding_mask": padding_mask(B, S, 1)}),
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
