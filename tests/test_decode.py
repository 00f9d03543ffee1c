"""Incremental decoding of the LM recipes' networks (``dc_lightning.models.lm.decode_state`` / ``decode_step``), CPU:
each step's logits equal the full forward's logits at that position, dense and converted (compressed modules), and a
step is graph-safe (no host read, no host-to-device copy: run on fake CUDA tensors, ``tests/fake_cuda.py``); the
decode benchmark's smoke run (``bench/gpu/bench_decode.py --smoke``) runs in a child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import compressed_zoo as zoo
import pytest
import torch
from fake_cuda import run_on_fake_cuda

from dc_lightning.inference.conversion import to_compressed_inference
from dc_lightning.models.lm import LSTMLanguageModel, TransformerLanguageModel, decode_state, decode_step

ROOT = Path(__file__).resolve().parents[1]


def _models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "lstm": LSTMLanguageModel(vocab_size=40, embed_dim=12, hidden_size=16, num_layers=2).eval(),
        "transformer": TransformerLanguageModel(vocab_size=40, width=16, num_layers=2, num_heads=2, max_len=24).eval(),
    }


MODELS = _models()


def _pair(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    dense = zoo.compress_all(MODELS[name], density=0.4, bits=4, seed=1)
    return dense, to_compressed_inference(dense)


@pytest.mark.parametrize("converted", [False, True], ids=["dense", "converted"])
@pytest.mark.parametrize("name", list(MODELS))
def test_decode_steps_match_the_full_forward(name: str, converted: bool) -> None:
    dense, conv = _pair(name)
    model = conv if converted else dense
    tokens = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = dense(tokens)  # [B, T, vocab]
        state = decode_state(model, batch=3, length=12)
        steps = [decode_step(model, tokens[:, t : t + 1], torch.tensor(t), state) for t in range(tokens.shape[1])]
    err = zoo.rel_err(torch.stack(steps, dim=1), full)
    assert err <= 1e-5, f"{name} ({'converted' if converted else 'dense'}): step vs full forward rel err {err:.2e}"


@pytest.mark.parametrize("name", list(MODELS))
def test_decode_step_is_graph_safe(name: str) -> None:
    """A step of the converted model on fake CUDA tensors: no host read (it would raise), no host-to-device copy."""
    _, conv = _pair(name)
    state = decode_state(conv, batch=2, length=8)
    tokens, pos = torch.tensor([[3], [5]]), torch.tensor(4)
    logits, copies = run_on_fake_cuda(conv, lambda m, t, p, s: decode_step(m, t, p, s), tokens, pos, state)
    assert copies == [] and logits.device.type == "cuda" and tuple(logits.shape) == (2, 40)


def test_decode_state_errors() -> None:
    with pytest.raises(ValueError, match="max_len = 24"):
        decode_state(MODELS["transformer"], batch=1, length=25)
    with pytest.raises(ValueError, match="batch=0"):
        decode_state(MODELS["lstm"], batch=0, length=4)
    with pytest.raises(TypeError, match="Linear"):
        decode_state(torch.nn.Linear(2, 2), batch=1, length=4)


def test_bench_decode_smoke(tmp_path: Path) -> None:
    """The decode benchmark's CPU smoke run: both models, batch 1 and 2, eager, random weights (said in the output)."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu.bench_decode", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "random weights" in proc.stdout
    rows = json.loads((tmp_path / "decode" / "decode.json").read_text())["rows"]
    assert {(r["model"], r["batch"], r["provider"]) for r in rows} == {
        (m, b, p) for m in ("lstm_lm", "transformer_lm") for b in (1, 2) for p in ("dense", "compressed")
    }
    assert all(r["tokens_per_s"] > 0 and r["same_tokens_as_eager"] for r in rows), rows
