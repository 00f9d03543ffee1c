"""The compressed inference path for every weight kind (``dc_lightning.inference.attention`` / ``conversion``), CPU.

The model zoo is ``tests/compressed_zoo.py`` (``tests/gpu/test_gpu_compressed_modules.py`` runs it on CUDA): every
weight matrix is pruned and quantized through ``dc_lightning.buffers``; the converted model must match the dense one
(fp32, relative L2 error <= 1e-5) and hold no dense float copy of a compressed weight. Kernels run their CPU reference
path here; the Triton kernels run under the interpreter in one child process (``test_triton_interpreter``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import compressed_zoo as zoo
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dc_lightning import buffers
from dc_lightning.inference import attention
from dc_lightning.inference.attention import CompressedMultiheadAttention
from dc_lightning.inference.conversion import plan_conversion, to_compressed_inference
from dc_lightning.inference.embedding import CompressedEmbedding
from dc_lightning.inference.linear import CompressedLinear
from dc_lightning.inference.memory import compressed_memory
from dc_lightning.inference.recurrent import CompressedGRU, CompressedLSTM, CompressedRNN

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]

CASES = zoo.build_cases()
TOL = 1e-5


def _dense(model: nn.Module, *args, **kwargs):
    """The dense reference: torch's slow path (its nested-tensor fast path zeroes padded positions)."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _compressed_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, pn) for m in model.modules() for pn, _ in m.named_parameters(recurse=False)
            if buffers.has_compression(m, pn)]


