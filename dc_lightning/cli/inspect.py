"""``dc-lightning inspect``: print the per-layer compression report of a ``.dcz`` file."""

from __future__ import annotations

import argparse
import sys

from dc_lightning.cli import input_file, user_errors

__all__ = ["cli_inspect"]


@user_errors("dc-lightning inspect")
def cli_inspect(argv: list[str] | None = None) -> int:
    """``dc-lightning inspect <file.dcz> [--json | --markdown] [--no-verify]``: print the per-layer compression report.

    The file's header digest and payload checksums are verified first: a corrupt file exits with status 1, a missing
    file or a directory with 2. ``--no-verify`` reads the header only and says so on every rendering.
    """
    p = argparse.ArgumentParser(prog="dc-lightning inspect", description=cli_inspect.__doc__.split("\n")[0])
    p.add_argument("file")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="print JSON")
    g.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--no-verify", action="store_true", help="skip the payload checksums (the report says so)")
    args = p.parse_args(argv)

    from dc_lightning.report import compression_report

    rep = compression_report(input_file(args.file, ".dcz"), verify=not args.no_verify)
    if not rep.verified:
        print(f"dc-lightning inspect: {args.file}: NOT VERIFIED (--no-verify): checksums not checked", file=sys.stderr)
    if args.json:
        print(rep.to_json())
    elif args.markdown:
        print(rep.to_markdown())
    else:
        rep.print()
    return 0
