"""The default callbacks on LSTM/GRU/attention weights keep cuDNN's flattened RNN weights valid (skipped without CUDA;
run on the H200 with ``pytest tests/gpu``).

On CUDA ``nn.LSTM``/``nn.GRU`` keep their weights as views into one flat buffer (``flatten_parameters``) that cuDNN
reads. Masking and codebook rewrites must be in place, or cuDNN would silently run with stale (unmasked) copies or
warn that the weights are "not part of single contiguous chunk of memory". For each model of
``tests/callbacks/test_param_targets.py`` with a recurrent layer this trains a few steps on the GPU with
``MagnitudePruning`` + ``TrainedQuantization`` and checks after every step (that file's ``Invariants``): pruned
weights exactly 0, quantized weights == ``codebook[assign]``, and the cuDNN LSTM output == a float64 gate-by-gate
reference built from ``param * mask`` (TF32 off). At the end of training, on the GPU, every RNN's weights still share
one storage; no non-contiguous warning was raised; every target holds its density and at most ``2**bits`` values.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from callbacks.test_param_targets import Invariants, bits_of, callbacks, density_of, lm, token_loader
from nets import cpu_trainer
from torch import nn

from dc_lightning import buffers
from dc_lightning.targets import select_targets

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: needs a CUDA device")


def one_storage(rnn: nn.RNNBase) -> bool:
    """Whether every parameter of ``rnn`` is a view into one storage (cuDNN's flattened weights)."""
    return len({p.untyped_storage().data_ptr() for p in rnn.parameters()}) == 1


class StorageAtTrainEnd(Invariants):
    """Invariants, plus whether the RNN weights still share cuDNN's flat storage at the end of training, on the GPU
    (read in ``on_train_end``: Lightning's teardown moves the model back to the CPU, which un-flattens them)."""

    one_storage: bool | None = None

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.one_storage = all(one_storage(m) for m in pl_module.modules() if isinstance(m, nn.RNNBase))


@pytest.fixture
def no_tf32():
    """The LSTM reference comparison is fp32 vs float64."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("kind", ["lstm", "gru", "mixed"])
def test_callbacks_keep_cudnn_rnn_weights_valid(kind: str, no_tf32, record_property) -> None:
    module = lm(kind)
    inv = StorageAtTrainEnd()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu_trainer(3, [*callbacks(), inv], accelerator="gpu", devices=1, limit_train_batches=2).fit(
            module, token_loader()
        )
    record_property("steps_checked", inv.steps)
    assert inv.steps == 6  # Invariants asserted after each of the 3 epochs x 2 steps
    assert inv.one_storage, "RNN weights no longer share cuDNN's flat storage at train end"
    noncontiguous = [str(w.message) for w in caught if "contiguous chunk" in str(w.message)]
    assert not noncontiguous, noncontiguous[:3]
    for name, t in select_targets(module).items():
        w, mask = t.weight.detach(), buffers.get_mask(t.module, t.param)
        assert int(mask.sum()) == round(density_of(name) * w.numel()), name
        assert w[w != 0].unique().numel() <= 2 ** bits_of(name), name
