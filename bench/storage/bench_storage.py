"""Storage of full-size AlexNet / VGG-16 after pruning to the paper's densities, 8/5-bit quantization, Huffman.

Reproduces the *storage accounting* of Deep Compression Tables 4 (AlexNet) and 5 (VGG-16): torchvision models
(``weights=None``: random init unless ``--state-dict`` gives trained weights), pruned per layer by magnitude to the
tables' W% column, quantized with 1-D k-means (linear init; 256 centroids conv, 32 fc [DC §5]), exported with
``save_compressed``. Random weights have no learned structure, so Huffman gains less than on trained weights.

    python -m bench.storage.bench_storage                    # both nets, paper index bits (AlexNet 4, VGG 5)
    python -m bench.storage.bench_storage --nets vgg16 --state-dict vgg16.pth

Writes ``storage_<net>.json`` / ``.csv`` / ``.md`` / ``.png`` and ``<net>.dcz`` under ``--out`` (default
``bench/results/<date>/storage``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from bench.harness.report import markdown_table, results_dir, write_csv, write_json
from dc_lightning.dcz import read_compressed
from dc_lightning.io import save_compressed

# layer -> (paper name, W% kept, CR P+Q %, CR P+Q+H %)  [DC Table 4 / Table 5]
ALEXNET = {
    "features.0": ("conv1", 0.84, 32.6, 20.53),
    "features.3": ("conv2", 0.38, 14.5, 9.43),
    "features.6": ("conv3", 0.35, 13.1, 8.44),
    "features.8": ("conv4", 0.37, 14.1, 9.11),
    "features.10": ("conv5", 0.37, 14.0, 9.43),
    "classifier.1": ("fc6", 0.09, 3.0, 2.39),
    "classifier.4": ("fc7", 0.09, 3.0, 2.46),
    "classifier.6": ("fc8", 0.25, 7.3, 5.85),
}
VGG16 = {
    "features.0": ("conv1_1", 0.58, 40.0, 29.97),
    "features.2": ("conv1_2", 0.22, 9.8, 6.99),
    "features.5": ("conv2_1", 0.34, 14.3, 8.91),
    "features.7": ("conv2_2", 0.36, 14.7, 9.31),
    "features.10": ("conv3_1", 0.53, 21.7, 11.15),
    "features.12": ("conv3_2", 0.24, 9.7, 5.67),
    "features.14": ("conv3_3", 0.42, 17.0, 8.96),
    "features.17": ("conv4_1", 0.32, 13.1, 7.29),
    "features.19": ("conv4_2", 0.27, 10.9, 5.93),
    "features.21": ("conv4_3", 0.34, 14.0, 7.47),
    "features.24": ("conv5_1", 0.35, 14.3, 8.00),
    "features.26": ("conv5_2", 0.29, 11.7, 6.52),
    "features.28": ("conv5_3", 0.36, 14.8, 7.79),
    "classifier.0": ("fc6", 0.04, 1.6, 1.10),
    "classifier.3": ("fc7", 0.04, 1.5, 1.25),
    "classifier.6": ("fc8", 0.23, 7.1, 5.24),
}
PAPER = {"alexnet": (ALEXNET, 27.0, 35.0, 4), "vgg16": (VGG16, 31.0, 49.0, 5)}


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """A torchvision state dict from ``.safetensors``, a plain ``.pth`` state dict, or a Lightning ``.ckpt`` of this
    project's ClassifierModule (its ``model.``-prefixed weights)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # Lightning checkpoint
        sd = {k[len("model."):]: v for k, v in sd["state_dict"].items() if k.startswith("model.")}
    return sd


