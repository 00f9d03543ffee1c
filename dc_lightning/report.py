"""Per-layer compression report with the columns of Deep Compression Tables 2-5.

Columns (one row per layer; ``P`` = pruning, ``Q`` = quantization, ``H`` = Huffman; dense = 32 bits per weight):

* ``kind``: the layer's storage, ``pq`` / ``q`` / ``p`` (the file record's ``kind``: pruned+quantized, quantized
  only, pruned only), or ``dense`` for a weight matrix stored as a plain tensor.
* ``weights``: ``#W``, the weight's element count.
* ``kept_pct``: ``W%``, kept (non-zero-mask) weights in percent (100 for unpruned layers).
* ``weight_bits_pq``: fixed-width bits per stored weight: ``log2(#codebook)`` for a quantized layer, the value
  width (32/16) for a pruned-only layer, the stored dtype width for a dense tensor.
* ``weight_bits_pqh``: Huffman bits of the codebook-index stream / number of stored weights (= ``weight_bits_pq``
  for layers without a Huffman-coded weight stream).
* ``index_bits_pq``: the configured relative-index width (0 when no index stream: unpruned layers).
* ``index_bits_pqh``: Huffman bits of the relative-index stream, **fillers included**, / number of kept weights.
* ``size_p_bytes``: the pruning-only stage (DC Fig. 1 first bar): ``kept * 32 + (kept + fillers) * index_bits``
  bits (unpruned layers: ``#W * 32``).
* ``size_pq_bytes``: fixed-width coding: ``kept * weight_bits_pq + (kept + fillers) * index_bits + #codebook *
  codebook bits`` (codebook and fillers included).
* ``size_pqh_bytes``: the layer's actual payload in the file: Huffman streams (each padded to a byte), their
  code-length tables and 16-bit sync tables, the codebook, and raw values for pruned-only layers.
* ``cr_pq_pct`` / ``cr_pqh_pct``: ``size_pq`` / ``size_pqh`` as a percentage of dense fp32 (``#W * 4`` bytes).

The total row sums sizes over all layers **and** all other tensors (biases, BatchNorm statistics, counted at
their stored size in every stage); bits columns in the total are kept-weight-weighted averages; ``ratio_*`` is
dense fp32 bytes / compressed bytes. ``file_bytes`` is the actual file size (adds the safetensors header and the
JSON metadata), reported separately as ``ratio_file``.

**Tied weights count once.** A matrix the model holds under several names (``lm_head.weight = wte.weight``) is one
row, under the name the file stores it (its other names are the file's ``aliases``, listed under the table as
:attr:`Report.aliases`), in the dense totals as in the compressed ones: the dense model holds it once too.

Example::

    from dc_lightning.report import compression_report

    rep = compression_report("vgg16.dcz")
    print(rep.to_markdown())
    rep.plot("vgg16_sizes.png")
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dc_lightning.utils import console as rich_console
from dc_lightning.utils import target_name

__all__ = ["LayerStats", "Report", "compression_report"]

_ITEM = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
_FLOATS = ("float32", "float16", "bfloat16", "float64")


@dataclass
class LayerStats:
    """One row of the report (see the module docstring for the exact definitions)."""

    name: str
    kind: str
    weights: int
    kept: int
    fillers: int
    weight_bits_pq: float
    weight_bits_pqh: float
    index_bits_pq: float
    index_bits_pqh: float
    size_dense_bytes: float
    size_p_bytes: float
    size_pq_bytes: float
    size_pqh_bytes: float

    @property
    def kept_pct(self) -> float:
        return 100.0 * self.kept / self.weights if self.weights else 0.0

    @property
    def cr_pq_pct(self) -> float:
        return 100.0 * self.size_pq_bytes / self.size_dense_bytes if self.size_dense_bytes else 0.0

    @property
    def cr_pqh_pct(self) -> float:
        return 100.0 * self.size_pqh_bytes / self.size_dense_bytes if self.size_dense_bytes else 0.0

    @property
    def ratio_p(self) -> float:
        return self.size_dense_bytes / self.size_p_bytes if self.size_p_bytes else float("inf")

    @property
    def ratio_pq(self) -> float:
        return self.size_dense_bytes / self.size_pq_bytes if self.size_pq_bytes else float("inf")

    @property
    def ratio_pqh(self) -> float:
        return self.size_dense_bytes / self.size_pqh_bytes if self.size_pqh_bytes else float("inf")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            kept_pct=self.kept_pct,
            cr_pq_pct=self.cr_pq_pct,
            cr_pqh_pct=self.cr_pqh_pct,
            ratio_p=self.ratio_p,
            ratio_pq=self.ratio_pq,
            ratio_pqh=self.ratio_pqh,
        )
        return d


def _layer_stats(rec: dict) -> LayerStats:
    from dc_lightning.dcz.container import DEFAULT_PARAM

    n = int(rec["numel"])
    storage = rec["kind"]
    kept = int(rec["nnz"])
    fill = int(rec.get("n_fill") or 0)
    ib = int(rec["index_bits"]) if rec.get("index_bits") else 0
    gap_entries = kept + fill if storage != "q" else 0
    idx_pq_bits = gap_entries * ib
    if storage in ("pq", "q"):
        wb = float(rec["bits"])
        cb_bits = int(rec["k"]) * 8 * _ITEM[rec["codebook_dtype"]]
        n_codes = int(rec["code"]["n"])
        wb_h = rec["code"]["nbits"] / n_codes if n_codes else 0.0
        size_pq = n_codes * wb + idx_pq_bits + cb_bits
    else:
        wb = 8.0 * _ITEM[rec["value_dtype"]]
        wb_h = wb
        size_pq = kept * wb + idx_pq_bits
    size_p = kept * 32 + idx_pq_bits if storage != "q" else n * 32
    ib_h = rec["gap"]["nbits"] / kept if rec.get("gap") and kept else 0.0
    return LayerStats(
        name=target_name(rec["module"], rec.get("param", DEFAULT_PARAM)),
        kind=storage,
        weights=n,
        kept=kept,
        fillers=fill,
        weight_bits_pq=wb,
        weight_bits_pqh=wb_h,
        index_bits_pq=float(ib),
        index_bits_pqh=ib_h,
        size_dense_bytes=4.0 * n,
        size_p_bytes=size_p / 8,
        size_pq_bytes=size_pq / 8,
        size_pqh_bytes=float(rec["nbytes"]),
    )


def _tensor_stats(recs: list[dict]) -> tuple[list[LayerStats], LayerStats | None]:
    """Dense weight matrices (a ``weight``, ``in_proj_weight``, ``weight_hh_l0`` ... with >= 2 dims) get their own
    row, named like a target (:mod:`dc_lightning.targets`); everything else one "other tensors" row."""
    rows, other = [], None
    for rec in recs:
        n = 1
        for d in rec["shape"]:
            n *= int(d)
        stored_bits = 8.0 * _ITEM.get(rec["stored_dtype"], 4)
        dense = 4.0 * n if rec["dtype"] in _FLOATS else float(rec["nbytes"])
        st = LayerStats(
            rec["key"],
            "dense",
            n,
            n,
            0,
            stored_bits,
            stored_bits,
            0.0,
            0.0,
            dense,
            float(rec["nbytes"]),
            float(rec["nbytes"]),
            float(rec["nbytes"]),
        )
        module, _, param = rec["key"].rpartition(".")
        if "weight" in param and len(rec["shape"]) >= 2:
            st.name = target_name(module, param) or rec["key"]
            rows.append(st)
        elif other is None:
            st.name = "other tensors"
            other = st
        else:
            for f in ("weights", "kept", "size_dense_bytes", "size_p_bytes", "size_pq_bytes", "size_pqh_bytes"):
                setattr(other, f, getattr(other, f) + getattr(st, f))
    return rows, other


@dataclass
class Report:
    """Per-layer compression statistics; see the module docstring for the column definitions.

    Attributes:
        layers: one :class:`LayerStats` per compressed layer and per dense weight; ``other`` aggregates the rest.
        total: totals row (``name="total"``).
        file_bytes: the actual file size.
        source: the file path (or ``"<model>"``).
        verified: False when the report was read from a file's header without checking its payloads' checksums
            (``compression_report(path, verify=False)``); the renderings then say so.
    """

    layers: list[LayerStats]
    other: LayerStats | None
    total: LayerStats
    file_bytes: int
    source: str = ""
    meta: dict = field(default_factory=dict, repr=False)
    verified: bool = True

    @classmethod
    def from_metadata(cls, meta: dict, file_size: int, source: str = "") -> Report:
        """Build the report from a file's ``dc_lightning`` metadata document."""
        layers = [_layer_stats(r) for r in meta["layers"]]
        dense_rows, other = _tensor_stats(meta["tensors"])
        layers += dense_rows
        allrows = layers + ([other] if other else [])
        kept = sum(r.kept for r in layers)
        tot = LayerStats(
            "total",
            "total",
            sum(r.weights for r in layers),
            kept,
            sum(r.fillers for r in layers),
            _wavg(layers, "weight_bits_pq"),
            _wavg(layers, "weight_bits_pqh"),
            _wavg([r for r in layers if r.index_bits_pq], "index_bits_pq"),
            _wavg([r for r in layers if r.index_bits_pq], "index_bits_pqh"),
            sum(r.size_dense_bytes for r in allrows),
            sum(r.size_p_bytes for r in allrows),
            sum(r.size_pq_bytes for r in allrows),
            sum(r.size_pqh_bytes for r in allrows),
        )
        small = {k: v for k, v in meta.items() if k not in ("layers", "tensors")}
        return cls(layers, other, tot, int(file_size), source, small)

    @property
    def aliases(self) -> dict[str, str]:
        """``{alias key: stored key}``: the file's tied weights (stored and counted once), ``{}`` without ties."""
        return dict(self.meta.get("aliases") or {})

    def _tied_line(self) -> str:
        pairs = ", ".join(f"{a} = {k}" for a, k in self.aliases.items())
        return f"Tied (stored and counted once): {pairs}." if pairs else ""

    @property
    def ratio_file(self) -> float:
        return self.total.size_dense_bytes / self.file_bytes if self.file_bytes else float("inf")

    def summary(self) -> str:
        """One line with both ratios, labelled: the whole file against the dense fp32 parameters, and [DC]'s
        weights-only accounting (P+Q+H), e.g. ``"28,665 bytes, 37.0x smaller than the dense fp32 parameters
        (weights alone, [DC]'s accounting: P+Q+H 42.4x)"``."""
        return (
            f"{self.file_bytes:,} bytes, {self.ratio_file:.1f}x smaller than the dense fp32 parameters "
            f"(weights alone, [DC]'s accounting: P+Q+H {self.total.ratio_pqh:.1f}x)"
        )

    _UNVERIFIED = "NOT VERIFIED: the payload checksums of this file were not checked (verify=False)"

    # ----------------------------------------------------------------------------------------------- output

    _COLS = (
        ("layer", "name", "{}"),
        ("#W", "weights", "{:,}"),
        ("W% (P)", "kept_pct", "{:.1f}%"),
        ("Wb P+Q", "weight_bits_pq", "{:.1f}"),
        ("Wb P+Q+H", "weight_bits_pqh", "{:.2f}"),
        ("Ib P+Q", "index_bits_pq", "{:.0f}"),
        ("Ib P+Q+H", "index_bits_pqh", "{:.2f}"),
        ("CR P+Q", "cr_pq_pct", "{:.2f}%"),
        ("CR P+Q+H", "cr_pqh_pct", "{:.2f}%"),
    )

    def _rows(self) -> list[LayerStats]:
        return self.layers + ([self.other] if self.other else []) + [self.total]

    def _cells(self, r: LayerStats) -> list[str]:
        cells = [fmt.format(getattr(r, attr)) for _, attr, fmt in self._COLS]
        if r is self.total:
            cells[2] += f" ({100.0 / r.kept_pct:.0f}x)" if r.kept_pct else ""
            cells[7] += f" ({r.ratio_pq:.1f}x)"
            cells[8] += f" ({r.ratio_pqh:.1f}x)"
        return cells

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "file_bytes": self.file_bytes,
            "ratio_file": self.ratio_file,
            "layers": [r.to_dict() for r in self.layers],
            "other": self.other.to_dict() if self.other else None,
            "total": self.total.to_dict(),
            "meta": self.meta,
            "verified": self.verified,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        head = [c[0] for c in self._COLS]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(self._cells(r)) + " |" for r in self._rows()]
        lines.append("")
        lines.append(
            f"File: {self.file_bytes:,} bytes ({self.ratio_file:.1f}x smaller than dense fp32, "
            f"{self.total.size_dense_bytes:,.0f} bytes)."
        )
        if self.aliases:
            lines.append(self._tied_line())
        if not self.verified:
            lines.append(f"**{self._UNVERIFIED}**")
        return "\n".join(lines)

    def print(self, console: Any = None) -> None:
        """Render the table with ``rich`` (to ``console``, default a new stdout console)."""
        from rich.table import Table

        table = Table(title=f"Compression report {self.source}".strip())
        for h, _, _ in self._COLS:
            table.add_column(h, justify="left" if h == "layer" else "right")
        for r in self._rows():
            table.add_row(*self._cells(r), style="bold" if r is self.total else None)
        (console or rich_console()).print(table)
        if self.aliases:
            (console or rich_console()).print(self._tied_line(), highlight=False)
        if not self.verified:
            (console or rich_console()).print(f"[bold red]{self._UNVERIFIED}[/]")

    def plot(self, path: str | os.PathLike) -> Path:
        """PNG bar chart of bytes per layer after pruning, +quantization, +Huffman (DC Fig. 1 stages)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        import numpy as np

        rows = self.layers + ([self.other] if self.other else [])
        x = np.arange(len(rows))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) + 2), 4.5))
        for off, attr, label in (
            (-0.3, "size_dense_bytes", "dense fp32"),
            (-0.1, "size_p_bytes", "pruning"),
            (0.1, "size_pq_bytes", "+quantization"),
            (0.3, "size_pqh_bytes", "+Huffman"),
        ):
            ax.bar(x + off, [max(getattr(r, attr), 1.0) for r in rows], width=0.2, label=label)
        ax.set_yscale("log")
        ax.set_xticks(x, [r.name for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("bytes")
        t = self.total
        ax.set_title(f"P {t.ratio_p:.1f}x, P+Q {t.ratio_pq:.1f}x, P+Q+H {t.ratio_pqh:.1f}x")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def log_wandb(self, logger: Any = None) -> None:
        """Log the table (``wandb.Table``), the totals and the JSON report (as an artifact) to Weights & Biases.

        Args:
            logger: a Lightning ``WandbLogger`` (its ``experiment`` run is used) or a wandb run; default the
                active ``wandb.run``.

        Raises:
            ValueError: no ``logger`` and no active wandb run.
        """
        import wandb

        run = getattr(logger, "experiment", logger) if logger is not None else wandb.run
        if run is None:
            raise ValueError("log_wandb: no wandb run; pass a WandbLogger or call wandb.init() first")
        table = wandb.Table(columns=[c[0] for c in self._COLS], data=[self._cells(r) for r in self._rows()])
        run.log(
            {
                "compression/report": table,
                "compression/ratio": self.total.ratio_pqh,
                "compression/ratio_pq": self.total.ratio_pq,
                "compression/file_bytes": self.file_bytes,
            }
        )
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "compression_report.json"
            p.write_text(self.to_json())
            art = wandb.Artifact("compression_report", type="report")
            art.add_file(str(p))
            run.log_artifact(art)


def _wavg(rows: list[LayerStats], attr: str) -> float:
    w = sum(r.kept for r in rows)
    return sum(getattr(r, attr) * r.kept for r in rows) / w if w else 0.0


def compression_report(model_or_path: Any, verify: bool = True, **save_kwargs: Any) -> Report:
    """The compression report of a ``.dcz`` file, or of a model (encoded in memory, nothing written).

    Args:
        model_or_path: a path to a compressed file, or an ``nn.Module`` with compression buffers.
        verify: (file) check the header digest and every payload's sha256 before reporting (default). ``False``
            reads the header only; the report then says prominently that it was not verified.
        **save_kwargs: for a model, the encoding options of :func:`dc_lightning.io.save_compressed`
            (``index_bits``, ``codebook_dtype``, ``dense_dtype``).

    Raises:
        CorruptFileError: the file cannot be read, or (``verify``) a payload is truncated or altered.

    Example::

        compression_report(model, index_bits=4).print()
    """
    from dc_lightning.dcz import CorruptFileError, build_file, read_header
    from dc_lightning.dcz.container import verify_payloads

    if isinstance(model_or_path, (str, os.PathLike)):
        path = str(model_or_path)
        with open(path, "rb") as f:
            data = f.read()
        try:
            _, meta = read_header(data, path)
            if verify:
                verify_payloads(data, meta, path)
            rep = Report.from_metadata(meta, len(data), path)
        except CorruptFileError:
            raise
        except Exception as e:
            raise CorruptFileError(f"{path}: metadata is inconsistent ({type(e).__name__}: {e})") from None
        rep.verified = bool(verify)
        return rep
    meta, data = build_file(model_or_path, **save_kwargs)
    return Report.from_metadata(meta, len(data), "<model>")
