"""Text for the language-model recipes: the Debian ``fortunes`` corpus, a byte tokenizer, a Lightning DataModule.

The corpus is the English fortune-cookie collection of BSD ``fortune(6)`` as Debian ships it (``apt-get install
fortunes``): plain-text files in ``/usr/share/games/fortunes``, one fortune after another, separated by lines holding
a single ``%``. The tokenizer is the identity on bytes (256 symbols), so it ships with the code and needs no training.
Fortunes are assigned to train/val/test by a seeded hash of their bytes, which does not depend on file order,
``PYTHONHASHSEED`` or the number of files. Each split is the concatenation of its fortunes (each ending in ``\\n%\\n``
as in the files, so the separator is learnt too) cut into contiguous windows of ``seq_len + 1`` bytes: the inputs are
the first ``seq_len`` bytes, the targets the last ``seq_len``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import TensorDataset

from dc_lightning.data.images import TensorSplits

log = logging.getLogger(__name__)

DEBIAN_FORTUNES = Path("/usr/share/games/fortunes")
INSTALL_HINT = "apt-get install fortunes"
SPLITS = ("train", "val", "test")
SEPARATOR = b"\n%\n"


class ByteTokenizer:
    """Bytes as tokens: ``vocab_size`` 256, ``encode`` is UTF-8 (any text round-trips), no training, no files."""

    vocab_size = 256

    def encode(self, text: str | bytes) -> torch.Tensor:
        """``text`` (a ``str`` is UTF-8 encoded) -> int64 token ids ``[len(bytes)]``."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Token ids -> text; bytes that are not valid UTF-8 (a cut multi-byte character) become U+FFFD."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = [i for i in ids if not 0 <= int(i) < 256]
        if bad:
            raise ValueError(f"ByteTokenizer.decode: ids {bad[:5]} are outside [0, 256)")
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def fortune_files(root: str | Path | None = None) -> list[Path]:
    """The fortune text files of ``root`` (default ``/usr/share/games/fortunes``), sorted by name.

    A fortune file is a regular file without a suffix (the ``.dat`` indexes and ``.u8`` links are skipped);
    sub-folders (Debian's ``off/`` of ``fortunes-off``) are not searched.

    Raises:
        FileNotFoundError: the folder is missing or holds no fortune file; the message names the folder and the
            install command.
    """
    folder = Path(root).expanduser() if root else DEBIAN_FORTUNES
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.suffix) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"data.root: no fortune files in {str(folder)!r} (plain-text files without a suffix, fortunes separated "
            f"by '%' lines). Install the corpus with `{INSTALL_HINT}` (Debian/Ubuntu) or pass data.root=<folder>."
        )
    return files


def read_fortunes(paths: list[Path]) -> list[bytes]:
    """The fortunes of ``paths`` as byte strings (stripped of surrounding blank lines; empty ones dropped)."""
    out = []
    for path in paths:
        raw = path.read_bytes().replace(b"\r\n", b"\n")
        # a separator is a line holding only '%': split on "\n%\n", and on a leading "%\n" of the file
        for chunk in (b"\n" + raw).split(SEPARATOR):
            text = chunk.strip(b"\n")
            if text and text != b"%":
                out.append(text)
    return out


def split_of(fortune: bytes, seed: int, fractions: tuple[float, float, float]) -> str:
    """``train``, ``val`` or ``test`` for one fortune, from a seeded BLAKE2 hash of its bytes."""
    digest = hashlib.blake2b(fortune, digest_size=8, key=str(seed).encode()).digest()
    u = int.from_bytes(digest, "big") / 2**64  # uniform in [0, 1)
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def split_corpus(fortunes: list[bytes], seed: int = 0,
                 fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)) -> dict[str, torch.Tensor]:
    """Token streams ``{"train": int64 [N_train], "val": ..., "test": ...}``, each fortune ending in ``\\n%\\n``.

    Duplicate fortunes hash alike, so they land in one split (no train/test leakage through repeats).

    Raises:
        ValueError: ``fractions`` are not three non-negative numbers summing to 1.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"data.fractions: {list(fractions)} must be three non-negative numbers (train, val, test) "
                         "summing to 1")
    parts: dict[str, list[bytes]] = {s: [] for s in SPLITS}
    for fortune in fortunes:
        parts[split_of(fortune, seed, fractions)].append(fortune + SEPARATOR)
    tok = ByteTokenizer()
    return {s: tok.encode(b"".join(p)) for s, p in parts.items()}


def windows(tokens: torch.Tensor, seq_len: int) -> TensorDataset:
    """Contiguous, non-overlapping ``(x, y)`` windows: ``x = t[i*L : i*L+L]``, ``y = t[i*L+1 : i*L+L+1]``.

    The trailing bytes that do not fill a window are dropped. Returns a ``TensorDataset`` of ``[n, seq_len]`` pairs.
    """
    n = (tokens.numel() - 1) // seq_len
    x = tokens[: n * seq_len].view(n, seq_len)
    y = tokens[1: n * seq_len + 1].view(n, seq_len)
    return TensorDataset(x, y)


class TextDataModule(TensorSplits, pl.LightningDataModule):
    """Byte-level language modelling on the ``fortunes`` corpus: batches of ``(x, y)`` int64 ``[B, seq_len]``.

    Args:
        root: folder of fortune files (default ``/usr/share/games/fortunes``, Debian's ``fortunes`` package).
        seq_len: bytes per window (the context the model is trained on).
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        fractions: train/val/test shares of the fortunes (seeded hash split).
        max_bytes: keep only the first ``max_bytes`` tokens of each split (a small slice for tests); None = all.
        seed: seed of the split and of the shuffling.

    Raises:
        ValueError: a non-positive ``seq_len``/``batch_size``/``max_bytes``, bad ``fractions``, or a split too
            short for one window.
        FileNotFoundError: in ``setup`` when the corpus is not installed (see :func:`fortune_files`).

    Example::

        dm = TextDataModule(seq_len=128, batch_size=64)
        pl.Trainer(max_epochs=1).fit(LanguageModule(model={"name": "lstm_lm"}), datamodule=dm)
    """

    vocab_size = ByteTokenizer.vocab_size

    def __init__(self, root: str | None = None, seq_len: int = 128, batch_size: int = 64,
                 eval_batch_size: int | None = None, fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
                 max_bytes: int | None = None, seed: int = 0) -> None:
        super().__init__()
        for field, value in (("seq_len", seq_len), ("batch_size", batch_size), ("max_bytes", max_bytes)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"data.{field}: {value!r} must be a positive integer")
        self.root, self.seq_len, self.batch_size = root, seq_len, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.fractions, self.max_bytes, self.seed = tuple(fractions), max_bytes, seed
        self.tokenizer = ByteTokenizer()
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        files = fortune_files(self.root)
        streams = split_corpus(read_fortunes(files), self.seed, self.fractions)
        for split, tokens in streams.items():
            if self.max_bytes is not None:
                tokens = tokens[: self.max_bytes]
            if tokens.numel() < self.seq_len + 1:
                raise ValueError(f"data: the {split} split of {str(files[0].parent)!r} holds {tokens.numel()} bytes, "
                                 f"fewer than one window of data.seq_len + 1 = {self.seq_len + 1}; lower seq_len or "
                                 "raise max_bytes")
            self.splits[split] = windows(tokens, self.seq_len)
        log.info("fortunes from %s: %s windows of %d bytes", files[0].parent,
                 {s: len(d) for s, d in self.splits.items()}, self.seq_len)