def build_compressed(
    net: str, state_dict: str | None = None, seed: int = 0, max_iter: int = 300
) -> tuple[nn.Module, dict]:
    """Full-size torchvision ``net`` pruned to the paper's densities and quantized 8 bits conv / 5 bits fc."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, net)(weights=None)
    if state_dict:
        model.load_state_dict(load_weights(state_dict))
    table = PAPER[net][0]
    times = {}
    t = time.perf_counter()
    from dc_lightning.pruning.masks import prune_model

    prune_model(model, densities={k: v[1] for k, v in table.items()}, include=list(table))
    times["prune_s"] = time.perf_counter() - t
    t = time.perf_counter()
    from dc_lightning.quantization.codebooks import quantize_model

    bits = {k: (8 if k.startswith("features") else 5) for k in table}
    quantize_model(model, bits=bits, include=list(table), max_iter=max_iter)
    times["quantize_s"] = time.perf_counter() - t
    return model, times


def run(net: str, state_dict: str | None, index_bits: int | None, max_iter: int, out: Path) -> dict:
    table, pq_paper, pqh_paper, paper_ib = PAPER[net]
    ib = paper_ib if index_bits is None else index_bits
    model, times = build_compressed(net, state_dict, max_iter=max_iter)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{net}.dcz"
    t = time.perf_counter()
    rep = save_compressed(model, path, index_bits=ib, overwrite=True)
    times["export_s"] = time.perf_counter() - t
    t = time.perf_counter()
    read_compressed(path)
    times["read_decode_s"] = time.perf_counter() - t
    rows = []
    for r in rep.layers:
        paper = table.get(r.name)
        rows.append(
            {
                "layer": paper[0] if paper else r.name,
                "module": r.name,
                "weights": r.weights,
                "kept_pct": round(r.kept_pct, 2),
                "paper_kept_pct": paper[1] * 100 if paper else None,
                "wb_pq": r.weight_bits_pq,
                "wb_pqh": round(r.weight_bits_pqh, 2),
                "ib_pq": r.index_bits_pq,
                "ib_pqh": round(r.index_bits_pqh, 2),
                "fillers_per_nz": round(r.fillers / r.kept, 3) if r.kept else 0.0,
                "cr_pq_pct": round(r.cr_pq_pct, 2),
                "paper_cr_pq_pct": paper[2] if paper else None,
                "cr_pqh_pct": round(r.cr_pqh_pct, 2),
                "paper_cr_pqh_pct": paper[3] if paper else None,
            }
        )
    tot = rep.total
    summary = {
        "net": net,
        "weights": "trained:" + state_dict if state_dict else "random init (torchvision weights=None)",
        "index_bits": ib,
        "kmeans_iters": max_iter,
        "ratio_p": round(tot.ratio_p, 2),
        "ratio_pq": round(tot.ratio_pq, 2),
        "paper_ratio_pq": pq_paper,
        "ratio_pqh": round(tot.ratio_pqh, 2),
        "paper_ratio_pqh": pqh_paper,
        "ratio_file": round(rep.ratio_file, 2),
        "file_bytes": rep.file_bytes,
        "dense_bytes": tot.size_dense_bytes,
        "pq_within_10pct": abs(tot.ratio_pq / pq_paper - 1) <= 0.10,
        **{k: round(v, 2) for k, v in times.items()},
    }
    write_json({"summary": summary, "layers": rows}, out / f"storage_{net}.json")
    write_csv(rows, out / f"storage_{net}.csv")
    (out / f"storage_{net}.md").write_text(rep.to_markdown())
    rep.plot(out / f"storage_{net}.png")
    return {"summary": summary, "layers": rows}


def _vs_paper(ours: str, paper: str, ours_spec: str, paper_spec: str = "", unit: str = ""):
    """A cell ``ours / paper`` (``-`` for a layer the paper's table lacks)."""

    def cell(r: dict) -> str:
        p = r[paper]
        return f"{r[ours]:{ours_spec}}{unit} / " + (f"{p:{paper_spec}}{unit}" if p is not None else "-")

    return cell


COLUMNS = ["layer", ("#W", "weights", ","),
           ("W% ours/paper", _vs_paper("kept_pct", "paper_kept_pct", ".1f", ".0f"), ""),
           ("Wb P+Q", "wb_pq", ".0f"), ("Wb P+Q+H", "wb_pqh", ".2f"), ("Ib P+Q", "ib_pq", ".0f"),
           ("Ib P+Q+H", "ib_pqh", ".2f"), ("fill/nz", "fillers_per_nz", ".3f"),
           ("CR P+Q ours/paper", _vs_paper("cr_pq_pct", "paper_cr_pq_pct", ".2f", "", "%"), ""),
           ("CR P+Q+H ours/paper", _vs_paper("cr_pqh_pct", "paper_cr_pqh_pct", ".2f", "", "%"), "")]  # fmt: skip


def to_markdown(res: dict) -> str:
    s = res["summary"]
    lines = markdown_table(res["layers"], COLUMNS).splitlines()
    lines.append(
        f"| **total** | | | | | {s['index_bits']} | | | **{s['ratio_pq']}x** / {s['paper_ratio_pq']}x | "
        f"**{s['ratio_pqh']}x** / {s['paper_ratio_pqh']}x |"
    )
    lines.append("")
    lines.append(
        f"pruning only {s['ratio_p']}x; whole file (header + metadata) {s['ratio_file']}x "
        f"({s['file_bytes']:,} bytes); prune {s['prune_s']} s, quantize {s['quantize_s']} s, "
        f"export {s['export_s']} s, read+decode {s['read_decode_s']} s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nets", nargs="+", default=["alexnet", "vgg16"], choices=list(PAPER))
    p.add_argument(
        "--state-dict", default=None, help="trained weights (.safetensors, .pth, Lightning .ckpt) for the (single) net"
    )
    p.add_argument("--index-bits", type=int, default=None, help="override the paper's index bits (AlexNet 4, VGG 5)")
    p.add_argument(
        "--kmeans-iters",
        type=int,
        default=300,
        help="Lloyd iterations from the linear init (0 = uniform quantization; default 300)",
    )
    p.add_argument("--out", type=Path, default=results_dir("storage"))
    args = p.parse_args(argv)
    for net in args.nets:
        res = run(net, args.state_dict, args.index_bits, args.kmeans_iters, args.out)
        print(
            f"\n## {net} (index bits {res['summary']['index_bits']}, k-means iterations {args.kmeans_iters}, "
            f"{res['summary']['weights']})\n"
        )
        print(to_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
