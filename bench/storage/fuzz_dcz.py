"""Structure-aware fuzz of the ``.dcz`` loader: mutants of a real file must be rejected or load the original weights.

The base file is LeNet-5 ([DC] Table 3's network) with every kind of compressed layer: ``conv1`` quantized only
(8 bits), ``conv2`` and ``ip1`` pruned + quantized, ``ip2`` pruned only, biases as plain tensors. Each mutant is one of

* **byte-level**: flip 1-4 bytes anywhere, truncate, duplicate a slice somewhere else, insert or zero a run;
* **header-level**: parse the header JSON, change one value (a layer's or tensor's field, a stream section, the
  Huffman parameters, the builder, the safetensors index, the metadata strings: numbers nudged / doubled / zeroed /
  negated / made huge, values swapped with the same field of another record, types changed), then re-serialise it with
  a valid length (what the issue's fuzz did);
* **re-sealed header**: the same edit, with the header digest recomputed, i.e. a self-consistent file that a tool
  rewrote; it exercises the record checks behind the digest. Such a file may legitimately hold other weights (a
  tensor's stored dtype changed from float32 to float16 is a valid file), so "loaded, different" is reported for it
  but is not a failure; exceptions other than ``ValueError``, hangs and memory are.

Every mutant is loaded with ``load_compressed`` into a fresh LeNet-5 (every other mutant without ``model=``, through the
builder record) under ``tracemalloc`` (NumPy's buffers are traced) and a SIGALRM timeout. Outcomes: rejected with
``CorruptFileError`` / ``ModelMismatchError`` / another ``ValueError``, loaded identical, loaded different, other
exception, hang. Exit status 1 when a byte-level or header-level mutant loads different weights, or any mutant raises
something other than a ``ValueError`` or hangs.

    python -m bench.storage.fuzz_dcz --mutants 10000 [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from bench.harness.report import write_json
from dc_lightning.dcz import CorruptFileError
from dc_lightning.dcz.container import assemble
from dc_lightning.io import ModelMismatchError, load_compressed, save_compressed
from dc_lightning.models import build_model
from dc_lightning.pruning.masks import attach_mask, magnitude_mask
from dc_lightning.quantization.codebooks import quantize_layer

KINDS = ("byte", "header", "resealed")


class Hang(Exception):
    pass


def base_model() -> torch.nn.Module:
    """LeNet-5 with a quantized-only, two pruned+quantized and one pruned-only layer (deterministic)."""
    torch.manual_seed(0)
    net = build_model("lenet5")
    layers = [m for m in net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    plan = [(None, 8), (0.3, 8), (0.08, 5), (0.2, None)]  # (density, bits) of conv1, conv2, ip1, ip2
    with torch.no_grad():
        for m, (density, bits) in zip(layers, plan, strict=True):
            if density is not None:
                mask, _ = magnitude_mask(m.weight, density=density)
                attach_mask(m, mask)
                m.weight.masked_fill_(~mask, 0.0)
            if bits is not None:
                quantize_layer(m, bits, max_iter=5)
    return net


def split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def leaves(obj, path=()):
    """Every (path, value) leaf of a JSON value (lists and dicts are walked; the containers themselves count too)."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, (*path, i))


def set_at(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def new_value(rng: random.Random, old, same_field: list):
    """A changed value for a leaf: nudged, scaled, zeroed, negated, huge, another record's value, another type."""
    choices = ["type", "swap"]
    if isinstance(old, bool):
        choices += ["not"]
    elif isinstance(old, int):
        choices += ["+1", "-1", "x2", "0", "neg", "huge"]
    elif isinstance(old, str):
        choices += ["str"]
    elif isinstance(old, list):
        choices += ["elem", "drop", "append"]
    op = rng.choice(choices)
    if op == "swap" and same_field:
        return rng.choice(same_field)
    if op == "not":
        return not old
    if op in ("+1", "-1"):
        return old + (1 if op == "+1" else -1)
    if op == "x2":
        return old * 2 + 1
    if op == "0":
        return 0
    if op == "neg":
        return -old - 1
    if op == "huge":
        return rng.choice([2**31, 2**40, 10**15, 2**63])
    if op == "str":
        return rng.choice(["", "float16", "float32", "int8", "bool", "pq", "q", "p", old[:-1], old + "x"])
    if op == "elem" and old:
        out = list(old)
        i = rng.randrange(len(out))
        out[i] = new_value(rng, out[i], []) if not isinstance(out[i], (list, dict)) else 7
        return out
    if op == "drop" and old:
        return old[:-1]
    if op == "append":
        return [*old, rng.choice([0, 1, 64, 2**20])]
    return rng.choice([None, 0, 1.5, "x", [], {}, [1, 2], True])


def mutate_header(rng: random.Random, raw: bytes, reseal: bool) -> tuple[bytes, str]:
    header, data = split(raw)
    meta = header["__metadata__"]
    doc = json.loads(meta["dc_lightning"])
    where = rng.random()
    if where < 0.8:  # the document: layer/tensor records, streams, huffman, builder
        target, tree = "doc", doc
    elif where < 0.9:  # the safetensors index
        target, tree = "index", {k: v for k, v in header.items() if k != "__metadata__"}
    else:
        target, tree = "meta", meta
    all_leaves = [(p, v) for p, v in leaves(tree) if p]
    path, old = rng.choice(all_leaves)
    same = [v for p, v in all_leaves if p and p[-1] == path[-1] and v != old and type(v) is type(old)]
    value = new_value(rng, old, same)
    set_at(tree, path, value)
    desc = f"{target}{list(path)}: {json.dumps(old)[:40]} -> {json.dumps(value)[:40]}"
    if target == "index":
        header = {"__metadata__": meta, **tree}
    meta["dc_lightning"] = json.dumps(doc, separators=(",", ":"), sort_keys=True)
    if reseal:
        payloads = {}
        try:  # re-seal needs a consistent index; an index edit is re-sealed as written
            for name, rec in header.items():
                if name != "__metadata__":
                    a, b = rec["data_offsets"]
                    payloads[name] = np.frombuffer(data[a:b], dtype=np.uint8)
            if target != "index":
                return assemble(payloads, meta), desc
        except Exception:
            pass
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + data, desc


def mutate_bytes(rng: random.Random, raw: bytes) -> tuple[bytes, str]:
    b = bytearray(raw)
    op = rng.choice(["flip", "flip", "truncate", "splice", "insert", "zero"])
    desc = op
    if op == "flip":
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= rng.randint(1, 255)
    elif op == "truncate":
        b = b[: rng.randrange(len(b))]
    elif op == "splice":
        a, c = rng.randrange(len(b)), rng.randrange(len(b))
        b = b[:a] + b[c : c + rng.randint(1, 256)] + b[a:]
    elif op == "insert":
        a = rng.randrange(len(b))
        b = b[:a] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + b[a:]
    else:
        a = rng.randrange(len(b))
        n = rng.randint(1, 64)
        b[a : a + n] = bytes(len(b[a : a + n]))
    return bytes(b), desc


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa
    )


