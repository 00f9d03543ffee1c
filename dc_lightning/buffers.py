"""The per-layer compression state: the one module that names, reads, writes and derives the buffers.

A compressed parameter ``<param>`` of a module (``weight`` for ``nn.Linear``/``nn.Conv*``) carries up to three
buffers beside it (buffers so that ``state_dict()`` and Lightning checkpoints carry them; docs/DESIGN.md):

=====================  ==========  ================  ==============================================================
buffer                 dtype       shape             meaning
=====================  ==========  ================  ==============================================================
``<param>_mask``       bool        ``param.shape``   True = connection kept; the parameter is pruned iff it exists
``<param>_codebook``   float32     ``[2**bits]``     shared weights; the parameter is quantized iff it exists
``<param>_assign``     uint8       ``param.shape``   codebook index of every weight (0 and meaningless where pruned)
=====================  ==========  ================  ==============================================================

Invariants after every optimizer step: ``param[~mask] == 0.0`` exactly, and for a quantized parameter
``param == where(mask, codebook[assign], 0.0)`` bit for bit. Every other module goes through the helpers below and
never spells the names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "ASSIGN",
    "CODEBOOK",
    "KINDS",
    "MASK",
    "MAX_CODES",
    "WEIGHT",
    "Codes",
    "buffer_keys",
    "buffer_name",
    "codes_of",
    "compressed_params",
    "get_buffer",
    "get_codebook",
    "get_mask",
    "fit_to_state_dict",
    "has_compression",
    "install_load_hook",
    "layer_codes",
    "matrix_shape",
    "parse_buffer_key",
    "register_placeholders",
    "remove_codebook",
    "set_buffer",
    "set_codebook",
    "set_mask",
    "sparse_coordinates",
]

WEIGHT = "weight"
KINDS = ("mask", "codebook", "assign")
MASK, CODEBOOK, ASSIGN = (f"{WEIGHT}_{k}" for k in KINDS)  # "weight_mask", "weight_codebook", "weight_assign"
#: the most codebook entries a layer may have: codes are uint8 in the file, the assignments and the kernels
MAX_CODES = 256


def buffer_name(kind: str, param: str = WEIGHT) -> str:
    """``<param>_<kind>`` for ``kind`` in :data:`KINDS` (``buffer_name("mask") == "weight_mask"``).

    Raises:
        ValueError: ``kind`` is not one of :data:`KINDS`.
    """
    if kind not in KINDS:
        raise ValueError(f"buffer kind {kind!r} is unknown; valid: {list(KINDS)}")
    return f"{param}_{kind}"


def buffer_keys(prefix: str, param: str = WEIGHT) -> tuple[str, ...]:
    """The state-dict keys of a parameter's buffers under a module prefix (``"fc1."`` -> ``"fc1.weight_mask"``...)."""
    return tuple(prefix + buffer_name(k, param) for k in KINDS)


def parse_buffer_key(key: str) -> tuple[str, str, str] | None:
    """``(module name, parameter name, kind)`` of a state-dict key naming a compression buffer, else ``None``.

    ``"classifier.6.weight_mask"`` -> ``("classifier.6", "weight", "mask")``.
    """
    module, _, leaf = key.rpartition(".")
    for kind in KINDS:
        suffix = "_" + kind
        if leaf.endswith(suffix) and len(leaf) > len(suffix):
            return module, leaf[: -len(suffix)], kind
    return None


def get_buffer(module: nn.Module, kind: str, param: str = WEIGHT) -> Tensor | None:
    """The parameter's ``kind`` buffer as it is (no pairing or shape check; the exporter reports broken pairs)."""
    return module._buffers.get(buffer_name(kind, param))


def get_mask(module: nn.Module, param: str = WEIGHT) -> Tensor | None:
    """The parameter's bool mask buffer (True = kept), or ``None`` when it is not pruned."""
    return get_buffer(module, "mask", param)


def get_codebook(module: nn.Module, param: str = WEIGHT) -> tuple[Tensor, Tensor] | None:
    """``(codebook, assign)`` of a quantized parameter, or ``None`` when it is not quantized."""
    cb, assign = get_buffer(module, "codebook", param), get_buffer(module, "assign", param)
    if cb is None or assign is None:
        return None
    return cb, assign


