"""bench/seed_sweep.py: variant parsing and the paired table (the training runs are exercised by the recipes)."""

import argparse
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("seed_sweep", ROOT / "bench" / "seed_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parse_variant(sweep):
    assert sweep.parse_variant("recipe") == ("recipe", [])
    assert sweep.parse_variant("long=pipeline.prune.epochs=32") == ("long", ["pipeline.prune.epochs=32"])
    name, ovs = sweep.parse_variant("d=pipeline.prune.densities={a:0.1,b:0.2};~x;+x={y:1}")
    assert name == "d" and ovs == ["pipeline.prune.densities={a:0.1,b:0.2}", "~x", "+x={y:1}"]
    for bad in ("", "=x=1", "a b=x=1", "a/b"):
        with pytest.raises(argparse.ArgumentTypeError, match="--variant"):
            sweep.parse_variant(bad)


def _row(seed, variant, change, ratio=40.0):
    return {"seed": seed, "variant": variant, "dense": 90.0, "pruned": 90.0 + change, "reloaded": 90.0 + change,
            "change": change, "ratio_pqh": ratio}


def test_table_pairs_variants_by_seed(sweep):
    rows = [_row(0, "ref", -0.5), _row(1, "ref", -0.3), _row(0, "new", -0.2, 41.0), _row(1, "new", -0.4, 39.5),
            {"seed": 2, "variant": "new", "error": "exit 1"}]
    md = sweep.table(rows, ["ref", "new"])
    lines = md.splitlines()
    assert lines[2].startswith("| ref | -0.50 | -0.30 | -0.40 | - |")
    # paired differences +0.30 and -0.10: mean +0.10, sample sd 0.28
    assert "| new | -0.20 | -0.40 | -0.30 | +0.10 (sd 0.28, n 2) | 39.5-41.0x |" in md
    assert "seed 2 new: exit 1" in md
