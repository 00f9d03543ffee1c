"""The layer codec of the ``.dcz`` file (Deep Compression §2-§4): encode a model, decode a file.

Every pruned and/or quantized layer (the buffers of :mod:`dc_lightning.buffers`) becomes one payload of sections
(:mod:`dc_lightning.dcz.container`):

* a **relative-index stream** (:mod:`dc_lightning.dcz.relative_index`: row-major scan of ``weight.reshape(out, -1)``,
  gaps of ``index_bits`` bits, top gap symbol = filler), Huffman-coded;
* a **codebook-index stream** (one symbol per kept weight), Huffman-coded (:mod:`dc_lightning.dcz.huffman`);
* the **codebook** (``2**bits`` centroids, float32 or float16);

and every other tensor (biases, BatchNorm statistics, unpruned unquantized weights) one payload of plain bytes. A
layer that is pruned but not quantized stores its kept values at full precision next to the index stream (the
paper's pruning-only stage); a layer quantized but not pruned stores only the codebook-index stream (all positions).

The document records the library version, the model builder (docs/DESIGN.md "Model builder record"), the Huffman
parameters, and per layer: module and parameter name (``param``, ``weight`` when absent: files written before
parameter-level targets), shape, kind, bits, index_bits, nnz, filler count, stream sections, byte count and sha256.
A layer is a compressed parameter (:mod:`dc_lightning.targets`): ``fc1.weight``, but also an attention module's
``in_proj_weight`` or an LSTM's ``weight_hh_l0``; it is named like a target (``fc1``, ``attn.in_proj_weight``).
Readers validate every record against its payload *before* allocating decode buffers, then decode all streams in
one vectorised pass.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from dc_lightning import buffers
from dc_lightning.buffers import matrix_shape
from dc_lightning.dcz import huffman
from dc_lightning.dcz.container import (
    DTYPE_NAMES,
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_CHUNK,
    MAX_CODE_LEN,
    NP_FLOAT,
    SCAN_ORDER,
    CorruptFileError,
    Sections,
    checked_int,
    checked_payload,
    checked_shape,
    checksum,
    huffman_params,
    little_endian,
    load_payloads,
    read_header,
    read_stream,
    section,
    stored_floats,
    stored_tensor,
    stream_bytes,
    tensor_bytes,
    write_container,
)
from dc_lightning.dcz.relative_index import (
    MAX_INDEX_BITS,
    SparseFormatError,
    decode_gaps,
    encode_gaps,
    positions_to_rows_cols,
)
from dc_lightning.kinds import PAPER_INDEX_BITS, paper_index_bits
from dc_lightning.targets import Target, pattern_aliases, target_name
from dc_lightning.utils import resolve_per_layer

__all__ = [
    "AUTO",
    "AUTO_INDEX_BITS",
    "MAX_DENSE_EXPANSION",
    "PAPER_INDEX_BITS",
    "CompressedFile",
    "CompressedLayer",
    "build_file",
    "builder_record",
    "parse",
    "read_compressed",
]

log = logging.getLogger(__name__)

#: ``index_bits="auto"``: export tries these relative-index widths per layer and keeps the smallest coded stream
AUTO = "auto"
AUTO_INDEX_BITS = tuple(range(2, 11))
#: a file may not expand (dense state dict) to more than this many times its size, floor 1 GiB (see decompress)
MAX_DENSE_EXPANSION = 1024
_MIN_DENSE_CAP = 1 << 30
_KINDS = ("pq", "q", "p")  # pruned+quantized, quantized only, pruned only


# ------------------------------------------------------------------------------------------------ decoded view


@dataclass
class CompressedLayer:
    """One compressed layer as decoded by :func:`read_compressed` (what the inference path builds layouts from).

    The weight's matrix view is ``weight.reshape(shape[0], -1)`` of shape ``(R, C)``; entry ``k`` sits at
    ``(rows[k], cols[k])``, entries in row-major (CSR) order.

    Attributes:
        name: the target's name (:mod:`dc_lightning.targets`): the qualified module name for a ``weight``,
            ``<module>.<param>`` for another parameter (``attn.in_proj_weight``).
        key: state-dict key of the weight (``<module>.<param>``).
        shape: the weight's shape.
        kind: ``"pq"`` pruned+quantized, ``"q"`` quantized only (every position stored), ``"p"`` pruned only.
        has_mask: whether the layer carried a mask buffer (``weight_mask``).
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

    def _scatter(self, values: Any, dtype: Any) -> np.ndarray:
        r, c = matrix_shape(self.shape)
        out = np.zeros((r, c), dtype=dtype)
        out[self.rows, self.cols] = values
        return out.reshape(self.shape)

    def dense(self) -> np.ndarray:
        """The weight as a float32 array of ``shape``: ``where(mask, codebook[codes], 0)`` (or the kept values)."""
        return self._scatter(self.codebook[self.codes] if self.codes is not None else self.values, np.float32)

    def mask(self) -> np.ndarray:
        return self._scatter(True, bool)

    def assign(self) -> np.ndarray:
        return self._scatter(self.codes, np.uint8)

    @property
    def module_name(self) -> str:
        """The qualified name of the module holding the parameter."""
        return self.key.rpartition(".")[0]

    @property
    def param(self) -> str:
        """The parameter's name in its module (``weight``, ``in_proj_weight``, ``weight_hh_l0`` ...)."""
        return self.key.rpartition(".")[2]

    def buffer_key(self, kind: str) -> str:
        """The state-dict key of this layer's ``kind`` buffer (``"mask"``, ``"codebook"``, ``"assign"``)."""
        module = self.module_name
        return (module + "." if module else "") + buffers.buffer_name(kind, self.param)


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
        mask/codebook/assign buffers of :mod:`dc_lightning.buffers`.

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
                if layer.has_mask:
                    out[layer.buffer_key("mask")] = torch.from_numpy(layer.mask())
                if layer.codes is not None:
                    out[layer.buffer_key("codebook")] = torch.from_numpy(layer.codebook.copy())
                    out[layer.buffer_key("assign")] = torch.from_numpy(layer.assign())
        return out


