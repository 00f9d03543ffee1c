"""Length-limited canonical Huffman coding, vectorised in NumPy (Deep Compression §4).

Deep Compression Huffman-codes two symbol streams per layer: the quantized weight indices (codebook symbols)
and the relative sparse indices (gaps). Both are skewed, and variable-length coding saves 20-30% [DC §4].

Design:

* **Code lengths** come from an ordinary Huffman tree (``heapq``), then are *length-limited* to ``max_len``
  bits with the JPEG "Adjust_BITS" procedure (ITU T.81 Annex K.3): while a length ``i > max_len`` is used,
  two leaves at depth ``i`` become one leaf at ``i - 1`` plus one leaf moved under a split leaf at the deepest
  depth ``j < i - 1``. Each step keeps the symbol count and the Kraft sum (``-2·2^-i + 2^-(i-1) + 2·2^-(j+1)
  - 2^-j = 0``) and moves a leaf up, so it terminates with a complete prefix code whose lengths are all
  ``<= max_len`` (possible iff the alphabet has ``<= 2**max_len`` used symbols). Lengths are then re-assigned
  so that more frequent symbols get shorter codes. A single used symbol gets a 1-bit code (never 0 bits: every
  symbol costs at least one bit, which lets readers bound a stream's symbol count by its byte size).
* **Canonical codes** (RFC 1951 §3.2.2): only the code lengths are stored; codes follow from them.
* **Encoding** is a handful of whole-array passes: cumulative bit offsets, each code shifted into the 64-bit
  window of the 32-bit word it starts in, an OR-reduction per word (``np.bitwise_or.reduceat`` on the sorted
  word indices), and a big-endian byte dump. No per-symbol Python loop.
* **Decoding** is table-driven: a lookup table indexed by the next ``L`` bits (``L`` = the longest code) gives
  the symbol and its length. The sequential dependence of a prefix code is broken with *sync points*: the
  encoder records the bit length of every chunk of ``chunk`` symbols (a "gap array", Yamamoto et al. 2020),
  so all chunks of all streams are decoded in lock-step as independent lanes: ``chunk`` vectorised steps in
  total, however many streams and symbols there are (:func:`decode_many`). The sync table costs
  ``16 / chunk`` bits per symbol (0.016 bits with the default 1024) and doubles as an integrity check: every
  lane must end exactly where the next one starts.

Example::

    import numpy as np
    from dc_lightning.dcz import huffman
    sym = np.random.default_rng(0).geometric(0.3, size=10_000).clip(max=31) - 1
    stream = huffman.encode(sym, alphabet_size=32)
    assert (huffman.decode(stream) == sym).all()
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_MAX_LEN",
    "HuffmanDecodeError",
    "HuffmanStream",
    "canonical_codes",
    "code_lengths",
    "decode",
    "decode_many",
    "encode",
    "validate_lengths",
]

#: longest code a stream may use; 16 bits keeps decode tables at 2**16 entries
DEFAULT_MAX_LEN = 16
#: symbols per sync chunk; 1024 symbols * 16 bits fits the uint16 chunk-length table
DEFAULT_CHUNK = 1024
#: hard limits accepted by the decoder (a file asking for more is rejected, not obeyed)
MAX_SUPPORTED_LEN = 24
MAX_ALPHABET = 1 << 16


class HuffmanDecodeError(ValueError):
    """A Huffman stream is inconsistent: bad code lengths, a bit pattern with no code, or lying sync table."""


@dataclass
class HuffmanStream:
    """One Huffman-coded symbol stream.

    Attributes:
        data: the packed bits, MSB first, ``ceil(nbits / 8)`` bytes (uint8).
        nbits: number of meaningful bits in ``data``.
        count: number of symbols.
        lengths: code length of every symbol of the alphabet (uint8, 0 = symbol unused).
        sync: bit length of each chunk of ``chunk`` consecutive symbols (uint16, ``ceil(count / chunk)`` entries).
        chunk: symbols per sync chunk.
    """

    data: np.ndarray
    nbits: int
    count: int
    lengths: np.ndarray
    sync: np.ndarray
    chunk: int = DEFAULT_CHUNK


def code_lengths(counts: np.ndarray, max_len: int = DEFAULT_MAX_LEN) -> np.ndarray:
    """Huffman code lengths for symbol frequencies ``counts``, limited to ``max_len`` bits.

    Args:
        counts: non-negative frequency of every symbol of the alphabet (length = alphabet size).
        max_len: longest allowed code, 1..24.

    Returns:
        uint8 array of the alphabet's size; 0 for symbols with count 0.

    Raises:
        ValueError: ``max_len`` outside 1..24, or more used symbols than ``2**max_len`` codes can hold.

    Example::

        code_lengths(np.array([1, 1, 2, 4]))  # -> [3, 3, 2, 1]
    """
    counts = np.asarray(counts, dtype=np.int64)
    if not 1 <= max_len <= MAX_SUPPORTED_LEN:
        raise ValueError(f"max_len={max_len} is invalid; valid: 1..{MAX_SUPPORTED_LEN}")
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError("counts must be a 1-D array of non-negative frequencies")
    lengths = np.zeros(counts.shape[0], dtype=np.uint8)
    used = np.flatnonzero(counts)
    n = used.size
    if n == 0:
        return lengths
    if n > (1 << max_len):
        raise ValueError(f"{n} used symbols cannot get codes of at most max_len={max_len} bits")
    if n == 1:
        lengths[used[0]] = 1
        return lengths
    # plain Huffman tree depths; ties broken by symbol id so the result is deterministic
    heap = [(int(counts[s]), i, [int(s)]) for i, s in enumerate(used)]
    heapq.heapify(heap)
    depth = np.zeros(counts.shape[0], dtype=np.int64)
    tick = n
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        merged = s1 + s2
        depth[merged] += 1
        heapq.heappush(heap, (c1 + c2, tick, merged))
        tick += 1
    # JPEG Annex K.3 Adjust_BITS on the histogram of lengths (proof of the bound in the module docstring)
    top = int(depth.max())
    bits = np.bincount(depth[used], minlength=top + 1).astype(np.int64)
    i = top
    while i > max_len:
        if bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2
            bits[i - 1] += 1
            bits[j + 1] += 2
            bits[j] -= 1
        else:
            i -= 1
    # most frequent symbols get the shortest codes (stable: ties by symbol id)
    order = used[np.lexsort((used, -counts[used]))]
    per_symbol = np.repeat(np.arange(bits.size), bits)
    lengths[order] = per_symbol[: order.size]
    return lengths


def validate_lengths(lengths: np.ndarray, max_len: int = MAX_SUPPORTED_LEN) -> None:
    """Check that ``lengths`` describe a prefix code: each ``<= max_len`` and the Kraft sum ``<= 1``.

    Raises:
        HuffmanDecodeError: the lengths are out of range or over-subscribed.
    """
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or lengths.size > MAX_ALPHABET:
        raise HuffmanDecodeError(f"code-length table has shape {lengths.shape}; expected 1-D, <= {MAX_ALPHABET}")
    if lengths.size and int(lengths.max()) > max_len:
        raise HuffmanDecodeError(f"code length {int(lengths.max())} exceeds the limit {max_len}")
    nz = lengths[lengths > 0].astype(np.int64)
    if nz.size and int((np.int64(1) << (max_len - nz)).sum()) > (1 << max_len):
        raise HuffmanDecodeError("code lengths are over-subscribed (Kraft sum > 1): not a prefix code")


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical Huffman codes (RFC 1951 §3.2.2) for per-symbol code ``lengths``; uint32, 0 for unused symbols."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.shape[0], dtype=np.uint32)
    if lengths.size == 0 or lengths.max() == 0:
        return codes
    top = int(lengths.max())
    bl_count = np.bincount(lengths, minlength=top + 1)
    bl_count[0] = 0
    next_code = np.zeros(top + 1, dtype=np.int64)
    code = 0
    for bits in range(1, top + 1):
        code = (code + int(bl_count[bits - 1])) << 1
        next_code[bits] = code
    used = np.flatnonzero(lengths)
    order = used[np.lexsort((used, lengths[used]))]  # by (length, symbol)
    ls = lengths[order]
    # rank of each symbol among symbols of the same length
    first = np.searchsorted(ls, ls, side="left")
    rank = np.arange(order.size) - first
    codes[order] = (next_code[ls] + rank).astype(np.uint32)
    return codes


def encode(
    symbols: np.ndarray,
    lengths: np.ndarray | None = None,
    *,
    alphabet_size: int | None = None,
    max_len: int = DEFAULT_MAX_LEN,
    chunk: int = DEFAULT_CHUNK,
) -> HuffmanStream:
    """Huffman-code ``symbols`` (vectorised).

    Args:
        symbols: 1-D array of non-negative integer symbols.
        lengths: code lengths to use (e.g. shared across streams); built from the symbol histogram when None.
        alphabet_size: size of the alphabet when ``lengths`` is None (default: ``symbols.max() + 1``).
        max_len: longest code when building ``lengths``.
        chunk: symbols per sync chunk (``chunk * max code length`` must fit in 16 bits).

    Returns:
        The coded :class:`HuffmanStream`.

    Raises:
        ValueError: a symbol outside the alphabet or without a code, or a ``chunk`` that overflows the sync table.
    """
    symbols = np.asarray(symbols).reshape(-1)
    if symbols.size and (symbols.min() < 0):
        raise ValueError("symbols must be non-negative")
    if lengths is None:
        size = int(alphabet_size) if alphabet_size is not None else (int(symbols.max()) + 1 if symbols.size else 1)
        if symbols.size and int(symbols.max()) >= size:
            raise ValueError(f"symbol {int(symbols.max())} outside the alphabet of size {size}")
        lengths = code_lengths(np.bincount(symbols, minlength=size), max_len)
    lengths = np.asarray(lengths, dtype=np.uint8)
    top = int(lengths.max()) if lengths.size else 0
    if chunk < 1 or chunk * max(top, 1) >= (1 << 16):
        raise ValueError(f"chunk={chunk} with codes of up to {top} bits overflows the uint16 sync table")
    n = symbols.size
    if n == 0:
        return HuffmanStream(np.zeros(0, np.uint8), 0, 0, lengths, np.zeros(0, np.uint16), chunk)
    if int(symbols.max()) >= lengths.size:
        raise ValueError(f"symbol {int(symbols.max())} outside the alphabet of size {lengths.size}")
    codes = canonical_codes(lengths)
    sym = symbols.astype(np.intp, copy=False)
    ln = lengths[sym].astype(np.int64)
    if not ln.all():
        raise ValueError("some symbols have no code (length 0) in the given code lengths")
    ends = np.cumsum(ln)
    nbits = int(ends[-1])
    starts = ends - ln
    # each code lies in the 64-bit window that starts at the 32-bit word holding its first bit (off + len <= 55)
    word = starts >> 5
    val = codes[sym].astype(np.uint64) << (64 - (starts & 31) - ln).astype(np.uint64)
    head = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
    red = np.bitwise_or.reduceat(val, head)
    uw = word[head]
    words = np.zeros(int(word[-1]) + 2, dtype=np.uint64)
    words[uw] |= red >> np.uint64(32)  # uw is strictly increasing, so fancy |= is safe
    words[uw + 1] |= red & np.uint64(0xFFFFFFFF)
    data = np.frombuffer(words.astype(">u4").tobytes(), dtype=np.uint8)[: (nbits + 7) // 8].copy()
    chunk_start = starts[::chunk]
    sync = np.diff(np.r_[chunk_start, nbits]).astype(np.uint16)
    return HuffmanStream(data, nbits, n, lengths, sync, chunk)


def _lut(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode table over every ``width``-bit pattern: (symbol or -1 for no code, code length or 1)."""
    sym_t = np.full(1 << width, -1, dtype=np.int32)
    len_t = np.ones(1 << width, dtype=np.uint8)
    used = np.flatnonzero(lengths)
    if used.size == 0:
        return sym_t, len_t
    codes = canonical_codes(lengths).astype(np.int64)
    ls = lengths[used].astype(np.int64)
    span = np.int64(1) << (width - ls)
    start = codes[used] << (width - ls)
    idx = np.repeat(start, span) + (np.arange(int(span.sum())) - np.repeat(np.cumsum(span) - span, span))
    sym_t[idx] = np.repeat(used, span)
    len_t[idx] = np.repeat(ls, span)
    return sym_t, len_t


