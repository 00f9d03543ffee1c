"""The compressed checkpoint: one versioned safetensors file, no pickle (Deep Compression §2-§4).

``save_compressed(model, path)`` writes every pruned and/or quantized layer (the buffers of docs/DESIGN.md) as

* a **relative-index stream** (:mod:`dc_lightning.sparse_format`: row-major scan of ``weight.reshape(out, -1)``,
  gaps of ``index_bits`` bits, top gap symbol = filler), Huffman-coded;
* a **codebook-index stream** (one symbol per kept weight), Huffman-coded (:mod:`dc_lightning.huffman`);
* the **codebook** (``2**bits`` centroids, float32 or float16);

and every other tensor (biases, BatchNorm statistics, unpruned unquantized weights) as plain bytes. A layer that
is pruned but not quantized stores its kept values at full precision next to the index stream (the paper's
pruning-only stage); a layer quantized but not pruned stores only the codebook-index stream (all positions).

File layout (extension ``.dcz``, a plain safetensors file):

* tensors ``layer.NNNN`` / ``tensor.NNNN``: uint8 payloads, one per compressed layer / plain tensor. A layer's
  payload is the concatenation of its sections (codebook, code lengths, sync tables, Huffman bits, values), whose
  ``[offset, length]`` are recorded in the metadata;
* safetensors metadata: ``format`` (``dc-lightning-compressed``), ``format_version`` (``1``) and ``dc_lightning``,
  a JSON document with the library version, the model builder (docs/DESIGN.md "Model builder record"), the
  Huffman parameters, and per layer: shape, kind, bits, index_bits, nnz, filler count, stream sizes and the sha256
  of its payload.

Readers validate everything (format, version, JSON schema, sizes against payload lengths, checksums, Huffman
tables, stream consistency) *before* allocating decode buffers, and raise one error type, :class:`CorruptFileError`.

Example::

    from dc_lightning.io import save_compressed, load_compressed

    report = save_compressed(model, "vgg16.dcz")
    print(report.to_markdown())
    model2 = load_compressed("vgg16.dcz")  # rebuilt from the recorded builder, buffers re-attached
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import math
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from dc_lightning import huffman
from dc_lightning.sparse_format import (
    MAX_INDEX_BITS,
    SparseFormatError,
    decode_gaps,
    encode_gaps,
    matrix_shape,
    positions_from_mask,
    positions_to_rows_cols,
)
from dc_lightning.utils import atomic_write, resolve_per_layer

if TYPE_CHECKING:
    from dc_lightning.report import Report

__all__ = [
    "EXTENSION",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CompressedFile",
    "CompressedLayer",
    "CorruptFileError",
    "cli_decompress",
    "cli_export",
    "decompress",
    "load_compressed",
    "read_compressed",
    "save_compressed",
]

log = logging.getLogger(__name__)

FORMAT_NAME = "dc-lightning-compressed"
FORMAT_VERSION = 1
EXTENSION = ".dcz"
#: the order non-zeros are scanned in (see dc_lightning.sparse_format); recorded in every file and checked on read
SCAN_ORDER = "row-major over weight.reshape(out, -1)"
#: paper defaults for the relative index [DC §2]: 8 bits for conv, 5 bits for fc
PAPER_INDEX_BITS = {"conv": 8, "fc": 5}
#: ``index_bits="auto"``: export tries these relative-index widths per layer and keeps the smallest coded stream
AUTO = "auto"
AUTO_INDEX_BITS = tuple(range(2, 11))
#: a file may not expand (dense state dict) to more than this many times its size, floor 1 GiB (see decompress)
MAX_DENSE_EXPANSION = 1024
_MIN_DENSE_CAP = 1 << 30
_MAX_HEADER = 100 << 20

_DTYPES: dict[str, torch.dtype] = {
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
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_NP_FLOAT = {"float32": np.float32, "float16": np.float16}
_MASK, _CODEBOOK, _ASSIGN = "weight_mask", "weight_codebook", "weight_assign"


class CorruptFileError(ValueError):
    """The compressed file cannot be read: truncated, altered (checksum), an unknown format version, a header
    inconsistent with its payloads, or a layer missing / shaped differently from the model it is loaded into."""


# ------------------------------------------------------------------------------------------------ decoded view


@dataclass
class CompressedLayer:
    """One compressed layer as decoded by :func:`read_compressed` (what the inference path builds layouts from).

    The weight's matrix view is ``weight.reshape(shape[0], -1)`` of shape ``(R, C)``; entry ``k`` sits at
    ``(rows[k], cols[k])``, entries in row-major (CSR) order.

    Attributes:
        name: qualified module name (``model.named_modules()``).
        key: state-dict key of the weight.
        shape: the weight's shape.
        kind: ``"pq"`` pruned+quantized, ``"q"`` quantized only (every position stored), ``"p"`` pruned only.
        has_mask: whether the layer carried ``weight_mask``.
        bits: codebook-index width (``None`` for ``"p"``); index_bits: relative-index width (``None`` for ``"q"``).
        rows, cols: int64 coordinates of the stored entries; codes: uint8 codebook indices (``None`` for ``"p"``).
        codebook: float32 centroids (``None`` for ``"p"``); values: float32 kept values (only for ``"p"``).
        record: the layer's metadata record.
    """

    name: str
    key: str
    shape: tuple[int, ...]
    kind: str
    has_mask: bool
    bits: int | None
    index_bits: int | None
    rows: np.ndarray
    cols: np.ndarray
    codes: np.ndarray | None
    codebook: np.ndarray | None
    values: np.ndarray | None
    record: dict = field(default_factory=dict, repr=False)

    @property
    def nnz(self) -> int:
        return int(self.rows.size)

    def dense(self) -> np.ndarray:
        """The weight as a float32 array of ``shape``: ``where(mask, codebook[codes], 0)`` (or the kept values)."""
        r, c = matrix_shape(self.shape)
        w = np.zeros((r, c), dtype=np.float32)
        w[self.rows, self.cols] = self.codebook[self.codes] if self.codes is not None else self.values
        return w.reshape(self.shape)

    def mask(self) -> np.ndarray:
        r, c = matrix_shape(self.shape)
        m = np.zeros((r, c), dtype=bool)
        m[self.rows, self.cols] = True
        return m.reshape(self.shape)

    def assign(self) -> np.ndarray:
        r, c = matrix_shape(self.shape)
        a = np.zeros((r, c), dtype=np.uint8)
        a[self.rows, self.cols] = self.codes
        return a.reshape(self.shape)


@dataclass
class CompressedFile:
    """Metadata plus decoded layers and plain tensors of a ``.dcz`` file (see :func:`read_compressed`)."""

    path: str
    metadata: dict
    layers: dict[str, CompressedLayer]
    tensors: dict[str, torch.Tensor]
    file_size: int

    @property
    def builder(self) -> dict | None:
        return self.metadata.get("builder")

    def dense_state_dict(self, with_buffers: bool = False) -> dict[str, torch.Tensor]:
        """A plain state dict: dense weights plus every other tensor; with ``with_buffers`` also the
        ``weight_mask``/``weight_codebook``/``weight_assign`` buffers.

        Raises:
            CorruptFileError: the dense weights would exceed ``MAX_DENSE_EXPANSION`` times the file size.
        """
        dense_bytes = sum(4 * int(np.prod(layer.shape, dtype=np.int64)) for layer in self.layers.values())
        cap = max(_MIN_DENSE_CAP, MAX_DENSE_EXPANSION * self.file_size)
        if dense_bytes > cap:
            raise CorruptFileError(
                f"{self.path}: dense weights would take {dense_bytes} bytes, more than {cap} "
                f"({MAX_DENSE_EXPANSION}x the file size); the header's shapes are not plausible"
            )
        out = dict(self.tensors)
        for layer in self.layers.values():
            out[layer.key] = torch.from_numpy(layer.dense())
            if with_buffers:
                prefix = layer.key[: -len("weight")]
                if layer.has_mask:
                    out[prefix + _MASK] = torch.from_numpy(layer.mask())
                if layer.codes is not None:
                    out[prefix + _CODEBOOK] = torch.from_numpy(layer.codebook.copy())
                    out[prefix + _ASSIGN] = torch.from_numpy(layer.assign())
        return out


# --------------------------------------------------------------------------------------------------- writing


def _to_bytes(t: torch.Tensor) -> np.ndarray:
    """Raw bytes of a tensor (any dtype, bf16 included) as a uint8 array."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().copy() if t.numel() else np.zeros(0, np.uint8)


