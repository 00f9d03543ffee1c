"""Per-step training overhead of keeping a pruned network pruned, and of fine-tuning its shared weights.

Providers, side by side in one process, same model, data, optimizer (SGD momentum 0.9 + weight decay 5e-4):

* ``none``: plain training, no callback (the reference).
* ``magnitude_pruning``: ``dc_lightning.MagnitudePruning`` (grads masked before the step, weights re-masked by an
  optimizer step post-hook).
* ``lightning_model_pruning``: Lightning's built-in ``ModelPruning("l1_unstructured")`` (torch.nn.utils.prune:
  ``weight = weight_orig * weight_mask`` recomputed in a forward pre-hook).
* ``pruning_codebook``: ``MagnitudePruning`` + ``TrainedQuantization(max_iter=0)`` clustering at the start of epoch 1,
  so the timed epoch runs the codebook phase [DC §3.3]: codebook gradients, codebook optimizer step and the rewrite
  ``weight = where(mask, codebook[assign], 0)`` after every step (the fused Triton path on CUDA).

Models: ``lenet5``, ``vgg16`` (32 px, SGD) and ``transformer_lm`` (the recipe's decoder-only transformer, 6 x 384,
byte tokens, ``--seq-len`` 128, next-token cross-entropy, AdamW as the recipe). Every prunable weight (the callbacks'
default targets; Linear/Conv for Lightning's ``ModelPruning``) is pruned to ``--density`` during epoch 0; epoch 1
(``--steps`` steps) is timed. A step is the wall time between consecutive ``on_train_batch_start`` calls (forward,
backward, optimizer step, all hooks), with ``torch.cuda.synchronize()`` on GPU.

The providers run ``--repeats`` times (default 5) in rotating order, one fit each, all in one process. Reported per
provider: the median over all timed steps with its interquartile range (``p25_ms``/``p75_ms``), the median of each
repeat (``repeat_medians_ms``, spread ``repeat_min_ms``/``repeat_max_ms``), the overhead of the pooled medians vs
``none``, and the *paired* overhead: each repeat's median against ``none``'s median of the same repeat (the two fits
run next to each other), its median over repeats with min and max (``paired_overhead_pct``,
``paired_overhead_min_pct``/``_max_pct``): the number to compare with a target such as +2 %. The time inside the
callbacks' per-step hooks is measured separately (CUDA events on GPU): ``pruning_hook_ms_per_step`` and
``codebook_hook_ms_per_step``. A provider that fails is recorded with its error and the others still run; the files
are rewritten after every fit, so a run cut short leaves what it measured.

    python -m bench.training.bench_pruning_overhead                     # CPU, LeNet-5, batch 128, fp32
    python -m bench.training.bench_pruning_overhead --device cuda       # VGG-16 at 32 px, batch 256, bf16-mixed
    python -m bench.training.bench_pruning_overhead --device cuda --model transformer_lm   # batch 64 x 128 bytes
    python -m bench.training.bench_pruning_overhead --smoke             # or SMOKE=1: tiny sizes, CPU, 2 repeats

Writes ``pruning_overhead_<model>_<device>.csv`` / ``.json`` (summary) and ``..._steps.json`` (all step times) under
``--out`` (default ``bench/results/<date>/pruning_overhead``). Plain argparse, no Hydra, no wandb.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import nn

from bench.harness.report import env_info, print_table, results_dir, write_csv, write_json
from bench.harness.timing import sync

PROVIDERS = ("none", "lightning_model_pruning", "magnitude_pruning", "pruning_codebook")


MODELS = ("lenet5", "vgg16", "transformer_lm")
#: --smoke sizes of the transformer (the recipe's: 6 layers x 384, 6 heads)
TINY_LM = {"width": 32, "num_layers": 2, "num_heads": 2, "max_len": 64}


def build_model(name: str, num_classes: int, smoke: bool = False) -> tuple[nn.Module, tuple[int, ...]]:
    """``(model, the shape of one input)``: an image ``(C, H, W)`` or, for ``transformer_lm``, ``(max_len,)``."""
    if name == "transformer_lm":
        from dc_lightning.models.lm import build_lm

        model = build_lm("transformer_lm", **(TINY_LM if smoke else {}))
        return model, (model.max_len,)
    if name == "lenet5":
        try:
            from dc_lightning.models import LeNet5

            return LeNet5(num_classes=num_classes), (1, 28, 28)
        except ImportError:  # Caffe's LeNet-5 layout, inline
            return nn.Sequential(
                nn.Conv2d(1, 20, 5),
                nn.MaxPool2d(2),
                nn.Conv2d(20, 50, 5),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(800, 500),
                nn.ReLU(),
                nn.Linear(500, num_classes),
            ), (1, 28, 28)
    if name == "vgg16":
        try:
            from dc_lightning.models import vgg16

            return vgg16(num_classes=num_classes), (3, 32, 32)
        except ImportError:
            from torchvision.models import vgg16 as tv_vgg16

            return tv_vgg16(weights=None, num_classes=num_classes), (3, 32, 32)
    raise SystemExit(f"--model: unknown model {name!r}; choose one of {list(MODELS)}")


class Classifier(pl.LightningModule):
    """Cross-entropy on ``(x, y)``: class labels, or next tokens (logits ``[B, T, V]`` against ``y`` ``[B, T]``).
    SGD (momentum 0.9, weight decay 5e-4) for the image models, AdamW for the language model (as its recipe)."""

    def __init__(self, model: nn.Module, lr: float, adamw: bool = False) -> None:
        super().__init__()
        self.model, self.lr, self.adamw = model, lr, adamw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        return nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten())

    def configure_optimizers(self):
        if self.adamw:
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


class Batches:
    """``n`` steps cycling over a few pre-generated batches already on the device (no loader cost)."""

    def __init__(self, batches: list, n: int) -> None:
        self.batches, self.n = batches, n

    def __iter__(self):
        for i in range(self.n):
            yield self.batches[i % len(self.batches)]

    def __len__(self) -> int:
        return self.n


class StepTimer(Callback):
    def __init__(self, device: torch.device, skip: int) -> None:
        self.device, self.skip = device, skip
        self.starts: list[float] = []

    def _now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1:
            self.starts.append(self._now())

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.starts.append(self._now())

    def step_times(self) -> list[float]:
        deltas = [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)]
        return deltas[self.skip :]


class HookClock:
    """Time spent inside a callback's per-step hooks during epoch 1: CUDA events on GPU (no host sync), else
    perf_counter. This isolates the callback's own cost from the step-time noise of a shared machine. Spans are
    summed per batch and the median over the batches after the first ``skip`` is reported (the first steps carry
    one-off work such as Triton compilation and the codebook step's precomputation)."""

    def __init__(self, device: torch.device, skip: int) -> None:
        self.device, self.skip, self.spans, self.calls = device, skip, [], 0

    def wrap(self, fn, trainer_of):
        def timed(*args, **kwargs):
            trainer = trainer_of(args)
            if trainer.current_epoch != 1:
                return fn(*args, **kwargs)
            self.calls += 1
            batch = trainer.fit_loop.epoch_loop.batch_idx
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                self.spans.append((batch, (start, end)))
                return out
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.spans.append((batch, time.perf_counter() - t0))
            return out

        return timed

    def ms_per_step(self) -> float | None:
        sync(self.device)
        per_batch: dict[int, float] = {}
        for batch, span in self.spans:
            ms = span[0].elapsed_time(span[1]) if self.device.type == "cuda" else 1e3 * span
            per_batch[batch] = per_batch.get(batch, 0.0) + ms
        kept = [ms for b, ms in sorted(per_batch.items()) if b >= self.skip] or list(per_batch.values())
        return statistics.median(kept) if kept else None


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Linear/Conv weights for Lightning's ``ModelPruning``, except an ``nn.MultiheadAttention``'s ``out_proj``: the
    attention reads ``out_proj.weight`` without calling ``out_proj``, so torch.nn.utils.prune's forward pre-hook never
    recomputes it and the second backward fails ("Trying to backward through the graph a second time")."""
    inside_mha = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d) and id(m) not in inside_mha]


def measured_density(model: nn.Module) -> float:
    # the effective weight the forward uses (torch prune keeps it in `weight` as a plain attribute)
    layers = [m for m, _ in prunable(model)]
    total = sum(m.weight.numel() for m in layers)
    return sum(int((m.weight != 0).sum()) for m in layers) / total


def run_one(provider: str, args: argparse.Namespace, batches: list, device: torch.device) -> tuple[list, float, dict]:
    from dc_lightning.callbacks.magnitude_pruning import MagnitudePruning
    from dc_lightning.callbacks.trained_quantization import TrainedQuantization

    torch.manual_seed(0)
    model, _ = build_model(args.model, args.num_classes, args.smoke)
    module = Classifier(model, args.lr, adamw=args.model == "transformer_lm")
    timer = StepTimer(device, skip=args.skip)
    callbacks: list[Callback] = [timer]
    mp_clock, cb_clock = HookClock(device, args.skip), HookClock(device, args.skip)
    tq = None
    if provider in ("magnitude_pruning", "pruning_codebook"):
        mp = MagnitudePruning(densities=args.density, prune_epochs=[0], verbose=False)
        # per-step hooks; the optimizer post-hook (only used for non-SGD/Adam/AdamW optimizers) is timed too
        mp.on_before_optimizer_step = mp_clock.wrap(mp.on_before_optimizer_step, lambda a: a[0])
        mp.on_train_batch_start = mp_clock.wrap(mp.on_train_batch_start, lambda a: a[0])
        mp._after_step = mp_clock.wrap(mp._after_step, lambda a: trainer)
        callbacks.append(mp)
    if provider == "pruning_codebook":
        # uniform centroids as in the recipes (max_iter=0); clustering at the start of epoch 1, the timed epoch
        tq = TrainedQuantization(max_iter=0, start_epoch=1, verbose=False, log_histograms=False)
        # the codebook phase: gradients + codebook step (inside the closure), and the weight rewrite (post-step)
        tq._update_codebooks = cb_clock.wrap(tq._update_codebooks, lambda a: trainer)
        tq._post_step = cb_clock.wrap(tq._post_step, lambda a: trainer)
        callbacks.append(tq)
    elif provider == "lightning_model_pruning":
        callbacks.append(
            ModelPruning(
                "l1_unstructured",
                parameters_to_prune=prunable(model),
                use_global_unstructured=False,
                amount=1.0 - args.density,
                apply_pruning=lambda epoch: epoch == 0,  # prune once, at the end of epoch 0
                make_pruning_permanent=False,
                use_lottery_ticket_hypothesis=False,
                verbose=0,
            )
        )
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=Batches(batches, args.steps))
    extra = {
        "pruning_hook_ms": mp_clock.ms_per_step(),
        "codebook_hook_ms": cb_clock.ms_per_step(),
        "codebook_backend": sorted({s.backend for _, s in tq._steps.values()}) if tq is not None else None,
        "codebook_skipped_steps": tq.skipped_steps if tq is not None else None,
    }
    return timer.step_times(), measured_density(model), extra


def summarise(args: argparse.Namespace, times: dict, repeat_medians: dict, density: dict, extras: dict) -> list:
    """One row per provider that produced step times: medians, spread, ratio to ``none``, hook times."""
    ref = statistics.median(times["none"]) if times.get("none") else None
    # best-of-repeats median: on a shared machine a repeat hit by a load burst is slower, never faster
    ref_by_repeat = repeat_medians.get("none", {})
    best_ref = min(ref_by_repeat.values()) if ref_by_repeat else None

    def med(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 4) if values else None

    rows = []
    for provider, t in times.items():
        if not t:
            continue
        t_sorted = sorted(t)
        m = statistics.median(t)
        by_repeat = repeat_medians[provider]
        # paired: each repeat against the reference's fit of the same repeat (run next to it)
        paired = [100 * (by_repeat[k] / ref_by_repeat[k] - 1) for k in by_repeat if k in ref_by_repeat]
        pruning_ms = med([e["pruning_hook_ms"] for e in extras[provider]])
        codebook_ms = med([e["codebook_hook_ms"] for e in extras[provider]])
        rows.append(
            {
                "provider": provider,
                "model": args.model,
                "device": args.device,
                "batch_size": args.batch_size,
                "precision": args.precision,
                "density_target": args.density if provider != "none" else 1.0,
                "density_measured": round(density[provider], 4),
                "steps_timed": len(t),
                "median_ms": round(1e3 * m, 3),
                "p10_ms": round(1e3 * t_sorted[len(t) // 10], 3),
                "p25_ms": round(1e3 * t_sorted[len(t) // 4], 3),
                "p75_ms": round(1e3 * t_sorted[(3 * len(t)) // 4], 3),
                "p90_ms": round(1e3 * t_sorted[(9 * len(t)) // 10], 3),
                "ratio_vs_none": round(m / ref, 4) if ref else None,
                "overhead_pct": round(100 * (m / ref - 1), 2) if ref else None,
                "repeats": len(by_repeat),
                "repeat_medians_ms": [round(1e3 * by_repeat[k], 3) for k in sorted(by_repeat)],
                "repeat_min_ms": round(1e3 * min(by_repeat.values()), 3),
                "repeat_max_ms": round(1e3 * max(by_repeat.values()), 3),
                "paired_overhead_pct": round(statistics.median(paired), 2) if paired else None,
                "paired_overhead_min_pct": round(min(paired), 2) if paired else None,
                "paired_overhead_max_pct": round(max(paired), 2) if paired else None,
                "best_repeat_median_ms": round(1e3 * min(by_repeat.values()), 3),
                "best_overhead_pct": round(100 * (min(by_repeat.values()) / best_ref - 1), 2)
                if best_ref
                else None,
                # time inside the callbacks' per-step hooks (MagnitudePruning; the codebook phase of
                # TrainedQuantization), per step, and as a share of the reference step
                "pruning_hook_ms_per_step": pruning_ms,
                "codebook_hook_ms_per_step": codebook_ms,
                "hook_pct_of_ref": round(100 * ((pruning_ms or 0) + (codebook_ms or 0)) / (1e3 * ref), 3)
                if ref and (pruning_ms is not None or codebook_ms is not None)
                else None,
                "codebook_backend": "/".join(extras[provider][-1]["codebook_backend"] or []) or None,
            }
        )
    return rows


def write(out: Path, tag: str, rows: list, meta: dict, times: dict, failures: list) -> None:
    if rows:
        write_csv(rows, out / f"{tag}.csv")
    write_json({"meta": meta, "rows": rows, "failures": failures}, out / f"{tag}.json")
    write_json(times, out / f"{tag}_steps.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default=None, choices=MODELS, help="default: lenet5 on cpu, vgg16 on cuda")
    p.add_argument("--batch-size", type=int, default=None, help="default: 128 (lenet5), 256 (vgg16), 64 (LM)")
    p.add_argument("--seq-len", type=int, default=128, help="transformer_lm: tokens per sequence (the recipe's)")
    p.add_argument(
        "--steps", type=int, default=None, help="steps per epoch; epoch 1 is timed (default 60 cpu, 120 gpu)"
    )
    p.add_argument("--skip", type=int, default=5, help="first timed steps dropped as warmup")
    p.add_argument("--repeats", type=int, default=5, help="rounds over the providers, rotating the order")
    p.add_argument("--density", type=float, default=0.1, help="fraction of weights kept in every layer")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--lr", type=float, default=None, help="default 0.01 (SGD), 1e-3 (AdamW, transformer_lm)")
    p.add_argument(
        "--precision", default=None, help="Lightning precision (default: bf16-mixed on cuda, 32-true on cpu)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--providers", nargs="*", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--budget", type=float, default=None, help="seconds: start no new fit after this much wall time")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: batch 4, 6 steps, 2 repeats, a "
                   "2-layer 32-wide transformer_lm (also SMOKE=1)")  # fmt: skip
    p.add_argument("--out", type=Path, default=results_dir("pruning_overhead"))
    args = p.parse_args(argv)
    args.smoke = args.smoke or os.environ.get("SMOKE") == "1"
    if args.smoke:
        args.device, args.repeats, args.skip = "cpu", min(args.repeats, 2), min(args.skip, 1)
        args.steps, args.batch_size, args.seq_len = args.steps or 6, args.batch_size or 4, min(args.seq_len, 32)
    args.model = args.model or ("vgg16" if args.device == "cuda" else "lenet5")
    args.batch_size = args.batch_size or {"vgg16": 256, "transformer_lm": 64}.get(args.model, 128)
    args.lr = args.lr or (1e-3 if args.model == "transformer_lm" else 0.01)
    args.steps = args.steps or (120 if args.device == "cuda" else 60)
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    os.environ.setdefault("WANDB_MODE", "disabled")

    g = torch.Generator().manual_seed(0)
    if args.model == "transformer_lm":  # random bytes: next-token targets are the inputs shifted by one
        seqs = [torch.randint(0, 256, (args.batch_size, args.seq_len + 1), generator=g) for _ in range(4)]
        batches = [(s[:, :-1].to(device), s[:, 1:].to(device)) for s in seqs]
    else:
        _, shape = build_model(args.model, args.num_classes)
        batches = [
            (
                torch.randn(args.batch_size, *shape, generator=g).to(device),
                torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device),
            )
            for _ in range(4)
        ]
    env = env_info(device)
    hw = env["device"]
    meta = {"env": env, "argv": sys.argv, "args": vars(args), "lightning": pl.__version__,
            "threads": torch.get_num_threads()}  # fmt: skip
    out, tag = args.out, f"pruning_overhead_{args.model}_{args.device}"
    times: dict[str, list[float]] = {k: [] for k in args.providers}
    repeat_medians: dict[str, dict[int, float]] = {k: {} for k in args.providers}
    extras: dict[str, list[dict]] = {k: [] for k in args.providers}
    density: dict[str, float] = {}
    failures: list[dict] = []
    rows: list[dict] = []
    t_start = time.perf_counter()
    for r in range(args.repeats):
        order = args.providers[r % len(args.providers) :] + args.providers[: r % len(args.providers)]
        for provider in order:
            if args.budget and time.perf_counter() - t_start > args.budget:
                failures.append({"repeat": r, "provider": provider, "error": "skipped: --budget exhausted"})
                continue
            try:
                t, d, extra = run_one(provider, args, batches, device)
            except Exception as err:  # noqa: BLE001 - record the failure, keep measuring the other providers
                trace = traceback.format_exc()
                failures.append({"repeat": r, "provider": provider, "error": repr(err), "trace": trace})
                print(f"repeat {r} {provider:<24} FAILED: {err!r}", flush=True)
                continue
            times[provider] += t
            repeat_medians[provider][r] = statistics.median(t)
            extras[provider].append(extra)
            density[provider] = d
            print(f"repeat {r} {provider:<24} median {1e3 * statistics.median(t):8.3f} ms/step", flush=True)
            rows = summarise(args, times, repeat_medians, density, extras)
            write(out, tag, rows, meta, times, failures)

    print(
        f"\n{args.model} on {args.device} ({hw}, {torch.get_num_threads()} threads), batch {args.batch_size}, "
        f"{args.precision}, torch {torch.__version__}, lightning {pl.__version__}"
    )
    for row in rows:
        row["hooks_ms"] = (row["pruning_hook_ms_per_step"] or 0) + (row["codebook_hook_ms_per_step"] or 0)
    for row in rows:
        row["iqr"] = f"{row['p25_ms']:.3f}-{row['p75_ms']:.3f}"
        row["repeat_range"] = f"{row['repeat_min_ms']:.3f}-{row['repeat_max_ms']:.3f}"
        if row["paired_overhead_pct"] is not None:
            row["paired"] = (f"{row['paired_overhead_pct']:+.2f} [{row['paired_overhead_min_pct']:+.2f}, "
                             f"{row['paired_overhead_max_pct']:+.2f}]")
    print_table(rows, ["provider", ("density", "density_measured", ".4f"), ("median ms", "median_ms", ".3f"),
                       ("IQR ms", "iqr", ""), ("repeats", "repeats", "d"), ("repeat medians ms", "repeat_range", ""),
                       ("overhead %", "overhead_pct", ".2f"), ("paired ovh % [min, max]", "paired", ""),
                       ("hooks ms", "hooks_ms", ".3f")])  # fmt: skip
    for f in failures:
        print(f"FAILED repeat {f['repeat']} {f['provider']}: {f['error']}")
    write(out, tag, rows, meta, times, failures)
    print(f"wrote {out / tag}.csv/.json")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
