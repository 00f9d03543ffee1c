"""The ``dc-lightning`` console script.

Each subcommand lives in the module that owns it as ``cli_main(argv: list[str]) -> int``; this file only
dispatches, so ``dc-lightning --help`` stays fast and imports nothing heavy.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sensitivity": ("dc_lightning.sensitivity", "prune one layer at a time and plot accuracy vs density"),
    "export": ("dc_lightning.io", "convert a Lightning checkpoint into a compressed .dcz file"),
    "decompress": ("dc_lightning.io", "write a compressed file's dense weights as a plain safetensors file"),
    "inspect": ("dc_lightning.report", "print the per-layer compression report of a compressed file"),
    "predict": ("dc_lightning.inference", "evaluate a compressed file through the EIE inference path"),
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
