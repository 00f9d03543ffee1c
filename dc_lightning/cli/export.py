"""``dc-lightning export`` (Lightning checkpoint -> ``.dcz``) and ``dc-lightning decompress`` (``.dcz`` -> dense
safetensors state dict)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dc_lightning.cli import UsageError, input_file, output_file, user_errors
from dc_lightning.dcz import AUTO
from dc_lightning.dcz.container import NP_FLOAT
from dc_lightning.dcz.relative_index import MAX_INDEX_BITS

__all__ = ["cli_decompress", "cli_export"]


def _index_bits_arg(text: str) -> int | str:
    if text == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an int in 1..{MAX_INDEX_BITS} or {AUTO!r}") from None


def _model_class(spec: str) -> object:
    """The class ``--model-class`` names, with what to do when the console script cannot import it."""
    from dc_lightning.io import import_callable

    try:
        return import_callable(spec)
    except ValueError as e:
        mod = spec.split(":", 1)[0].split(".", 1)[0]
        if ":" in spec and ((Path.cwd() / f"{mod}.py").is_file() or (Path.cwd() / mod / "__init__.py").is_file()):
            raise UsageError(
                f"--model-class {spec}: {mod!r} is in the current directory, which the dc-lightning console script "
                f"does not search; run it as PYTHONPATH=. dc-lightning export ..."
            ) from None
        raise UsageError(f"--model-class {spec}: {e}") from None


@user_errors("dc-lightning export")
def cli_export(argv: list[str] | None = None) -> int:
    """``dc-lightning export <lightning.ckpt> <out.dcz> [--model-class pkg.mod:Class] [...]``.

    The input is a Lightning checkpoint, a ``torch.save`` pickle: it is loaded with ``torch.load(...,
    weights_only=False)``, which can run code from the file, so only export checkpoints you produced or trust.
    The output file contains no pickle. User mistakes print one line and return 2.
    """
    p = argparse.ArgumentParser(prog="dc-lightning export", description=cli_export.__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="Lightning .ckpt file (your own: it is unpickled)")
    p.add_argument("out", help="output .dcz file")
    p.add_argument("--model-class", help="LightningModule class as pkg.module:Class (rebuilt from hyper_parameters)")
    p.add_argument(
        "--index-bits",
        type=_index_bits_arg,
        default=None,
        help="relative-index bits: an int, or 'auto' = the smallest file per layer (default: 8 conv / 5 fc)",
    )
    p.add_argument("--codebook-dtype", default="float32", choices=sorted(NP_FLOAT))
    p.add_argument("--dense-dtype", default="float32", choices=sorted(NP_FLOAT))
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)

    from dc_lightning.checkpoint import read_checkpoint, restore_checkpoint
    from dc_lightning.io import save_compressed

    out = output_file(args.out, args.overwrite)
    # torch.load unpickles here (hyper_parameters may hold objects): documented above, only your own checkpoints
    ckpt = read_checkpoint(input_file(args.checkpoint, "Lightning .ckpt"), weights_only=False)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    spec = args.model_class
    if spec is None:
        raise UsageError("pass --model-class pkg.module:Class (Lightning checkpoints do not record it)")
    cls = _model_class(spec)
    try:
        model = cls(**hparams)
    except Exception as e:
        raise UsageError(f"cannot build {spec}(**hyper_parameters): {type(e).__name__}: {e}") from None
    try:
        restore_checkpoint(model, ckpt)
    except RuntimeError as e:
        raise UsageError(f"{args.checkpoint} does not fit {spec}: {' '.join(str(e).split())[:400]}") from None
    builder = None if getattr(model, "dc_builder", None) else {"callable": spec, "kwargs": hparams}
    report = save_compressed(
        model,
        out,
        index_bits=args.index_bits,
        codebook_dtype=args.codebook_dtype,
        dense_dtype=args.dense_dtype,
        builder=builder,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.out}: {report.summary()}")
    return 0


@user_errors("dc-lightning decompress")
def cli_decompress(argv: list[str] | None = None) -> int:
    """``dc-lightning decompress <in.dcz> <out.safetensors> [--overwrite]``: dense safetensors state dict.

    User mistakes (a missing input, an existing output without ``--overwrite``) print one line and return 2, as in
    the other subcommands; a corrupt ``.dcz`` file returns 1.
    """
    p = argparse.ArgumentParser(prog="dc-lightning decompress", description=cli_decompress.__doc__.split("\n")[0])
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    from dc_lightning.io import decompress

    output_file(args.output, args.overwrite)
    decompress(input_file(args.input, ".dcz"), args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}")
    return 0
