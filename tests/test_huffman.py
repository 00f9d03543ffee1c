"""Length-limited canonical Huffman: round trips, the length bound, canonical codes, corruption detection."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dc_lightning.dcz import huffman as H


def _kraft(lengths):
    lengths = lengths[lengths > 0].astype(float)
    return float((2.0**-lengths).sum())


def _fib(n):
    f = [1, 1]
    while len(f) < n:
        f.append(f[-1] + f[-2])
    return np.array(f[:n], dtype=np.int64)


def test_code_lengths_small_example():
    assert H.code_lengths(np.array([1, 1, 2, 4])).tolist() == [3, 3, 2, 1]
    assert H.code_lengths(np.array([0, 5, 0])).tolist() == [0, 1, 0]  # a lone symbol still costs 1 bit
    assert H.code_lengths(np.zeros(4, int)).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("max_len", [6, 8, 12, 16])
def test_fibonacci_skew_respects_bound_and_kraft(max_len):
    counts = _fib(40)  # unlimited Huffman would need 39-bit codes
    lengths = H.code_lengths(counts, max_len)
    assert lengths.max() == max_len
    assert _kraft(lengths) == pytest.approx(1.0)  # complete prefix code
    # more frequent symbols never get longer codes
    order = np.argsort(-counts, kind="stable")
    assert (np.diff(lengths[order].astype(int)) >= 0).all()
    sym = np.repeat(np.arange(40), np.minimum(counts, 3000))
    stream = H.encode(sym, lengths)
    assert np.array_equal(H.decode(stream), sym)


def test_unlimited_case_is_optimal_huffman():
    counts = np.array([45, 13, 12, 16, 9, 5])  # textbook example: cost 224
    lengths = H.code_lengths(counts, 16)
    assert int((lengths * counts).sum()) == 224


def test_too_many_symbols_for_bound():
    with pytest.raises(ValueError, match="max_len"):
        H.code_lengths(np.ones(300), 8)
    with pytest.raises(ValueError, match="max_len"):
        H.code_lengths(np.ones(4), 0)


def test_canonical_codes_rfc1951_example():
    # RFC 1951 §3.2.2: lengths (3,3,3,3,3,2,4,4) -> codes 010,011,100,101,110,00,1110,1111
    codes = H.canonical_codes(np.array([3, 3, 3, 3, 3, 2, 4, 4]))
    assert codes.tolist() == [0b010, 0b011, 0b100, 0b101, 0b110, 0b00, 0b1110, 0b1111]


def test_encoded_bits_match_manual_concatenation():
    lengths = np.array([3, 3, 3, 3, 3, 2, 4, 4], dtype=np.uint8)
    codes = H.canonical_codes(lengths)
    sym = np.array([5, 6, 0, 7, 5, 5, 1])
    bitstr = "".join(format(int(codes[s]), f"0{lengths[s]}b") for s in sym)
    stream = H.encode(sym, lengths)
    assert stream.nbits == len(bitstr)
    got = "".join(format(b, "08b") for b in stream.data)[: len(bitstr)]
    assert got == bitstr


@pytest.mark.parametrize("dist", ["uniform", "single", "fib", "geometric"])
@pytest.mark.parametrize("n", [0, 1, 7, 1023, 1024, 1025, 5000])
def test_round_trip_distributions(dist, n):
    rng = np.random.default_rng(n)
    if dist == "uniform":
        sym = rng.integers(0, 256, n)
    elif dist == "single":
        sym = np.full(n, 17)
    elif dist == "fib":
        p = _fib(32)[::-1].astype(float)
        sym = rng.choice(32, n, p=p / p.sum())
    else:
        sym = np.minimum(rng.geometric(0.25, n) - 1, 255)
    stream = H.encode(sym, alphabet_size=256, max_len=12)
    assert stream.lengths.max(initial=0) <= 12
    assert np.array_equal(H.decode(stream), sym)
    if dist == "single":
        assert stream.nbits == n


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 63), max_size=3000), st.integers(1, 2048), st.integers(6, 16))
def test_round_trip_hypothesis(symbols, chunk, max_len):
    sym = np.array(symbols, dtype=np.int64)
    stream = H.encode(sym, alphabet_size=64, max_len=max_len, chunk=min(chunk, 4095))
    assert stream.lengths.max(initial=0) <= max_len
    assert np.array_equal(H.decode(stream), sym)


def test_decode_many_matches_individual():
    rng = np.random.default_rng(1)
    streams = [
        H.encode(rng.integers(0, k, n), alphabet_size=k, chunk=c)
        for k, n, c in [(2, 10, 4), (32, 5000, 1024), (256, 0, 1024), (7, 3333, 100)]
    ]
    many = H.decode_many(streams)
    for s, d in zip(streams, many, strict=False):
        assert np.array_equal(d, H.decode(s))
        assert d.size == s.count


def test_corrupt_streams_are_detected():
    rng = np.random.default_rng(2)
    sym = np.minimum(rng.geometric(0.3, 4000) - 1, 31)
    s = H.encode(sym, alphabet_size=32)
    bad_count = H.HuffmanStream(s.data, s.nbits, s.nbits + 1, s.lengths, s.sync, s.chunk)
    with pytest.raises(H.HuffmanDecodeError, match=rf"stream claims {s.nbits + 1} symbols in only {s.nbits} bits"):
        H.decode(bad_count)
    sync = s.sync.copy()
    sync[0] += 1
    sync[1] -= 1
    with pytest.raises(H.HuffmanDecodeError, match="decoded chunk lengths disagree with the sync table"):
        H.decode(H.HuffmanStream(s.data, s.nbits, s.count, s.lengths, sync, s.chunk))
    over = s.lengths.copy()
    over[over > 0] = 1  # Kraft sum > 1
    with pytest.raises(H.HuffmanDecodeError, match="Kraft"):
        H.decode(H.HuffmanStream(s.data, s.nbits, s.count, over, s.sync, s.chunk))
    flipped = s.data.copy()
    flipped[10] ^= 0xFF
    try:
        out = H.decode(H.HuffmanStream(flipped, s.nbits, s.count, s.lengths, s.sync, s.chunk))
    except H.HuffmanDecodeError:
        return
    assert not np.array_equal(out, sym)  # if it decodes at all, it decodes to something else
