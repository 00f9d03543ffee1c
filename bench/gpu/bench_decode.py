"""Greedy-decoding throughput of the LM recipes' networks: the converted compressed model vs the dense fp16 model,
each decode step one CUDA graph replay.

    python -m bench.gpu.bench_decode                      # random weights at the recipes' sizes (said in the output)
    python -m bench.gpu.bench_decode --ckpt lstm_lm=R/lstm_lm/model.dcz --ckpt transformer_lm=R/transformer_lm/model.dcz
    python -m bench.gpu.bench_decode --smoke              # or SMOKE=1: tiny shapes on the CPU, eager only

Models: ``lstm_lm`` and ``transformer_lm`` of ``dc_lightning.models.lm`` at the recipes' sizes (``LM_DEFAULTS``).
Weights, per model: a trained recipe's ``.dcz`` (already pruned and quantized), a Lightning ``.ckpt`` of the dense
baseline (pruned to the recipe's densities and quantized to its bits in memory: ``prune_model`` + ``quantize_model``
with uniform centroids, as ``recipes/<name>/recipe.yaml``), or, without ``--ckpt``, random weights compressed the
same way. Both providers hold the same pruned+quantized weights:

* ``dense``: the weights as dense tensors, fp16 (cuDNN LSTM / cuBLAS GEMMs);
* ``compressed``: ``to_compressed_inference`` (compressed kernels for every matrix and embedding), fp16 activations;
  ``--autotune`` times the kernels' configurations at the benchmark's batch sizes first.

Decoding (``decode_state`` / ``decode_step``): one token per sequence per step from preallocated state (the LSTM's
``(h, c)``, the transformer's key/value cache over ``prompt + --new-tokens`` positions, attended with a mask, so
every step has the same shapes). One step (logits, argmax, write the token, advance the position) is captured in one
CUDA graph and replayed ``--new-tokens`` times; tokens/s = batch x new tokens / time (CUDA events, median of
``--repeats``), the prompt's prefill outside the timing. Every row checks that its graph replays produce the same
tokens as its own eager loop, and the compressed rows report how many of their tokens match the dense model's (the
two differ only in rounding). The weights of these models fit in the H200's L2 cache, as they would while decoding.

Writes ``decode.csv`` / ``decode.json`` under ``--out`` (default ``$OUT/decode`` or ``bench/results/<date>/decode``).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bench.harness.report import REPO, env_info, print_table, results_dir, write_csv, write_json
from bench.harness.timing import capture

MODELS = ("lstm_lm", "transformer_lm")
TINY = {"lstm_lm": {"embed_dim": 16, "hidden_size": 16},
        "transformer_lm": {"width": 16, "num_layers": 6, "num_heads": 2, "max_len": 64}}  # fmt: skip


def recipe_compression(name: str) -> tuple[dict[str, float], int]:
    """The recipe's per-layer densities (layer names of the bare network) and quantization bits."""
    import yaml

    cfg = yaml.safe_load((REPO / "recipes" / name / "recipe.yaml").read_text())
    densities = cfg["pipeline"]["prune"]["callback"]["densities"]
    return {k.removeprefix("model."): float(v) for k, v in densities.items()}, int(
        cfg["pipeline"]["quantize"]["callback"]["bits"]
    )


def compress(net: nn.Module, name: str, bits: int | None) -> str:
    """Prune ``net`` to its recipe's densities and quantize it (uniform centroids), in place; returns a note."""
    from dc_lightning.pruning.masks import prune_model
    from dc_lightning.quantization.codebooks import quantize_model

    densities, recipe_bits = recipe_compression(name)
    bits = bits or recipe_bits
    prune_model(net, densities=densities)
    quantize_model(net, bits=bits, include=list(densities), max_iter=0)
    return f"pruned to recipes/{name} densities, {bits}-bit uniform codebooks (in memory)"


