"""The ``.dcz`` container: a plain safetensors file with a versioned JSON document in its metadata.

What this module owns (:mod:`dc_lightning.dcz.encode` and :mod:`~dc_lightning.dcz.decode` give the bytes their
meaning):

* the file's identity: safetensors metadata ``format`` (:data:`FORMAT_NAME`), ``format_version``
  (:data:`FORMAT_VERSION`) and ``dc_lightning``, a JSON document that repeats both and records the scan order;
* **payloads**: uint8 tensors ``layer.NNNN`` / ``tensor.NNNN``, each with its byte count and sha256 in the document;
* **sections**: a payload is a concatenation of sections recorded as ``[offset, length]``; a Huffman stream is three
  sections (code lengths, uint16 sync table, data; :class:`Sections`, :func:`read_stream`);
* the **header digest**: the safetensors header (tensor index and metadata, padding included) is covered by a sha256
  stored in it (``__metadata__["header_sha256"]``, computed with that value set to 64 zeros), so a changed byte
  anywhere in the header is detected; payload bytes are covered by their own sha256 in the document. This detects
  damage and edits, not forgery (anyone can recompute a digest): see the README, "Loading files you did not make";
* the checks every reader runs before allocating decode buffers (sizes, bounds, checksums), all raising
  :class:`CorruptFileError`.

The file is written byte for byte by :func:`write_container` (fixed key order, sorted payload names): the same model
gives the same bytes in every process.

**Versioning** (docs/DESIGN.md "File format versioning"). Readers accept exactly :data:`FORMAT_VERSION` and ignore
fields they do not know. A new field may be added *without* a version bump only as an **optional field**: a reader
of the same version that ignores it still decodes every tensor exactly as the writer meant (the field adds a check,
or repeats what other fields already say), and it has a documented default that readers use when a file lacks it,
so files written before it load unchanged. Anything an older reader of the same version would misread, or would
ignore and return wrong results (a new storage ``kind``, a new section in a payload, a changed meaning, unit, order
or encoding of a field), changes :data:`FORMAT_VERSION`, so older readers refuse the file by its version. The
optional fields of version 1 are :data:`OPTIONAL_FIELDS`. The builder record says how to rebuild the model, not what
any tensor holds, so its optional fields (``config``) pass the first test trivially; a reader that ignores one may
fail to rebuild the model without ``model=`` (and says so), never return other numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from typing import Any

import numpy as np
import torch

from dc_lightning.dcz import huffman

log = logging.getLogger(__name__)

__all__ = [
    "EXTENSION",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SCAN_ORDER",
    "CorruptFileError",
    "DEFAULT_ALIASES",
    "DEFAULT_PARAM",
    "OPTIONAL_FIELDS",
    "Sections",
    "assemble",
    "checked_int",
    "checked_payload",
    "checked_shape",
    "checksum",
    "huffman_params",
    "little_endian",
    "load_payloads",
    "read_header",
    "read_stream",
    "section",
    "stored_floats",
    "stored_tensor",
    "stream_bytes",
    "tensor_bytes",
    "verify_payloads",
    "write_container",
]

FORMAT_NAME = "dc-lightning-compressed"
#: bumped for any change an older reader would misread or silently ignore with wrong results; an optional field with
#: a documented default (:data:`OPTIONAL_FIELDS`) is added without a bump (the module docstring, "Versioning")
FORMAT_VERSION = 1
EXTENSION = ".dcz"
#: the order non-zeros are scanned in (see dc_lightning.dcz.relative_index); recorded in every file and checked on read
SCAN_ORDER = "row-major over weight.reshape(out, -1)"
MAX_HEADER = 100 << 20
HEADER_DIGEST = "header_sha256"
_DIGEST_FIELD = b'"' + HEADER_DIGEST.encode() + b'":"'
#: a layer record without ``param`` (written before parameter-level targets) holds its module's ``weight``
DEFAULT_PARAM = "weight"
#: the optional fields of format version 1 (``header_sha256`` and ``param`` added on 2026-12-02, ``config`` and
#: ``aliases`` on 2026-12-07), and what a reader does when a file lacks one:
#:
#: * ``header_sha256`` (safetensors metadata): the header digest. It only adds a check, so a reader that ignores it
#:   decodes the same numbers; a file without it loads with a logged warning that the header is unverified (its
#:   records are still checked one by one and every payload against its sha256).
#: * ``param`` (layer record): the parameter's name in its module. It repeats what the record's ``key``
#:   (``<module>.<param>``, checked by every reader) already says, so a reader that ignores it stores the layer
#:   under the same key; a record without it reads as :data:`DEFAULT_PARAM` (``weight``).
#: * ``config`` (builder record, docs/DESIGN.md "Model builder record"): a Hugging Face model's ``config.to_dict()``,
#:   which ``load_compressed`` without ``model=`` hands to the (trusted) class as ``cls(cls.config_class.from_dict(
#:   config))``. No tensor depends on it (``read_compressed`` never reads the builder); a record without it (default
#:   ``None``) rebuilds as before, ``cls(**kwargs)``.
#: * ``aliases`` (document): ``{state-dict key: stored key}``, the keys of tensors the model holds under several names
#:   (tied weights: ``{"decoder.weight": "embedding.weight"}``), each stored once under the key it maps to (a layer's
#:   key, one of its buffers' keys, or a plain tensor's). Default ``{}`` (no key is an alias; the writer omits the
#:   field then, so files without ties keep their bytes). It neither adds a check nor repeats other fields, but it
#:   changes no stored number: a reader of version 1 that ignores it decodes every layer and tensor exactly and only
#:   lacks the alias keys. Such a reader's ``load_compressed`` refuses the file (``ModelMismatchError``: the alias key,
#:   ``decoder.weight``, is "missing from the file") and its ``decompress`` writes a state dict without that key
#:   (which a strict ``load_state_dict`` refuses): a refusal or a missing key, never a wrong number, which the rule
#:   allows (as for ``param``, whose absence older readers refused as corrupt).
DEFAULT_ALIASES: dict[str, str] = {}
OPTIONAL_FIELDS = {HEADER_DIGEST: None, "param": DEFAULT_PARAM, "config": None, "aliases": DEFAULT_ALIASES}
#: a reader's bounds on the Huffman parameters a file declares (the decode tables hold 2**max_len entries per stream)
MAX_CODE_LEN = huffman.DEFAULT_MAX_LEN
MAX_CHUNK = (1 << 16) - 1

#: dtypes a plain tensor may have, by the name the document records
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
#: storage dtypes of codebooks and kept values
NP_FLOAT = {"float32": np.float32, "float16": np.float16}


class CorruptFileError(ValueError):
    """The compressed file cannot be read: truncated, altered (checksum), an unknown format version, a header
    inconsistent with its payloads, or a layer missing / shaped differently from the model it is loaded into."""


# --------------------------------------------------------------------------------------------------- writing


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """Raw bytes of a tensor (any dtype, bf16 included) as a uint8 array."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().copy() if t.numel() else np.zeros(0, np.uint8)


