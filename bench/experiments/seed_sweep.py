"""Paired seed sweep of a recipe's compression stages: is a change better than seed-to-seed noise?

For every seed: train the recipe's dense baseline once (``stages=[baseline]``), then run the compression stages
(``stage=prune baseline_ckpt=...``) once per variant from that same dense model and seed, so each variant's change vs
the dense model is paired with the others'. Seeds run as parallel processes (on a GPU machine they share the GPU);
the table gives per-seed changes, their means and the paired difference of each variant to the first one.

    python -m bench.experiments.seed_sweep --recipe lenet5 --seeds 0 1 2 3 --jobs 4 --out bench/results/<date>/sweep \\
        --variant recipe --variant "long=pipeline.prune.epochs=32" [-- common overrides]

A variant is ``name`` or ``name=override[;override...]``. Writes ``<out>/sweep.csv``, ``<out>/sweep.json`` and
``<out>/sweep.md`` (rewritten as each seed finishes, so a sweep cut short keeps its finished seeds); run folders
(checkpoints included) go under ``--runs`` (default ``<out>/runs``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from bench.harness.report import results_dir, write_csv, write_json

ROOT = Path(__file__).resolve().parents[2]


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition("=")
    if not name or any(c in name for c in "/ "):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected name or name=override[;override...]")
    return name, [o for o in rest.split(";") if o] if rest else []


def _run(args: list[str], log: Path) -> int:
    with open(log, "w") as f:
        return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], stdout=f, stderr=subprocess.STDOUT,
                              cwd=ROOT).returncode


def seed_job(
    seed: int, recipe: str, variants: list[tuple[str, list[str]]], common: list[str], runs: Path
) -> list[dict]:
    base_dir = runs / f"s{seed}_baseline"
    base = [f"recipe={recipe}", f"seed={seed}", "logger=csv", *common]
    rows = []
    ckpt = base_dir / "checkpoints" / "baseline.ckpt"
    if not ckpt.is_file():
        rc = _run([*base, "stages=[baseline]", f"output_dir={base_dir}", f"hydra.run.dir={base_dir}/hydra"],
                  runs / f"s{seed}_baseline.log")
        if rc or not ckpt.is_file():
            return [{"seed": seed, "variant": "baseline", "error": f"baseline exit {rc}"}]
    dense = json.loads((base_dir / "summary.json").read_text())["accuracy"]["baseline"]["acc1"]
    for name, overrides in variants:
        run_dir = runs / f"s{seed}_{name}"
        t0 = time.perf_counter()
        rc = _run([*base, "stage=prune", f"baseline_ckpt={ckpt}", f"output_dir={run_dir}",
                   f"hydra.run.dir={run_dir}/hydra", *overrides], runs / f"s{seed}_{name}.log")
        summary_path = run_dir / "summary.json"
        if rc or not summary_path.is_file():
            rows.append({"seed": seed, "variant": name, "error": f"exit {rc}"})
            continue
        s = json.loads(summary_path.read_text())
        reloaded = s["accuracy"]["reloaded"]["acc1"]
        rows.append({
            "seed": seed, "variant": name, "overrides": ";".join(overrides), "dense": dense * 100,
            "pruned": s["accuracy"]["prune"]["acc1"] * 100, "reloaded": reloaded * 100,
            "change": (reloaded - dense) * 100, "ratio_pqh": s["report"]["total"]["ratio_pqh"],
            "file_bytes": s["report"]["file_bytes"], "seconds": round(time.perf_counter() - t0, 1),
        })
    return rows


def table(rows: list[dict], variants: list[str]) -> str:
    ok = [r for r in rows if "error" not in r]
    seeds = sorted({r["seed"] for r in ok})
    by = {(r["seed"], r["variant"]): r for r in ok}
    lines = ["| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean change | paired vs "
             f"{variants[0]} | P+Q+H |", "|---|" + "---|" * (len(seeds) + 3)]
    for v in variants:
        ch = [by[(s, v)]["change"] if (s, v) in by else None for s in seeds]
        got = [c for c in ch if c is not None]
        diffs = [by[(s, v)]["change"] - by[(s, variants[0])]["change"] for s in seeds
                 if (s, v) in by and (s, variants[0]) in by]
        paired = (f"{statistics.mean(diffs):+.2f} (sd {statistics.stdev(diffs):.2f}, n {len(diffs)})"
                  if len(diffs) > 1 and v != variants[0] else "-")
        ratios = [by[(s, v)]["ratio_pqh"] for s in seeds if (s, v) in by]
        lines.append(
            f"| {v} | " + " | ".join("-" if c is None else f"{c:+.2f}" for c in ch)
            + f" | {statistics.mean(got):+.2f} | {paired} | "
            + (f"{min(ratios):.1f}-{max(ratios):.1f}x" if ratios else "-") + " |"
        )
    dense = [by[(s, variants[0])]["dense"] for s in seeds if (s, variants[0]) in by]
    if dense:
        lines.append("")
        lines.append("dense top-1 per seed: " + ", ".join(f"{d:.2f} %" for d in dense))
    errors = [r for r in rows if "error" in r]
    if errors:
        lines.append("errors: " + "; ".join(f"seed {r['seed']} {r['variant']}: {r['error']}" for r in errors))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--variant", type=parse_variant, action="append", required=True,
                    help="name or name=override[;override...]; the first is the reference of the paired column")
    ap.add_argument("--jobs", type=int, default=2, help="seeds run in parallel (default 2)")
    ap.add_argument("--out", type=Path, default=results_dir("seed_sweep"))
    ap.add_argument("--runs", type=Path, default=None, help="run folders (default <out>/runs)")
    args = ap.parse_args(argv)
    names = [n for n, _ in args.variant]
    if len(set(names)) != len(names):
        ap.error(f"--variant: names must be unique, got {names}")
    if args.jobs < 1:
        ap.error(f"--jobs: {args.jobs} must be >= 1")
    runs = args.runs or args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(seed_job, s, args.recipe, args.variant, common, runs) for s in args.seeds]
        for fut in as_completed(futures):
            rows.extend(fut.result())
            rows.sort(key=lambda r: (r["seed"], r["variant"]))
            write(args.out, rows, names)
    print((args.out / "sweep.md").read_text())
    return 0 if all("error" not in r for r in rows) else 1


def write(out: Path, rows: list[dict], names: list[str]) -> None:
    md = table(rows, names) if any("error" not in r for r in rows) else "no run finished"
    (out / "sweep.md").write_text(md + "\n")
    write_json(rows, out / "sweep.json")
    fields = ["seed", "variant", "overrides", "dense", "pruned", "reloaded", "change", "ratio_pqh", "file_bytes",
              "seconds", "error"]
    write_csv(rows, out / "sweep.csv", fields=fields)


if __name__ == "__main__":
    raise SystemExit(main())