def _layer_kind(module: nn.Module) -> str:
    return "conv" if isinstance(module, nn.modules.conv._ConvNd) else "fc"


def _compressed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that carry a ``weight`` and a mask and/or codebook buffer (docs/DESIGN.md)."""
    out = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        if getattr(m, _MASK, None) is not None or getattr(m, _CODEBOOK, None) is not None:
            out[name] = m
    return out


def _resolve_index_bits(index_bits: Any, layers: dict[str, nn.Module]) -> dict[str, int | str]:
    names = list(layers)
    if index_bits is None:
        out = {n: PAPER_INDEX_BITS[_layer_kind(m)] for n, m in layers.items()}
    elif index_bits == AUTO:
        out = {n: AUTO for n in names}
    else:
        if isinstance(index_bits, dict) and not names:
            return {}
        out = resolve_per_layer(index_bits, names, "index_bits", default=-1)
        for n, v in out.items():
            if isinstance(v, int) and not isinstance(v, bool) and v == -1:
                out[n] = PAPER_INDEX_BITS[_layer_kind(layers[n])]
    for n, v in out.items():
        if v == AUTO:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_INDEX_BITS:
            raise ValueError(f"index_bits for layer {n!r} is {v!r}; valid: an int in 1..{MAX_INDEX_BITS} or {AUTO!r}")
    return out


def _stored_lengths(s: huffman.HuffmanStream) -> np.ndarray:
    """The code-length table as stored: one byte per symbol, or a single byte for a fixed-width code."""
    lengths = s.lengths.astype(np.uint8)
    if lengths.size > 1 and (lengths == lengths[0]).all():  # a fixed-width code: one length for all symbols
        lengths = lengths[:1]
    return lengths


def _stream_bytes(s: huffman.HuffmanStream) -> int:
    """Bytes a stream occupies in the file (data, code-length table, uint16 sync table; see ``_Payload.add_stream``)."""
    return int(s.data.size) + int(_stored_lengths(s).size) + 2 * int(s.sync.size)


def _gap_stream(
    pos: np.ndarray, index_bits: int | str, max_len: int, chunk: int
) -> tuple[int, np.ndarray, huffman.HuffmanStream]:
    """Relative-index stream of one layer at ``index_bits``, or at the width in AUTO_INDEX_BITS whose coded stream
    is smallest (``"auto"``; ties go to the narrower width)."""
    widths = AUTO_INDEX_BITS if index_bits == AUTO else (int(index_bits),)
    best = None
    for b in widths:
        gaps = encode_gaps(pos, b)
        s = _code_stream(gaps, 1 << b, max_len, chunk)
        if best is None or _stream_bytes(s) < _stream_bytes(best[2]):
            best = (b, gaps, s)
    return best


def _check_dtype(value: str, field_name: str) -> str:
    if value not in _NP_FLOAT:
        raise ValueError(f"{field_name}={value!r} is invalid; valid: {sorted(_NP_FLOAT)}")
    return value


class _Payload:
    """Accumulates the sections of one layer payload."""

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
        lengths = _stored_lengths(s)
        return {
            "n": int(s.count),
            "nbits": int(s.nbits),
            "chunk": int(s.chunk),
            "lengths": self.add(lengths),
            "sync": self.add(s.sync.astype("<u2")),
            "data": self.add(s.data),
        }

    def array(self) -> np.ndarray:
        return np.frombuffer(b"".join(self.parts), dtype=np.uint8).copy() if self.size else np.zeros(0, np.uint8)


def _code_stream(symbols: np.ndarray, alphabet: int, max_len: int, chunk: int) -> huffman.HuffmanStream:
    """Huffman-code ``symbols``, or code them at a fixed width when that is smaller.

    A Huffman stream stores one code length per symbol of the alphabet (256 bytes for an 8-bit codebook), which costs
    more than it saves on tiny layers (LeNet-5's conv1: 330 weights). A fixed-width code is the canonical code whose
    lengths are all ``ceil(log2(alphabet))``; its length table is stored as a single byte (see ``_Payload.add_stream``),
    and readers decode it exactly like any other canonical code.
    """
    coded = huffman.encode(symbols, alphabet_size=alphabet, max_len=max_len, chunk=chunk)
    width = max(1, math.ceil(math.log2(alphabet)))
    if width > max_len or not symbols.size:
        return coded
    fixed_bytes = (symbols.size * width + 7) // 8 + 1  # data + the one-byte length table (same sync table)
    if fixed_bytes < coded.data.size + alphabet:
        return huffman.encode(symbols, np.full(alphabet, width, np.uint8), chunk=chunk)
    return coded


def _encode_layer(
    name: str,
    m: nn.Module,
    index_bits: int | str,
    codebook_dtype: str,
    dense_dtype: str,
    strict: bool,
    max_len: int,
    chunk: int,
) -> tuple[dict, np.ndarray]:
    w = m.weight.detach().cpu()
    if w.dtype != torch.float32:
        raise ValueError(f"layer {name!r}: weight dtype {w.dtype} is not supported; compressed layers need float32")
    shape = tuple(w.shape)
    R, C = matrix_shape(shape)
    w2 = w.numpy().reshape(R, C)
    mask_t = getattr(m, _MASK, None)
    cb_t = getattr(m, _CODEBOOK, None)
    assign_t = getattr(m, _ASSIGN, None)
    has_mask = mask_t is not None
    if has_mask and tuple(mask_t.shape) != shape:
        raise ValueError(f"layer {name!r}: weight_mask shape {tuple(mask_t.shape)} != weight shape {shape}")
    mask2 = mask_t.detach().cpu().numpy().astype(bool, copy=False).reshape(R, C) if has_mask else None
    pos = positions_from_mask(mask2) if has_mask else None
    if pos is not None:
        rows, cols = positions_to_rows_cols(pos, C)
        kept = w2[rows, cols]
        outside = int(np.count_nonzero(w2)) - int(np.count_nonzero(kept))
        if outside:
            msg = f"layer {name!r}: {outside} weights outside weight_mask are non-zero (docs/DESIGN.md invariant)"
            if strict:
                raise ValueError(msg + "; re-apply the masks or pass strict=False to store the masked weights")
            log.warning("%s; storing the masked weights", msg)
    else:
        kept = w2.reshape(-1)  # row-major, every position
    rec: dict[str, Any] = {
        "module": name,
        "key": f"{name}.weight" if name else "weight",
        "shape": list(shape),
        "has_mask": has_mask,
        "numel": R * C,
    }
    pay = _Payload()
    if cb_t is not None:
        if assign_t is None or tuple(assign_t.shape) != shape:
            raise ValueError(f"layer {name!r}: weight_codebook without a weight_assign buffer of shape {shape}")
        cb = cb_t.detach().cpu().to(torch.float32).numpy().reshape(-1)
        k = cb.size
        if not 1 <= k <= 256:
            raise ValueError(f"layer {name!r}: codebook has {k} entries; valid: 1..256 (uint8 weight_assign)")
        bits = max(1, math.ceil(math.log2(k)))
        a2 = assign_t.detach().cpu().numpy().reshape(R, C)
        codes = a2[rows, cols] if pos is not None else a2.reshape(-1)
        if codes.size and int(codes.max()) >= k:
            raise ValueError(f"layer {name!r}: weight_assign holds index {int(codes.max())} >= codebook size {k}")
        mismatch = int(np.count_nonzero(cb[codes].view(np.uint32) != np.ascontiguousarray(kept).view(np.uint32)))
        if mismatch:
            msg = f"layer {name!r}: {mismatch} kept weights differ from weight_codebook[weight_assign]"
            if strict:
                raise ValueError(msg + " (docs/DESIGN.md invariant); pass strict=False to store the quantized values")
            log.warning("%s; storing the quantized values", msg)
        cbs = cb.astype(_NP_FLOAT[codebook_dtype])
        if codebook_dtype != "float32" and not np.array_equal(cbs.astype(np.float32), cb):
            log.info(
                "layer %r: codebook rounded to %s (loaded weights will differ from the model's)", name, codebook_dtype
            )
        rec.update(
            kind="pq" if has_mask else "q",
            bits=bits,
            k=k,
            codebook_dtype=codebook_dtype,
            codebook=pay.add(cbs.astype("<" + cbs.dtype.str[1:])),
        )
        rec["code"] = pay.add_stream(_code_stream(codes, k, max_len, chunk))
    else:
        if not has_mask:
            raise AssertionError("layer without mask or codebook is not a compressed layer")
        vals = np.ascontiguousarray(kept).astype(_NP_FLOAT[dense_dtype])
        rec.update(
            kind="p", bits=None, k=None, value_dtype=dense_dtype, values=pay.add(vals.astype("<" + vals.dtype.str[1:]))
        )
        rec["code"] = None
    if has_mask:
        width, gaps, stream = _gap_stream(pos, index_bits, max_len, chunk)
        rec.update(index_bits=width, nnz=int(pos.size), n_fill=int(gaps.size - pos.size))
        rec["gap"] = pay.add_stream(stream)
    else:
        rec.update(index_bits=None, nnz=R * C, n_fill=0, gap=None)
    arr = pay.array()
    rec["nbytes"] = int(arr.size)
    rec["sha256"] = hashlib.sha256(arr.tobytes()).hexdigest()
    return rec, arr


def _builder_record(model: nn.Module, builder: dict | None) -> dict | None:
    rec = builder if builder is not None else getattr(model, "dc_builder", None)
    if rec is None:
        cls = type(model)
        kwargs: Any = {}
        hp = getattr(model, "hparams", None)
        if hp is not None:
            kwargs = dict(hp)
        rec = {"callable": f"{cls.__module__}:{cls.__qualname__}", "kwargs": kwargs}
    try:
        rec = json.loads(json.dumps(rec))
    except (TypeError, ValueError):
        log.warning("model builder %r is not JSON-serialisable; load_compressed will need model=", rec)
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("callable"), str):
        raise ValueError(f"builder must be {{'callable': 'pkg.mod:Name', 'kwargs': {{...}}}}, got {rec!r}")
    return rec


def build_file(
    model: nn.Module,
    *,
    index_bits: int | str | dict[str, int | str] | None = None,
    codebook_dtype: str = "float32",
    dense_dtype: str = "float32",
    builder: dict | None = None,
    strict: bool = True,
    max_len: int = huffman.DEFAULT_MAX_LEN,
    chunk: int = huffman.DEFAULT_CHUNK,
) -> tuple[dict, bytes]:
    """Encode ``model`` into (metadata, file bytes) without writing anything (see :func:`save_compressed`)."""
    from dc_lightning import __version__

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_dtype(codebook_dtype, "codebook_dtype")
    _check_dtype(dense_dtype, "dense_dtype")
    layers = _compressed_layers(model)
    ib = _resolve_index_bits(index_bits, layers)
    tensors: dict[str, np.ndarray] = {}
    meta_layers, meta_tensors = [], []
    consumed: set[str] = set()
    for i, (name, m) in enumerate(layers.items()):
        rec, arr = _encode_layer(name, m, ib[name], codebook_dtype, dense_dtype, strict, max_len, chunk)
        rec["tensor"] = f"layer.{i:04d}"
        tensors[rec["tensor"]] = arr
        meta_layers.append(rec)
        prefix = f"{name}." if name else ""
        consumed.update(prefix + s for s in ("weight", _MASK, _CODEBOOK, _ASSIGN))
    for i, (key, t) in enumerate((k, v) for k, v in model.state_dict().items() if k not in consumed):
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"state-dict entry {key!r} has unsupported dtype {t.dtype}; valid: {sorted(_DTYPES)}")
        src = _DTYPE_NAMES[t.dtype]
        stored = dense_dtype if t.dtype == torch.float32 else src
        arr = _to_bytes(t.to(_DTYPES[stored]))
        name = f"tensor.{i:04d}"
        tensors[name] = arr
        meta_tensors.append(
            {
                "key": key,
                "dtype": src,
                "stored_dtype": stored,
                "shape": list(t.shape),
                "tensor": name,
                "nbytes": int(arr.size),
                "sha256": hashlib.sha256(arr.tobytes()).hexdigest(),
            }
        )
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "builder": _builder_record(model, builder),
        "huffman": {"max_len": max_len, "chunk": chunk},
        "scan_order": SCAN_ORDER,
        "layers": meta_layers,
        "tensors": meta_tensors,
    }
    from safetensors.numpy import save

    data = save(
        tensors,
        metadata={
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "dc_lightning": json.dumps(meta, separators=(",", ":")),
        },
    )
    return meta, data


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    index_bits: int | str | dict[str, int | str] | None = None,
    codebook_dtype: str = "float32",
    dense_dtype: str = "float32",
    builder: dict | None = None,
    overwrite: bool = False,
    strict: bool = True,
) -> Report:
    """Write ``model`` (plain ``nn.Module`` or LightningModule) as one compressed ``.dcz`` file, atomically.

    Layers carrying ``weight_mask`` and/or ``weight_codebook``+``weight_assign`` (docs/DESIGN.md) are stored as
    Huffman-coded relative-index and codebook-index streams [DC §2-§4]; everything else in ``state_dict()`` is
    stored as plain bytes. The live model is only read, never modified.

    Args:
        model: the model.
        path: target file (extension ``.dcz`` by convention).
        index_bits: relative-index width: ``None`` = paper default (8 conv, 5 fc [DC §2]), an int for all layers,
            ``"auto"``, or ``{fnmatch pattern: int or "auto"}`` (last matching pattern wins; unmatched layers get the
            paper default). ``"auto"`` encodes each layer's relative indices at every width in 2..10 and keeps the
            one whose Huffman-coded stream (with its tables) is smallest: a wider index needs fewer filler entries,
            a narrower one a smaller code table. Export then takes up to 9x longer for those layers.
        codebook_dtype: ``"float32"`` (bit-exact) or ``"float16"`` (smaller; weights then change by rounding).
        dense_dtype: storage of plain float32 tensors and of pruned-only kept values: ``"float32"`` or ``"float16"``.
        builder: ``{"callable": "pkg.mod:Name", "kwargs": {...}}`` to rebuild the model; default ``model.dc_builder``,
            else the class path plus ``hparams`` (LightningModule).
        overwrite: replace an existing file; without it an existing ``path`` raises.
        strict: raise when a layer breaks the buffer invariants (non-zero weights outside the mask, weights that
            differ from ``codebook[assign]``); with ``False`` the masked/quantized values are stored instead.

    Returns:
        The :class:`dc_lightning.report.Report` of the written file.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: bad arguments or a layer violating the buffer invariants (``strict``).

    Example::

        report = save_compressed(model, "lenet.dcz", index_bits={"*": 5, "conv*": 8})
        print(report.to_markdown())
    """
    from dc_lightning.report import Report

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    meta, data = build_file(
        model,
        index_bits=index_bits,
        codebook_dtype=codebook_dtype,
        dense_dtype=dense_dtype,
        builder=builder,
        strict=strict,
    )
    with atomic_write(path) as f:
        f.write(data)
    return Report.from_metadata(meta, file_size=len(data), source=str(path))


# --------------------------------------------------------------------------------------------------- reading


def _read_header(data: bytes, where: str) -> tuple[dict, dict]:
    """(tensor index, metadata) of a safetensors byte string, with every size checked."""
    if len(data) < 8:
        raise CorruptFileError(f"{where}: {len(data)} bytes is too short for a safetensors file (truncated?)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > _MAX_HEADER:
        raise CorruptFileError(f"{where}: header claims {n} bytes but the file holds {len(data) - 8} (truncated?)")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
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


def _int(v: Any, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CorruptFileError(f"{what} = {v!r} is not an integer in [{lo}, {hi}]")
    return v


def _section(payload: np.ndarray, sec: Any, what: str) -> np.ndarray:
    if not isinstance(sec, list) or len(sec) != 2:
        raise CorruptFileError(f"{what}: section must be [offset, length], got {sec!r}")
    off, n = _int(sec[0], what + ".offset"), _int(sec[1], what + ".length")
    if off + n > payload.size:
        raise CorruptFileError(f"{what}: section [{off}, {off + n}) lies outside its {payload.size}-byte payload")
    return payload[off : off + n]


def _stream(payload: np.ndarray, rec: Any, alphabet: int, what: str) -> huffman.HuffmanStream:
    if not isinstance(rec, dict):
        raise CorruptFileError(f"{what}: stream record missing")
    lengths = _section(payload, rec.get("lengths"), what + ".lengths")
    if lengths.size == 1 and alphabet > 1:  # a fixed-width code stores its one length once
        lengths = np.full(alphabet, lengths[0], dtype=np.uint8)
    if lengths.size != alphabet:
        raise CorruptFileError(f"{what}: {lengths.size} code lengths for an alphabet of {alphabet}")
    sync_b = _section(payload, rec.get("sync"), what + ".sync")
    if sync_b.size % 2:
        raise CorruptFileError(f"{what}: sync table has an odd byte count")
    return huffman.HuffmanStream(
        data=_section(payload, rec.get("data"), what + ".data"),
        nbits=_int(rec.get("nbits"), what + ".nbits"),
        count=_int(rec.get("n"), what + ".n"),
        lengths=lengths,
        sync=sync_b.view("<u2").astype(np.uint16),
        chunk=_int(rec.get("chunk"), what + ".chunk", 1, (1 << 16) - 1),
    )


def _shape(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > 8:
        raise CorruptFileError(f"{what}: shape {v!r} is not a list of at most 8 dims")
    shape = tuple(_int(d, what + ".shape", 0, 1 << 40) for d in v)
    if math.prod(shape) > (1 << 48):
        raise CorruptFileError(f"{what}: shape {shape} is implausibly large")
    return shape


def read_compressed(path: str | os.PathLike) -> CompressedFile:
    """Read and fully validate a ``.dcz`` file; decode every layer's streams.

    The result holds, per compressed layer, a :class:`CompressedLayer` with ``rows``/``cols`` (int64, CSR order),
    ``codes`` (uint8) and ``codebook`` (float32) or ``values``, and the plain tensors as torch tensors. The
    inference path builds its GPU layouts from these; :func:`dc_lightning.sparse_format.eie_layout` derives EIE's.

    Raises:
        CorruptFileError: any inconsistency (see the module docstring); FileNotFoundError if ``path`` is missing.
    """
    path = str(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _parse(data, path)
    except CorruptFileError:
        raise
    except (huffman.HuffmanDecodeError, SparseFormatError) as e:
        raise CorruptFileError(f"{path}: {e}") from None
    except Exception as e:  # safetensors/numpy/json errors on hostile input: one documented error type
        raise CorruptFileError(f"{path}: unreadable compressed file ({type(e).__name__}: {e})") from None


def _parse(data: bytes, where: str) -> CompressedFile:
    from safetensors.numpy import load

    header, doc = _read_header(data, where)
    try:
        arrays = load(data)
    except Exception as e:
        raise CorruptFileError(f"{where}: safetensors payload is inconsistent ({e})") from None

    def payload(rec: dict, what: str) -> np.ndarray:
        name = rec.get("tensor")
        if not isinstance(name, str) or name not in arrays:
            raise CorruptFileError(f"{where}: {what}: payload tensor {name!r} is missing")
        arr = arrays[name]
        if arr.dtype != np.uint8 or arr.ndim != 1 or arr.size != _int(rec.get("nbytes"), what + ".nbytes"):
            raise CorruptFileError(f"{where}: {what}: payload {name!r} has the wrong dtype/shape/size")
        if hashlib.sha256(arr.tobytes()).hexdigest() != rec.get("sha256"):
            raise CorruptFileError(f"{where}: {what}: sha256 checksum mismatch (file altered or damaged)")
        return arr

    layers_meta, tensors_meta = doc.get("layers"), doc.get("tensors")
    if not isinstance(layers_meta, list) or not isinstance(tensors_meta, list):
        raise CorruptFileError(f"{where}: metadata lacks the layers/tensors lists")
    if not (isinstance(doc.get("builder"), dict) or doc.get("builder") is None):
        raise CorruptFileError(f"{where}: builder record is not an object")
    # pass 1: validate layer records and collect streams (no decode buffers allocated yet)
    pending = []
    streams: list[huffman.HuffmanStream] = []
    keys: set[str] = set()
    for rec in layers_meta:
        if not isinstance(rec, dict):
            raise CorruptFileError(f"{where}: layer record is not an object")
        name, key = rec.get("module"), rec.get("key")
        if not isinstance(name, str) or not isinstance(key, str) or not key.endswith("weight") or key in keys:
            raise CorruptFileError(f"{where}: bad or duplicate layer name/key {name!r}/{key!r}")
        keys.add(key)
        what = f"layer {name!r}"
        shape = _shape(rec.get("shape"), what)
        numel = math.prod(shape)
        if _int(rec.get("numel"), what + ".numel") != numel:
            raise CorruptFileError(f"{where}: {what}: numel disagrees with shape {shape}")
        kind = rec.get("kind")
        has_mask = rec.get("has_mask")
        if kind not in ("pq", "q", "p") or has_mask is not (kind != "q"):
            raise CorruptFileError(f"{where}: {what}: unknown kind {kind!r} / has_mask {has_mask!r}")
        pay = payload(rec, what)
        nnz = _int(rec.get("nnz"), what + ".nnz", 0, numel)
        item = {
            "rec": rec,
            "name": name,
            "key": key,
            "shape": shape,
            "kind": kind,
            "nnz": nnz,
            "code": None,
            "gap": None,
        }
        if kind in ("pq", "q"):
            k = _int(rec.get("k"), what + ".k", 1, 256)
            bits = _int(rec.get("bits"), what + ".bits", 1, 8)
            if bits != max(1, math.ceil(math.log2(k))):
                raise CorruptFileError(f"{where}: {what}: bits={bits} disagrees with codebook size {k}")
            cdt = rec.get("codebook_dtype")
            if cdt not in _NP_FLOAT:
                raise CorruptFileError(f"{where}: {what}: codebook dtype {cdt!r}")
            cb = _section(pay, rec.get("codebook"), what + ".codebook")
            if cb.size != k * np.dtype(_NP_FLOAT[cdt]).itemsize:
                raise CorruptFileError(f"{where}: {what}: codebook section size disagrees with k={k}")
            item["codebook"] = cb.view("<" + np.dtype(_NP_FLOAT[cdt]).str[1:]).astype(np.float32)
            item["code"] = len(streams)
            s = _stream(pay, rec.get("code"), k, what + ".code")
            if s.count != (nnz if kind == "pq" else numel) or (kind == "q" and nnz != numel):
                raise CorruptFileError(f"{where}: {what}: code stream holds {s.count} symbols, expected nnz={nnz}")
            streams.append(s)
        else:
            vdt = rec.get("value_dtype")
            if vdt not in _NP_FLOAT:
                raise CorruptFileError(f"{where}: {what}: value dtype {vdt!r}")
            vals = _section(pay, rec.get("values"), what + ".values")
            if vals.size != nnz * np.dtype(_NP_FLOAT[vdt]).itemsize:
                raise CorruptFileError(f"{where}: {what}: values section size disagrees with nnz={nnz}")
            item["values"] = vals.view("<" + np.dtype(_NP_FLOAT[vdt]).str[1:]).astype(np.float32)
        if kind in ("pq", "p"):
            b = _int(rec.get("index_bits"), what + ".index_bits", 1, MAX_INDEX_BITS)
            item["index_bits"] = b
            item["gap"] = len(streams)
            s = _stream(pay, rec.get("gap"), 1 << b, what + ".gap")
            if s.count != nnz + _int(rec.get("n_fill"), what + ".n_fill"):
                raise CorruptFileError(f"{where}: {what}: gap stream holds {s.count} symbols, expected nnz+fillers")
            streams.append(s)
        pending.append(item)
    # pass 2: decode all streams together (one vectorised pass; sizes were checked against payloads above)
    decoded = huffman.decode_many(streams)
    layers: dict[str, CompressedLayer] = {}
    for it in pending:
        shape = it["shape"]
        numel = math.prod(shape)
        _, C = matrix_shape(shape)
        if it["gap"] is not None:
            pos = decode_gaps(decoded[it["gap"]], it["index_bits"], it["nnz"], numel)
        else:
            pos = np.arange(numel, dtype=np.int64)
        rows, cols = positions_to_rows_cols(pos, C) if numel else (pos, pos)
        codes = decoded[it["code"]].astype(np.uint8) if it["code"] is not None else None
        if it["name"] in layers:
            raise CorruptFileError(f"{where}: duplicate layer {it['name']!r}")
        layers[it["name"]] = CompressedLayer(
            name=it["name"],
            key=it["key"],
            shape=shape,
            kind=it["kind"],
            has_mask=it["kind"] != "q",
            bits=it["rec"].get("bits"),
            index_bits=it.get("index_bits"),
            rows=rows,
            cols=cols,
            codes=codes,
            codebook=it.get("codebook"),
            values=it.get("values"),
            record=it["rec"],
        )
    tensors: dict[str, torch.Tensor] = {}
    for rec in tensors_meta:
        if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
            raise CorruptFileError(f"{where}: tensor record is not an object with a key")
        key = rec["key"]
        what = f"tensor {key!r}"
        if key in tensors or key in keys:
            raise CorruptFileError(f"{where}: duplicate tensor key {key!r}")
        src, stored = rec.get("dtype"), rec.get("stored_dtype")
        if src not in _DTYPES or stored not in _DTYPES:
            raise CorruptFileError(f"{where}: {what}: unknown dtype {src!r}/{stored!r}")
        shape = _shape(rec.get("shape"), what)
        arr = payload(rec, what)
        if arr.size != math.prod(shape) * _DTYPES[stored].itemsize:
            raise CorruptFileError(f"{where}: {what}: payload size disagrees with shape {shape} and dtype {stored}")
        t = (
            torch.frombuffer(bytearray(arr.tobytes()), dtype=_DTYPES[stored])
            if arr.size
            else torch.empty(0, dtype=_DTYPES[stored])
        )
        tensors[key] = t.reshape(shape).to(_DTYPES[src])
    return CompressedFile(path=where, metadata=doc, layers=layers, tensors=tensors, file_size=len(data))


# --------------------------------------------------------------------------------------------------- loading


_TRUSTED_PREFIXES = ("dc_lightning.", "torchvision.models")


def _resolve_callable(spec: str) -> Any:
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"builder callable {spec!r} is not of the form 'pkg.module:QualName'")
    mod_name, qual = spec.split(":", 1)
    obj: Any = importlib.import_module(mod_name)
    for part in qual.split("."):
        obj = getattr(obj, part)
    trusted = (mod_name + ".").startswith(_TRUSTED_PREFIXES) or (isinstance(obj, type) and issubclass(obj, nn.Module))
    if not trusted:
        # a file must not be able to make us call an arbitrary function (os:system ...)
        raise ValueError(
            f"builder {spec!r} is neither an nn.Module class nor in {_TRUSTED_PREFIXES}; "
            "build the model yourself and pass it as load_compressed(path, model=...)"
        )
    return obj


def build_from_record(builder: dict | None, where: str = "file") -> nn.Module:
    """Instantiate a model from a builder record ``{"callable": "pkg.mod:Name", "kwargs": {...}}``.

    Raises:
        ValueError: no record, an untrusted callable, or the builder failed.
    """
    if not builder:
        raise ValueError(f"{where} records no model builder; pass the model: load_compressed(path, model=...)")
    fn = _resolve_callable(builder.get("callable"))
    kwargs = builder.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where}: builder kwargs {kwargs!r} are not a mapping")
    try:
        model = fn(**kwargs)
    except Exception as e:
        raise ValueError(
            f"{where}: rebuilding the model with {builder['callable']}(**{kwargs}) failed ({type(e).__name__}: {e}); "
            "pass the model: load_compressed(path, model=...)"
        ) from e
    if not isinstance(model, nn.Module):
        raise ValueError(f"{where}: builder {builder['callable']} returned {type(model).__name__}, not an nn.Module")
    return model


def _set_buffer(module: nn.Module, name: str, value: torch.Tensor, device: torch.device) -> None:
    module.register_buffer(name, value.to(device), persistent=True)


def load_compressed(
    path: str | os.PathLike, model: nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Load a ``.dcz`` file into ``model`` (or a model rebuilt from the recorded builder).

    Weights are bit-for-bit the pruned+quantized weights that were saved (with float32 codebooks/values), and the
    ``weight_mask``/``weight_codebook``/``weight_assign`` buffers are re-attached to the compressed layers, so the
    model can keep training with the compression callbacks or be converted with ``to_compressed_inference``.

    Args:
        path: the file.
        model: load into this instance; its state-dict keys and shapes must match the file.
        map_location: device of the rebuilt model (a given model keeps its devices).

    Returns:
        The model.

    Raises:
        CorruptFileError: unreadable file, or a layer/tensor missing from the file or shaped differently from the
            model's.
        ValueError: no model given and the file's builder record is absent or not trusted.

    Example::

        model = load_compressed("lenet.dcz")
    """
    cf = read_compressed(path)
    rebuilt = model is None
    if rebuilt:
        model = build_from_record(cf.builder, where=str(path))
    modules = dict(model.named_modules())
    buffer_keys = set()
    for layer in cf.layers.values():
        m = modules.get(layer.name)
        if m is None or not isinstance(getattr(m, "weight", None), torch.Tensor):
            raise CorruptFileError(f"{path}: layer {layer.name!r} of the file does not exist in the model")
        if tuple(m.weight.shape) != layer.shape:
            raise CorruptFileError(
                f"{path}: layer {layer.name!r} has shape {layer.shape} in the file but {tuple(m.weight.shape)} in "
                "the model"
            )
        prefix = f"{layer.name}." if layer.name else ""
        buffer_keys.update(prefix + s for s in (_MASK, _CODEBOOK, _ASSIGN))
    sd = model.state_dict()
    file_keys = set(cf.tensors) | {layer.key for layer in cf.layers.values()}
    missing = sorted(k for k in sd if k not in file_keys and k not in buffer_keys)
    unexpected = sorted(k for k in file_keys if k not in sd)
    if missing or unexpected:
        raise CorruptFileError(
            f"{path}: file and model disagree; missing from the file: {missing[:10]}, not in the model: "
            f"{unexpected[:10]}"
        )
    for key, t in cf.tensors.items():
        if tuple(sd[key].shape) != tuple(t.shape):
            raise CorruptFileError(
                f"{path}: tensor {key!r} has shape {tuple(t.shape)} in the file but {tuple(sd[key].shape)} in the model"
            )
    with torch.no_grad():
        for layer in cf.layers.values():
            m = modules[layer.name]
            dev = m.weight.device
            m.weight.copy_(torch.from_numpy(layer.dense()).to(m.weight.dtype))
            if layer.has_mask:
                _set_buffer(m, _MASK, torch.from_numpy(layer.mask()), dev)
            elif getattr(m, _MASK, None) is not None:
                getattr(m, _MASK).fill_(True)
            if layer.codes is not None:
                _set_buffer(m, _CODEBOOK, torch.from_numpy(layer.codebook.copy()), dev)
                _set_buffer(m, _ASSIGN, torch.from_numpy(layer.assign()), dev)
        for key, t in cf.tensors.items():
            sd[key].copy_(t)  # state_dict() tensors share storage with the parameters/buffers
    if rebuilt:
        model.to(map_location)
    return model


def decompress(in_path: str | os.PathLike, out_path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write a ``.dcz`` file's dense weights (and all other tensors) as a plain safetensors state dict.

    Raises:
        CorruptFileError: unreadable input, or shapes implying more than ``MAX_DENSE_EXPANSION`` x the file size.
        FileExistsError: ``out_path`` exists and ``overwrite`` is False.
    """
    from safetensors.torch import save

    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; pass overwrite=True to replace it")
    cf = read_compressed(in_path)
    sd = {k: v.contiguous() for k, v in cf.dense_state_dict().items()}
    data = save(sd, metadata={"source": os.path.basename(str(in_path)), "format": "dense state dict"})
    with atomic_write(out_path) as f:
        f.write(data)


# ------------------------------------------------------------------------------------------------------- CLI


def attach_buffers_from_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Register placeholder mask/codebook/assign buffers that ``state_dict`` has and ``model`` lacks."""
    modules = dict(model.named_modules())
    for key, t in state_dict.items():
        mod_name, _, buf = key.rpartition(".")
        if buf in (_MASK, _CODEBOOK, _ASSIGN) and mod_name in modules and getattr(modules[mod_name], buf, None) is None:
            modules[mod_name].register_buffer(buf, torch.zeros_like(t))


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
    p.add_argument("--codebook-dtype", default="float32", choices=sorted(_NP_FLOAT))
    p.add_argument("--dense-dtype", default="float32", choices=sorted(_NP_FLOAT))
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
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
        mod_name, qual = spec.split(":", 1)
        cls: Any = importlib.import_module(mod_name)
        for part in qual.split("."):
            cls = getattr(cls, part)
        model = cls(**hparams)
    except Exception as e:
        print(f"dc-lightning export: cannot build {spec}(**hyper_parameters): {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    attach_buffers_from_state_dict(model, ckpt["state_dict"])
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
    try:
        decompress(args.input, args.output, overwrite=args.overwrite)
    except (CorruptFileError, FileExistsError, FileNotFoundError) as e:
        print(f"dc-lightning decompress: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0