def little_endian(arr: np.ndarray) -> np.ndarray:
    """``arr`` with an explicit little-endian dtype (the byte order of every stored number)."""
    return arr.astype("<" + arr.dtype.str[1:])


def checksum(arr: np.ndarray) -> str:
    """The sha256 (hex) recorded for a payload."""
    return hashlib.sha256(arr.tobytes()).hexdigest()


def _stored_lengths(s: huffman.HuffmanStream) -> np.ndarray:
    """The code-length table as stored: one byte per symbol, or a single byte for a fixed-width code."""
    lengths = s.lengths.astype(np.uint8)
    if lengths.size > 1 and (lengths == lengths[0]).all():  # a fixed-width code: one length for all symbols
        lengths = lengths[:1]
    return lengths


def stream_bytes(s: huffman.HuffmanStream) -> int:
    """Bytes a stream occupies in the file: data, code-length table, uint16 sync table (:meth:`Sections.add_stream`)."""
    return int(s.data.size) + int(_stored_lengths(s).size) + 2 * int(s.sync.size)


class Sections:
    """Accumulates the sections of one payload; each ``add`` returns the section's ``[offset, length]``."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, arr: np.ndarray) -> list[int]:
        b = np.ascontiguousarray(arr).tobytes()
        sec = [self.size, len(b)]
        self.parts.append(b)
        self.size += len(b)
        return sec

    def add_stream(self, s: huffman.HuffmanStream) -> dict:
        """Store a Huffman stream as three sections and return its record (read back by :func:`read_stream`)."""
        return {
            "n": int(s.count),
            "nbits": int(s.nbits),
            "chunk": int(s.chunk),
            "lengths": self.add(_stored_lengths(s)),
            "sync": self.add(s.sync.astype("<u2")),
            "data": self.add(s.data),
        }

    def array(self) -> np.ndarray:
        return np.frombuffer(b"".join(self.parts), dtype=np.uint8).copy() if self.size else np.zeros(0, np.uint8)


def write_container(payloads: dict[str, np.ndarray], doc: dict) -> bytes:
    """The file's bytes: the uint8 ``payloads`` as safetensors tensors, ``doc`` (keys sorted) as the ``dc_lightning``
    metadata, and the header digest (:func:`assemble`)."""
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "dc_lightning": json.dumps(doc, separators=(",", ":"), sort_keys=True),
    }
    return assemble(payloads, meta)


def assemble(payloads: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """A safetensors file of uint8 ``payloads`` (sorted by name) and string ``metadata`` (in its order), sealed with
    the header digest (an existing ``header_sha256`` is replaced). Deterministic: no hash-map order is involved."""
    index: dict[str, Any] = {}
    offset = 0
    for name in sorted(payloads):
        n = int(payloads[name].size)
        index[name] = {"dtype": "U8", "shape": [n], "data_offsets": [offset, offset + n]}
        offset += n
    meta = {k: v for k, v in metadata.items() if k != HEADER_DIGEST} | {HEADER_DIGEST: "0" * 64}
    header = json.dumps({"__metadata__": meta, **index}, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)  # safetensors aligns the data to 8 bytes with trailing spaces
    digest = hashlib.sha256(header).hexdigest()
    header = header.replace(_DIGEST_FIELD + b"0" * 64, _DIGEST_FIELD + digest.encode())
    parts = [struct.pack("<Q", len(header)), header]
    parts += [np.ascontiguousarray(payloads[name], dtype=np.uint8).tobytes() for name in sorted(payloads)]
    return b"".join(parts)


# --------------------------------------------------------------------------------------------------- reading


def read_header(data: bytes, where: str) -> tuple[dict, dict]:
    """``(tensor index, document)`` of a ``.dcz`` file's bytes, with every size, the format name, the version and
    the scan order checked (``where`` names the file in errors).

    Raises:
        CorruptFileError: truncated, not JSON, not this format, or a version or scan order this reader cannot read.
    """
    if len(data) < 8:
        raise CorruptFileError(f"{where}: {len(data)} bytes is too short for a .dcz file (truncated?)")
    _check_identity(data, where)
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > MAX_HEADER:
        raise CorruptFileError(f"{where}: header claims {n} bytes but the file holds {len(data) - 8} (truncated?)")
    raw = data[8 : 8 + n]
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{where}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{where}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{where}: no safetensors metadata; not a dc-lightning compressed file")
    if meta.get("format") != FORMAT_NAME:
        raise CorruptFileError(f"{where}: format {meta.get('format')!r} is not {FORMAT_NAME!r}")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CorruptFileError(
            f"{where}: unknown format version {meta.get('format_version')!r}; this reader supports {FORMAT_VERSION}"
        )
    _check_digest(raw, meta.get(HEADER_DIGEST), where)
    try:
        doc = json.loads(meta["dc_lightning"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{where}: dc_lightning metadata is missing or not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME or doc.get("format_version") != FORMAT_VERSION:
        raise CorruptFileError(f"{where}: dc_lightning metadata has the wrong format name or version")
    if doc.get("scan_order") != SCAN_ORDER:
        raise CorruptFileError(
            f"{where}: scan_order {doc.get('scan_order')!r} is not supported; this reader supports {SCAN_ORDER!r}"
        )
    return header, doc


def _check_identity(data: bytes, where: str) -> None:
    """Say plainly when the bytes are not a ``.dcz`` file at all (a checkpoint renamed, random bytes).

    Raises:
        CorruptFileError: a zip archive (``torch.save`` / Lightning ``.ckpt``), a pickle, or bytes whose header
            length or first header byte no safetensors file has.
    """
    (n,) = struct.unpack("<Q", data[:8])
    if n <= MAX_HEADER and (len(data) <= 8 or data[8:9] == b"{"):
        return  # a safetensors header (whatever its length's first byte: 0x80 is a length too, not a pickle)
    if data[:4] == b"PK\x03\x04":
        looks_like = "a zip archive (a PyTorch / Lightning checkpoint?)"
    elif data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        looks_like = "a Python pickle (a torch.save file?)"
    else:
        looks_like = "bytes without a safetensors header"
    raise CorruptFileError(
        f"{where}: not a {EXTENSION} file: it looks like {looks_like}. A {EXTENSION} file starts with an 8-byte header "
        f"length and a JSON header (format {FORMAT_NAME!r}); write one with save_compressed or dc-lightning export"
    )


def _check_digest(raw: bytes, digest: Any, where: str) -> None:
    """Check the header digest: sha256 of the header bytes with the digest's own value set to 64 zeros.

    Raises:
        CorruptFileError: a malformed digest or a mismatch (no digest at all: a logged warning, see below).
    """
    if digest is None:
        # an optional field (OPTIONAL_FIELDS): files written before header digests stay loadable, the user's file is
        # not lost: its records are still checked one by one and every payload by its sha256, only the header is not
        # verified
        log.warning(
            "%s: the header carries no %r (written before dc_lightning added header digests): the header is NOT "
            "verified, only the records and payload checksums; re-export the model (save_compressed) to add one",
            where, HEADER_DIGEST,
        )
        return
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise CorruptFileError(f"{where}: the header's {HEADER_DIGEST!r} is malformed (damaged or altered)")
    field = _DIGEST_FIELD + digest.encode()
    if raw.count(field) != 1 or hashlib.sha256(raw.replace(field, _DIGEST_FIELD + b"0" * 64)).hexdigest() != digest:
        raise CorruptFileError(f"{where}: header digest mismatch: the header was altered or damaged")


def load_payloads(data: bytes, where: str) -> dict[str, np.ndarray]:
    """Every tensor of the safetensors file, by name.

    Raises:
        CorruptFileError: the safetensors index and the bytes disagree.
    """
    from safetensors.numpy import load

    try:
        return load(data)
    except Exception as e:
        raise CorruptFileError(f"{where}: safetensors payload is inconsistent ({e})") from None


def verify_payloads(data: bytes, doc: dict, where: str) -> None:
    """Check every payload a document's layer and tensor records name: present, sized and with its sha256.

    Raises:
        CorruptFileError: the safetensors index and the bytes disagree, or a payload is missing or altered.
    """
    payloads = load_payloads(data, where)
    records = doc.get("layers"), doc.get("tensors")
    if not all(isinstance(r, list) for r in records):
        raise CorruptFileError(f"{where}: metadata lacks the layers/tensors lists")
    for rec in records[0] + records[1]:
        if not isinstance(rec, dict):
            raise CorruptFileError(f"{where}: a layer or tensor record is not an object")
        checked_payload(payloads, rec, f"record {rec.get('key')!r}", where)


def checked_payload(payloads: dict[str, np.ndarray], rec: dict, what: str, where: str) -> np.ndarray:
    """The uint8 payload a record names (``rec["tensor"]``), after checking its size and sha256 against the record.

    Raises:
        CorruptFileError: missing payload, wrong dtype/shape/size, or a checksum mismatch.
    """
    name = rec.get("tensor")
    if not isinstance(name, str) or name not in payloads:
        raise CorruptFileError(f"{where}: {what}: payload tensor {name!r} is missing")
    arr = payloads[name]
    if arr.dtype != np.uint8 or arr.ndim != 1 or arr.size != checked_int(rec.get("nbytes"), what + ".nbytes"):
        raise CorruptFileError(f"{where}: {what}: payload {name!r} has the wrong dtype/shape/size")
    if checksum(arr) != rec.get("sha256"):
        raise CorruptFileError(f"{where}: {what}: sha256 checksum mismatch (file altered or damaged)")
    return arr


def checked_int(v: Any, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    """``v`` if it is an int in ``[lo, hi]`` (bools excluded).

    Raises:
        CorruptFileError: otherwise (the message names the field ``what``).
    """
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CorruptFileError(f"{what} = {v!r} is not an integer in [{lo}, {hi}]")
    return v


def checked_shape(v: Any, what: str) -> tuple[int, ...]:
    """A recorded shape: a list of at most 8 non-negative dims whose product is at most ``2**48``.

    Raises:
        CorruptFileError: otherwise.
    """
    if not isinstance(v, list) or len(v) > 8:
        raise CorruptFileError(f"{what}: shape {v!r} is not a list of at most 8 dims")
    shape = tuple(checked_int(d, what + ".shape", 0, 1 << 40) for d in v)
    if math.prod(shape) > (1 << 48):
        raise CorruptFileError(f"{what}: shape {shape} is implausibly large")
    return shape


def section(payload: np.ndarray, sec: Any, what: str) -> np.ndarray:
    """The bytes of section ``sec = [offset, length]`` of ``payload``.

    Raises:
        CorruptFileError: ``sec`` is malformed or lies outside the payload.
    """
    if not isinstance(sec, list) or len(sec) != 2:
        raise CorruptFileError(f"{what}: section must be [offset, length], got {sec!r}")
    off, n = checked_int(sec[0], what + ".offset"), checked_int(sec[1], what + ".length")
    if off + n > payload.size:
        raise CorruptFileError(f"{what}: section [{off}, {off + n}) lies outside its {payload.size}-byte payload")
    return payload[off : off + n]


def read_stream(
    payload: np.ndarray, rec: Any, alphabet: int, what: str, max_len: int = MAX_CODE_LEN, chunk: int | None = None
) -> huffman.HuffmanStream:
    """The Huffman stream a record of :meth:`Sections.add_stream` describes, over an alphabet of ``alphabet``
    symbols (not decoded: :func:`dc_lightning.dcz.huffman.decode_many` decodes many streams in one pass).

    ``max_len`` and ``chunk`` are the file's Huffman parameters (:func:`huffman_params`): the decoder's tables hold
    ``2**max_len`` entries per stream and its output ``chunk`` symbols per lane, so a stream declaring longer codes
    or another chunk is rejected before anything is allocated.

    Raises:
        CorruptFileError: a missing record, a section out of bounds, a code-length table of the wrong size, a code
            longer than ``max_len`` or a chunk other than ``chunk``.
    """
    if not isinstance(rec, dict):
        raise CorruptFileError(f"{what}: stream record missing")
    lengths = section(payload, rec.get("lengths"), what + ".lengths")
    if lengths.size == 1 and alphabet > 1:  # a fixed-width code stores its one length once
        lengths = np.full(alphabet, lengths[0], dtype=np.uint8)
    if lengths.size != alphabet:
        raise CorruptFileError(f"{what}: {lengths.size} code lengths for an alphabet of {alphabet}")
    if lengths.size and int(lengths.max()) > max_len:
        raise CorruptFileError(f"{what}: code length {int(lengths.max())} exceeds the file's max_len {max_len}")
    if chunk is not None and rec.get("chunk") != chunk:
        raise CorruptFileError(f"{what}: chunk {rec.get('chunk')!r} differs from the file's chunk {chunk}")
    sync_b = section(payload, rec.get("sync"), what + ".sync")
    if sync_b.size % 2:
        raise CorruptFileError(f"{what}: sync table has an odd byte count")
    return huffman.HuffmanStream(
        data=section(payload, rec.get("data"), what + ".data"),
        nbits=checked_int(rec.get("nbits"), what + ".nbits"),
        count=checked_int(rec.get("n"), what + ".n"),
        lengths=lengths,
        sync=sync_b.view("<u2").astype(np.uint16),
        chunk=checked_int(rec.get("chunk"), what + ".chunk", 1, (1 << 16) - 1),
    )


def huffman_params(doc: dict, where: str) -> tuple[int, int]:
    """``(max_len, chunk)`` the document declares for all its streams, within this reader's bounds.

    Raises:
        CorruptFileError: missing, or outside ``1..MAX_CODE_LEN`` / ``1..MAX_CHUNK``.
    """
    h = doc.get("huffman")
    if not isinstance(h, dict):
        raise CorruptFileError(f"{where}: metadata lacks the huffman parameters")
    return (
        checked_int(h.get("max_len"), f"{where}: huffman.max_len", 1, MAX_CODE_LEN),
        checked_int(h.get("chunk"), f"{where}: huffman.chunk", 1, MAX_CHUNK),
    )


def stored_floats(raw: np.ndarray, dtype_name: str) -> np.ndarray:
    """Little-endian ``float32``/``float16`` bytes (a codebook, kept values) as float32 numbers."""
    return raw.view("<" + np.dtype(NP_FLOAT[dtype_name]).str[1:]).astype(np.float32)


def stored_tensor(raw: np.ndarray, shape: tuple[int, ...], stored: str, src: str) -> torch.Tensor:
    """A plain tensor from its stored bytes: ``stored`` dtype on disk, converted back to its ``src`` dtype."""
    dtype = DTYPES[stored]
    t = torch.frombuffer(bytearray(raw.tobytes()), dtype=dtype) if raw.size else torch.empty(0, dtype=dtype)
    return t.reshape(shape).to(DTYPES[src])
