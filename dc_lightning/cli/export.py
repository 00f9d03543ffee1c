"""``dc-lightning export`` (Lightning checkpoint -> ``.dcz``) and ``dc-lightning decompress`` (``.dcz`` -> dense
safetensors state dict)."""

from __future__ import annotations

import argparse
import sys

from dc_lightning.dcz import AUTO
from dc_lightning.dcz.container import NP_FLOAT
from dc_lightning.sparse_format import MAX_INDEX_BITS

__all__ = ["cli_decompress", "cli_export"]


def _index_bits_arg(text: str) -> int | str:
    if text == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an int in 1..{MAX_INDEX_BITS} or {AUTO!r}") from None


def cli_export(argv: list[str] | None = None) -> int:
    """``dc-lightning export <lightning.ckpt> <out.dcz> [--model-class pkg.mod:Class] [...]``.

    The input is a Lightning checkpoint, a ``torch.save`` pickle: it is loaded with ``torch.load(...,
    weights_only=False)``, which can run code from the file, so only export checkpoints you produced or trust.
    The output file contains no pickle.
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

    import torch

    from dc_lightning.buffers import register_placeholders
    from dc_lightning.io import import_callable, save_compressed

    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        print(f"dc-lightning export: {args.checkpoint} is not a Lightning checkpoint (no state_dict)", file=sys.stderr)
        return 2
    hparams = dict(ckpt.get("hyper_parameters") or {})
    spec = args.model_class
    if spec is None:
        print(
            "dc-lightning export: pass --model-class pkg.module:Class (Lightning checkpoints do not record it)",
            file=sys.stderr,
        )
        return 2
    try:
        model = import_callable(spec)(**hparams)
    except Exception as e:
        print(f"dc-lightning export: cannot build {spec}(**hyper_parameters): {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    register_placeholders(model, ckpt["state_dict"])
    model.load_state_dict(ckpt["state_dict"])
    builder = None if getattr(model, "dc_builder", None) else {"callable": spec, "kwargs": hparams}
    report = save_compressed(
        model,
        args.out,
        index_bits=args.index_bits,
        codebook_dtype=args.codebook_dtype,
        dense_dtype=args.dense_dtype,
        builder=builder,
        overwrite=args.overwrite,
    )
    print(
        f"wrote {args.out}: {report.file_bytes:,} bytes, {report.ratio_file:.1f}x smaller than the dense fp32 "
        f"parameters (weights alone, [DC]'s accounting: P+Q+H {report.total.ratio_pqh:.1f}x)"
    )
    return 0


def cli_decompress(argv: list[str] | None = None) -> int:
    """``dc-lightning decompress <in.dcz> <out.safetensors> [--overwrite]``: dense safetensors state dict."""
    p = argparse.ArgumentParser(prog="dc-lightning decompress", description=cli_decompress.__doc__)
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    from dc_lightning.io import CorruptFileError, decompress

    try:
        decompress(args.input, args.output, overwrite=args.overwrite)
    except (CorruptFileError, FileExistsError, FileNotFoundError) as e:
        print(f"dc-lightning decompress: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0
