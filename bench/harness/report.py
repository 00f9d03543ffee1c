"""Where bench results go and how they are written: dated result folders, the machine record, Markdown tables,
CSV and JSON.

Results go to ``bench/results/<YYYY-MM-DD>/<name>/`` (:func:`results_dir`), or to ``$OUT/<name>`` when ``OUT`` is
set (the lent GPU machine, whose ``$OUT`` comes back). A table is a list of row dicts and a list of columns; a column
is a key, or ``(header, key or row -> value, format spec)``.

Example::

    rows = [{"layer": "fc6", "us": 12.345}]
    print_table(rows, ["layer", ("µs", "us", ".2f")])
    write_csv(rows, results_dir("my_bench") / "rows.csv")
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"

Column = str | tuple[str, str | Callable[[dict], Any], str]


def results_dir(name: str, date: str | None = None) -> Path:
    """``$OUT/<name>`` when ``OUT`` is set, else ``bench/results/<date or today>/<name>`` (not created here)."""
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / name
    return RESULTS / (date or time.strftime("%Y-%m-%d")) / name


def env_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Date, command, Python/torch/Triton versions and the device a result was measured on."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cmd": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        info["device"] = torch.cuda.get_device_name(dev)
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return info


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if spec and isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def markdown_table(rows: Iterable[dict], columns: Sequence[Column]) -> str:
    """A Markdown table of ``rows``: one line per row, one cell per column (a missing value prints ``-``)."""
    cols = [(c, c, "") if isinstance(c, str) else c for c in columns]
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [_cell(get(row) if callable(get) else row.get(get), spec) for _, get, spec in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(rows: Iterable[dict], columns: Sequence[Column], title: str | None = None) -> str:
    """Print :func:`markdown_table` (after ``title``) and return it."""
    text = markdown_table(rows, columns)
    print(("\n" + title + "\n\n" if title else "") + text, flush=True)
    return text


def write_csv(rows: Sequence[dict], path: Path | str, fields: Sequence[str] | None = None) -> Path:
    """Write ``rows`` as CSV (columns: ``fields``, else every key in first-seen order); creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fields is None:
        fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def write_json(obj: Any, path: Path | str) -> Path:
    """Write ``obj`` as indented JSON (anything JSON cannot hold as its ``str``); creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str))
    return path
