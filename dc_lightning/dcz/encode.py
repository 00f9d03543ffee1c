"""Encoding a model into a ``.dcz`` file (Deep Compression §2-§4): :func:`build_file`.

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
parameter-level targets), shape, storage (field ``kind``: ``pq``/``q``/``p``), bits, index_bits, nnz, filler count,
stream sections, byte count and sha256.
A layer is a compressed parameter (:mod:`dc_lightning.targets`): ``fc1.weight``, but also an attention module's
``in_proj_weight`` or an LSTM's ``weight_hh_l0``; it is named like a target (``fc1``, ``attn.in_proj_weight``).
:mod:`dc_lightning.dcz.decode` reads it back.

**Tied weights are stored once.** A state-dict entry that is the same tensor object as an earlier one
(``decoder.weight = embedding.weight``, a module registered under two names) is not stored again: the document's
optional ``aliases`` maps its key to the key the file stores it under (``{"decoder.weight": "embedding.weight"}``;
a compressed parameter and its buffers under its layer's keys), written only when the model has ties.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from dc_lightning import buffers
from dc_lightning.buffers import MAX_CODES, matrix_shape
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
    Sections,
    checksum,
    little_endian,
    stream_bytes,
    tensor_bytes,
    write_container,
)
from dc_lightning.dcz.relative_index import MAX_INDEX_BITS, encode_gaps
from dc_lightning.kinds import named_type, paper_index_bits
from dc_lightning.targets import Target, pattern_aliases
from dc_lightning.utils import resolve_per_layer

__all__ = [
    "AUTO",
    "AUTO_INDEX_BITS",
    "build_file",
    "builder_record",
    "encode_layer",
]

log = logging.getLogger(__name__)

#: ``index_bits="auto"``: export tries these relative-index widths per layer and keeps the smallest coded stream
AUTO = "auto"
AUTO_INDEX_BITS = tuple(range(2, 11))
#: Hugging Face models: their builder record carries their config (:func:`builder_record`)
_PRETRAINED = named_type("transformers.modeling_utils.PreTrainedModel")


# --------------------------------------------------------------------------------------------------- encoding


def _compressed_layers(model: nn.Module) -> tuple[dict[str, Target], list[tuple[Target, Target]]]:
    """The parameters carrying a mask and/or a codebook buffer, by target name, in ``named_modules()`` order, and
    ``(first, other)`` for every other holder of a tied parameter that carries buffers too (stored once, under the
    first holder; the other holder's buffers must describe the same state).

    Raises:
        ValueError: two holders of one parameter carry different compression buffers.
    """
    out: dict[str, Target] = {}
    first: dict[int, Target] = {}
    repeats = []
    for name, m in model.named_modules():
        for param in buffers.compressed_params(m):
            t = Target(name, param, m)
            seen = first.setdefault(id(t.weight), t)
            if seen is t:
                out[t.name] = t
                continue
            for role in buffers.KINDS:
                a, b = buffers.get_buffer(seen.module, role, seen.param), buffers.get_buffer(m, role, param)
                if not (a is b or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b))):
                    raise ValueError(
                        f"layers {seen.name!r} and {t.name!r} share one parameter ({t.full_name} is "
                        f"{seen.full_name}) but carry different {buffers.buffer_name(role, param)} buffers; a tied "
                        f"weight has one compression state: keep it on {seen.module_name!r} only"
                    )
            repeats.append((seen, t))
    return out, repeats


def _aliases(model: nn.Module, layers: dict[str, Target], repeats: list[tuple[Target, Target]]) -> dict[str, str]:
    """``{alias key: stored key}`` (the document's optional ``aliases``): every state-dict entry that is the same
    tensor object as an earlier one (a tied parameter, the tensors of a module registered under two names) names the
    key the file stores it under: a compressed parameter and its buffers are stored under their layer's keys, and the
    buffers of another holder of a tied compressed parameter alias the first holder's. A key a layer record restores
    is never an alias (two layers may share a codebook tensor: each record holds its own copy)."""
    first: dict[int, str] = {}
    restored: set[str] = set()
    aliases: dict[str, str] = {}
    for t in layers.values():
        first.setdefault(id(t.weight), t.full_name)
        restored.add(t.full_name)
        for role in buffers.KINDS:
            b = buffers.get_buffer(t.module, role, t.param)
            if b is not None:
                key = _prefix(t) + buffers.buffer_name(role, t.param)
                first.setdefault(id(b), key)
                restored.add(key)
    for seen, t in repeats:  # equal (not identical) buffers of another holder: the same state, stored once
        for role in buffers.KINDS:
            if buffers.get_buffer(t.module, role, t.param) is not None:
                aliases[_prefix(t) + buffers.buffer_name(role, t.param)] = _prefix(seen) + buffers.buffer_name(
                    role, seen.param
                )
    for key, value in model.state_dict(keep_vars=True).items():
        stored = first.setdefault(id(value), key)
        if stored != key and key not in restored:
            aliases.setdefault(key, stored)
    return aliases


def _prefix(t: Target) -> str:
    return f"{t.module_name}." if t.module_name else ""


def _restored_keys(records: list[dict]) -> set[str]:
    """The state-dict keys a reader restores from layer records: each parameter and the buffers its storage has."""
    out = set()
    for rec in records:
        prefix, param = (rec["module"] + "." if rec["module"] else ""), rec["param"]
        roles = (["mask"] if rec["has_mask"] else []) + (["codebook", "assign"] if rec["kind"] != "p" else [])
        out.update([rec["key"], *(prefix + buffers.buffer_name(role, param) for role in roles)])
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
    if not 1 <= k <= MAX_CODES:
        raise ValueError(f"layer {name!r}: codebook has {k} entries; valid: 1..{MAX_CODES} (uint8 {assign_name})")
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
    """The model builder the file records: ``builder``, else ``model.dc_builder``, else the class import path with,
    for a Hugging Face ``transformers.PreTrainedModel``, its config (``{"callable": ..., "config":
    model.config.to_dict()}``; :func:`dc_lightning.io.build_from_record` rebuilds it as ``cls(cls.config_class
    .from_dict(config))``) or, for a LightningModule, its ``hparams`` as kwargs (docs/DESIGN.md "Model builder
    record"). ``None`` (with a warning) when the record is not JSON-serialisable.

    Raises:
        ValueError: the record is not ``{"callable": "pkg.mod:Name", "kwargs": {...}}`` (plus an optional
            ``"config": {...}``).
    """
    rec = builder if builder is not None else getattr(model, "dc_builder", None)
    if rec is None:
        cls = type(model)
        rec = {"callable": f"{cls.__module__}:{cls.__qualname__}"}
        if isinstance(model, _PRETRAINED):  # transformers is optional: recognised by name, never imported here
            rec["config"] = model.config.to_dict()
        else:
            hp = getattr(model, "hparams", None)
            rec["kwargs"] = dict(hp) if hp is not None else {}
    try:
        rec = json.loads(json.dumps(rec))
    except (TypeError, ValueError):
        log.warning("model builder %r is not JSON-serialisable; load_compressed will need model=", rec)
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("callable"), str):
        raise ValueError(f"builder must be {{'callable': 'pkg.mod:Name', 'kwargs': {{...}}}}, got {rec!r}")
    if not isinstance(rec.get("config", {}), dict):
        raise ValueError(f"builder config must be a mapping (a transformers config's to_dict()), got {rec['config']!r}")
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
    all_layers, repeats = _compressed_layers(model)
    layers = all_layers
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
    found = _aliases(model, layers, repeats)
    consumed.update(found)  # never stored twice; an alias of a dropped tensor (a placeholder's buffers) is dropped
    restored = _restored_keys(meta_layers)
    aliases = {k: v for k, v in found.items() if v not in consumed or v in restored}
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
    if aliases:  # an optional field (container.OPTIONAL_FIELDS): files without ties keep their bytes
        doc["aliases"] = aliases
    return doc, write_container(payloads, doc)
