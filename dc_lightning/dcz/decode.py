"""Reading a ``.dcz`` file: every layer record is validated against its payload *before* any decode buffer is
allocated (sizes, bounds, section tiling, stream lengths; :mod:`dc_lightning.dcz.container` checks the header and the
payload checksums), then all streams of the file are decoded in one vectorised pass
(:func:`dc_lightning.dcz.huffman.decode_many`) into :class:`~dc_lightning.dcz.records.CompressedLayer` objects.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dc_lightning.buffers import MAX_CODES, buffer_name, matrix_shape
from dc_lightning.dcz import huffman
from dc_lightning.dcz.container import (
    DEFAULT_ALIASES,
    DEFAULT_PARAM,
    DTYPES,
    NP_FLOAT,
    CorruptFileError,
    checked_int,
    checked_payload,
    checked_shape,
    huffman_params,
    load_payloads,
    read_header,
    read_stream,
    section,
    stored_floats,
    stored_tensor,
)
from dc_lightning.dcz.records import STORAGES, CompressedFile, CompressedLayer
from dc_lightning.dcz.relative_index import MAX_INDEX_BITS, SparseFormatError, decode_gaps, positions_to_rows_cols
from dc_lightning.utils import target_name

__all__ = ["read_compressed"]


@dataclass
class _PendingLayer:
    """A layer record validated against its payload, its streams collected but not decoded yet."""

    rec: dict
    name: str
    key: str
    shape: tuple[int, ...]
    storage: str  # the record's "kind": "pq", "q" or "p" (records.STORAGES)
    nnz: int
    index_bits: int | None = None
    codebook: np.ndarray | None = None
    values: np.ndarray | None = None
    code: int | None = None  # index of the codebook-index stream in the list handed to decode_many
    gap: int | None = None  # index of the relative-index stream


_Shapes = dict[str, tuple[int, ...]]
_Expect = Callable[[_Shapes, _Shapes, dict[str, str]], None]


def read_compressed(
    path: str | os.PathLike, expect: _Expect | None = None
) -> CompressedFile:
    """Read and fully validate a ``.dcz`` file; decode every layer's streams.

    The result holds, per compressed layer, a :class:`CompressedLayer` with ``rows``/``cols`` (int64, CSR order),
    ``codes`` (uint8) and ``codebook`` (float32) or ``values``, and the plain tensors as torch tensors. The
    inference path builds its GPU layouts from these; :func:`dc_lightning.dcz.relative_index.eie_layout` derives EIE's.

    ``expect``, when given, is called with ``{state-dict key: shape}`` of the layers and of the plain tensors the file
    declares and with its ``aliases`` (``{alias key: stored key}``, validated: every stored key is a layer's key, one
    of its buffers' or a plain tensor's), after the records are validated and before anything is decoded
    (``load_compressed`` checks them against the model there); what it raises propagates unchanged.

    Raises:
        CorruptFileError: any inconsistency (see the module docstring); FileNotFoundError if ``path`` is missing.
    """
    path = str(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _parse(data, path, expect)
    except _Expected as e:  # the caller's own error, unchanged
        raise e.args[0] from None
    except CorruptFileError:
        raise
    except (huffman.HuffmanDecodeError, SparseFormatError) as e:
        raise CorruptFileError(f"{path}: {e}") from None
    except Exception as e:  # safetensors/numpy/json errors on hostile input: one documented error type
        raise CorruptFileError(f"{path}: unreadable compressed file ({type(e).__name__}: {e})") from None


class _Expected(Exception):
    """Carries what ``expect`` raised through :func:`read_compressed`'s catch-all for hostile input."""


def _parse(data: bytes, where: str, expect: _Expect | None) -> CompressedFile:
    _, doc = read_header(data, where)
    max_len, chunk = huffman_params(doc, where)
    payloads = load_payloads(data, where)
    layers_meta, tensors_meta = doc.get("layers"), doc.get("tensors")
    if not isinstance(layers_meta, list) or not isinstance(tensors_meta, list):
        raise CorruptFileError(f"{where}: metadata lacks the layers/tensors lists")
    if not (isinstance(doc.get("builder"), dict) or doc.get("builder") is None):
        raise CorruptFileError(f"{where}: builder record is not an object")
    # pass 1: validate layer records and collect streams (no decode buffers allocated yet)
    streams: list[huffman.HuffmanStream] = []
    keys: set[str] = set()
    pending = [_check_layer(rec, payloads, streams, keys, where, max_len, chunk) for rec in layers_meta]
    tensors = _read_tensors(tensors_meta, payloads, keys, where)  # each checked against its payload's size
    aliases = _check_aliases(doc, pending, tensors, where)
    if expect is not None:  # declared shapes against the model, before any decode buffer exists
        try:
            expect({it.key: it.shape for it in pending}, {k: tuple(t.shape) for k, t in tensors.items()}, aliases)
        except Exception as e:
            raise _Expected(e) from None
    # pass 2: decode all streams together (one vectorised pass; sizes were checked against payloads above)
    layers = _decode_layers(pending, huffman.decode_many(streams), where)
    return CompressedFile(path=where, metadata=doc, layers=layers, tensors=tensors, file_size=len(data))


