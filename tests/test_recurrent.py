"""``CompressedLSTM`` / ``CompressedGRU`` / ``CompressedRNN`` (``dc_lightning.inference.recurrent``) against torch's
own modules on every calling convention, CPU.

Each tiny torch module (2 layers) is pruned (``prune_model``) and quantized (``quantize_model``), so it runs with
exactly the weights the converted module decodes; outputs and final states must agree to a relative L2 error of
1e-5 (fp32). Both paths run: ``dense`` (the CPU path: every matrix decoded once per call, torch's kernel; calls of at
most ``STEP_MAX`` timesteps step through the layouts' CPU products instead) and ``kernels`` (the step loop CUDA takes,
here on the CPU reference of the compressed kernels, selected by making ``use_triton`` answer True).
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from dc_lightning import to_compressed_inference
from dc_lightning.inference import recurrent
from dc_lightning.inference.linear import CompressedLinear
from dc_lightning.pruning.masks import prune_model
from dc_lightning.quantization.codebooks import quantize_model

TOL = 1e-5
IN, H, P, LAYERS = 5, 6, 4, 2  # input, hidden, LSTM projection sizes; layers
KINDS = {
    "lstm": (nn.LSTM, {}),
    "lstm_proj": (nn.LSTM, {"proj_size": P}),
    "gru": (nn.GRU, {}),
    "rnn_tanh": (nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
}
LENGTHS = [5, 2, 4, 1]  # unsorted, a length-1 sequence included; the batch of the padded and packed inputs
PATHS = ("dense", "kernels")


def _compress(module: nn.Module, seed: int = 0, **convert) -> tuple[nn.Module, nn.Module]:
    """``(dense, converted)``: ``module`` pruned to half and quantized to 4 bits in place, and its conversion."""
    torch.manual_seed(seed)
    holder = nn.Sequential(module).eval()
    logging.disable(logging.INFO)  # the conversion logs one line per layer
    try:
        prune_model(holder, densities=0.5)
        quantize_model(holder, bits=4, max_iter=5)
        return holder[0], to_compressed_inference(holder, **convert)[0]
    finally:
        logging.disable(logging.NOTSET)


@functools.cache
def _pair(kind: str, bidirectional: bool, batch_first: bool) -> tuple[nn.Module, nn.Module]:
    cls, kw = KINDS[kind]
    torch.manual_seed(1)
    module = cls(IN, H, num_layers=LAYERS, bidirectional=bidirectional, batch_first=batch_first, **kw)
    return _compress(module)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _states(hx: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return hx if isinstance(hx, tuple) else (hx,)


def _inputs(rnn: nn.RNNBase, form: str, with_h0: bool, g: torch.Generator) -> tuple:
    """``(input,)`` or ``(input, hx)`` for ``rnn`` in one of the forms torch accepts."""
    B, T = len(LENGTHS), max(LENGTHS)
    x = torch.randn(B, T, IN, generator=g)  # batch-first; transposed below when the module is sequence-first
    if form == "unbatched":
        inp, batch = x[0], None
    elif form == "padded":
        inp, batch = (x if rnn.batch_first else x.transpose(0, 1)), B
    else:
        lengths = LENGTHS if form == "packed_unsorted" else sorted(LENGTHS, reverse=True)
        padded = x if rnn.batch_first else x.transpose(0, 1)
        inp = pack_padded_sequence(padded, lengths, rnn.batch_first, enforce_sorted=form == "packed_sorted")
        batch = B
    if not with_h0:
        return (inp,)
    D = 2 if rnn.bidirectional else 1
    sizes = [getattr(rnn, "proj_size", 0) or rnn.hidden_size] + ([rnn.hidden_size] if isinstance(rnn, nn.LSTM) else [])
    shapes = [(LAYERS * D, *(() if batch is None else (batch,)), s) for s in sizes]
    hx = tuple(torch.randn(*shape, generator=g) for shape in shapes)
    return inp, (hx if isinstance(rnn, nn.LSTM) else hx[0])


def _run(module: nn.Module, args: tuple, path: str, monkeypatch: pytest.MonkeyPatch) -> tuple:
    with monkeypatch.context() as mp:
        if path == "kernels":
            mp.setattr(recurrent, "use_triton", lambda x: True)
        with torch.no_grad():
            return module(*args)


@pytest.mark.parametrize("with_h0", [False, True], ids=["no_h0", "h0"])
@pytest.mark.parametrize("form", ["packed_sorted", "packed_unsorted", "padded", "unbatched"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_matches_torch(
    kind: str, bidirectional: bool, batch_first: bool, form: str, with_h0: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    dense, conv = _pair(kind, bidirectional, batch_first)
    assert isinstance(conv, recurrent.CompressedRNNBase)
    assert all(isinstance(m, CompressedLinear) for cell in conv.cells for m in cell.values())
    args = _inputs(dense, form, with_h0, torch.Generator().manual_seed(7))
    with torch.no_grad():
        want_out, want_hx = dense(*args)
    for path in PATHS:
        got_out, got_hx = _run(conv, args, path, monkeypatch)
        assert type(got_hx) is type(want_hx), path
        if form.startswith("packed"):
            assert isinstance(got_out, PackedSequence), path
            for a, b in zip(got_out[1:], want_out[1:], strict=True):  # batch_sizes, sorted/unsorted indices
                assert (a is None and b is None) or torch.equal(a, b), path
            got_out, want_out_t = got_out.data, want_out.data
        else:
            want_out_t = want_out
        assert _rel_err(got_out, want_out_t) <= TOL, f"{path}: output"
        for i, (a, b) in enumerate(zip(_states(got_hx), _states(want_hx), strict=True)):
            assert _rel_err(a, b) <= TOL, f"{path}: final state {i}"


# ------------------------------------------------------------------------------------------- the CPU path's cost


def test_cpu_path_decodes_each_matrix_once_per_call_and_keeps_no_copy(monkeypatch) -> None:
    """A sequence decodes every matrix exactly once; a call of at most ``STEP_MAX`` timesteps decodes none (it steps
    through the layouts' CPU references, never through the ops); neither leaves state behind."""
    dense, conv = _pair("lstm_proj", True, False)
    mats = [m for cell in conv.cells for m in cell.values()]
    assert len(mats) == LAYERS * 2 * 3
    before = {k: (tuple(v.shape), v.dtype) for k, v in conv.state_dict().items() if isinstance(v, torch.Tensor)}
    attrs = set(vars(conv))
    calls, products = [], []
    decode = CompressedLinear.dense_weight
    monkeypatch.setattr(CompressedLinear, "dense_weight", lambda self: calls.append(self) or decode(self))
    monkeypatch.setattr(CompressedLinear, "forward", lambda self, x: pytest.fail("called the op"))
    product = recurrent.cpu_projection
    monkeypatch.setattr(recurrent, "cpu_projection", lambda m, x: products.append(m) or product(m, x))
    g = torch.Generator().manual_seed(3)
    for T in (1, recurrent.STEP_MAX, recurrent.STEP_MAX + 1, 9):
        calls.clear()
        products.clear()
        x = torch.randn(T, 2, IN, generator=g)
        with torch.no_grad():
            got, _ = conv(x)
            want, _ = dense(x)
        assert _rel_err(got, want) <= TOL
        if T <= recurrent.STEP_MAX:
            assert not calls, f"T={T}: decoded"
            # per layer and direction: W_ih once for all timesteps, then W_hh and W_hr once per timestep
            assert len(products) == LAYERS * 2 * (1 + 2 * T) and {id(m) for m in products} == set(map(id, mats))
        else:
            assert not products and sorted(map(id, calls)) == sorted(map(id, mats)), f"T={T}: each decoded once"
    after = {k: (tuple(v.shape), v.dtype) for k, v in conv.state_dict().items() if isinstance(v, torch.Tensor)}
    assert after == before and set(vars(conv)) == attrs, "the call left state behind"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_short_calls_match_torch_on_every_form(kind: str) -> None:
    """Calls of at most ``STEP_MAX`` timesteps (the CPU step path): padded both ways, packed (a batch that shrinks),
    unbatched, with and without states, and a sampler's loop of one call per token carrying the state."""
    g = torch.Generator().manual_seed(5)
    for bidirectional, batch_first in ((False, False), (True, True)):
        dense, conv = _pair(kind, bidirectional, batch_first)
        D = 2 if bidirectional else 1
        for T in range(1, recurrent.STEP_MAX + 1):
            x = torch.randn(3, T, IN, generator=g)
            padded = x if batch_first else x.transpose(0, 1)
            forms = [(padded,), (x[0],)]  # x[0]: one unbatched sequence [T, IN]
            forms.append((pack_padded_sequence(padded, [T, 1, T], batch_first, enforce_sorted=False),))
            sizes = [getattr(dense, "proj_size", 0) or H] + ([H] if isinstance(dense, nn.LSTM) else [])
            hx = tuple(torch.randn(LAYERS * D, 3, s, generator=g) for s in sizes)
            forms.append((padded, hx if isinstance(dense, nn.LSTM) else hx[0]))
            for args in forms:
                with torch.no_grad():
                    want_out, want_hx = dense(*args)
                    got_out, got_hx = conv(*args)
                if isinstance(want_out, PackedSequence):
                    want_out, got_out = want_out.data, got_out.data
                assert _rel_err(got_out, want_out) <= TOL, (kind, T, len(args))
                for a, b in zip(_states(got_hx), _states(want_hx), strict=True):
                    assert _rel_err(a, b) <= TOL, (kind, T, len(args))
        tokens = torch.randn(6, 1, 1, IN, generator=g)
        want_hx = got_hx = None
        with torch.no_grad():
            for tok in tokens:
                tok = tok.transpose(0, 1) if batch_first else tok
                want, want_hx = dense(tok, want_hx)
                got, got_hx = conv(tok, got_hx)
                assert _rel_err(got, want) <= TOL


# ------------------------------------------------------------------------------------- training mode, bias, dense


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_relu"])
def test_train_mode_applies_inter_layer_dropout_as_torch(kind: str, monkeypatch) -> None:
    cls, kw = KINDS[kind]
    torch.manual_seed(2)
    dense, conv = _compress(cls(IN, H, num_layers=3, dropout=0.5, **kw))
    dense.train()
    conv.train()
    x = torch.randn(6, 3, IN)
    with torch.no_grad():
        torch.manual_seed(11)
        want, _ = dense(x)
        torch.manual_seed(11)
        got, _ = conv(x)  # the dense path runs torch's kernel: the same dropout masks from the same seed
        assert _rel_err(got, want) <= TOL
        dense.eval()
        evaluated, _ = dense(x)
        assert _rel_err(got, evaluated) > 1e-3, "dropout was not applied"
        kernels, _ = _run(conv, (x,), "kernels", monkeypatch)
        assert _rel_err(kernels, evaluated) > 1e-3, "the kernel path did not apply dropout"
        conv.eval()
        assert _rel_err(_run(conv, (x,), "kernels", monkeypatch)[0], evaluated) <= TOL
        assert _rel_err(conv(x)[0], evaluated) <= TOL


@pytest.mark.parametrize("path", PATHS)
def test_no_bias_and_weights_kept_dense(path: str, monkeypatch) -> None:
    torch.manual_seed(4)
    lstm = nn.LSTM(IN, H, num_layers=2, bias=False, proj_size=P, bidirectional=True)
    dense, conv = _compress(lstm, exclude=["0.weight_hh_l0", "0.weight_hr_l1_reverse"])
    assert not conv.bias
    assert type(conv.cells[0]["hh"]) is nn.Linear and type(conv.cells[3]["hr"]) is nn.Linear
    assert isinstance(conv.cells[0]["ih"], CompressedLinear)
    x = pack_padded_sequence(torch.randn(5, 3, IN), [5, 2, 3], enforce_sorted=False)
    with torch.no_grad():
        want, (h, c) = dense(x)
    got, (gh, gc) = _run(conv, (x,), path, monkeypatch)
    assert max(_rel_err(got.data, want.data), _rel_err(gh, h), _rel_err(gc, c)) <= TOL


# ------------------------------------------------------------------------------------------------- user mistakes


def test_user_errors_name_the_layer_and_the_valid_shape() -> None:
    _, lstm = _pair("lstm", False, True)
    _, gru = _pair("gru", True, False)
    packed = pack_padded_sequence(torch.randn(3, 4, IN), [4, 2, 1], batch_first=True)
    with pytest.raises(ValueError, match=rf"CompressedLSTM: input's last dimension must be input_size={IN}, got 3"):
        lstm(pack_padded_sequence(torch.randn(3, 4, 3), [4, 2, 1], batch_first=True))
    with pytest.raises(ValueError, match=rf"CompressedLSTM: h0 must have shape \(2, 3, {H}\)"):
        lstm(packed, (torch.zeros(2, 2, H), torch.zeros(2, 3, H)))
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h0, c0\), got Tensor"):
        lstm(packed, torch.zeros(2, 3, H))
    with pytest.raises(ValueError, match=r"CompressedGRU expects a 2-D or 3-D input or a PackedSequence, got \(1, "):
        gru(torch.randn(1, 2, 3, IN))
    with pytest.raises(ValueError, match=rf"CompressedGRU: h0 must have shape \(4, {H}\)"):
        gru(torch.randn(4, IN), torch.zeros(4, 1, H))  # unbatched input takes a 2-D h0, as torch's