def load_net(name: str, path: str | None, sizes: dict, bits: int | None) -> tuple[nn.Module, str]:
    """``(the network with its compression buffers, where its weights come from)``."""
    from dc_lightning import buffers
    from dc_lightning.models.lm import build_lm

    if path is None:
        torch.manual_seed(0)
        net = build_lm(name, **sizes)
        return net, f"random weights (no --ckpt {name}=...): " + compress(net, name, bits)
    if path.endswith(".dcz"):
        from dc_lightning.io import load_compressed

        try:  # the recipe's file records its builder (dc_lightning.module:LanguageModule, trusted)
            loaded = load_compressed(path)
        except ValueError:  # a file of the bare network without a usable record: into one at these sizes
            loaded = load_compressed(path, model=build_lm(name, **sizes))
        net = getattr(loaded, "model", loaded)
        note = f"{path} (pruned and quantized by the recipe)"
    else:
        from dc_lightning.checkpoint import read_checkpoint, restore_checkpoint

        ckpt = read_checkpoint(path)
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        net = build_lm(name, **sizes)
        try:
            restore_checkpoint(net, {**ckpt, "state_dict": state})
        except (RuntimeError, ValueError) as err:
            at = sizes or "the recipe sizes"
            raise SystemExit(f"--ckpt {name}={path}: does not fit {name} at {at}: {err}") from None
        held = [(m, p) for m in net.modules() for p, _ in m.named_parameters(recurse=False)]
        compressed = any(buffers.has_compression(m, p) for m, p in held)
        note = f"{path}" + ("" if compressed else ": " + compress(net, name, bits))
    from dc_lightning.models.lm import LSTMLanguageModel, TransformerLanguageModel

    if not isinstance(net, (LSTMLanguageModel, TransformerLanguageModel)):
        raise SystemExit(f"--ckpt {name}={path}: holds a {type(net).__name__}, not an LM of dc_lightning.models.lm")
    return net, note