def _floats(model: nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    held = {(t.data_ptr(), t.numel()): t.numel() for t in tensors if t.is_floating_point()}
    return sum(held.values())


def _assert_no_dense_copy(dense: nn.Module, converted: nn.Module) -> None:
    """Apart from codebooks (float tensors of at most 257 values other than ``bias`` inside the compressed modules,
    whatever their layout), the converted model holds no more floats than the dense model's uncompressed tensors
    (biases, norms), and no float tensor of a compressed weight's shape."""
    weights = _compressed_weights(dense)
    assert weights, "the test model must have compressed weights"
    uncompressed, seen = _floats(dense), set()
    for m, pn in weights:
        codebook = buffers.get_codebook(m, pn)[0]
        uncompressed -= sum(t.numel() for t in (getattr(m, pn), codebook) if id(t) not in seen)  # tied: once
        seen.update((id(getattr(m, pn)), id(codebook)))
    others = {}
    for m in converted.modules():
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if not t.is_floating_point():
                continue
            if isinstance(m, (CompressedLinear, CompressedEmbedding)) and name != "bias":
                assert t.numel() <= 257, f"{type(m).__name__}.{name}: {t.numel()} floats is no codebook"
            else:
                others[(t.data_ptr(), t.numel())] = t.numel()
    assert sum(others.values()) <= uncompressed
    shapes = {tuple(getattr(m, pn).shape) for m, pn in weights}
    for name, t in [*converted.named_parameters(), *converted.named_buffers()]:
        assert not (t.is_floating_point() and tuple(t.shape) in shapes), f"{name} is a dense copy of a weight"


@pytest.mark.parametrize("case", sorted(CASES))
def test_zoo_matches_dense_and_holds_no_dense_copy(case: str) -> None:
    model, variants = CASES[case]
    converted = to_compressed_inference(model)
    assert not _compressed_weights(converted), "no layer with compression buffers may stay (every kind converts)"
    _assert_no_dense_copy(model, converted)
    for variant, (args, kwargs) in variants.items():
        with torch.no_grad():
            got = converted(*args, **kwargs)
        err = zoo.rel_err(got, _dense(model, *args, **kwargs))
        assert err <= TOL, f"{case}/{variant}: relative error {err:.3g}"


def test_zoo_conversion_replaces_the_right_modules() -> None:
    enc = to_compressed_inference(CASES["encoder_bf"][0])
    layer = enc.layers[0]
    assert isinstance(layer.self_attn, CompressedMultiheadAttention)
    assert isinstance(layer.self_attn.out_proj, CompressedLinear), "out_proj is converted with its attention"
    assert isinstance(layer.linear1, CompressedLinear) and layer.activation_relu_or_gelu == 0
    assert enc.use_nested_tensor is False and CASES["encoder_bf"][0].use_nested_tensor is True
    assert isinstance(to_compressed_inference(CASES["lstm"][0]), CompressedLSTM)
    assert isinstance(to_compressed_inference(CASES["gru"][0]), CompressedGRU)
    rnn = to_compressed_inference(CASES["rnn"][0])
    assert isinstance(rnn, CompressedRNN) and rnn.nonlinearity == "relu"
    demo = to_compressed_inference(CASES["demo_transformer"][0])
    assert isinstance(demo.embedding, CompressedEmbedding) and isinstance(demo.decoder, CompressedLinear)
    head = to_compressed_inference(CASES["linear_subclass"][0])
    assert isinstance(head[0], CompressedLinear) and head[0].relu and isinstance(head[1], nn.Identity)


def test_encoder_fast_path_dense_reference_agrees_on_unpadded_positions() -> None:
    """With torch's fast path on (the default), the dense encoder's nested-tensor path zeroes padded positions; the
    converted model (slow path) must agree everywhere else, and with the fused fast path without padding."""
    model, variants = CASES["encoder_bf"]
    converted = to_compressed_inference(model)
    (src,), kw = variants["key_padding"]
    with torch.no_grad():
        fast, got = model(src, **kw), converted(src, **kw)
        keep = ~kw["src_key_padding_mask"]
        assert zoo.rel_err(got[keep], fast[keep]) <= TOL
        assert zoo.rel_err(converted(src), model(src)) <= TOL


# --------------------------------------------------------------------------------------------- attention details


def _mha(**kw) -> nn.MultiheadAttention:
    mha = nn.MultiheadAttention(16, 4, **kw).eval()
    return zoo.compress_all(mha, seed=3)


@pytest.mark.parametrize("path", ["dense", "kernels"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("average", [True, False])
def test_mha_need_weights_and_masks(batch_first: bool, average: bool, path: str, monkeypatch) -> None:
    """On both paths: ``dense`` (the CPU's: weights decoded once per call, ``F.linear``) and ``kernels`` (the CUDA
    branch, here on the CPU reference of the compressed kernels)."""
    if path == "kernels":
        monkeypatch.setattr(attention, "use_triton", lambda x: True)
    mha = _mha(batch_first=batch_first)
    cm = CompressedMultiheadAttention.from_module(mha).eval()
    g = torch.Generator().manual_seed(0)
    N, L, S = 2, 5, 7
    q = torch.randn(N, L, 16, generator=g) if batch_first else torch.randn(L, N, 16, generator=g)
    kv = torch.randn(N, S, 16, generator=g) if batch_first else torch.randn(S, N, 16, generator=g)
    masks = {
        "none": {},
        "bool2d": {"attn_mask": torch.rand(L, S, generator=g) < 0.3},
        "float3d": {"attn_mask": torch.randn(N * 4, L, S, generator=g)},
        "kpm": {"key_padding_mask": zoo.padding_mask(N, S)},
        "bool2d+kpm": {"attn_mask": torch.rand(L, S, generator=g) < 0.3, "key_padding_mask": zoo.padding_mask(N, S)},
    }
    for name, m in masks.items():
        for need in (True, False):
            out, w = cm(q, kv, kv, need_weights=need, average_attn_weights=average, **m)
            ref, rw = _dense(mha, q, kv, kv, need_weights=need, average_attn_weights=average, **m)
            assert zoo.rel_err(out, ref) <= TOL, name
            assert (w is None) == (rw is None) == (not need)
            if need:
                assert w.shape == rw.shape and zoo.rel_err(w, rw) <= TOL, name


def test_mha_self_attention_causal_unbatched_and_variants() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 16, generator=g)
    causal = zoo.causal_mask(6)
    for kw in ({}, {"add_bias_kv": True}, {"add_zero_attn": True}, {"bias": False}):
        mha = _mha(batch_first=True, **kw)
        cm = to_compressed_inference(mha)
        assert isinstance(cm, CompressedMultiheadAttention)
        for call in (
            dict(need_weights=False, attn_mask=causal, is_causal=True),
            dict(need_weights=True, attn_mask=causal),
            dict(need_weights=False, key_padding_mask=zoo.padding_mask(2, 6)),
        ):
            assert zoo.rel_err(cm(x, x, x, **call)[0], _dense(mha, x, x, x, **call)[0]) <= TOL, (kw, call)
        # unbatched input: [L, E]
        assert zoo.rel_err(cm(x[0], x[0], x[0])[0], _dense(mha, x[0], x[0], x[0])[0]) <= TOL, kw
    with pytest.raises(ValueError, match="is_causal=True needs attn_mask"):
        cm(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        cm(x, x, x, attn_mask=torch.zeros(5, 5))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        cm(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))


def test_mha_cpu_path_decodes_each_projection_once_and_keeps_no_copy(monkeypatch) -> None:
    mha = _mha(batch_first=True)
    cm = to_compressed_inference(mha)
    projections = [cm.q_proj, cm.k_proj, cm.v_proj, cm.out_proj]
    assert all(isinstance(p, CompressedLinear) for p in projections)
    before = {k: tuple(v.shape) for k, v in cm.state_dict().items() if isinstance(v, torch.Tensor)}
    calls = []
    decode = CompressedLinear.dense_weight
    monkeypatch.setattr(CompressedLinear, "dense_weight", lambda self: calls.append(self) or decode(self))
    monkeypatch.setattr(CompressedLinear, "forward", lambda self, x: pytest.fail("ran the kernel path"))
    x = torch.randn(3, 9, 16)
    for need in (True, False):
        calls.clear()
        assert zoo.rel_err(cm(x, x, x, need_weights=need)[0], _dense(mha, x, x, x, need_weights=need)[0]) <= TOL
        assert sorted(map(id, calls)) == sorted(map(id, projections)), "each projection decoded exactly once"
    assert {k: tuple(v.shape) for k, v in cm.state_dict().items() if isinstance(v, torch.Tensor)} == before


def test_mha_separate_kdim_vdim_and_partly_compressed() -> None:
    mha = nn.MultiheadAttention(16, 2, kdim=10, vdim=6, batch_first=True).eval()
    zoo.compress_all(mha, seed=4)
    for name in ("v_proj_weight",):  # a projection without compression buffers stays a dense Linear
        for kind in buffers.KINDS:
            mha._buffers.pop(buffers.buffer_name(kind, name))
    cm = to_compressed_inference(mha)
    assert isinstance(cm.q_proj, CompressedLinear) and isinstance(cm.k_proj, CompressedLinear)
    assert type(cm.v_proj) is nn.Linear and not cm._qkv_same_embed_dim
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(3, 4, 16, generator=g), torch.randn(3, 5, 10, generator=g), torch.randn(3, 5, 6, generator=g)
    assert zoo.rel_err(cm(q, k, v)[0], _dense(mha, q, k, v)[0]) <= TOL


# --------------------------------------------------------------------------------------- recurrent and embedding


def test_rnn_takes_packed_sequence_and_flatten_parameters_is_a_noop() -> None:
    """(every calling convention against torch: tests/test_recurrent.py)"""
    lstm = to_compressed_inference(CASES["lstm"][0])
    lstm.flatten_parameters()
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(2, 3, 12), [2, 3], batch_first=True, enforce_sorted=False)
    got, (h, c) = lstm(packed)
    want, (h_ref, c_ref) = _dense(CASES["lstm"][0], packed)
    assert max(zoo.rel_err(got.data, want.data), zoo.rel_err(h, h_ref), zoo.rel_err(c, c_ref)) <= TOL
    with pytest.raises(ValueError, match="input_size=12"):
        lstm(torch.randn(2, 3, 11))
    with pytest.raises(ValueError, match=r"c0 must have shape \(4, 2, 10\)"):
        lstm(torch.randn(2, 3, 12), (torch.zeros(4, 2, 10), torch.zeros(4, 2, 9)))
    gru = to_compressed_inference(CASES["gru"][0])
    with pytest.raises(ValueError, match=r"h0 must have shape \(4, 3, 10\)"):
        gru(torch.randn(5, 3, 12), torch.zeros(2, 3, 10))


@pytest.mark.parametrize("layout", ["ell", "codes", None])
@pytest.mark.parametrize("bits", [3, 7])
@pytest.mark.parametrize("dim", [13, 300])
def test_embedding_layouts_decode_rows(layout: str | None, bits: int, dim: int) -> None:
    emb = zoo.compress_all(nn.Embedding(30, dim, padding_idx=2), density=0.3, bits=bits, seed=5)
    ce = CompressedEmbedding.from_module(emb, layout=layout)
    ids = torch.tensor([[2, 0, 29], [5, 2, 17]])
    assert torch.equal(ce(ids), emb(ids))
    assert torch.equal(ce(ids)[0, 0], torch.zeros(dim)) and ce.padding_idx == 2
    if layout == "codes":  # 3 bits + a zero code fit a nibble: two codes per byte
        assert ce.codes.dtype == torch.uint8 and ce.codes.shape == (30, -(-dim // 2) if bits == 3 else dim)
    if layout == "ell":
        assert ce.entries.dtype == (torch.uint8 if dim <= 256 else torch.int16)
        assert ce.entries.shape == (2, 30, int(emb.weight_mask.sum(1).max()))
    assert [n for n, t in ce.named_buffers() if t.is_floating_point()] == ["codebook"]
    assert ce.codebook.numel() <= 2**bits + 1


def test_embedding_codes_layout_needs_a_free_code() -> None:
    emb = zoo.compress_all(nn.Embedding(30, 13), density=0.5, bits=8)
    with pytest.raises(ValueError, match="needs a free code for pruned weights; the codebook has 256"):
        CompressedEmbedding.from_module(emb, layout="codes")
    assert CompressedEmbedding.from_module(emb).layout == "ell"


def test_embedding_with_max_norm_is_kept_dense(caplog) -> None:
    model = nn.Sequential(zoo.compress_all(nn.Embedding(10, 4, max_norm=1.0)))
    with caplog.at_level(logging.INFO, logger="dc_lightning.inference"):
        out = to_compressed_inference(model)
    assert isinstance(out[0], nn.Embedding)
    assert "kept 0 (Embedding) dense: max_norm=1.0" in caplog.text


# ------------------------------------------------------------------------------------------ what is provably safe


class _TiedLM(nn.Module):
    """Reads the embedding's weight in forward (output layer tied functionally)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, ids):
        return F.linear(self.proj(self.emb(ids)), self.emb.weight)


class _SharedLM(nn.Module):
    """Tied by sharing the Parameter (the word_language_model way): both layers read only their own weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(self.emb(ids))


class _Overrides(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


def _weight_of(m):
    return m.weight


class _Hidden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.read = _weight_of  # a helper called through an attribute: invisible to the source check

    def forward(self, x):
        return x @ self.read(self.fc).t()


def test_weight_reader_is_kept_dense_with_one_log_line(caplog) -> None:
    model = zoo.compress_all(_TiedLM(), seed=6).eval()
    ids = torch.randint(0, 20, (2, 5))
    with caplog.at_level(logging.INFO, logger="dc_lightning.inference"):
        conv = to_compressed_inference(model, example_inputs=(ids,))
    assert isinstance(conv.emb, nn.Embedding) and isinstance(conv.proj, CompressedLinear)
    lines = [r.getMessage() for r in caplog.records if "emb" in r.getMessage() and "kept" in r.getMessage()]
    assert lines == ["to_compressed_inference: kept emb (Embedding) dense: _TiedLM.forward reads `emb.weight`"]
    assert torch.equal(conv(ids), model(ids))


def test_shared_parameter_both_converted() -> None:
    model = _SharedLM().eval()
    zoo.compress_all(model.emb, seed=7)
    for name, t in model.emb.named_buffers():  # one weight, one compression state on both holders
        model.out.register_buffer(name, t)
    conv = to_compressed_inference(model, example_inputs=torch.randint(0, 20, (2, 5)))
    assert isinstance(conv.emb, CompressedEmbedding) and isinstance(conv.out, CompressedLinear)
    _assert_no_dense_copy(model, conv)
    plan = {d.name: d for d in plan_conversion(model, exclude=["out"])}
    # one weight: converted once or not at all (issue 22: a dense copy alive beside a compressed one saves nothing)
    assert plan["out"].action == "skip" and plan["emb"].action == "skip"
    assert "tied to out, which stays dense (excluded by pattern 'out')" in plan["emb"].reason


def test_a_module_registered_twice_is_replaced_by_one_module() -> None:
    shared = nn.Linear(6, 6)
    model = zoo.compress_all(nn.Sequential(shared, nn.Tanh(), shared), seed=12).eval()
    conv = to_compressed_inference(model)
    assert isinstance(conv[0], CompressedLinear) and conv[0] is conv[2]
    x = torch.randn(2, 6)
    assert zoo.rel_err(conv(x), model(x)) <= TOL  # not bit for bit: the CPU sums a small batch's products sparsely


def test_skips_exclude_overridden_forward_hooks_and_conv(caplog) -> None:
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(8, 8), _Overrides(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
    )
    zoo.compress_all(model, seed=8)
    buffers.set_mask(model[0], torch.rand(4, 2, 3) < 0.5)
    model[4].register_forward_hook(lambda *a: None)
    plan = {d.name: d for d in plan_conversion(model, exclude=["5"])}
    assert plan["0"].action == "skip" and "no compressed inference module for Conv1d" in plan["0"].reason
    assert plan["2"].action == "convert"
    assert plan["3"].action == "skip" and "overrides Linear.forward" in plan["3"].reason
    assert plan["4"].action == "skip" and "hooks" in plan["4"].reason
    assert plan["5"].action == "skip" and "excluded by pattern '5'" in plan["5"].reason
    x = torch.randn(3, 2, 4)
    with caplog.at_level(logging.INFO, logger="dc_lightning.inference"):
        conv = to_compressed_inference(model, exclude=["5"], example_inputs=x)
    assert [type(m).__name__ for m in conv] == ["Conv1d", "Flatten", "CompressedLinear", "_Overrides", "Linear",
                                                "Linear"]
    assert sum("kept" in r.getMessage() for r in caplog.records) == 4  # one line per skipped layer
    assert zoo.rel_err(conv(x), model(x)) <= TOL


def test_parameter_level_exclude_keeps_those_weights_dense_inside() -> None:
    model, variants = CASES["mixed"]
    conv = to_compressed_inference(model, exclude=["attn.out_proj.weight", "lstm.weight_hh_l1_reverse", "head.2.*"])
    assert isinstance(conv.attn, CompressedMultiheadAttention) and type(conv.attn.out_proj) is nn.Linear
    assert isinstance(conv.attn.q_proj, CompressedLinear)
    cells = conv.lstm.cells
    assert type(cells[3]["hh"]) is nn.Linear and isinstance(cells[3]["ih"], CompressedLinear)
    assert type(conv.head[2]) is nn.Linear
    (args, kwargs), = variants.values()
    with torch.no_grad():
        assert zoo.rel_err(conv(*args, **kwargs), _dense(model, *args, **kwargs)) <= TOL


def test_encoder_with_dense_attention_and_converted_feed_forward_runs_the_slow_path() -> None:
    """The encoder layer's fused path would read linear1.weight: it must be off although the attention is dense."""
    model, variants = CASES["encoder_bf"]
    conv = to_compressed_inference(model, exclude=["layers.*.self_attn"])
    assert type(conv.layers[0].self_attn) is nn.MultiheadAttention and isinstance(conv.layers[0].linear1,
                                                                                    CompressedLinear)
    (src,), _ = variants["plain"]
    with torch.no_grad():  # torch's fast path enabled (default): the dense attention may use its own fused kernel
        assert zoo.rel_err(conv(src), model(src)) <= TOL


def test_pruned_only_layer_with_too_many_values_is_skipped() -> None:
    lin = nn.Linear(30, 30)
    buffers.set_mask(lin, torch.rand(30, 30) < 0.9)
    with torch.no_grad():
        lin.weight.mul_(lin.weight_mask)
    (d,) = plan_conversion(lin)
    assert d.action == "skip" and "distinct values" in d.reason


def test_example_inputs_catch_a_reader_the_source_check_cannot_see() -> None:
    model = zoo.compress_all(_Hidden(), seed=9).eval()
    with pytest.raises(ValueError, match=r"converted model fails on example_inputs.*exclude"):
        to_compressed_inference(model, example_inputs=torch.randn(2, 6))
    assert isinstance(to_compressed_inference(model, exclude=["fc"], example_inputs=torch.randn(2, 6)).fc, nn.Linear)


def test_example_inputs_catch_a_numerical_mismatch_and_name_the_layer() -> None:
    model = zoo.compress_all(nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)), seed=10).eval()
    with torch.no_grad():
        model[2].weight.add_(0.5 * model[2].weight_mask)  # the weight no longer equals its codebook decode
    with pytest.raises(ValueError, match=r"relative L2 error .* Layers that differ on their own inputs: 2 \(") as e:
        to_compressed_inference(model, example_inputs=torch.randn(2, 6))
    assert "0 (" not in str(e.value)


def test_unavailable_source_needs_example_inputs() -> None:
    ns: dict = {"nn": nn}
    src = (
        "class Made(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(4, 4)\n"
        "    def forward(self, x):\n        return self.fc(x)\n"
    )
    exec(src, ns)
    model = zoo.compress_all(ns["Made"](), seed=11).eval()
    assert isinstance(to_compressed_inference(model).fc, nn.Linear)
    assert isinstance(to_compressed_inference(model, example_inputs=torch.randn(2, 4)).fc, CompressedLinear)


# ------------------------------------------------------------------------------------------ memory, state, compile


def test_compressed_memory_counts_every_tensor_once() -> None:
    model = CASES["mixed"][0]
    conv = to_compressed_inference(model)
    mem = compressed_memory(conv)
    names = [r["name"] for r in mem["layers"]]
    assert names == ["emb", "lstm", "attn", "gru", "head.0", "head.2"]
    dense = {n: sum(p.numel() for p in model.get_submodule(n).parameters()) for n in names}
    for r in mem["layers"]:
        m = conv.get_submodule(r["name"])
        held = {(t.data_ptr(), t.numel()): t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()]}
        assert r["bytes"] == sum(held.values()) and r["dense_fp16_bytes"] == 2 * dense[r["name"]], r
    assert mem["bytes"] == sum(r["bytes"] for r in mem["layers"])
    assert mem["ratio"] == pytest.approx(mem["dense_fp16_bytes"] / mem["bytes"])
    big = zoo.compress_all(nn.Embedding(400, 64), density=0.1, bits=4)
    # 10 % density, 4 bits: ~14 kept entries in the longest of 400 rows, 2 bytes each (uint8 column + code)
    assert compressed_memory(nn.Sequential(CompressedEmbedding.from_module(big)))["ratio"] > 3.5


@pytest.mark.parametrize("case", ["mixed", "lstm_proj", "decoder_sf"])
def test_state_dict_roundtrip(case: str) -> None:
    model, variants = CASES[case]
    conv = to_compressed_inference(model)
    other = to_compressed_inference(model)
    with torch.no_grad():
        for t in [*other.parameters(), *other.buffers()]:
            t.zero_()
    other.load_state_dict(conv.state_dict())
    args, kwargs = next(iter(variants.values()))
    with torch.no_grad():
        assert zoo.rel_err(other(*args, **kwargs), conv(*args, **kwargs)) == 0.0


@pytest.mark.parametrize("case", ["mixed", "encoder_bf", "decoder_sf", "demo_transformer"])
def test_fullgraph_trace(case: str) -> None:
    """dynamo traces the converted modules without a graph break (eager backend: no inductor compile on the CPU)."""
    model, variants = CASES[case]
    conv = to_compressed_inference(model)
    torch._dynamo.reset()
    compiled = torch.compile(conv, fullgraph=True, backend="eager")
    args, kwargs = next(iter(variants.values()))
    with torch.no_grad():
        assert zoo.rel_err(compiled(*args, **kwargs), conv(*args, **kwargs)) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("kind", [CompressedLinear, CompressedLSTM, CompressedMultiheadAttention])
def test_inductor_compile_matches_eager(kind: type) -> None:
    """torch.compile with its default backend (inductor: generated C++ on the CPU) gives the eager converted model's
    output, for a CompressedLinear stack, a CompressedLSTM and a CompressedMultiheadAttention (2-core CPU: 27 s for
    the three with an empty inductor cache, the first compile of a process the slowest; 17 s with a warm cache)."""
    torch.manual_seed(0)
    model, args = {
        CompressedLinear: (nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 7)), (torch.randn(3, 12),)),
        CompressedLSTM: (nn.LSTM(6, 5, batch_first=True), (torch.randn(2, 3, 6), (torch.randn(1, 2, 5),) * 2)),
        CompressedMultiheadAttention: (nn.MultiheadAttention(8, 2, batch_first=True), (torch.randn(2, 3, 8),) * 3),
    }[kind]
    model = zoo.compress_all(model, seed=0).eval()
    conv = to_compressed_inference(model)
    assert isinstance(conv if kind is not CompressedLinear else conv[0], kind)
    torch._dynamo.reset()
    compiled = torch.compile(conv)
    # compile_threads=1: no worker pool to start on 2 cores
    with torch.no_grad(), torch._inductor.config.patch(compile_threads=1):
        eager, got = conv(*args), compiled(*args)
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)
    assert zoo.rel_err(got, _dense(model, *args)) <= TOL


# ---------------------------------------------------------------------------------------- Triton interpreter run


def _interpreter_cases(out_path: str) -> None:
    """Child-process entry point (TRITON_INTERPRET=1 set before triton is imported): tiny converted models."""
    results = {}
    for name in ("mixed", "encoder_sf", "embedding"):
        model, variants = CASES[name]
        conv = to_compressed_inference(model)
        args, kwargs = next(iter(variants.values()))
        with torch.no_grad():
            results[name] = zoo.rel_err(conv(*args, **kwargs), _dense(model, *args, **kwargs))
    Path(out_path).write_text(json.dumps(results))


# triton is a hard dependency on Linux (pyproject.toml): there a missing triton fails, not skips
@pytest.mark.skipif(sys.platform != "linux" and importlib.util.find_spec("triton") is None,
                    reason="triton not installed")
def test_triton_interpreter(tmp_path) -> None:
    out = tmp_path / "interp.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(HERE), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == {"mixed", "encoder_sf", "embedding"}
    for name, err in results.items():
        assert err <= TOL, f"{name}: relative error {err:.3g} under the Triton interpreter"


if __name__ == "__main__":
    torch.set_num_threads(1)
    _interpreter_cases(sys.argv[1])
