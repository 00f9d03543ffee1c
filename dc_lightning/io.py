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

import fnmatch
import importlib
import importlib.machinery
import inspect
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dc_lightning import buffers
from dc_lightning.dcz import build_file, read_compressed, read_header
from dc_lightning.report import Report
from dc_lightning.utils import atomic_write

__all__ = [
    "ModelMismatchError",
    "TRUSTED_BUILDERS",
    "build_from_record",
    "decompress",
    "import_callable",
    "load_compressed",
    "save_compressed",
]

log = logging.getLogger(__name__)


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
            differ from ``codebook[assign]``); with ``False`` the masked/quantized values are stored instead, with a
            ``UserWarning`` naming the layer and the count. An unfilled all-zero codebook placeholder (in checkpoints
            that early 0.1.0 builds wrote before clustering) is not a codebook: the layer is stored as not quantized.

    Returns:
        The :class:`dc_lightning.report.Report` of the written file.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: bad arguments or a layer violating the buffer invariants (``strict``).

    Warns:
        UserWarning: (once per class) ``load_compressed(path)`` will not be able to rebuild the model without
            ``model=``, and why.

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
    _warn_if_not_rebuildable(model, meta.get("builder"), builder is not None)
    return Report.from_metadata(meta, file_size=len(data), source=str(path))


_WARNED: set[str] = set()


