"""Save a model as one ``.dcz`` file and load it back (the file format itself is :mod:`dc_lightning.dcz`).

``save_compressed(model, path)`` writes every pruned and/or quantized layer (the buffers of
:mod:`dc_lightning.buffers`) as Huffman-coded relative-index and codebook-index streams and every other tensor as
plain bytes, atomically. ``load_compressed(path)`` rebuilds the model from the recorded builder (docs/DESIGN.md
"Model builder record"; :func:`build_from_record`) or loads into a given one, and re-attaches the buffers.
``decompress`` writes the dense weights as a plain safetensors state dict.

Example::

    from dc_lightning.io import save_compressed, load_compressed

    report = save_compressed(model, "vgg16.dcz")
    print(report.to_markdown())
    model2 = load_compressed("vgg16.dcz")  # rebuilt from the recorded builder, buffers re-attached
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dc_lightning import buffers
from dc_lightning.dcz import (
    EXTENSION,
    FORMAT_NAME,
    FORMAT_VERSION,
    CompressedFile,
    CompressedLayer,
    CorruptFileError,
    build_file,
    read_compressed,
)
from dc_lightning.report import Report
from dc_lightning.utils import atomic_write

__all__ = [
    "EXTENSION",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CompressedFile",
    "CompressedLayer",
    "CorruptFileError",
    "build_from_record",
    "decompress",
    "import_callable",
    "load_compressed",
    "read_compressed",
    "save_compressed",
]


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

    Layers carrying a mask and/or a codebook + assignments (:mod:`dc_lightning.buffers`) are stored as
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


# --------------------------------------------------------------------------------------------------- loading


_TRUSTED_PREFIXES = ("dc_lightning.", "torchvision.models")


def import_callable(spec: str) -> Any:
    """The object a ``"pkg.module:QualName"`` string names (imported; no trust check: see :func:`build_from_record`).

    Raises:
        ValueError: ``spec`` is not of that form.
        ImportError, AttributeError: the module or the name does not exist.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"builder callable {spec!r} is not of the form 'pkg.module:QualName'")
    mod_name, qual = spec.split(":", 1)
    obj: Any = importlib.import_module(mod_name)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def _trusted_callable(spec: str) -> Any:
    obj = import_callable(spec)
    mod_name = spec.split(":", 1)[0]
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
    fn = _trusted_callable(builder.get("callable"))
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


def load_compressed(
    path: str | os.PathLike, model: nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Load a ``.dcz`` file into ``model`` (or a model rebuilt from the recorded builder).

    Weights are bit-for-bit the pruned+quantized weights that were saved (with float32 codebooks/values), and the
    mask/codebook/assign buffers (:mod:`dc_lightning.buffers`) are re-attached to the compressed parameters (a
    ``weight``, an attention module's ``in_proj_weight``, an LSTM's ``weight_hh_l0`` ...), so the
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
    buffer_keys: set[str] = set()
    for layer in cf.layers.values():
        m = modules.get(layer.module_name)
        weight = getattr(m, layer.param, None) if m is not None else None
        if not isinstance(weight, torch.Tensor):
            raise CorruptFileError(
                f"{path}: layer {layer.name!r} of the file does not exist in the model (no tensor {layer.key!r})"
            )
        if tuple(weight.shape) != layer.shape:
            raise CorruptFileError(
                f"{path}: layer {layer.name!r} has shape {layer.shape} in the file but {tuple(weight.shape)} in "
                "the model"
            )
        buffer_keys.update(layer.buffer_key(kind) for kind in buffers.KINDS)
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
            m, param = modules[layer.module_name], layer.param
            weight = getattr(m, param)
            weight.copy_(torch.from_numpy(layer.dense()).to(weight.dtype))  # in place: RNN flat weights stay valid
            if layer.has_mask:
                buffers.set_mask(m, torch.from_numpy(layer.mask()), param)
            elif buffers.get_mask(m, param) is not None:
                buffers.get_mask(m, param).fill_(True)
            if layer.codes is not None:
                codebook, assign = torch.from_numpy(layer.codebook.copy()), torch.from_numpy(layer.assign())
                buffers.set_codebook(m, codebook, assign, param)
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
