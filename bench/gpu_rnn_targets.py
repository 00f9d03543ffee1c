"""CUDA check: the default callbacks on LSTM/GRU/attention weights keep cuDNN's flattened RNN weights valid.

On CUDA ``nn.LSTM``/``nn.GRU`` keep their weights as views into one flat buffer (``flatten_parameters``) that cuDNN
reads. Masking and codebook rewrites must be in place, or cuDNN would silently run with stale (unmasked) copies or
warn that the weights are "not part of single contiguous chunk of memory". For each model of
tests/callbacks/test_param_targets.py with a recurrent layer, this trains a few steps on the GPU with
``MagnitudePruning`` + ``TrainedQuantization`` and checks after every step (tests' ``Invariants``): pruned weights
exactly 0, quantized weights == ``codebook[assign]``, and the cuDNN LSTM output == a float64 gate-by-gate reference
built from ``param * mask`` (TF32 off). After training it checks that every RNN's weights still share one storage.

    python bench/gpu_rnn_targets.py          # writes $OUT/gpu_rnn_targets.json and .md (default bench/out)

Needs torch + Lightning only (no Hydra): runs on the H200 image.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "callbacks")]

from nets import cpu_trainer  # noqa: E402
from test_param_targets import Invariants, bits_of, callbacks, density_of, lm, token_loader  # noqa: E402

from dc_lightning import buffers  # noqa: E402
from dc_lightning.targets import select_targets  # noqa: E402


def one_storage(rnn: nn.RNNBase) -> bool:
    """Whether every parameter of ``rnn`` is a view into one storage (cuDNN's flattened weights)."""
    return len({p.untyped_storage().data_ptr() for p in rnn.parameters()}) == 1


class StorageAtTrainEnd(Invariants):
    """Invariants, plus whether the RNN weights still share cuDNN's flat storage at the end of training, on the GPU
    (read in ``on_train_end``: Lightning's teardown moves the model back to the CPU, which un-flattens them)."""

    one_storage: bool | None = None

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.one_storage = all(one_storage(m) for m in pl_module.modules() if isinstance(m, nn.RNNBase))


def check(kind: str) -> dict:
    module = lm(kind)
    inv = StorageAtTrainEnd()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu_trainer(3, [*callbacks(), inv], accelerator="gpu", devices=1, limit_train_batches=2).fit(
            module, token_loader()
        )
    ok_density = ok_values = True
    for name, t in select_targets(module).items():
        w, mask = t.weight.detach(), buffers.get_mask(t.module, t.param)
        ok_density &= int(mask.sum()) == round(density_of(name) * w.numel())
        ok_values &= w[w != 0].unique().numel() <= 2 ** bits_of(name)
    return {
        "model": kind,
        "device": torch.cuda.get_device_name(),
        "steps checked": inv.steps,
        "rnn weights one storage at train end (GPU)": inv.one_storage,
        "non-contiguous warnings": sum("contiguous chunk" in str(w.message) for w in caught),
        "densities exact": bool(ok_density),
        "<= 2^bits values": bool(ok_values),
    }


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_rnn_targets.py needs a CUDA device")
    torch.backends.cudnn.allow_tf32 = False  # the reference comparison is fp32 vs float64
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = [check(kind) for kind in ("lstm", "gru", "mixed")]
    out = Path(os.environ.get("OUT", ROOT / "bench" / "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_rnn_targets.json").write_text(json.dumps(rows, indent=2))
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (out / "gpu_rnn_targets.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    bad = [r["model"] for r in rows if not (r["rnn weights one storage at train end (GPU)"] and r["densities exact"]
                                            and r["<= 2^bits values"] and r["non-contiguous warnings"] == 0)]
    if bad:
        raise SystemExit(f"failed: {bad}")


if __name__ == "__main__":
    main()