def _check_layer(
    rec: Any,
    payloads: dict[str, np.ndarray],
    streams: list[huffman.HuffmanStream],
    keys: set[str],
    where: str,
    max_len: int,
    chunk: int,
) -> _PendingLayer:
    """Validate one layer record against its payload; append its streams to ``streams`` and its key to ``keys``."""
    if not isinstance(rec, dict):
        raise CorruptFileError(f"{where}: layer record is not an object")
    module, key = rec.get("module"), rec.get("key")
    param = rec.get("param", DEFAULT_PARAM)  # an optional field (container.OPTIONAL_FIELDS)
    if (
        not isinstance(module, str)
        or not isinstance(param, str)
        or not param
        or "." in param
        or key != (f"{module}.{param}" if module else param)
        or key in keys
    ):
        raise CorruptFileError(f"{where}: bad or duplicate layer module/param/key {module!r}/{param!r}/{key!r}")
    keys.add(key)
    name = target_name(module, param)
    what = f"layer {name!r}"
    shape = checked_shape(rec.get("shape"), what)
    numel = math.prod(shape)
    if checked_int(rec.get("numel"), what + ".numel") != numel:
        raise CorruptFileError(f"{where}: {what}: numel disagrees with shape {shape}")
    storage = rec.get("kind")
    has_mask = rec.get("has_mask")
    if storage not in STORAGES or has_mask is not (storage != "q"):
        raise CorruptFileError(f"{where}: {what}: unknown kind {storage!r} / has_mask {has_mask!r}")
    pay = checked_payload(payloads, rec, what, where)
    nnz = checked_int(rec.get("nnz"), what + ".nnz", 0, numel)
    item = _PendingLayer(rec=rec, name=name, key=key, shape=shape, storage=storage, nnz=nnz)
    if storage in ("pq", "q"):
        item.codebook, stream = _check_code_stream(rec, pay, storage, (nnz, numel), what, where, (max_len, chunk))
        item.code = len(streams)
        streams.append(stream)
    else:
        item.values = _float_section(rec, pay, "values", "value", ("nnz", nnz), what, where)
    if storage in ("pq", "p"):
        item.index_bits = checked_int(rec.get("index_bits"), what + ".index_bits", 1, MAX_INDEX_BITS)
        stream = read_stream(pay, rec.get("gap"), 1 << item.index_bits, what + ".gap", max_len, chunk)
        if stream.count != nnz + checked_int(rec.get("n_fill"), what + ".n_fill"):
            raise CorruptFileError(f"{where}: {what}: gap stream holds {stream.count} symbols, expected nnz+fillers")
        item.gap = len(streams)
        streams.append(stream)
    _check_tiling(rec, storage, pay.size, what, where)
    return item


def _check_aliases(doc: dict, pending: list[_PendingLayer], tensors: dict[str, torch.Tensor], where: str) -> dict:
    """The document's ``aliases`` (an optional field, ``container.OPTIONAL_FIELDS``): ``{alias key: stored key}``,
    each stored key one the file restores (a layer's key, one of the buffers its storage has, a plain tensor's) and
    each alias key none of those.

    Raises:
        CorruptFileError: not a mapping of strings, an alias naming a stored key, or a stored key the file lacks.
    """
    aliases = doc.get("aliases", DEFAULT_ALIASES)
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise CorruptFileError(f"{where}: aliases must map state-dict keys to stored keys, got {aliases!r}")
    restored = set(tensors)
    for it in pending:
        module, _, param = it.key.rpartition(".")
        roles = (["mask"] if it.storage != "q" else []) + (["codebook", "assign"] if it.storage != "p" else [])
        restored.update([it.key, *((module + "." if module else "") + buffer_name(r, param) for r in roles)])
    for alias, stored in aliases.items():
        if not alias or alias in restored or stored not in restored:
            raise CorruptFileError(
                f"{where}: alias {alias!r} -> {stored!r}: an alias must name a key the file does not store, and map "
                "it to one the file stores (a layer, one of its buffers, or a plain tensor)"
            )
    return aliases


def _check_tiling(rec: dict, storage: str, nbytes: int, what: str, where: str) -> None:
    """The sections of a layer's payload tile it in the writer's order (codebook or values, code stream, gap
    stream), so a record cannot point a section at other bytes of a payload whose checksum still holds."""
    stream_parts = ("lengths", "sync", "data")
    secs = [rec["codebook"], *(rec["code"][p] for p in stream_parts)] if storage in ("pq", "q") else [rec["values"]]
    if storage in ("pq", "p"):
        secs += [rec["gap"][p] for p in stream_parts]
    end = 0
    for off, n in secs:
        if off != end:
            raise CorruptFileError(f"{where}: {what}: sections do not tile the payload (offset {off}, expected {end})")
        end = off + n
    if end != nbytes:
        raise CorruptFileError(f"{where}: {what}: sections cover {end} of the payload's {nbytes} bytes")


