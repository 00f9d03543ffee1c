"""File size of Lightning's demo ``Transformer`` compressed with the default callbacks (CPU, a few steps).

``lightning.pytorch.demos.transformer.LightningTransformer`` at its default sizes (vocab 33,278 as for WikiText-2,
``ninp=200, nhead=2, nhid=200, nlayers=2``: 13.3 M of its 14.6 M parameters in the embedding and the output layer) is
trained for a few steps on a synthetic Zipf-distributed token stream (WikiText-2 needs a download), with the default
callbacks: ``MagnitudePruning(densities=...)`` (one round at epoch 0) and ``TrainedQuantization()`` (the paper's
5 bits for fc-like matrices, clustered at epoch 1), then written with ``save_compressed``. Two runs side by side:

* ``all targets``: the defaults, every weight matrix (embedding, attention ``in_proj_weight`` and ``out_proj``,
  feed-forward, output layer);
* ``linear only``: ``types=(nn.Linear,)``, what the callbacks compressed before parameter-level targets (the
  embedding and ``in_proj_weight`` stay dense fp32).

Figures: whole file vs the dense fp32 state dict (``file_bytes`` against every tensor at fp32), and the weights-only
ratio of [DC] (dense fp32 bytes of the compressed matrices / their payload bytes). Few steps on random-ish tokens
say nothing about accuracy; the sizes depend on the densities and bits, not on training length.

    python -m bench.experiments.demo_transformer_size        # densities 0.1, default bits, 4 steps per epoch
    python -m bench.experiments.demo_transformer_size --density 0.2 --bits 4

Writes ``demo_transformer_size.json`` and ``.md`` under ``--out`` (default
``bench/results/<date>/demo_transformer_size``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.demos.transformer import LightningTransformer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench.harness.report import markdown_table, results_dir, write_json
from dc_lightning import MagnitudePruning, TrainedQuantization
from dc_lightning.io import save_compressed

VOCAB = 33278  # the demo's default (WikiText-2)


class OfflineDemo(LightningTransformer):
    """The demo module unchanged, except that it does not download WikiText-2 (its ``prepare_data``)."""

    def prepare_data(self) -> None:
        pass


def zipf_tokens(n_seq: int, block: int, seed: int = 0) -> DataLoader:
    """``n_seq`` sequences of ``block + 1`` tokens, token ``i`` drawn with probability ~ 1/(i+1) (a language-like
    frequency law), as ``(inputs, next tokens)`` pairs."""
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64)
    tokens = torch.multinomial(p / p.sum(), n_seq * (block + 1), replacement=True, generator=g).view(n_seq, -1)
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8, shuffle=False)


def run(label: str, density: float, bits: int | None, steps: int, types: tuple | None) -> dict:
    pl.seed_everything(0)
    module = OfflineDemo(vocab_size=VOCAB)  # the demo's default sizes
    extra = {} if types is None else {"types": types}
    callbacks = [
        MagnitudePruning(densities=density, prune_epochs=[0], verbose=False, **extra),
        TrainedQuantization(bits=bits, verbose=False, **extra),
    ]
    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=steps, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    t0 = time.perf_counter()
    trainer.fit(module, zipf_tokens(8 * steps, 35))
    train_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        report = save_compressed(module, Path(tmp) / "demo.dcz")
    compressed = [r for r in report.layers if r.kind != "dense"]
    dense_rows = [r for r in report.layers if r.kind == "dense"]
    w_dense = sum(r.size_dense_bytes for r in compressed)
    w_file = sum(r.size_pqh_bytes for r in compressed)
    return {
        "run": label,
        "compressed matrices": len(compressed),
        "dense matrices": [r.name for r in dense_rows],
        "weights compressed": sum(r.weights for r in compressed),
        "parameters": sum(p.numel() for p in module.parameters()),
        "dense fp32 bytes": int(report.total.size_dense_bytes),  # every tensor of the state dict at fp32
        "file bytes": report.file_bytes,
        "whole file ratio": report.ratio_file,
        "weights-only ratio": w_dense / w_file if w_file else float("nan"),
        "train s": round(train_s, 1),
    }


def _cell(v) -> str:
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.2f}x"
    return (", ".join(v) or "none") if isinstance(v, list) else str(v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--density", type=float, default=0.1, help="fraction of every matrix kept (default 0.1)")
    parser.add_argument("--bits", type=int, default=None, help="codebook bits (default: the paper's, 5 for fc)")
    parser.add_argument("--steps", type=int, default=4, help="training batches per epoch (2 epochs)")
    parser.add_argument("--out", type=Path, default=results_dir("demo_transformer_size"))
    args = parser.parse_args(argv)
    rows = [
        run("all targets (default)", args.density, args.bits, args.steps, None),
        run("linear only (types=(nn.Linear,))", args.density, args.bits, args.steps, (nn.Linear,)),
    ]
    setup = {"density": args.density, "bits": args.bits or "default (5)", "steps per epoch": args.steps,
             "model": "LightningTransformer(vocab_size=33278): ninp=200, nhead=2, nhid=200, nlayers=2"}
    write_json({"setup": setup, "rows": rows}, args.out / "demo_transformer_size.json")
    cols = ("run", "parameters", "weights compressed", "dense fp32 bytes", "file bytes", "whole file ratio",
            "weights-only ratio", "dense matrices")
    table = markdown_table(rows, [(c, lambda r, c=c: _cell(r[c]), "") for c in cols])
    (args.out / "demo_transformer_size.md").write_text(f"{setup}\n\n{table}\n")
    print(setup)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
