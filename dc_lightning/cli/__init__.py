"""The ``dc-lightning`` console script.

One module of this package per subcommand (``export.py`` holds ``export`` and ``decompress``), each with a function
``cli_<name>(argv: list[str]) -> int`` that parses its own arguments and calls the library; the library modules know
nothing of argparse or Hydra. This file only dispatches, importing the subcommand's module when it runs, so
``dc-lightning --help`` stays fast and imports nothing heavy.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sensitivity": ("dc_lightning.cli.sensitivity", "prune one layer at a time and plot accuracy vs density"),
    "export": ("dc_lightning.cli.export", "convert a Lightning checkpoint into a compressed .dcz file"),
    "decompress": ("dc_lightning.cli.export", "write a compressed file's dense weights as a plain safetensors file"),
    "inspect": ("dc_lightning.cli.inspect", "print the per-layer compression report of a compressed file"),
    "predict": ("dc_lightning.cli.predict", "evaluate a compressed file through the EIE inference path"),
}


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
