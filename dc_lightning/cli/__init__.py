"""The ``dc-lightning`` console script.

One module of this package per subcommand (``export.py`` holds ``export`` and ``decompress``), each with a function
``cli_<name>(argv: list[str]) -> int`` that parses its own arguments and calls the library; the library modules know
nothing of argparse or Hydra. This file only dispatches, importing the subcommand's module when it runs, so
``dc-lightning --help`` stays fast and imports nothing heavy.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sensitivity": ("dc_lightning.cli.sensitivity", "prune one layer at a time and plot accuracy vs density"),
    "export": ("dc_lightning.cli.export", "convert a Lightning checkpoint into a compressed .dcz file"),
    "decompress": ("dc_lightning.cli.export", "write a compressed file's dense weights as a plain safetensors file"),
    "inspect": ("dc_lightning.cli.inspect", "print the per-layer compression report of a compressed file"),
    "predict": ("dc_lightning.cli.predict", "evaluate a compressed file through the EIE inference path"),
    "generate": ("dc_lightning.cli.generate", "sample text from a compressed language model (lstm_lm, transformer_lm)"),
}


class UsageError(Exception):
    """A user mistake a subcommand reports as one line on stderr, exit status 2 (no traceback)."""


def input_file(path: str, what: str) -> Path:
    """``path`` as an existing regular file.

    Raises:
        UsageError: it does not exist or is a directory (the message names it and what is expected).
    """
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{path} is a directory; give the {what} file itself")
    if not p.is_file():
        raise UsageError(f"{path}: no such file (expected the {what} file)")
    return p


def output_file(path: str, overwrite: bool) -> Path:
    """``path`` as a file the subcommand may write.

    Raises:
        UsageError: it exists and ``--overwrite`` was not given, or it is a directory.
    """
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{path} is a directory; give the output file's name")
    if p.exists() and not overwrite:
        raise UsageError(f"{path} exists; pass --overwrite to replace it")
    return p


def user_errors(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a ``cli_<name>(argv) -> int``: a :class:`UsageError`, a missing or unreadable file, or a
    ``ValueError``/``TypeError`` from the library prints ``<prog>: <message>`` (one line) and returns 2; a corrupt
    ``.dcz`` file (``CorruptFileError``) returns 1."""

    def wrap(fn: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(fn)
        def run(*args, **kwargs) -> int:
            from dc_lightning.dcz import CorruptFileError

            try:
                return fn(*args, **kwargs)
            except CorruptFileError as e:
                print(f"{prog}: {e}", file=sys.stderr)
                return 1
            except (UsageError, OSError, ValueError, TypeError) as e:
                text = " ".join(str(e).split()) or type(e).__name__
                print(f"{prog}: {text}", file=sys.stderr)
                return 2

        return run

    return wrap


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: dc-lightning <command> [options]", "", "Deep Compression + EIE for PyTorch Lightning.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "Run 'dc-lightning <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from dc_lightning import __version__

        print(f"dc-lightning {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"dc-lightning: unknown command {name!r}; valid commands: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(getattr(module, f"cli_{name}")(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
