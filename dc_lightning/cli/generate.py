"""``dc-lightning generate``: sample text from a compressed language model through the compressed inference modules."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from dc_lightning.cli import input_file, user_errors

__all__ = ["cli_generate"]


@user_errors("dc-lightning generate")
def cli_generate(argv: Sequence[str] | None = None) -> int:
    """``dc-lightning generate FILE.dcz --prompt TEXT [--tokens N] [--temperature T] [--top-k K] [--seed S]
    [--device D] [--dense]``: print the prompt and its continuation (bytes decoded as UTF-8) on stdout."""
    parser = argparse.ArgumentParser(
        prog="dc-lightning generate",
        description="sample text from a compressed byte-level language model (recipe lstm_lm or transformer_lm)",
    )
    parser.add_argument("path", help="compressed .dcz file of a LanguageModule")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--tokens", type=int, default=200, help="bytes to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest bytes only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dense", action="store_true",
                        help="run the decoded dense model instead of the compressed inference modules")
    args = parser.parse_args(argv)

    from dc_lightning.data.text import ByteTokenizer
    from dc_lightning.inference.conversion import to_compressed_inference
    from dc_lightning.io import load_compressed
    from dc_lightning.models.lm import sample

    path = input_file(args.path, "compressed .dcz")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module = load_compressed(path).eval()
    tok = ByteTokenizer()
    decoder = getattr(getattr(module, "model", module), "decoder", None)
    if getattr(decoder, "out_features", None) != tok.vocab_size:
        raise ValueError(f"{path}: not a byte-level language model (recipes lstm_lm / transformer_lm): its network "
                         f"has no decoder to {tok.vocab_size} bytes")
    model = module.to(device) if args.dense else to_compressed_inference(module, device=device)
    gen = torch.Generator().manual_seed(args.seed)
    ids = sample(model, tok.encode(args.prompt), args.tokens, temperature=args.temperature, top_k=args.top_k,
                 generator=gen)
    sys.stdout.write(args.prompt + tok.decode(ids) + "\n")
    return 0