class Greedy:
    """Greedy decoding of ``prompt`` [B, n] by ``new`` tokens from static buffers; :meth:`step` is one decode step
    (logits, argmax, the token written to ``seq``, the position advanced), eager or captured."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, new: int, dtype: torch.dtype) -> None:
        from dc_lightning.models.lm import decode_state

        self.model, self.prompt, self.new = model, prompt, new
        B, n = prompt.shape
        self.state = decode_state(model, B, n + new, prompt.device, dtype)
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=prompt.device)
        self.pos = torch.zeros((), dtype=torch.long, device=prompt.device)
        self.seq = torch.zeros(B, n + new, dtype=torch.long, device=prompt.device)

    @torch.no_grad()
    def step(self) -> None:
        from dc_lightning.models.lm import decode_step

        nxt = decode_step(self.model, self.tok, self.pos, self.state).argmax(-1, keepdim=True)  # [B, 1]
        self.seq.index_copy_(1, self.pos.view(1) + 1, nxt)
        self.tok.copy_(nxt)
        self.pos.add_(1)

    @torch.no_grad()
    def reset(self) -> None:
        """Zero the state and prefill the prompt (eager), leaving its last token to the first timed step."""
        from dc_lightning.models.lm import decode_step

        for t in self.state.values():
            t.zero_()
        n = self.prompt.shape[1]
        self.seq.zero_()
        self.seq[:, :n] = self.prompt
        for i in range(n - 1):
            self.pos.fill_(i)
            decode_step(self.model, self.prompt[:, i : i + 1], self.pos, self.state)
        self.tok.copy_(self.prompt[:, n - 1 :])
        self.pos.fill_(n - 1)

    def generated(self) -> torch.Tensor:
        return self.seq[:, self.prompt.shape[1] :].clone()


def timed_s(run, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def measure(model: nn.Module, prompt: torch.Tensor, args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """Eager tokens, graph tokens, tokens/s (graph on CUDA, eager always) of one provider at one batch size."""
    g = Greedy(model, prompt, args.new_tokens, dtype)
    device = prompt.device

    def eager_loop() -> None:
        for _ in range(args.new_tokens):
            g.step()

    g.reset()
    eager_loop()
    eager_tokens = g.generated()
    eager_s = []
    for _ in range(args.repeats):
        g.reset()
        eager_s.append(timed_s(eager_loop, device))
    row = {"eager_tokens_per_s": prompt.shape[0] * args.new_tokens / statistics.median(eager_s)}
    if device.type != "cuda":
        row.update(tokens_per_s=row["eager_tokens_per_s"], timing="eager (CPU)", same_tokens_as_eager=True)
        return {**row, "tokens": eager_tokens}
    graph, _ = capture([g.step], warmup=1)

    def replay_loop() -> None:
        for _ in range(args.new_tokens):
            graph.replay()

    g.reset()
    replay_loop()
    torch.cuda.synchronize()
    graph_tokens = g.generated()
    spans = []
    for _ in range(args.repeats):
        g.reset()
        spans.append(timed_s(replay_loop, device))
    sec = statistics.median(spans)
    row.update(tokens_per_s=prompt.shape[0] * args.new_tokens / sec, us_per_step=1e6 * sec / args.new_tokens,
               timing="CUDA graph per step", same_tokens_as_eager=bool(torch.equal(graph_tokens, eager_tokens)))
    return {**row, "tokens": graph_tokens}


def run_model(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    from dc_lightning.inference.conversion import to_compressed_inference
    from dc_lightning.inference.memory import compressed_memory

    net, source = load_net(name, args.ckpt.get(name), TINY[name] if args.smoke else {}, args.bits)
    print(f"{name}: {source}", flush=True)
    net.eval()
    providers = {"dense": copy.deepcopy(net).to(device=device, dtype=dtype).eval()}
    tune = args.batches if args.autotune and device.type == "cuda" else None
    conv = to_compressed_inference(net, device=device, autotune_batches=tune, dtype=dtype)
    mem = compressed_memory(conv)
    providers["compressed"] = conv.to(dtype).eval()
    prompt_ids = torch.tensor(list(args.prompt.encode("utf-8")), dtype=torch.long, device=device)
    rows = []
    for batch in args.batches:
        prompt = prompt_ids.expand(batch, -1).contiguous()
        dense_tokens = None
        for provider, model in providers.items():
            row = {"model": name, "batch": batch, "provider": provider, "dtype": str(dtype).removeprefix("torch."),
                   "weights": source.split(":")[0], "new_tokens": args.new_tokens}  # fmt: skip
            try:
                got = measure(model, prompt, args, dtype)
            except Exception as err:  # noqa: BLE001 - record it, keep measuring the others
                row["error"] = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
                print(f"{name} batch {batch} {provider}: FAILED {row['error']}", flush=True)
                rows.append(row)
                continue
            tokens = got.pop("tokens")
            row.update(got)
            if provider == "dense":
                dense_tokens = tokens
                row["weight_bytes"] = mem["dense_fp16_bytes"]
            else:
                row["weight_bytes"] = mem["bytes"]
                if dense_tokens is not None:
                    row["tokens_equal_to_dense"] = round(float((tokens == dense_tokens).float().mean()), 4)
            row["sample"] = bytes(int(t) % 256 for t in tokens[0, :48].tolist()).decode("utf-8", "replace")
            rows.append(row)
        timed = [r for r in rows if r["batch"] == batch and "tokens_per_s" in r]
        dense = next((r for r in timed if r["provider"] == "dense"), None)
        for r in timed if dense is not None else []:
            r["speedup_vs_dense"] = round(r["tokens_per_s"] / dense["tokens_per_s"], 3)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    p.add_argument("--ckpt", action="append", default=[], metavar="MODEL=PATH",
                   help="a trained recipe's .dcz (or dense baseline .ckpt) for lstm_lm or transformer_lm")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,16; smoke 1,2)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per sequence (default 128)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row (median reported)")
    p.add_argument("--prompt", default=None, help="default 'The meaning of life is ' (smoke: 'The ')")
    p.add_argument("--bits", type=int, default=None, help="quantization bits when compressing in memory "
                   "(default: the recipe's)")  # fmt: skip
    p.add_argument("--autotune", action="store_true", help="time the compressed kernels' configurations at these "
                   "batch sizes first (CUDA; default: the shape heuristics)")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, eager (also SMOKE=1)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.smoke = args.smoke or os.environ.get("SMOKE") == "1"
    ckpts = {}
    for item in args.ckpt:
        name, sep, path = item.partition("=")
        if not sep or name not in MODELS or not path:
            raise SystemExit(f"--ckpt {item!r}: expected MODEL=PATH with MODEL one of {list(MODELS)}")
        ckpts[name] = path
    args.ckpt = ckpts
    args.batches = [int(b) for b in (args.batches or ("1,2" if args.smoke else "1,16")).split(",")]
    args.new_tokens = args.new_tokens or (6 if args.smoke else 128)
    args.prompt = args.prompt or ("The " if args.smoke else "The meaning of life is ")
    if args.smoke:
        args.repeats = 1
        torch.set_num_threads(1)  # tiny shapes: more threads only contend
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: running eager on the CPU (no graphs; numbers check the plumbing only)")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    out = args.out or results_dir("decode")
    rows: list[dict] = []
    for name in args.models:
        rows += run_model(name, args, device, dtype)
        meta = {"env": env_info(device), "args": {**vars(args), "out": str(out)}}
        write_json({**meta, "rows": rows}, out / "decode.json")  # after each model: a run cut short keeps it
    print_table(rows, ["model", "batch", "provider", ("tok/s", "tokens_per_s", ".0f"),
                       ("µs/step", "us_per_step", ".1f"), ("eager tok/s", "eager_tokens_per_s", ".0f"),
                       ("x dense", "speedup_vs_dense", ".2f"), ("same as eager", "same_tokens_as_eager", ""),
                       ("= dense", "tokens_equal_to_dense", ".3f"), ("weight B", "weight_bytes", ",d"), "weights",
                       "error"], title=f"greedy decode, {args.new_tokens} new tokens, prompt {args.prompt!r}")
    write_csv(rows, out / "decode.csv")
    print(f"wrote {out / 'decode.csv'} and decode.json")
    ok = rows and all("error" not in r and r.get("same_tokens_as_eager") for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
