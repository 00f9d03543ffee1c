"""``dc-lightning inspect``: print the per-layer compression report of a ``.dcz`` file."""

from __future__ import annotations

import argparse
import json
import re
import sys

from dc_lightning.cli import UsageError, input_file, user_errors

__all__ = ["cli_inspect"]

#: what ``--memory``'s optional value is when it names a device (``cpu``, ``cuda``, ``cuda:1``, ``mps``...)
DEVICE = r"(cpu|cuda|mps|xpu|meta)(:\d+)?"


@user_errors("dc-lightning inspect")
def cli_inspect(argv: list[str] | None = None) -> int:
    """``dc-lightning inspect <file.dcz> [--json | --markdown] [--no-verify] [--memory [DEVICE]]``: print the report.

    The file's header digest and payload checksums are verified first: a corrupt file exits with status 1, a missing
    file or a directory with 2. ``--no-verify`` reads the header only and says so on every rendering.
    """
    p = argparse.ArgumentParser(prog="dc-lightning inspect", description=cli_inspect.__doc__.split("\n")[0])
    p.add_argument("file", nargs="?")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="print JSON")
    g.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--no-verify", action="store_true", help="skip the payload checksums (the report says so)")
    p.add_argument("--memory", nargs="?", const="cpu", metavar="DEVICE",
                   help="also convert the model (to_compressed_inference) on DEVICE (default cpu; e.g. cuda) and "
                        "report the bytes its compressed layers hold there vs dense fp16")
    p.add_argument("--trusted", action="append", default=None, metavar="PATTERN",
                   help="with --memory: a builder the file may name (as load_compressed(trusted=...))")
    args = p.parse_args(argv)
    if args.file is None:
        # `inspect --memory FILE`: argparse hands FILE to --memory's optional DEVICE; a device name looks otherwise
        if args.memory is None or re.fullmatch(DEVICE, args.memory):
            raise UsageError("give the .dcz file: dc-lightning inspect FILE.dcz [--memory [DEVICE]]")
        args.file, args.memory = args.memory, "cpu"

    from dc_lightning.report import compression_report

    rep = compression_report(input_file(args.file, ".dcz"), verify=not args.no_verify)
    if not rep.verified:
        print(f"dc-lightning inspect: {args.file}: NOT VERIFIED (--no-verify): checksums not checked", file=sys.stderr)
    mem = None
    if args.memory is not None:
        from dc_lightning.inference.conversion import inference_memory

        mem = inference_memory(args.file, args.memory, trusted=args.trusted)
    if args.json:
        if mem is None:
            print(rep.to_json())
        else:
            print(json.dumps({**json.loads(rep.to_json()), "memory": mem}, indent=2))
        return 0
    if args.markdown:
        print(rep.to_markdown())
    else:
        rep.print()
    if mem is not None:
        print(f"\nmemory after to_compressed_inference on {mem['device']}:")
        print("| layer | module | bytes | dense fp16 bytes | ratio |")
        print("|---|---|---|---|---|")
        for r in mem["layers"]:
            print(f"| {r['name']} | {r['type']} | {r['bytes']:,} | {r['dense_fp16_bytes']:,} | {r['ratio']:.2f}x |")
        print(f"| total | | {mem['bytes']:,} | {mem['dense_fp16_bytes']:,} | {mem['ratio']:.2f}x |")
        print(f"file on disk: {mem['file_bytes']:,} bytes")
    return 0