def load_once(path: Path, with_model: bool, timeout: float) -> tuple[str, torch.nn.Module | None, int, str]:
    """(outcome, model, tracemalloc peak bytes, error text)."""
    tracemalloc.start()
    signal.setitimer(signal.ITIMER_REAL, timeout)
    model, err = None, ""
    try:
        model = load_compressed(path, model=build_model("lenet5") if with_model else None)
        outcome = "loaded"
    except Hang:
        outcome = "hang"
    except CorruptFileError as e:
        outcome, err = "CorruptFileError", str(e)
    except ModelMismatchError as e:
        outcome, err = "ModelMismatchError", str(e)
    except ValueError as e:
        outcome, err = "other ValueError", str(e)
    except Exception as e:  # the finding the fuzz exists for
        outcome, err = f"NOT a ValueError: {type(e).__name__}", str(e)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return outcome, model, peak, err


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mutants", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before a load counts as a hang")
    p.add_argument("--json", type=Path, default=None, help="write the counts and examples here")
    args = p.parse_args(argv)

    def on_alarm(signum, frame):
        raise Hang()

    signal.signal(signal.SIGALRM, on_alarm)
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="fuzz_dcz_"))
    base = tmp / "base.dcz"
    ref = base_model()
    save_compressed(ref, base)
    raw = base.read_bytes()
    outcome, original, base_peak, _ = load_once(base, True, args.timeout)
    assert outcome == "loaded" and same_state(original, ref), "the base file must load"
    dense_bytes = sum(t.numel() * t.element_size() for t in ref.state_dict().values())

    counts: dict[str, Counter] = {k: Counter() for k in KINDS}
    examples: dict[str, list[str]] = {}
    peaks = {k: 0 for k in KINDS}
    path = tmp / "mutant.dcz"
    t0 = time.perf_counter()
    for i in range(args.mutants):
        kind = KINDS[i % len(KINDS)]
        mutant = raw
        while mutant == raw:  # an edit that re-creates the original (a value swapped with an equal one) is redrawn
            mutant, desc = (
                mutate_bytes(rng, raw) if kind == "byte" else mutate_header(rng, raw, reseal=kind == "resealed")
            )
        path.write_bytes(mutant)
        outcome, model, peak, err = load_once(path, with_model=i % 2 == 0, timeout=args.timeout)
        peaks[kind] = max(peaks[kind], peak)
        if outcome == "loaded":
            outcome = "loaded identical" if same_state(model, ref) else "loaded DIFFERENT"
        counts[kind][outcome] += 1
        if outcome.startswith(("NOT", "hang", "loaded DIFFERENT", "other")):
            examples.setdefault(f"{kind}: {outcome}", []).append(f"mutant {i} ({desc}): {err[:160]}")
    seconds = time.perf_counter() - t0

    failures = sum(
        n
        for kind, c in counts.items()
        for outcome, n in c.items()
        if outcome.startswith(("NOT", "hang")) or (outcome == "loaded DIFFERENT" and kind != "resealed")
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"{args.mutants} mutants of {base.name} ({len(raw):,} bytes; dense state dict {dense_bytes:,} bytes), "
          f"seed {args.seed}, {seconds:.0f} s")
    print("| mutant kind | outcome | count |")
    print("|---|---|---:|")
    for kind in KINDS:
        for outcome, n in sorted(counts[kind].items()):
            print(f"| {kind} | {outcome} | {n} |")
    print(f"peak traced memory while loading: base file {base_peak:,} bytes; mutants "
          + ", ".join(f"{k} {v:,}" for k, v in peaks.items()) + f"; process max RSS {rss:,} bytes")
    for key, ex in examples.items():
        print(f"{key}: {len(ex)} e.g. {ex[:3]}")
    print("FAIL" if failures else "OK", f"({failures} failures)")
    if args.json:
        write_json({
            "mutants": args.mutants, "seed": args.seed, "file_bytes": len(raw), "dense_bytes": dense_bytes,
            "seconds": round(seconds, 1), "counts": {k: dict(c) for k, c in counts.items()},
            "peak_traced_bytes": {"base": base_peak, **peaks}, "max_rss_bytes": rss,
            "examples": {k: v[:20] for k, v in examples.items()}, "failures": failures,
        }, args.json)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