# --------------------------------------------------------------------------------------------------- encoding


def _compressed_layers(model: nn.Module) -> dict[str, Target]:
    """The parameters carrying a mask and/or a codebook buffer, by target name, in ``named_modules()`` order."""
    out = {}
    for name, m in model.named_modules():
        for param in buffers.compressed_params(m):
            t = Target(name, param, m)
            out[t.name] = t
    return out


def _resolve_index_bits(index_bits: Any, layers: dict[str, Target]) -> dict[str, int | str]:
    names = list(layers)
    if index_bits is None:
        out = {n: paper_index_bits(t.module) for n, t in layers.items()}
    elif index_bits == AUTO:
        out = {n: AUTO for n in names}
    else:
        if isinstance(index_bits, dict) and not names:
            return {}
        out = resolve_per_layer(index_bits, names, "index_bits", default=-1, aliases=pattern_aliases(layers))
        for n, v in out.items():
            if isinstance(v, int) and not isinstance(v, bool) and v == -1:
                out[n] = paper_index_bits(layers[n].module)
    for n, v in out.items():
        if v == AUTO:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_INDEX_BITS:
            raise ValueError(f"index_bits for layer {n!r} is {v!r}; valid: an int in 1..{MAX_INDEX_BITS} or {AUTO!r}")
    return out


def _code_stream(symbols: np.ndarray, alphabet: int, max_len: int, chunk: int) -> huffman.HuffmanStream:
    """Huffman-code ``symbols``, or code them at a fixed width when that is smaller.

    A Huffman stream stores one code length per symbol of the alphabet (256 bytes for an 8-bit codebook), which costs
    more than it saves on tiny layers (LeNet-5's conv1: 330 weights). A fixed-width code is the canonical code whose
    lengths are all ``ceil(log2(alphabet))``; its length table is stored as a single byte (see
    ``Sections.add_stream``), and readers decode it exactly like any other canonical code.
    """
    coded = huffman.encode(symbols, alphabet_size=alphabet, max_len=max_len, chunk=chunk)
    width = max(1, math.ceil(math.log2(alphabet)))
    if width > max_len or not symbols.size:
        return coded
    fixed_bytes = (symbols.size * width + 7) // 8 + 1  # data + the one-byte length table (same sync table)
    if fixed_bytes < coded.data.size + alphabet:
        return huffman.encode(symbols, np.full(alphabet, width, np.uint8), chunk=chunk)
    return coded


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
        if best is None or stream_bytes(s) < stream_bytes(best[2]):
            best = (b, gaps, s)
    return best


