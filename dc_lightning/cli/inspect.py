"""``dc-lightning inspect``: print the per-layer compression report of a ``.dcz`` file."""

from __future__ import annotations

import argparse
import sys

__all__ = ["cli_inspect"]


def cli_inspect(argv: list[str] | None = None) -> int:
    """``dc-lightning inspect <file.dcz> [--json | --markdown]``: print the per-layer compression report."""
    p = argparse.ArgumentParser(prog="dc-lightning inspect", description=cli_inspect.__doc__)
    p.add_argument("file")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="print JSON")
    g.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = p.parse_args(argv)

    from dc_lightning.dcz import CorruptFileError
    from dc_lightning.report import compression_report

    try:
        rep = compression_report(args.file)
    except (CorruptFileError, FileNotFoundError) as e:
        print(f"dc-lightning inspect: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(rep.to_json())
    elif args.markdown:
        print(rep.to_markdown())
    else:
        rep.print()
    return 0