def has_compression(module: nn.Module, param: str = WEIGHT) -> bool:
    """Whether the parameter carries a mask or a codebook buffer (is stored as a compressed layer)."""
    return get_mask(module, param) is not None or get_buffer(module, "codebook", param) is not None


def compressed_params(module: nn.Module) -> list[str]:
    """The names of the module's tensors that carry a mask or a codebook buffer, parameters in registration order
    first (``["weight"]`` for a pruned ``nn.Linear``, ``["weight_ih_l0", "weight_hh_l0"]`` for a pruned LSTM).

    ``weight`` counts with any of its buffers (a broken pair is the exporter's error to report). Another tensor
    ``<p>`` counts only with a bool ``<p>_mask`` or a uint8 ``<p>_assign`` of its shape, so that a module's own
    buffer that happens to be called ``<p>_mask`` (an attention module's ``causal_mask`` beside a ``causal``
    tensor) is not taken for compression state.
    """
    found = []
    for name, buf in module._buffers.items():
        parsed = parse_buffer_key(name)
        if parsed is None or parsed[1] in found:
            continue
        param, kind = parsed[1], parsed[2]
        tensor = getattr(module, param, None)
        if not isinstance(tensor, Tensor):
            continue
        ours = {"mask": torch.bool, "assign": torch.uint8}.get(kind)
        if param == WEIGHT or (buf is not None and buf.dtype == ours and buf.shape == tensor.shape):
            found.append(param)
    order = {p: i for i, p in enumerate(module._parameters)}
    return sorted(found, key=lambda p: order.get(p, len(order)))


@torch.no_grad()
def set_buffer(module: nn.Module, name: str, value: Tensor) -> Tensor:
    """Store ``value`` as buffer ``name``: in place when one of the same shape and dtype exists, so tensors that a
    DDP wrapper, an optimizer hook or a CUDA graph already reference stay valid; registered anew otherwise.

    Raises:
        ValueError: ``name`` is already an attribute of ``module`` that is not a buffer (a parameter, a submodule).
    """
    current = module._buffers.get(name)
    if current is not None and current.shape == value.shape and current.dtype == value.dtype:
        current.copy_(value)
        return current
    if name not in module._buffers and hasattr(module, name):
        raise ValueError(f"{type(module).__name__}.{name} exists and is not a buffer; cannot store {name!r} there")
    module.register_buffer(name, value.detach().clone(), persistent=True)
    return module._buffers[name]


def set_mask(module: nn.Module, mask: Tensor, param: str = WEIGHT) -> Tensor:
    """Store a bool mask on the parameter's device (validated by the caller: ``pruning.attach_mask``)."""
    device = getattr(module, param).device
    return set_buffer(module, buffer_name("mask", param), mask.to(device=device, dtype=torch.bool))


def set_codebook(module: nn.Module, codebook: Tensor, assign: Tensor, param: str = WEIGHT) -> None:
    """Store a float32 codebook and uint8 assignments on the parameter's device (validated by the caller:
    ``quantization.attach_codebook``)."""
    device = getattr(module, param).device
    set_buffer(module, buffer_name("codebook", param), codebook.reshape(-1).to(device=device, dtype=torch.float32))
    set_buffer(module, buffer_name("assign", param), assign.to(device=device, dtype=torch.uint8))


def remove_codebook(module: nn.Module, param: str = WEIGHT) -> None:
    """Drop the parameter's codebook and assignments (the parameter is then no longer quantized)."""
    module._buffers.pop(buffer_name("codebook", param), None)
    module._buffers.pop(buffer_name("assign", param), None)


