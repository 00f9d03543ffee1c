"""The converted zoo (``tests/compressed_zoo.py``, every weight kind and mask variant of the GPU suite) is graph-safe,
checked on the CPU:

* **No host synchronisation, no host-to-device copy in forward** (what CUDA-graph capture refuses): each converted
  model runs on *fake* CUDA tensors (``FakeTensorMode``: shapes and devices only, no GPU needed; the compressed
  layers take their CUDA path, the kernels' fake implementations). A read of a value on the host (``.item()``,
  ``bool(t)``, ``nonzero``...) raises there, and a dispatch mode records every op that turns a CPU tensor into a CUDA
  one. Two controls show the check fails where capture failed on the H200 before the fix (torch's
  ``_detect_is_causal_mask`` reading the mask; Lightning's demo Transformer copying its CPU mask).
* **torch.compile(fullgraph=True)** (graph breaks raise; no inductor needed): the compiled converted model equals its
  eager run, for every variant. The last variant of each case (the one with the most masks for the attention cases)
  compiles with the ``aot_eager`` backend (AOT autograd traces the aten graph through the kernels' fake
  implementations too), the others with ``eager`` (dynamo only: where graph breaks are found) to keep the file under
  a minute; ``DC_COMPILE_BACKEND=aot_eager`` runs every variant with it.
"""

from __future__ import annotations

import copy
import os

import compressed_zoo as zoo
import pytest
import torch
from fake_cuda import run_on_fake_cuda
from torch import nn
from torch.utils._pytree import tree_leaves

from dc_lightning.inference.conversion import to_compressed_inference

CASES = zoo.build_cases()
VARIANTS = [(name, v) for name, (_, variants) in CASES.items() for v in variants]
BACKEND = os.environ.get("DC_COMPILE_BACKEND")  # None: aot_eager for each case's last variant, eager otherwise
_CONVERTED: dict[str, nn.Module] = {}


