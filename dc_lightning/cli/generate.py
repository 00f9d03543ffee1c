"""``dc-lightning generate``: sample text from a compressed language model through the compressed inference modules.

Works on the recipes' byte-level models, on files written by ``dc-lightning export`` or ``save_compressed`` from a
user's own model (``--model`` builds it, ``--trusted`` lets the file's builder record rebuild it) and on Hugging Face
causal LMs (``model.generate``). Tokens: bytes by default, a local Hugging Face tokenizer folder (``--tokenizer``), or
raw ids (``--prompt-ids``, ids printed back).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from dc_lightning.cli import UsageError, input_file, user_errors

__all__ = ["cli_generate"]


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected token ids such as '15496,11,995'") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected at least one non-negative token id")
    return ids


def _build(spec: str, kwargs: str | None) -> torch.nn.Module:
    """The model ``--model pkg.module:builder`` (called with ``--model-kwargs``) builds: the user's own choice of code
    to run, so no allowlist applies."""
    from dc_lightning.io import import_callable

    try:
        fn = import_callable(spec)
        kw = json.loads(kwargs) if kwargs else {}
    except (ValueError, json.JSONDecodeError) as e:
        raise UsageError(f"--model {spec}: {e}") from None
    if not isinstance(kw, dict):
        raise UsageError(f"--model-kwargs {kwargs!r}: expected a JSON object such as '{{\"vocab\": 50257}}'")
    try:
        model = fn(**kw)
    except Exception as e:
        raise UsageError(f"--model {spec}: calling it with {kw} failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--model {spec} returned {type(model).__name__}, not an nn.Module")
    return model


def _tokenizer(folder: str):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UsageError("--tokenizer needs the transformers package (pip install transformers)") from None
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UsageError(f"--tokenizer {folder}: not a local Hugging Face tokenizer folder ({e})") from None


@user_errors("dc-lightning generate")
def cli_generate(argv: Sequence[str] | None = None) -> int:
    """``dc-lightning generate FILE.dcz (--prompt TEXT | --prompt-ids IDS) [--tokens N] [--temperature T] [--top-k K]
    [--seed S] [--device D] [--dense] [--model pkg.mod:builder [--model-kwargs JSON]] [--trusted PATTERN]...
    [--tokenizer DIR]``: print the prompt and its continuation on stdout."""
    parser = argparse.ArgumentParser(
        prog="dc-lightning generate",
        description="sample text from a compressed language model (a recipe's byte-level LM, your own model, or a "
                    "Hugging Face causal LM)",
    )
    parser.add_argument("path", help="compressed .dcz file")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text to continue (bytes, or --tokenizer's tokens)")
    prompt.add_argument("--prompt-ids", type=_ids, help="token ids to continue, e.g. '15496,11,995' (ids printed)")
    parser.add_argument("--tokens", type=int, default=200, help="tokens to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dense", action="store_true",
                        help="run the decoded dense model instead of the compressed inference modules")
    parser.add_argument("--model", metavar="PKG.MOD:BUILDER",
                        help="build the model with this importable callable instead of the file's builder record")
    parser.add_argument("--model-kwargs", metavar="JSON", help="keyword arguments of --model, as a JSON object")
    parser.add_argument("--trusted", action="append", default=None, metavar="PATTERN",
                        help="a builder the file may name, e.g. 'mypkg.*' or 'transformers.*' (repeatable; as "
                             "load_compressed(trusted=...))")
    parser.add_argument("--tokenizer", metavar="DIR", help="a local Hugging Face tokenizer folder (default: bytes)")
    args = parser.parse_args(argv)
    if args.model_kwargs and not args.model:
        raise UsageError("--model-kwargs needs --model")

    from dc_lightning.data.text import ByteTokenizer
    from dc_lightning.inference.conversion import to_compressed_inference
    from dc_lightning.io import load_compressed
    from dc_lightning.models.lm import generate_ids

    path = input_file(args.path, "compressed .dcz")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    given = _build(args.model, args.model_kwargs) if args.model else None
    module = load_compressed(path, model=given, trusted=args.trusted).eval()
    tok = _tokenizer(args.tokenizer) if args.tokenizer else (None if args.prompt_ids else ByteTokenizer())
    if args.prompt_ids:
        prompt = torch.tensor(args.prompt_ids, dtype=torch.long)
    elif args.tokenizer:
        prompt = torch.tensor(tok.encode(args.prompt), dtype=torch.long)
    else:
        prompt = tok.encode(args.prompt)
    model = module.to(device) if args.dense else to_compressed_inference(module, device=device)
    gen = torch.Generator().manual_seed(args.seed)
    ids = generate_ids(model, prompt, args.tokens, temperature=args.temperature, top_k=args.top_k, generator=gen,
                       byte_level=isinstance(tok, ByteTokenizer), where=str(path))
    if args.prompt_ids:
        sys.stdout.write(" ".join(str(i) for i in [*args.prompt_ids, *ids.tolist()]) + "\n")
    elif args.tokenizer:
        sys.stdout.write(args.prompt + tok.decode(ids.tolist()) + "\n")
    else:
        sys.stdout.write(args.prompt + tok.decode(ids) + "\n")
    return 0