def register_placeholders(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Register the compression buffers that ``state_dict`` holds and ``model`` lacks, so ``load_state_dict`` fits.

    One rule for every caller (checkpoint loading, export from a checkpoint, resume): a missing buffer, or one of
    another shape, is registered as zeros of the state dict's shape and dtype on the parameter's device; the
    following ``load_state_dict`` overwrites it. Returns the keys registered.

    A key ``<layer>.<param>_<kind>`` whose layer exists but has no tensor ``<param>`` is not a compression buffer
    (an attention module's ``causal_mask``, say) and is left to ``load_state_dict``.

    Raises:
        ValueError: a key names a layer the model does not have (the message names the key and the layer).
    """
    modules = dict(model.named_modules())
    added = []
    for key, value in state_dict.items():
        parsed = parse_buffer_key(key)
        if parsed is None:
            continue
        layer, param, kind = parsed
        if layer not in modules:
            raise ValueError(
                f"checkpoint key {key!r}: the model has no layer {layer!r} to carry this {kind} buffer "
                f"(does the checkpoint belong to another model?)"
            )
        module = modules[layer]
        weight = getattr(module, param, None)
        if not isinstance(weight, Tensor):
            continue
        name = buffer_name(kind, param)
        current = module._buffers.get(name)
        if current is None or current.shape != value.shape or current.dtype != value.dtype:
            module.register_buffer(name, torch.zeros(value.shape, dtype=value.dtype, device=weight.device))
            added.append(key)
    return added


def fit_to_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> tuple[list[str], list[str]]:
    """Make ``model``'s compression buffers those ``state_dict`` describes, so that ``load_state_dict`` fits exactly.

    Buffers the state dict holds and the model lacks are registered as placeholders (:func:`register_placeholders`);
    a buffer the model has for a parameter whose value the state dict holds *without* that buffer is removed (the
    state dict describes the parameter as not pruned / not quantized: a dense checkpoint resumed under
    ``MagnitudePruning``, a checkpoint written before ``TrainedQuantization`` clustered). Parameters the state dict
    does not hold are left alone (a partial ``strict=False`` load). Returns ``(registered keys, removed keys)``.

    Raises:
        ValueError: a buffer key names a layer the model does not have.
    """
    added = register_placeholders(model, state_dict)
    removed = []
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        for key in [k for k in module._buffers if parse_buffer_key(k) is not None]:
            _, param, _ = parse_buffer_key(key)
            if prefix + param in state_dict and prefix + key not in state_dict:
                del module._buffers[key]
                removed.append(prefix + key)
    return added, removed


def _load_pre_hook(module: nn.Module, state_dict: Mapping[str, Tensor], prefix: str, *args: object) -> None:
    """``load_state_dict`` pre-hook of :func:`install_load_hook` (a module-level function: models stay picklable)."""
    fit_to_state_dict(module, {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)})


def install_load_hook(model: nn.Module) -> None:
    """Let every later ``model.load_state_dict(sd)`` carry exactly the compression buffers ``sd`` holds
    (:func:`fit_to_state_dict` runs first), whatever the model carried before. Idempotent.

    The compression callbacks install it in ``setup`` (so ``Trainer.fit(ckpt_path=...)`` resumes a dense or a
    compressed checkpoint); :func:`dc_lightning.checkpoint.load_from_checkpoint` installs it on a fresh module.
    """
    hooks = model._load_state_dict_pre_hooks.values()
    if not any(getattr(h, "hook", None) is _load_pre_hook for h in hooks):
        model.register_load_state_dict_pre_hook(_load_pre_hook)


# ------------------------------------------------------------------------------------------- derived coordinates


def matrix_shape(shape: tuple[int, ...] | list[int] | torch.Size) -> tuple[int, int]:
    """The ``(R, C)`` matrix view of a weight of ``shape``: ``(shape[0], prod(shape[1:]))`` (the stored scan order)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return 1, 1
    r = shape[0]
    c = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    return r, c


def sparse_coordinates(shape: tuple[int, ...], mask: Tensor | np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Row-major ``(rows, cols)`` (int64) of the kept weights of ``weight.reshape(out, -1)``; every position when
    ``mask`` is ``None``. Row-major is the stored scan order (Caffe's blob order; docs/DESIGN.md)."""
    R, C = matrix_shape(shape)
    if mask is None:
        pos = np.arange(R * C, dtype=np.int64)
    else:
        m = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
        pos = np.flatnonzero(m.astype(bool, copy=False).reshape(-1)).astype(np.int64)
    return pos // C, pos % C


class Codes(NamedTuple):
    """The codes of one compressed parameter (or a row slice of it), on the parameter's device (:func:`codes_of`)."""

    mask: Tensor  #: bool, the parameter's shape: True = kept
    codes: Tensor  #: int64, the parameter's shape: the codebook index of every kept weight, 0 where pruned
    codebook: Tensor  #: float32 ``[k]``, ``1 <= k <= MAX_CODES``


@torch.no_grad()
def codes_of(module: nn.Module, param: str = WEIGHT, rows: slice | None = None) -> Codes:
    """``(mask, codes, codebook)`` of ``module.<param>`` (or of its ``rows``), computed on the parameter's device.

    The one derivation of codes from the buffers; every packing (the EIE layout, the kernels, the inference modules)
    goes through it. The rule:

    * **kept weights**: the mask buffer's True entries; without a mask, every weight of a quantized parameter (its
      assignments code them all, zeros included) and the non-zero weights of a plain one (no buffer at all);
    * **codes**: a quantized parameter's assignments at the kept positions; otherwise the **distinct kept values
      become the codebook** (sorted ascending, so decoding is exact) when there are at most :data:`MAX_CODES` of
      them, and ``codebook = [0.0]`` when nothing is kept. With ``rows``, a parameter without a codebook gets the
      distinct values of those rows only (an attention's q, k and v rows each get their own).

    Raises:
        ValueError: a buffer's shape differs from the parameter's, or the parameter has no codebook and more than
            :data:`MAX_CODES` distinct kept values (the compressed path stores codebook indices, not floats).
    """
    weight = getattr(module, param)
    shape = tuple(weight.shape)
    mask = get_mask(module, param)
    got = get_codebook(module, param)
    for kind, t in (("assign", None if got is None else got[1]), ("mask", mask)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(
                f"{type(module).__name__}.{buffer_name(kind, param)} has shape {tuple(t.shape)}; expected {shape}"
            )
    sl = slice(None) if rows is None else rows
    values = weight.detach()[sl]
    if mask is not None:
        keep = mask[sl].to(torch.bool)
    elif got is not None:
        keep = torch.ones_like(values, dtype=torch.bool)
    else:
        keep = values != 0
    if got is not None:
        codebook, assign = got
        codes = torch.where(keep, assign[sl].to(torch.int64), 0)
        return Codes(keep, codes, codebook.detach().reshape(-1).to(torch.float32))
    centroids, inverse = torch.unique(values[keep].to(torch.float32), return_inverse=True)
    if centroids.numel() > MAX_CODES:
        raise ValueError(
            f"{type(module).__name__}.{param} is not quantized and keeps {centroids.numel()} distinct values; the "
            f"compressed path needs at most {MAX_CODES} (quantize it first, e.g. quantize_model)"
        )
    if centroids.numel() == 0:
        centroids = torch.zeros(1, device=weight.device)
    codes = torch.zeros(keep.shape, dtype=torch.int64, device=weight.device)
    codes[keep] = inverse
    return Codes(keep, codes, centroids)


def layer_codes(
    module: nn.Module, param: str = WEIGHT
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    """``(rows, cols, codes, codebook, shape)`` of a quantized parameter: :func:`codes_of` as host arrays.

    ``rows``/``cols`` (int64) are the row-major coordinates of the kept weights in the ``(R, C)`` matrix view
    (:func:`matrix_shape`; all of them without a mask), ``codes`` their uint8 codebook indices, ``codebook`` float32.

    Raises:
        ValueError: the parameter is not quantized, or a buffer's shape differs from the parameter's.
    """
    if get_codebook(module, param) is None:
        raise ValueError(
            f"{type(module).__name__}.{param} has no {buffer_name('codebook', param)}/{buffer_name('assign', param)} "
            "buffers: it is not quantized (run TrainedQuantization or quantize_model first)"
        )
    mask, codes, codebook = codes_of(module, param)
    shape = tuple(mask.shape)
    rows, cols = torch.nonzero(mask.reshape(matrix_shape(shape)), as_tuple=True)  # row-major (the stored order)
    picked = codes.reshape(matrix_shape(shape))[rows, cols].to(torch.uint8)
    return rows.cpu().numpy(), cols.cpu().numpy(), picked.cpu().numpy(), codebook.cpu().numpy(), shape