def _check_code_stream(
    rec: dict, pay: np.ndarray, storage: str, counts: tuple[int, int], what: str, where: str, params: tuple[int, int]
) -> tuple[np.ndarray, huffman.HuffmanStream]:
    """``(float32 codebook, codebook-index stream)`` of a quantized layer's record; ``counts`` = (nnz, numel),
    ``params`` = the file's (max_len, chunk)."""
    nnz, numel = counts
    k = checked_int(rec.get("k"), what + ".k", 1, MAX_CODES)
    bits = checked_int(rec.get("bits"), what + ".bits", 1, 8)
    if bits != max(1, math.ceil(math.log2(k))):
        raise CorruptFileError(f"{where}: {what}: bits={bits} disagrees with codebook size {k}")
    codebook = _float_section(rec, pay, "codebook", "codebook", ("k", k), what, where)
    stream = read_stream(pay, rec.get("code"), k, what + ".code", *params)
    if stream.count != (nnz if storage == "pq" else numel) or (storage == "q" and nnz != numel):
        raise CorruptFileError(f"{where}: {what}: code stream holds {stream.count} symbols, expected nnz={nnz}")
    return codebook, stream


def _float_section(
    rec: dict, pay: np.ndarray, name: str, dtype_of: str, count: tuple[str, int], what: str, where: str
) -> np.ndarray:
    """The float32 numbers of section ``rec[name]``, stored as ``rec[dtype_of + "_dtype"]``; ``count`` = (field,
    value) says how many there must be (a codebook's ``k``, a pruned-only layer's ``nnz``)."""
    dt = rec.get(f"{dtype_of}_dtype")
    if dt not in NP_FLOAT:
        raise CorruptFileError(f"{where}: {what}: {dtype_of} dtype {dt!r}")
    raw = section(pay, rec.get(name), f"{what}.{name}")
    if raw.size != count[1] * np.dtype(NP_FLOAT[dt]).itemsize:
        raise CorruptFileError(f"{where}: {what}: {name} section size disagrees with {count[0]}={count[1]}")
    return stored_floats(raw, dt)


def _decode_layers(pending: list[_PendingLayer], decoded: list[np.ndarray], where: str) -> dict[str, CompressedLayer]:
    """The :class:`CompressedLayer` of every checked record, from its decoded streams."""
    layers: dict[str, CompressedLayer] = {}
    for it in pending:
        numel = math.prod(it.shape)
        _, C = matrix_shape(it.shape)
        if it.gap is not None:
            pos = decode_gaps(decoded[it.gap], it.index_bits, it.nnz, numel)
        else:
            pos = np.arange(numel, dtype=np.int64)
        rows, cols = positions_to_rows_cols(pos, C) if numel else (pos, pos)
        if it.name in layers:
            raise CorruptFileError(f"{where}: duplicate layer {it.name!r}")
        layers[it.name] = CompressedLayer(
            name=it.name,
            key=it.key,
            shape=it.shape,
            kind=it.storage,
            has_mask=it.storage != "q",
            bits=it.rec.get("bits"),
            index_bits=it.index_bits,
            rows=rows,
            cols=cols,
            codes=decoded[it.code].astype(np.uint8) if it.code is not None else None,
            codebook=it.codebook,
            values=it.values,
            record=it.rec,
        )
    return layers


def _read_tensors(
    tensors_meta: list, payloads: dict[str, np.ndarray], layer_keys: set[str], where: str
) -> dict[str, torch.Tensor]:
    """The plain tensors (biases, BatchNorm statistics, uncompressed weights) by state-dict key."""
    tensors: dict[str, torch.Tensor] = {}
    for rec in tensors_meta:
        if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
            raise CorruptFileError(f"{where}: tensor record is not an object with a key")
        key = rec["key"]
        what = f"tensor {key!r}"
        if key in tensors or key in layer_keys:
            raise CorruptFileError(f"{where}: duplicate tensor key {key!r}")
        src, stored = rec.get("dtype"), rec.get("stored_dtype")
        if src not in DTYPES or stored not in DTYPES:
            raise CorruptFileError(f"{where}: {what}: unknown dtype {src!r}/{stored!r}")
        if stored != src and not (src == "float32" and stored in NP_FLOAT):  # the writer's only conversion
            raise CorruptFileError(f"{where}: {what}: dtype {src!r} cannot be stored as {stored!r}")
        shape = checked_shape(rec.get("shape"), what)
        arr = checked_payload(payloads, rec, what, where)
        if arr.size != math.prod(shape) * DTYPES[stored].itemsize:
            raise CorruptFileError(f"{where}: {what}: payload size disagrees with shape {shape} and dtype {stored}")
        tensors[key] = stored_tensor(arr, shape, stored, src)
    return tensors
