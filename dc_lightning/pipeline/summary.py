"""Run summary: accuracies per stage, wall time per stage, and our per-layer report beside the paper's table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from dc_lightning.utils import atomic_write
from dc_lightning.utils import console as rich_console


def _paper_rows(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    paper = OmegaConf.to_container(cfg.paper, resolve=True) if cfg.get("paper") else None
    return {row["name"]: row for row in (paper or {}).get("layers", [])}


def _paper_row(paper: dict[str, dict], name: str) -> dict:
    """The paper's row of a target: by its name, else by its module's (an LSTM's ``model.lstm`` row covers
    ``model.lstm.weight_ih_l0`` and ``model.lstm.weight_hh_l0``; the report names each with its parameter)."""
    if name in paper:
        return paper[name]
    module, param = name.rsplit(".", 1) if "." in name else (name, "")
    row = paper.get(module)
    return {**row, "layer": f"{row.get('layer', module)} {param}"} if row else {}


def _layers(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    return list((report or {}).get("layers", []))


def _ratio_line(report: dict[str, Any]) -> str:
    t = report["total"]
    return (f"Compression of the weights ([DC]'s definition: weights + indices + codebooks): P {t['ratio_p']:.1f}x, "
            f"P+Q {t['ratio_pq']:.1f}x, P+Q+H {t['ratio_pqh']:.1f}x; whole file (biases, header included): "
            f"{report['file_bytes']:,} B, {report['ratio_file']:.1f}x smaller than the dense fp32 parameters")


def _has_ppl(summary: dict[str, Any]) -> bool:
    """Whether the run measured perplexity (a language model: dc_lightning.module.LanguageModule)."""
    return any("ppl" in m for m in summary["accuracy"].values())


def _metric_cells(summary: dict[str, Any], stage: str, ppl: bool) -> list[str]:
    """Top-1 (next-token accuracy for a language model) and, when ``ppl``, perplexity of one stage's row."""
    metrics = summary["accuracy"].get("reloaded" if stage == "evaluate" else stage, {})
    acc, p = metrics.get("acc1"), metrics.get("ppl")
    return ["" if acc is None else f"{100 * acc:.2f}%", *(["" if p is None else f"{p:.3f}"] if ppl else [])]


def summary_markdown(cfg: DictConfig, summary: dict[str, Any]) -> str:
    """The run's Markdown: accuracy per stage, seconds per stage, per-layer table with the paper's beside it."""
    ppl = _has_ppl(summary)
    lines = [f"# {cfg.recipe_name}: Deep Compression run", "",
             "| stage | top-1 | perplexity | seconds |" if ppl else "| stage | top-1 | seconds |",
             "|---|---|---|---|" if ppl else "|---|---|---|"]
    for stage, secs in summary["seconds"].items():
        lines.append("| " + " | ".join([stage, *_metric_cells(summary, stage, ppl), str(secs)]) + " |")
    report = summary.get("report")
    if report:
        paper = _paper_rows(cfg)
        lines += ["", "| layer | #weights | kept % | weight bits P+Q / P+Q+H | index bits P+Q / P+Q+H | "
                  "size % P+Q / P+Q+H | paper kept % | paper size % P+Q / P+Q+H |", "|---|---|---|---|---|---|---|---|"]
        for r in _layers(report):
            p = _paper_row(paper, r["name"])
            lines.append(
                f"| {p.get('layer', r['name'])} | {r['weights']} | {r['kept_pct']:.1f} | "
                f"{r['weight_bits_pq']:.2f} / {r['weight_bits_pqh']:.2f} | "
                f"{r['index_bits_pq']:.2f} / {r['index_bits_pqh']:.2f} | "
                f"{r['cr_pq_pct']:.2f} / {r['cr_pqh_pct']:.2f} | {p.get('kept', '')} | "
                f"{p.get('cr_pq', '')} / {p.get('cr_pqh', '')} |"
            )
        pp = OmegaConf.to_container(cfg.paper, resolve=True) if cfg.get("paper") else {}
        lines += ["", _ratio_line(report)
                  + (f"; paper: P+Q {pp.get('ratio_pq')}x, P+Q+H {pp.get('ratio')}x ({pp.get('name')})"
                     if pp and pp.get("ratio_pq") else f"; paper: P+Q+H {pp.get('ratio')}x ({pp.get('name')})" if pp
                     else "")]
    return "\n".join(lines) + "\n"


def write_summary(cfg: DictConfig, summary: dict[str, Any]) -> None:
    out = Path(cfg.output_dir)
    with atomic_write(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2, default=str)
    with atomic_write(out / "report.md", "w") as f:
        f.write(summary_markdown(cfg, summary))


def print_summary(cfg: DictConfig, summary: dict[str, Any], console: Console | None = None) -> None:
    """Print the final table (rank 0 only: the pipeline runs it after the stages' trainers are done)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    console = console or rich_console()
    table = Table(title=f"{cfg.recipe_name}: accuracy and wall time per stage")
    ppl = _has_ppl(summary)
    for col in ("stage", "top-1", *(("perplexity",) if ppl else ()), "seconds"):
        table.add_column(col)
    for stage, secs in summary["seconds"].items():
        table.add_row(stage, *_metric_cells(summary, stage, ppl), f"{secs}")
    console.print(table)
    report = summary.get("report")
    if report:
        paper = _paper_rows(cfg)
        t2 = Table(title="per layer: ours vs the paper")
        for col in ("layer", "#weights", "kept %", "Wb P+Q", "Wb P+Q+H", "Ib P+Q+H", "size% P+Q", "size% P+Q+H",
                    "paper kept %", "paper size% P+Q+H"):
            t2.add_column(col, justify="right")
        for r in _layers(report):
            p = _paper_row(paper, r["name"])
            t2.add_row(str(p.get("layer", r["name"])), f"{r['weights']:,}", f"{r['kept_pct']:.1f}",
                       f"{r['weight_bits_pq']:.2f}", f"{r['weight_bits_pqh']:.2f}", f"{r['index_bits_pqh']:.2f}",
                       f"{r['cr_pq_pct']:.2f}", f"{r['cr_pqh_pct']:.2f}", str(p.get("kept", "")),
                       str(p.get("cr_pqh", "")))
        console.print(t2)
        console.print(_ratio_line(report))