@pytest.fixture(autouse=True, scope="module")
def _slow_attention_path():
    """torch's fused attention paths off, as in the GPU suite (the converted layers never take them)."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(before)


def _converted(name: str) -> nn.Module:
    if name not in _CONVERTED:
        _CONVERTED[name] = to_compressed_inference(CASES[name][0])
    return _CONVERTED[name]


def _run_on_fake_cuda(model: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, list[str]]:
    """``model(*args, **kwargs)`` on fake CUDA tensors: (the output, the host-to-device copies made in forward)."""
    return run_on_fake_cuda(model, lambda m, a, kw: m(*a, **kw), args, kwargs)


@pytest.mark.parametrize(("name", "vname"), VARIANTS, ids=[f"{n}-{v}" for n, v in VARIANTS])
def test_forward_has_no_host_sync_on_cuda(name: str, vname: str) -> None:
    args, kwargs = CASES[name][1][vname]
    out, copies = _run_on_fake_cuda(_converted(name), args, kwargs)
    assert copies == [], f"{name}/{vname}: host-to-device copies in forward: {copies}"
    first = out if isinstance(out, torch.Tensor) else tree_leaves(out)[0]
    assert first.device.type == "cuda"


def test_host_sync_check_catches_torch_causal_detection() -> None:
    """Control: without the converted model's pre-hooks, torch's encoder reads the mask on the host (the H200's
    capture failure of ``encoder_bf/bool_mask+padding``) and the check raises."""
    conv = copy.deepcopy(_converted("encoder_bf"))
    assert len(conv._forward_pre_hooks) == 1
    conv._forward_pre_hooks.clear()
    args, kwargs = CASES["encoder_bf"][1]["bool_mask+padding"]
    with pytest.raises(Exception, match="_local_scalar_dense"):
        _run_on_fake_cuda(conv, args, kwargs)


def test_host_sync_check_catches_demo_mask_copy() -> None:
    """Control: without the pre-hook on Lightning's demo Transformer (the decoder's hook kept), its CPU-made causal
    mask is copied to the device in forward, and the check records the copy."""
    conv = copy.deepcopy(_converted("demo_transformer"))
    assert len(conv._forward_pre_hooks) == 1
    conv._forward_pre_hooks.clear()
    args, kwargs = CASES["demo_transformer"][1]["lm"]
    _, copies = _run_on_fake_cuda(conv, args, kwargs)
    assert copies, "the CPU mask's copy to the device was not seen"


def test_hooks_leave_explicit_hints_alone() -> None:
    """The pre-hooks only fill a hint left ``None``: an explicit ``is_causal`` and a passed mask go through as given,
    and the converted model (hooks included) survives deepcopy and state_dict round trips."""
    conv = _converted("transformer")
    calls = []
    dec = copy.deepcopy(conv.decoder)
    dec.register_forward_pre_hook(lambda m, a, kw: calls.append(kw.get("tgt_is_causal")), with_kwargs=True)
    args, kwargs = CASES["transformer"][1]["masks"]
    src, tgt = args
    mem = torch.randn(src.shape)
    with torch.no_grad():
        dec(tgt, mem, tgt_mask=kwargs["tgt_mask"])
        dec(tgt, mem, tgt_mask=kwargs["tgt_mask"], tgt_is_causal=True)
        dec(tgt, mem)
    assert calls == [False, True, None]
    again = copy.deepcopy(conv)
    again.load_state_dict(conv.state_dict())
    assert len(again.decoder._forward_pre_hooks) == 1 and len(again.encoder._forward_pre_hooks) == 1


@pytest.mark.parametrize(("name", "vname"), VARIANTS, ids=[f"{n}-{v}" for n, v in VARIANTS])
def test_compile_fullgraph_matches_eager(name: str, vname: str) -> None:
    conv = _converted(name)
    args, kwargs = CASES[name][1][vname]
    backend = BACKEND or ("aot_eager" if vname == list(CASES[name][1])[-1] else "eager")
    torch._dynamo.reset()  # the encoder/decoder layers' code is shared by several cases: no recompile limit
    with torch.no_grad():
        eager = conv(*args, **kwargs)
        compiled = torch.compile(conv, fullgraph=True, backend=backend)(*args, **kwargs)
    err = zoo.rel_err(compiled, eager)
    assert err <= 1e-5, f"{name}/{vname} ({backend}): compiled vs eager rel err {err:.2e}"


class _TiedLM(nn.Module):
    """An embedding tied to its output head (GPT-2's ``lm_head.weight = wte.weight``): converted to a TiedEmbedding
    and a CompressedLinear sharing one packed table."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(50, 16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.wte(ids)))


def _conv1d_net() -> nn.Module:
    from transformers.pytorch_utils import Conv1D  # Hugging Face's transposed linear (GPT-2's c_attn, c_fc)

    return nn.Sequential(Conv1D(24, 16), nn.GELU(), Conv1D(16, 24))


@pytest.mark.parametrize("build", [_TiedLM, _conv1d_net], ids=["tied_embedding", "hf_conv1d"])
def test_kinds_outside_the_zoo_have_no_host_sync(build) -> None:
    """The other converted kinds (a tied embedding/head pair, Hugging Face's Conv1D): graph-safe and compilable."""
    torch.manual_seed(0)
    conv = to_compressed_inference(zoo.compress_all(build()).eval())
    converted = {type(m).__name__ for m in conv.modules()}
    assert converted & {"TiedEmbedding", "CompressedConv1D"}, converted
    x = torch.randint(0, 50, (2, 5)) if build is _TiedLM else torch.randn(2, 5, 16)
    out, copies = _run_on_fake_cuda(conv, (x,), {})
    assert copies == [] and out.device.type == "cuda"
    torch._dynamo.reset()
    with torch.no_grad():
        err = zoo.rel_err(torch.compile(conv, fullgraph=True, backend="aot_eager")(x), conv(x))
    assert err <= 1e-5