def _unfilled_codebook(t: Target) -> bool:
    """A codebook placeholder nothing filled: all-zero codebook and assignments beside a non-zero weight (what
    early 0.1.0 builds, which registered placeholders at setup, left in checkpoints written before clustering; the
    current TrainedQuantization registers none). A real codebook cannot be all zeros then."""
    got = buffers.get_codebook(t.module, t.param)
    return got is not None and not bool(got[0].any()) and not bool(got[1].any()) and bool(t.weight.detach().any())


def _check_dtype(value: str, field_name: str) -> str:
    if value not in NP_FLOAT:
        raise ValueError(f"{field_name}={value!r} is invalid; valid: {sorted(NP_FLOAT)}")
    return value


def _violation(msg: str, strict: bool, fix: str, stored: str) -> None:
    """A layer breaking a buffer invariant: raise under ``strict``, else warn that ``stored`` values are written."""
    if strict:
        raise ValueError(msg + fix)
    warnings.warn(f"{msg}; strict=False: the file stores the {stored}, not the model's weights", stacklevel=4)


def _encode_codebook(
    t: Target, kept: np.ndarray, rows: np.ndarray, cols: np.ndarray, codebook_dtype: str, strict: bool
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(codebook, codes, bits)`` of a quantized layer, its buffers checked against the kept weights."""
    name, shape = t.name, tuple(t.weight.shape)
    cb_name, assign_name = buffers.buffer_name("codebook", t.param), buffers.buffer_name("assign", t.param)
    cb_t, assign_t = buffers.get_buffer(t.module, "codebook", t.param), buffers.get_buffer(t.module, "assign", t.param)
    if assign_t is None or tuple(assign_t.shape) != shape:
        raise ValueError(f"layer {name!r}: {cb_name} without a {assign_name} buffer of shape {shape}")
    cb = cb_t.detach().cpu().to(torch.float32).numpy().reshape(-1)
    k = cb.size
    if not 1 <= k <= 256:
        raise ValueError(f"layer {name!r}: codebook has {k} entries; valid: 1..256 (uint8 {assign_name})")
    codes = assign_t.detach().cpu().numpy().reshape(matrix_shape(shape))[rows, cols]
    if codes.size and int(codes.max()) >= k:
        raise ValueError(f"layer {name!r}: {assign_name} holds index {int(codes.max())} >= codebook size {k}")
    mismatch = int(np.count_nonzero(cb[codes].view(np.uint32) != np.ascontiguousarray(kept).view(np.uint32)))
    if mismatch:
        msg = f"layer {name!r}: {mismatch} kept weights differ from {cb_name}[{assign_name}]"
        fix = " (docs/DESIGN.md invariant); pass strict=False to store the quantized values"
        _violation(msg, strict, fix, "quantized values")
    cbs = cb.astype(NP_FLOAT[codebook_dtype])
    if codebook_dtype != "float32" and not np.array_equal(cbs.astype(np.float32), cb):
        log.info("layer %r: codebook rounded to %s (loaded weights will differ from the model's)", name, codebook_dtype)
    return cbs, codes, max(1, math.ceil(math.log2(k)))


def encode_layer(
    t: Target,
    index_bits: int | str,
    codebook_dtype: str,
    dense_dtype: str,
    strict: bool,
    max_len: int,
    chunk: int,
    quantized: bool = True,
) -> tuple[dict, np.ndarray]:
    """``(record, payload)`` of one compressed parameter (the record still lacks its payload tensor name); with
    ``quantized=False`` a codebook it carries is ignored (an unfilled placeholder).

    Raises:
        ValueError: a float weight other than float32, buffers shaped unlike the weight, or (``strict``) a weight
            that breaks the buffer invariants.
    """
    name = t.name
    w = t.weight.detach().cpu()
    if w.dtype != torch.float32:
        raise ValueError(f"layer {name!r}: weight dtype {w.dtype} is not supported; compressed layers need float32")
    shape = tuple(w.shape)
    R, C = matrix_shape(shape)
    w2 = w.numpy().reshape(R, C)
    mask_t = buffers.get_mask(t.module, t.param)
    mask_name = buffers.buffer_name("mask", t.param)
    has_mask = mask_t is not None
    if has_mask and tuple(mask_t.shape) != shape:
        raise ValueError(f"layer {name!r}: {mask_name} shape {tuple(mask_t.shape)} != weight shape {shape}")
    rows, cols = buffers.sparse_coordinates(shape, mask_t)  # every position without a mask
    kept = w2[rows, cols]
    if has_mask:
        outside = int(np.count_nonzero(w2)) - int(np.count_nonzero(kept))
        if outside:
            msg = f"layer {name!r}: {outside} weights outside {mask_name} are non-zero (docs/DESIGN.md invariant)"
            fix = "; re-apply the masks or pass strict=False to store the masked weights"
            _violation(msg, strict, fix, "masked weights")
    rec: dict[str, Any] = {
        "module": t.module_name,
        "param": t.param,
        "key": t.full_name,
        "shape": list(shape),
        "has_mask": has_mask,
        "numel": R * C,
    }
    pay = Sections()
    if quantized and buffers.get_buffer(t.module, "codebook", t.param) is not None:
        cbs, codes, bits = _encode_codebook(t, kept, rows, cols, codebook_dtype, strict)
        rec.update(
            kind="pq" if has_mask else "q",
            bits=bits,
            k=int(cbs.size),
            codebook_dtype=codebook_dtype,
            codebook=pay.add(little_endian(cbs)),
        )
        rec["code"] = pay.add_stream(_code_stream(codes, int(cbs.size), max_len, chunk))
    else:
        if not has_mask:
            raise AssertionError("layer without mask or codebook is not a compressed layer")
        vals = np.ascontiguousarray(kept).astype(NP_FLOAT[dense_dtype])
        rec.update(kind="p", bits=None, k=None, value_dtype=dense_dtype, values=pay.add(little_endian(vals)))
        rec["code"] = None
    if has_mask:
        pos = rows * C + cols
        width, gaps, stream = _gap_stream(pos, index_bits, max_len, chunk)
        rec.update(index_bits=width, nnz=int(pos.size), n_fill=int(gaps.size - pos.size))
        rec["gap"] = pay.add_stream(stream)
    else:
        rec.update(index_bits=None, nnz=R * C, n_fill=0, gap=None)
    arr = pay.array()
    rec["nbytes"] = int(arr.size)
    rec["sha256"] = checksum(arr)
    return rec, arr


def builder_record(model: nn.Module, builder: dict | None = None) -> dict | None:
    """The model builder the file records: ``builder``, else ``model.dc_builder``, else the class import path and,
    for a LightningModule, its ``hparams`` as kwargs (docs/DESIGN.md "Model builder record"). ``None`` (with a
    warning) when the record is not JSON-serialisable.

    Raises:
        ValueError: the record is not ``{"callable": "pkg.mod:Name", "kwargs": {...}}``.
    """
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


def _tensor_record(key: str, t: torch.Tensor, dense_dtype: str, payload_name: str) -> tuple[dict, np.ndarray]:
    """``(record, payload)`` of a plain state-dict tensor (float32 stored as ``dense_dtype``)."""
    if t.dtype not in DTYPE_NAMES:
        raise ValueError(f"state-dict entry {key!r} has unsupported dtype {t.dtype}; valid: {sorted(DTYPES)}")
    src = DTYPE_NAMES[t.dtype]
    stored = dense_dtype if t.dtype == torch.float32 else src
    arr = tensor_bytes(t.to(DTYPES[stored]))
    rec = {
        "key": key,
        "dtype": src,
        "stored_dtype": stored,
        "shape": list(t.shape),
        "tensor": payload_name,
        "nbytes": int(arr.size),
        "sha256": checksum(arr),
    }
    return rec, arr


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
    """Encode ``model`` into (document, file bytes) without writing anything (see
    :func:`dc_lightning.io.save_compressed` for the arguments)."""
    from dc_lightning import __version__

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_dtype(codebook_dtype, "codebook_dtype")
    _check_dtype(dense_dtype, "dense_dtype")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= MAX_CODE_LEN:
        raise ValueError(f"max_len={max_len!r}; valid: an int in 1..{MAX_CODE_LEN} (the readers' bound)")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= MAX_CHUNK:
        raise ValueError(f"chunk={chunk!r}; valid: an int in 1..{MAX_CHUNK}")
    layers = all_layers = _compressed_layers(model)
    unfilled = {n for n, t in layers.items() if _unfilled_codebook(t)}
    if unfilled:
        log.warning("layers %s carry all-zero codebook placeholders (never clustered); stored as not quantized",
                    sorted(unfilled))
    layers = {n: t for n, t in layers.items() if n not in unfilled or buffers.get_mask(t.module, t.param) is not None}
    ib = _resolve_index_bits(index_bits, layers)
    payloads: dict[str, np.ndarray] = {}
    meta_layers, meta_tensors = [], []
    consumed: set[str] = set()
    for i, (name, t) in enumerate(layers.items()):
        rec, arr = encode_layer(t, ib[name], codebook_dtype, dense_dtype, strict, max_len, chunk, name not in unfilled)
        rec["tensor"] = f"layer.{i:04d}"
        payloads[rec["tensor"]] = arr
        meta_layers.append(rec)
        prefix = f"{t.module_name}." if t.module_name else ""
        consumed.update((t.full_name, *buffers.buffer_keys(prefix, t.param)))
    consumed.update(
        k for t in all_layers.values() if t.name in unfilled
        for k in buffers.buffer_keys(f"{t.module_name}." if t.module_name else "", t.param)
    )
    for i, (key, t) in enumerate((k, v) for k, v in model.state_dict().items() if k not in consumed):
        rec, arr = _tensor_record(key, t, dense_dtype, f"tensor.{i:04d}")
        payloads[rec["tensor"]] = arr
        meta_tensors.append(rec)
    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "builder": builder_record(model, builder),
        "huffman": {"max_len": max_len, "chunk": chunk},
        "scan_order": SCAN_ORDER,
        "layers": meta_layers,
        "tensors": meta_tensors,
    }
    return doc, write_container(payloads, doc)


# --------------------------------------------------------------------------------------------------- decoding


@dataclass
class _PendingLayer:
    """A layer record validated against its payload, its streams collected but not decoded yet."""

    rec: dict
    name: str
    key: str
    shape: tuple[int, ...]
    kind: str
    nnz: int
    index_bits: int | None = None
    codebook: np.ndarray | None = None
    values: np.ndarray | None = None
    code: int | None = None  # index of the codebook-index stream in the list handed to decode_many
    gap: int | None = None  # index of the relative-index stream


_Expect = Callable[[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]], None]


def read_compressed(
    path: str | os.PathLike, expect: _Expect | None = None
) -> CompressedFile:
    """Read and fully validate a ``.dcz`` file; decode every layer's streams.

    The result holds, per compressed layer, a :class:`CompressedLayer` with ``rows``/``cols`` (int64, CSR order),
    ``codes`` (uint8) and ``codebook`` (float32) or ``values``, and the plain tensors as torch tensors. The
    inference path builds its GPU layouts from these; :func:`dc_lightning.dcz.relative_index.eie_layout` derives EIE's.

    ``expect``, when given, is called with ``{state-dict key: shape}`` of the layers and of the plain tensors the file
    declares, after the records are validated and before anything is decoded (``load_compressed`` checks them
    against the model there); what it raises propagates unchanged.

    Raises:
        CorruptFileError: any inconsistency (see :mod:`dc_lightning.dcz`); FileNotFoundError if ``path`` is missing.
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


def parse(
    data: bytes, where: str, expect: _Expect | None = None
) -> CompressedFile:
    """Decode a ``.dcz`` file's bytes (``where`` names it in errors); see :func:`read_compressed`."""
    try:
        return _parse(data, where, expect)
    except _Expected as e:
        raise e.args[0] from None


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
    if expect is not None:  # declared shapes against the model, before any decode buffer exists
        try:
            expect({it.key: it.shape for it in pending}, {k: tuple(t.shape) for k, t in tensors.items()})
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
    param = rec.get("param", buffers.WEIGHT)  # absent in files written before parameter-level targets
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
    kind = rec.get("kind")
    has_mask = rec.get("has_mask")
    if kind not in _KINDS or has_mask is not (kind != "q"):
        raise CorruptFileError(f"{where}: {what}: unknown kind {kind!r} / has_mask {has_mask!r}")
    pay = checked_payload(payloads, rec, what, where)
    nnz = checked_int(rec.get("nnz"), what + ".nnz", 0, numel)
    item = _PendingLayer(rec=rec, name=name, key=key, shape=shape, kind=kind, nnz=nnz)
    if kind in ("pq", "q"):
        item.codebook, stream = _check_code_stream(rec, pay, kind, (nnz, numel), what, where, (max_len, chunk))
        item.code = len(streams)
        streams.append(stream)
    else:
        item.values = _float_section(rec, pay, "values", "value", ("nnz", nnz), what, where)
    if kind in ("pq", "p"):
        item.index_bits = checked_int(rec.get("index_bits"), what + ".index_bits", 1, MAX_INDEX_BITS)
        stream = read_stream(pay, rec.get("gap"), 1 << item.index_bits, what + ".gap", max_len, chunk)
        if stream.count != nnz + checked_int(rec.get("n_fill"), what + ".n_fill"):
            raise CorruptFileError(f"{where}: {what}: gap stream holds {stream.count} symbols, expected nnz+fillers")
        item.gap = len(streams)
        streams.append(stream)
    _check_tiling(rec, kind, pay.size, what, where)
    return item


def _check_tiling(rec: dict, kind: str, nbytes: int, what: str, where: str) -> None:
    """The sections of a layer's payload tile it in the writer's order (codebook or values, code stream, gap
    stream), so a record cannot point a section at other bytes of a payload whose checksum still holds."""
    stream_parts = ("lengths", "sync", "data")
    secs = [rec["codebook"], *(rec["code"][p] for p in stream_parts)] if kind in ("pq", "q") else [rec["values"]]
    if kind in ("pq", "p"):
        secs += [rec["gap"][p] for p in stream_parts]
    end = 0
    for off, n in secs:
        if off != end:
            raise CorruptFileError(f"{where}: {what}: sections do not tile the payload (offset {off}, expected {end})")
        end = off + n
    if end != nbytes:
        raise CorruptFileError(f"{where}: {what}: sections cover {end} of the payload's {nbytes} bytes")


def _check_code_stream(
    rec: dict, pay: np.ndarray, kind: str, counts: tuple[int, int], what: str, where: str, params: tuple[int, int]
) -> tuple[np.ndarray, huffman.HuffmanStream]:
    """``(float32 codebook, codebook-index stream)`` of a quantized layer's record; ``counts`` = (nnz, numel),
    ``params`` = the file's (max_len, chunk)."""
    nnz, numel = counts
    k = checked_int(rec.get("k"), what + ".k", 1, 256)
    bits = checked_int(rec.get("bits"), what + ".bits", 1, 8)
    if bits != max(1, math.ceil(math.log2(k))):
        raise CorruptFileError(f"{where}: {what}: bits={bits} disagrees with codebook size {k}")
    codebook = _float_section(rec, pay, "codebook", "codebook", ("k", k), what, where)
    stream = read_stream(pay, rec.get("code"), k, what + ".code", *params)
    if stream.count != (nnz if kind == "pq" else numel) or (kind == "q" and nnz != numel):
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
            kind=it.kind,
            has_mask=it.kind != "q",
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