def _rebuild_problem(model: nn.Module, record: dict | None, explicit: bool) -> str | None:
    """Why ``load_compressed(path)`` (no ``model=``) cannot rebuild ``model`` from its builder ``record``, or None."""
    if record is None:
        return "its builder record is not JSON-serialisable"
    mod_name = record["callable"].split(":", 1)[0]
    if mod_name == "__main__":
        return f"its class {record['callable']!r} is defined in a script (__main__), which no other process can import"
    top = mod_name.split(".", 1)[0]
    if top not in sys.builtin_module_names and importlib.machinery.PathFinder.find_spec(top, sys.path) is None:
        return f"its module {mod_name!r} is not importable from sys.path (loaded from a file path, or not installed)"
    if explicit or record.get("config") is not None or any(
        getattr(model, a, None) is not None for a in ("dc_builder", "hparams")
    ):
        return None
    try:
        params = list(inspect.signature(type(model).__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    named = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if named:
        return (
            f"the file records {record['callable']}() without arguments (the class takes {named}); a model built "
            "with other arguments will not match the file"
        )
    return None


def _warn_if_not_rebuildable(model: nn.Module, record: dict | None, explicit: bool) -> None:
    """Warn once per builder when a file cannot be loaded without ``model=`` (docs/DESIGN.md "Model builder record")."""
    problem = _rebuild_problem(model, record, explicit)
    key = f"{type(model).__module__}:{type(model).__qualname__}:{problem}"
    if problem is None or key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        f"save_compressed: load_compressed(path) will not be able to rebuild this model: {problem}. Load it with "
        "load_compressed(path, model=...), or record how to build it: model.dc_builder = {'callable': "
        "'pkg.module:builder', 'kwargs': {...}} or save_compressed(..., builder=...)",
        UserWarning,
        stacklevel=3,
    )


# --------------------------------------------------------------------------------------------------- loading


class ModelMismatchError(ValueError):
    """The file is readable but does not fit the model it is loaded into: a layer or tensor the model lacks, one
    the file lacks, or a shape that differs (the message names the key and both shapes). Not a
    :class:`CorruptFileError`: the file may be fine, the model is another one."""


#: what a file's builder record may name without the caller's opt-in (``trusted=``): the package's own builders and
#: torchvision's model builders. Patterns: ``"pkg.mod:Name"`` (fnmatch on the whole spec) or ``"pkg.*"`` (a package
#: and everything under it).
TRUSTED_BUILDERS = (
    "dc_lightning.models:build_model",
    "dc_lightning.models:LeNet300100",
    "dc_lightning.models:LeNet5",
    "dc_lightning.models:alexnet",
    "dc_lightning.models:vgg16",
    "dc_lightning.module:ClassifierModule",
    "dc_lightning.module:LanguageModule",
    "torchvision.models.*",
)


def import_callable(spec: str) -> Any:
    """The object a ``"pkg.module:QualName"`` string names (imported; no trust check: see :func:`build_from_record`).

    Raises:
        ValueError: ``spec`` is not of that form, or its module or name cannot be found (the message says which and
            why: a class defined in ``__main__``, a module not on ``sys.path``).
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"{spec!r} is not of the form 'pkg.module:QualName' (e.g. 'mymodels:SmallCNN')")
    mod_name, qual = spec.split(":", 1)
    if mod_name == "__main__":
        raise ValueError(
            f"{spec!r} names a class defined in a script (__main__) when the file was written; another process "
            "cannot import it. Move the class into an importable module, or build the model yourself and pass it "
            "(model=...)"
        )
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(
            f"{spec!r}: cannot import module {mod_name!r} ({type(e).__name__}: {e}); is its package installed or its "
            "folder on sys.path (PYTHONPATH=...)? Otherwise build the model yourself and pass it (model=...)"
        ) from None
    for part in qual.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{spec!r}: module {mod_name!r} has no attribute {qual!r}")
        obj = getattr(obj, part)
    return obj


def _matches(spec_or_module: str, patterns: Any) -> bool:
    mod = spec_or_module.split(":", 1)[0]
    for pat in patterns:
        if ":" in pat:
            if ":" in spec_or_module and fnmatch.fnmatchcase(spec_or_module, pat):
                return True
        elif fnmatch.fnmatchcase(mod, pat) or (pat.endswith(".*") and mod == pat[:-2]):
            return True
    return False


def _check_trusted(trusted: Any) -> tuple[str, ...] | bool:
    if trusted is True:
        return True
    if trusted is None or trusted is False:
        return ()
    if isinstance(trusted, str) or not all(isinstance(p, str) and p for p in trusted):
        raise TypeError(f"trusted={trusted!r}; valid: None, True, or a list of patterns such as ['mypkg.*']")
    return tuple(trusted)


def _trusted_callable(spec: Any, trusted: tuple[str, ...] | bool, where: str) -> Any:
    """The builder a record names, imported only when ``spec`` is on the allowlist (:data:`TRUSTED_BUILDERS` plus
    ``trusted``), and accepted only when the object found is defined in an allowed module too (so an allowed module
    cannot hand out something it merely imports)."""
    allowed = TRUSTED_BUILDERS + (trusted if isinstance(trusted, tuple) else ())
    module = spec.split(":", 1)[0] if isinstance(spec, str) else "pkg"
    hint = (
        # a class of a script (__main__) cannot be imported by another process: trusting it would not help
        "build the model yourself and pass it (load_compressed(path, model=...); dc-lightning: --model "
        "pkg.module:builder)"
        + ("" if module == "__main__" else f", or, if you trust the file, allow its builder: trusted=['{module}.*']")
    )
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"{where}: builder callable {spec!r} is not of the form 'pkg.module:QualName'; {hint}")
    if trusted is not True and not _matches(spec, allowed):
        raise ValueError(
            f"{where}: builder {spec!r} is neither an nn.Module class of a trusted module nor a builder on the "
            f"allowlist {list(TRUSTED_BUILDERS)}; nothing was imported. To load it, {hint}"
        )
    obj = import_callable(spec)
    home = f"{getattr(obj, '__module__', '')}:{getattr(obj, '__qualname__', '')}"
    if trusted is not True and not (_matches(home, allowed) or _matches(home.split(":", 1)[0], allowed)):
        raise ValueError(f"{where}: builder {spec!r} resolves to {home!r}, which is not on the allowlist; {hint}")
    if not callable(obj):
        raise ValueError(f"{where}: builder {spec!r} is not callable")
    return obj


def build_from_record(builder: dict | None, where: str = "file", trusted: Any = None) -> nn.Module:
    """Instantiate a model from a builder record ``{"callable": "pkg.mod:Name", "kwargs": {...}}``, or, when the record
    has a ``"config"`` (a Hugging Face model's ``config.to_dict()``), ``Name(Name.config_class.from_dict(config),
    **kwargs)``.

    Nothing is imported or called unless the callable is on the allowlist: :data:`TRUSTED_BUILDERS` (this package's
    builders, ``torchvision.models``) plus the caller's ``trusted`` patterns (``["mypkg.*"]``, ``["transformers.*"]``),
    or ``trusted=True`` (any callable: only for files you trust as you trust code, like ``trust_remote_code=True``).
    The config goes only to the trusted class's own ``config_class``.

    Raises:
        ValueError: no record, an untrusted or unimportable callable, a config for a class without ``config_class``,
            or the builder failed; the message says to pass ``model=`` (or ``trusted=``).
        TypeError: ``trusted`` is not None, True or a list of patterns.
    """
    allowed = _check_trusted(trusted)
    if not builder:
        raise ValueError(f"{where} records no model builder; pass the model: load_compressed(path, model=...)")
    if not isinstance(builder, dict):
        raise ValueError(
            f"{where}: the builder record {builder!r} is not a mapping {{'callable': ..., 'kwargs': ...}}; pass the "
            "model: load_compressed(path, model=...)"
        )
    spec = builder.get("callable")
    try:
        fn = _trusted_callable(spec, allowed, where)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    kwargs = builder.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where}: builder kwargs {kwargs!r} are not a mapping")
    config = builder.get("config")  # an optional field (dcz.container.OPTIONAL_FIELDS): absent = kwargs only
    args: tuple = ()
    if config is not None:
        config_class = getattr(fn, "config_class", None) if isinstance(fn, type) else None
        if not isinstance(config, dict) or not callable(getattr(config_class, "from_dict", None)):
            raise ValueError(
                f"{where}: builder {spec} records a config ({type(config).__name__}) but is not a class with a "
                "config_class (a transformers PreTrainedModel); pass the model: load_compressed(path, model=...)"
            )
        try:
            args = (config_class.from_dict(config),)
        except Exception as e:
            raise ValueError(
                f"{where}: {config_class.__name__}.from_dict(<the file's config>) failed ({type(e).__name__}: {e}); "
                "pass the model: load_compressed(path, model=...)"
            ) from e
    try:
        model = fn(*args, **kwargs)
    except Exception as e:
        call = f"{spec}({config_class.__name__}(...), **{kwargs})" if args else f"{spec}(**{kwargs})"
        raise ValueError(
            f"{where}: rebuilding the model with {call} failed ({type(e).__name__}: {e}); "
            "pass the model: load_compressed(path, model=...)"
        ) from e
    if not isinstance(model, nn.Module):
        raise ValueError(f"{where}: builder {spec} returned {type(model).__name__}, not an nn.Module")
    return model


def _expect_model(model: nn.Module, where: str, rebuilt: str | None) -> Any:
    """The ``expect`` check of :func:`dc_lightning.dcz.read_compressed`: the file's declared keys and shapes against
    ``model``, before anything is decoded. ``rebuilt`` names the builder when the model was rebuilt from the file."""
    hint = (
        f"; the model was rebuilt as {rebuilt} from the file's builder record, which may lack its constructor "
        "arguments: build the model yourself and pass it (load_compressed(path, model=...))"
        if rebuilt
        else ""
    )

    def check(layers: dict[str, tuple[int, ...]], tensors: dict[str, tuple[int, ...]], aliases: dict[str, str]) -> None:
        modules = dict(model.named_modules())
        sd = model.state_dict()
        allowed_missing: set[str] = set()
        for key, shape in layers.items():
            name, _, param = key.rpartition(".")  # a compressed parameter's state-dict key
            weight = getattr(modules.get(name), param, None)
            if not isinstance(weight, torch.Tensor):
                raise ModelMismatchError(f"{where}: tensor {key!r} of the file does not exist in the model{hint}")
            if tuple(weight.shape) != shape:
                raise ModelMismatchError(
                    f"{where}: parameter {key!r} has shape {shape} in the file but {tuple(weight.shape)} in the model"
                    + hint
                )
            allowed_missing.update(buffers.buffer_keys(name + "." if name else "", param))
        optional = set()  # aliases of compression buffers: state the loader attaches to the stored holder only
        for alias, stored in aliases.items():
            shape = layers.get(stored, tensors.get(stored))
            if shape is None:
                optional.add(alias)
            elif alias in sd and tuple(sd[alias].shape) != shape:
                raise ModelMismatchError(
                    f"{where}: {alias!r} is stored as {stored!r} (tied weights) of shape {shape}, but the model's "
                    f"{alias!r} has shape {tuple(sd[alias].shape)}{hint}"
                )
            if stored in layers:  # another holder of a compressed parameter may carry its buffers too
                module, _, param = alias.rpartition(".")
                allowed_missing.update(buffers.buffer_keys(module + "." if module else "", param))
        file_keys = set(layers) | set(tensors) | set(aliases)
        missing = sorted(k for k in sd if k not in file_keys and k not in allowed_missing)
        unexpected = sorted(k for k in file_keys if k not in sd and k not in optional)
        if missing or unexpected:
            raise ModelMismatchError(
                f"{where}: file and model disagree; missing from the file: {missing[:10]}, not in the model: "
                f"{unexpected[:10]}{hint}"
            )
        for key, shape in tensors.items():
            if tuple(sd[key].shape) != shape:
                raise ModelMismatchError(
                    f"{where}: tensor {key!r} has shape {shape} in the file but {tuple(sd[key].shape)} in the model"
                    + hint
                )

    return check


def load_compressed(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
    *,
    trusted: Any = None,
) -> nn.Module:
    """Load a ``.dcz`` file into ``model`` (or a model rebuilt from the recorded builder).

    Weights are bit-for-bit the pruned+quantized weights that were saved (with float32 codebooks/values), and the
    mask/codebook/assign buffers (:mod:`dc_lightning.buffers`) are re-attached to the compressed parameters (a
    ``weight``, an attention module's ``in_proj_weight``, an LSTM's ``weight_hh_l0`` ...), so the
    model can keep training with the compression callbacks or be converted with ``to_compressed_inference``.
    Tied weights (the file's ``aliases``) come back tied: a model that holds them as two parameters is re-tied, with
    a logged warning (see :func:`_restore_aliases`).

    Without ``model``, the file's builder record is used only when it names this package's builders or
    ``torchvision.models`` (:data:`TRUSTED_BUILDERS`); nothing else is imported or called unless ``trusted`` allows
    it (README: "Loading files you did not make").

    Args:
        path: the file.
        model: load into this instance; its state-dict keys and shapes must match the file.
        map_location: device of the rebuilt model (a given model keeps its devices).
        trusted: extra builders the file may name: patterns like ``["mypkg.*", "mymodels:SmallCNN"]``, or ``True``
            for any (a file you trust as you trust code).

    Returns:
        The model.

    Raises:
        CorruptFileError: unreadable, truncated or altered file.
        ModelMismatchError: a layer/tensor missing from the file or the model, or shaped differently (checked before
            decoding).
        ValueError: no model given and the file's builder record is absent, not trusted, not importable, or builds
            a model that does not fit the file; the message says what to pass.

    Example::

        model = load_compressed("lenet.dcz")
    """
    rebuilt = None
    if model is None:
        with open(path, "rb") as f:
            _, doc = read_header(f.read(), str(path))
        model = build_from_record(doc.get("builder"), where=str(path), trusted=trusted)
        rebuilt = f"{doc['builder'].get('callable')}(**{doc['builder'].get('kwargs') or {}})"
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    cf = read_compressed(path, expect=_expect_model(model, str(path), rebuilt))
    modules = dict(model.named_modules())
    sd = model.state_dict(keep_vars=True)  # the parameters and buffers themselves (identity tells ties apart)
    decoded = {}
    with torch.no_grad():
        for layer in cf.layers.values():
            m, param = modules[layer.module_name], layer.param
            weight = getattr(m, param)
            weight.copy_(torch.from_numpy(layer.dense()).to(weight.dtype))  # in place: RNN flat weights stay valid
            decoded[id(weight)] = layer.key
            if layer.has_mask:
                buffers.set_mask(m, torch.from_numpy(layer.mask()), param)
            elif buffers.get_mask(m, param) is not None:
                buffers.get_mask(m, param).fill_(True)
            if layer.codes is not None:
                codebook, assign = torch.from_numpy(layer.codebook.copy()), torch.from_numpy(layer.assign())
                buffers.set_codebook(m, codebook, assign, param)
        for key, t in cf.tensors.items():
            if id(sd[key]) in decoded:  # a file of before aliases stored a tied compressed weight twice
                log.info("%s: %r is the model's %r (tied): its plain copy is skipped, the layer's decode is kept "
                         "(re-save the model to store it once)", path, key, decoded[id(sd[key])])
                continue
            sd[key].copy_(t)
        _restore_aliases(model, cf.aliases, str(path))
    if rebuilt:
        model.to(map_location)
    return model


def _tensor_at(model: nn.Module, key: str) -> Any:
    module, _, leaf = key.rpartition(".")
    return getattr(model.get_submodule(module), leaf, None)


def _restore_aliases(model: nn.Module, aliases: dict[str, str], where: str) -> None:
    """Give every alias key of the file the tensor it names (tied weights, docs/DESIGN.md "File format versioning").

    A model that ties them already is left as it is. One that holds two separate parameters is **re-tied** (the
    alias's module gets the stored parameter itself, as ``tie_weights`` does in Hugging Face models), not given a
    copy: the file holds one weight, and two copies would drift apart in training, be two targets for the callbacks
    (the second without masks) and be stored twice again. Buffer aliases (the compression state of another holder, a
    module registered twice) point at the stored holder's buffers where the model carries them.
    """
    retied = []
    for alias, stored in aliases.items():
        module, _, leaf = alias.rpartition(".")
        owner, src, current = model.get_submodule(module), _tensor_at(model, stored), _tensor_at(model, alias)
        if current is src:
            continue
        if leaf in owner._parameters and isinstance(src, nn.Parameter):
            setattr(owner, leaf, src)  # nn.Module.__setattr__: an RNN's flat weights follow
            retied.append(f"{alias} = {stored}")
            s_module, _, s_leaf = stored.rpartition(".")
            for role in buffers.KINDS:  # the other holder's own compression buffers: the stored holder's state
                name = buffers.buffer_name(role, leaf)
                if name in owner._buffers and f"{module + '.' if module else ''}{name}" not in aliases:
                    state = buffers.get_buffer(model.get_submodule(s_module), role, s_leaf)
                    if state is None:
                        del owner._buffers[name]
                    else:
                        owner._buffers[name] = state
        elif leaf in owner._buffers:
            owner._buffers[leaf] = src
        elif current is not None:
            current.copy_(src)
    if retied:
        log.warning("load_compressed: %s: %s were one parameter when saved (tied weights) but two in the model: "
                    "re-tied", where, ", ".join(retied))


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
    # a plain state dict for load_state_dict: an alias key (tied weights) gets its own copy (safetensors refuses
    # tensors that share memory)
    sd = {k: v.contiguous().clone() if k in cf.aliases else v.contiguous() for k, v in cf.dense_state_dict().items()}
    data = save(sd, metadata={"source": os.path.basename(str(in_path)), "format": "dense state dict"})
    with atomic_write(out_path) as f:
        f.write(data)