def decode(stream: HuffmanStream) -> np.ndarray:
    """Decode one stream; see :func:`decode_many`."""
    return decode_many([stream])[0]


def decode_many(streams: list[HuffmanStream]) -> list[np.ndarray]:
    """Decode several streams at once: every chunk of every stream is one lane of a vectorised decoder.

    The work is ``max(chunk)`` NumPy steps over all lanes, so decoding a whole model costs about as many Python
    steps as decoding one chunk. Inputs are validated before any buffer is allocated.

    Returns:
        One int32 array of symbols per stream.

    Raises:
        HuffmanDecodeError: inconsistent counts/sizes/lengths, a bit pattern that is no code, or a sync table that
            does not match the bits (all of which a corrupted file produces).
    """
    if not streams:
        return []
    width = 1
    for s in streams:
        lengths = np.asarray(s.lengths)
        validate_lengths(lengths)
        nbytes = int(np.asarray(s.data).size)
        if s.nbits < 0 or s.count < 0 or s.nbits > 8 * nbytes or nbytes > (s.nbits + 7) // 8 + 0:
            raise HuffmanDecodeError(f"stream claims {s.nbits} bits but holds {nbytes} bytes")
        if s.count > s.nbits:  # every code is >= 1 bit: bounds the symbol count by the payload size
            raise HuffmanDecodeError(f"stream claims {s.count} symbols in only {s.nbits} bits")
        if not 1 <= s.chunk < (1 << 16):
            raise HuffmanDecodeError(f"invalid sync chunk size {s.chunk}")
        if np.asarray(s.sync).size != -(-s.count // s.chunk):
            raise HuffmanDecodeError(f"sync table has {np.asarray(s.sync).size} entries for {s.count} symbols")
        if int(np.asarray(s.sync, dtype=np.int64).sum()) != s.nbits:
            raise HuffmanDecodeError("sync table does not add up to the stream's bit count")
        if s.count and not lengths.any():
            raise HuffmanDecodeError("stream has symbols but no codes")
        if lengths.size:
            width = max(width, int(lengths.max()))
    # one global bit buffer; every stream starts on a byte boundary
    byte_off = np.cumsum([0] + [int(np.asarray(s.data).size) for s in streams])
    chunk = max(s.chunk for s in streams)
    pad = (chunk * MAX_SUPPORTED_LEN) // 8 + 8  # lanes may overrun by < chunk codes; read zeros there
    buf = np.zeros(int(byte_off[-1]) + pad, dtype=np.uint8)
    for s, o in zip(streams, byte_off[:-1], strict=False):
        buf[o : o + np.asarray(s.data).size] = s.data
    # 32-bit big-endian window starting at every byte; a code starting at bit pos is the top of win[pos>>3]<<(pos&7)
    b = buf.astype(np.uint32)
    win = (b[:-3] << 24) | (b[1:-2] << 16) | (b[2:-1] << 8) | b[3:]
    del b
    # stacked decode tables, one block of 2**width per stream
    tables = [_lut(np.asarray(s.lengths, dtype=np.uint8), width) for s in streams]
    sym_t = np.concatenate([t[0] for t in tables])
    len_t = np.concatenate([t[1] for t in tables]).astype(np.uint32)
    code_len = np.concatenate([np.r_[np.asarray(s.lengths, np.int64), 0] for s in streams])  # per-stream, +1 pad
    # lanes: (start bit, table base, number of symbols)
    starts, bases, counts, ends, sym_base = [], [], [], [], []
    sb = 0
    for k, s in enumerate(streams):
        n_alpha = np.asarray(s.lengths).size
        if s.count:
            sync = np.asarray(s.sync, dtype=np.int64)
            cs = np.cumsum(sync)
            starts.append(int(byte_off[k]) * 8 + cs - sync)
            ends.append(int(byte_off[k]) * 8 + cs)
            bases.append(np.full(sync.size, k << width, dtype=np.int64))
            sym_base.append(np.full(sync.size, sb, dtype=np.int64))
            c = np.full(sync.size, s.chunk, dtype=np.int64)
            c[-1] = s.count - s.chunk * (sync.size - 1)
            counts.append(c)
        sb += n_alpha + 1
    out: list[np.ndarray] = [np.zeros(0, dtype=np.int32) for _ in streams]
    if not starts:
        return out
    start_all = np.concatenate(starts)
    end = np.concatenate(ends)
    cnt = np.concatenate(counts)
    if int(end.max()) >= (1 << 31) - 8 * pad:
        raise HuffmanDecodeError("streams too large for one decode batch (> 2**31 bits)")
    # all-uint32 lane state: no dtype promotion inside the hot loop
    pos = start_all.astype(np.uint32)
    base = np.concatenate(bases).astype(np.uint32)
    steps = int(cnt.max())
    lanes = pos.size
    sym_out = np.empty((steps, lanes), dtype=np.int32)
    top = np.uint32(32 - width)
    lmask = np.uint32((1 << width) - 1)
    sh = np.empty(lanes, np.uint32)
    w = np.empty(lanes, np.uint32)
    for i in range(steps):
        np.bitwise_and(pos, 7, out=sh)
        np.subtract(top, sh, out=sh)
        np.right_shift(pos, 3, out=w)
        np.take(win, w, out=w)
        np.right_shift(w, sh, out=w)
        np.bitwise_and(w, lmask, out=w)
        np.add(w, base, out=w)
        np.take(sym_t, w, out=sym_out[i])
        pos += len_t.take(w)
    valid = np.arange(steps)[:, None] < cnt[None, :]
    flat = sym_out.T[valid.T]  # lane-major: lanes of a stream are consecutive and in order
    if flat.size and int(flat.min()) < 0:
        raise HuffmanDecodeError("bit pattern that is not a code of this stream (corrupt stream)")
    # every lane must consume exactly the bits the sync table gives it: full lanes by their final position,
    # the (at most one per stream) short last lanes by summing their code lengths
    lane_sb = np.concatenate(sym_base)
    full = cnt == steps
    ok = np.array_equal(pos[full].astype(np.int64), end[full])
    for j in np.flatnonzero(~full):
        used = int(code_len[lane_sb[j] + sym_out[: cnt[j], j]].sum())
        ok = ok and start_all[j] + used == end[j]
    if not ok:
        raise HuffmanDecodeError("decoded chunk lengths disagree with the sync table (corrupt stream)")
    o = 0
    for k, s in enumerate(streams):
        out[k] = flat[o : o + s.count]
        o += s.count
    return out
