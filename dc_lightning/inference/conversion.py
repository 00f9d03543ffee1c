"""Which layers of a model may run on the compressed inference path, and the conversion itself.

``to_compressed_inference`` (``dc_lightning.inference.linear``) calls :func:`convert_model`. The rules:

* **Targets.** Every module whose weight kind has an inference module (:mod:`dc_lightning.kinds`: ``nn.Linear`` and
  subclasses -> ``CompressedLinear``; ``nn.MultiheadAttention`` converted as a whole, never its ``out_proj`` alone:
  the attention reads ``out_proj.weight``; ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``; ``nn.Embedding``). A target is
  converted when at least one of its weight matrices carries a mask or codebook (:mod:`dc_lightning.buffers`).
* **Provably safe only.** Replacing a layer removes its dense weight attributes. A layer is skipped, with one log
  line saying why, when: an ``exclude`` pattern (``fnmatch`` on the module name) matches; its class overrides
  ``forward`` (the replacement would drop that code); it has forward hooks or parametrizations; its parent is a
  ``torch`` module other than the containers and the ``nn.Transformer*`` family (which are handled); or the
  ``forward`` of an enclosing user class (or a method it calls on ``self``) reads one of the attributes the
  replacement lacks (``self.emb.weight``, ``self.attn.in_proj_weight``, ``getattr(self.fc, "weight")``...) or hands
  the layer to a function that does or may (``output_logits(x, self.wte)`` reading ``emb.weight``; a function whose
  source cannot be followed may). That check reads the sources (``ast``, :mod:`~dc_lightning.inference.source_check`)
  and cannot tell whether such a call runs: with ``example_inputs`` the layer is converted on trial and kept dense
  again, with a warning naming the function, if the converted model fails or differs on them. A class whose source
  is unavailable blocks the layers below it unless the caller gives ``example_inputs`` (then the comparison of
  outputs is the proof; a mismatch raises).
* **Fast paths.** ``nn.TransformerEncoderLayer`` chooses a fused path that reads the dense weights of its
  attention and feed-forward layers; on a layer holding a converted module the path is switched off
  (``activation_relu_or_gelu = 0``: only the fast path reads it; the slow path calls ``self.activation``), and an
  ``nn.TransformerEncoder`` above it stops converting inputs to nested tensors (``use_nested_tensor = False``).
* **Tied weights** (one parameter held by several modules, found by identity; its compression buffers live on one
  of them) are converted once or not at all (:mod:`~dc_lightning.inference.ties`). An ``nn.Embedding`` tied to an
  ``nn.Linear`` (``lm_head.weight = wte.weight``) becomes a :class:`CompressedLinear` and a
  :class:`~dc_lightning.inference.embedding.TiedEmbedding` that decodes its rows from the Linear's packed LUT table
  (no dense copy, the codes in memory once); embeddings tied only to each other become one
  :class:`~dc_lightning.inference.embedding.CompressedEmbedding`. When one holder must stay dense (for any reason
  above, ``exclude`` included), or the tie is of other kinds (two Linears with their own biases, an LSTM, a module
  without an inference module), every holder stays dense, each with a warning: converting the others would keep
  the dense matrix alive and add a compressed one.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dc_lightning import buffers, kinds
from dc_lightning.inference.attention import make_capturable
from dc_lightning.inference.linear import ALTERNATE, CompressedLinear
from dc_lightning.inference.matrix import param_codes
from dc_lightning.inference.memory import compressed_memory
from dc_lightning.inference.source_check import is_torch_class, weight_reader
from dc_lightning.inference.ties import build_ties, compression_states, plan_ties, state_of
from dc_lightning.inference.verify import check_outputs, reference_outputs
from dc_lightning.kernels import layouts

__all__ = [
    "Decision",
    "convert_model",
    "plan_conversion",
    "inference_memory",
    "to_compressed_inference",
]

log = logging.getLogger("dc_lightning.inference")

# torch parents whose forward never reads a child's weights (containers), or whose reads are handled below
_SAFE_TORCH_PARENTS = (
    nn.Sequential,
    nn.ModuleList,
    nn.ModuleDict,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.Transformer,
)


@dataclass
class Decision:
    """What happens to one layer. ``action``: ``"convert"``, ``"skip"`` (compressed but kept dense, see
    ``reason``) or ``"dense"`` (no compression buffer: nothing to convert)."""

    name: str
    kind: str
    action: str
    reason: str
    params: tuple[str, ...] = ()
    keep_dense: tuple[str, ...] = ()  # compressed weights kept dense inside the converted module (exclude=)
    tied: tuple[str, ...] = ()  # the other holders of its tied weight, converted with it from one packed table
    trial: str = ""  # a reader only example_inputs can rule out (a function the layer is handed to)


# ------------------------------------------------------------------------------------------------ target kinds


def _kind(m: nn.Module) -> kinds.Kind | None:
    """The weight kind of a conversion target (a kind with an inference module), else ``None``."""
    kind = kinds.kind_of(m)
    return kind if kind is not None and kind.converter is not None else None


def _packable(owner: nn.Module, param: str) -> str | None:
    """Why the compressed parameter cannot be packed, or ``None`` when it can."""
    if buffers.get_codebook(owner, param) is not None:
        return None
    try:
        param_codes(owner, param)  # a pruned-only weight: at most 256 distinct kept values
    except ValueError as err:
        return str(err)
    return None


# ------------------------------------------------------------------------------------------------------ planning


def named_targets(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module | None]]:
    """``(name, module, parent)`` of every target, not descending into targets (an attention's ``out_proj`` is part
    of the attention) nor into modules that are already compressed."""

    def walk(prefix: str, m: nn.Module, parent: nn.Module | None) -> Iterator[tuple[str, nn.Module, nn.Module | None]]:
        if isinstance(m, kinds.compressed_module_types()):
            return
        if _kind(m) is not None:
            yield prefix, m, parent
            return
        for child_name, child in m._modules.items():  # not named_children(): it skips a module's second name
            if child is None:
                continue
            yield from walk(f"{prefix}.{child_name}" if prefix else child_name, child, m)

    yield from walk("", model, None)


def plan_conversion(
    model: nn.Module,
    exclude: Sequence[str] = (),
    *,
    outputs_checked: bool = False,
    keep: Mapping[str, str] | None = None,
) -> list[Decision]:
    """Decide, for every conversion target of ``model``, whether it is converted (see the module docstring).

    Args:
        model: the dense model (its layers carry the compression buffers).
        exclude: ``fnmatch`` patterns of module names (``"decoder"``, ``"encoder.layers.*"``) or of parameter names
            (``"lstm.weight_hh_l0"``, ``"*.self_attn.out_proj.weight"``) to keep dense. An attention or recurrent
            layer with some weights excluded is converted with those weights dense inside it.
        outputs_checked: the caller compares outputs on example inputs afterwards, so a class whose source is
            unavailable does not block conversion, and a layer handed to a function that may read its weights is
            converted on trial (:attr:`Decision.trial`).
        keep: ``{layer name: reason}`` of targets to keep dense whatever else holds (a trial the outputs ruled out).

    Returns:
        One :class:`Decision` per target, in module order, plus one ``"skip"`` per other compressed module (e.g.
        convolutions: no compressed inference module).
    """
    if isinstance(exclude, str):
        exclude = [exclude]
    states = compression_states(model)
    decisions = []
    targets = list(named_targets(model))
    for name, m, parent in targets:
        kind = _kind(m)
        weights = kinds.held_weights(m)
        compressed = tuple(lbl for owner, p, lbl in weights if state_of(states, owner, p) is not None)
        excluded = tuple(lbl for lbl in compressed if _matches(f"{name}.{lbl}" if name else lbl, exclude))
        reason, trial = (keep or {}).get(name, ""), ""
        if not reason:
            reason, trial = _skip_reason(model, name, m, parent, kind, weights, exclude, outputs_checked, states)
        if not reason and compressed and len(excluded) == len(compressed):
            reason = f"excluded by pattern {_matches(f'{name}.{excluded[0]}' if name else excluded[0], exclude)!r}"
        kept = tuple(lbl for lbl in compressed if lbl not in excluded)
        if not compressed:
            decisions.append(Decision(name, kind.name, "dense", "no mask or codebook"))
        elif reason:
            decisions.append(Decision(name, kind.name, "skip", reason, compressed))
        else:
            note = f"excluded, kept dense inside: {', '.join(excluded)}" if excluded else ""
            decisions.append(Decision(name, kind.name, "convert", note, kept, excluded, trial=trial))
    plan_ties(model, decisions, states)
    covered = [name for name, _, _ in targets]
    for name, m in model.named_modules():
        if any(name == t or not t or name.startswith(t + ".") for t in covered):
            continue
        params = tuple(p for p, _ in m.named_parameters(recurse=False) if buffers.has_compression(m, p))
        if params and not isinstance(m, kinds.compressed_module_types()):
            decisions.append(
                Decision(name, type(m).__name__, "skip", f"no compressed inference module for {type(m).__name__}",
                         params)
            )
    return decisions


def _matches(name: str, patterns: Sequence[str]) -> str | None:
    """The first ``fnmatch`` pattern matching ``name``, or ``None``."""
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def _skip_reason(
    model: nn.Module,
    name: str,
    m: nn.Module,
    parent: nn.Module | None,
    kind: kinds.Kind,
    weights: list[tuple[nn.Module, str, str]],
    exclude: Sequence[str],
    outputs_checked: bool,
    states: dict[int, tuple[nn.Module, str]],
) -> tuple[str, str]:
    """``(why the layer stays dense or "", the reader it is converted on trial against or "")``."""
    pattern = _matches(name, exclude)
    if pattern is not None:
        return f"excluded by pattern {pattern!r}", ""
    if type(m).forward is not kind.torch_type.forward:
        return f"{type(m).__qualname__} overrides {kind.name}.forward (the replacement would drop that code)", ""
    if m._forward_hooks or m._forward_pre_hooks:
        return "it has forward hooks (they would be lost)", ""
    if torch.nn.utils.parametrize.is_parametrized(m):
        return "its weights are parametrized (torch.nn.utils.parametrize)", ""
    refused = kind.refuses(m) if kind.refuses is not None else ""
    if refused:
        return refused, ""
    if parent is not None and is_torch_class(type(parent)) and not isinstance(parent, _SAFE_TORCH_PARENTS):
        return f"its parent is a {type(parent).__name__}, which may read its weights", ""
    trial = ""
    reader = weight_reader(model, name, kind.removes(m))
    if reader is not None:
        if reader.kind == "reads":
            return reader.why, ""
        if not outputs_checked and reader.kind == "unavailable":
            return (
                f"{reader.why}, so it cannot be checked that its forward does not read this layer's weights; pass "
                "example_inputs to check the outputs instead"
            ), ""
        if not outputs_checked:
            return (
                f"{reader.why}; pass example_inputs to prove the conversion safe (it is then converted on trial), "
                f"or exclude=[{name!r}]"
            ), ""
        trial = reader.why if reader.kind == "passed" else ""
    for owner, p, label in weights:
        state = state_of(states, owner, p)
        if state is not None and _matches(f"{name}.{label}" if name else label, exclude) is None:
            why = _packable(*state)
            if why:
                return why, ""
    return "", trial


# ------------------------------------------------------------------------------------------------------ converting


def convert_model(
    model: nn.Module,
    exclude: Sequence[str] = (),
    *,
    fuse_relu: bool = True,
    outputs_checked: bool = False,
    keep: Mapping[str, str] | None = None,
    log_decisions: bool = True,
) -> tuple[nn.Module, list[Decision]]:
    """Convert ``model`` IN PLACE by :func:`plan_conversion`'s decisions (``keep`` as there) and log each one
    (``log_decisions``).

    Returns ``(model, decisions)``; ``model`` is a new object only when the model itself is a target.
    """
    decisions = plan_conversion(model, exclude, outputs_checked=outputs_checked, keep=keep)
    def relu_after(name: str) -> bool:
        parent_name, _, local = name.rpartition(".")
        return fuse_relu and _relu_after(model.get_submodule(parent_name), local) is not None

    tied = build_ties(model, decisions, relu_after)
    converted = []
    built: dict[tuple, nn.Module] = {}  # a module registered under several names is replaced by ONE new module
    for d in decisions:
        if d.action != "convert":
            continue
        m = model.get_submodule(d.name) if d.name else model
        parent_name, _, local = d.name.rpartition(".")
        parent = (model.get_submodule(parent_name) if parent_name else model) if d.name else None
        kind = _kind(m)
        relu_at = _relu_after(parent, local) if fuse_relu and kind.fuses_relu else None
        key = (id(m), relu_at is not None, d.keep_dense)
        try:
            new = tied.get(d.name, built.get(key))
            if new is None:
                new = kind.converter().build(m, relu_at is not None, d.keep_dense)
        except ValueError as err:
            d.action, d.reason = "skip", str(err)
            continue
        built[key] = new
        if relu_at is not None:  # the ReLU's only input is the Linear's output (next element of the Sequential)
            parent._modules[relu_at] = nn.Identity()
        if parent is None:
            model = new
        else:
            parent._modules[local] = new
        converted.append(d.name)
    _fast_paths_off(model, converted)
    make_capturable(model, converted)  # CUDA-graph capture: no host sync in the torch containers
    if log_decisions:
        _log(decisions, model)
    return model, decisions


def _relu_after(parent: nn.Module | None, local: str) -> str | None:
    """The name of the ``nn.ReLU`` that directly follows ``local`` in an ``nn.Sequential`` parent, or ``None``."""
    if not isinstance(parent, nn.Sequential):
        return None
    names = list(parent._modules)
    nxt = names.index(local) + 1
    return names[nxt] if nxt < len(names) and isinstance(parent._modules[names[nxt]], nn.ReLU) else None


def _fast_paths_off(model: nn.Module, converted: list[str]) -> None:
    """Send ``nn.Transformer*`` layers holding a converted module to their slow path (see the module docstring)."""
    for name, m in model.named_modules():
        if not any(c.startswith(name + ".") or not name for c in converted):
            continue
        if isinstance(m, nn.TransformerEncoderLayer) and m.activation_relu_or_gelu:
            m.activation_relu_or_gelu = 0
            log.info("to_compressed_inference: %s: fused fast path off (it reads dense weights)", name or "<model>")
        if getattr(m, "use_nested_tensor", False) and isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False
            log.info("to_compressed_inference: %s: nested-tensor fast path off (it reads dense weights)", name)


def _log(decisions: list[Decision], model: nn.Module) -> None:
    for d in decisions:
        where = d.name or "<model>"
        if d.action == "convert":
            note = f"; {d.reason}" if d.reason else ""
            if d.trial:
                note += f"; {d.trial}: ruled out by example_inputs (the outputs match)"
            log.info("to_compressed_inference: converted %s (%s: %s)%s", where, d.kind, ", ".join(d.params), note)
        elif d.action == "skip":
            log.warning("to_compressed_inference: kept %s (%s) dense: %s", where, d.kind, d.reason)
    dense = [d.name or "<model>" for d in decisions if d.action == "dense"]
    if dense:
        shown = ", ".join(dense[:12]) + (f" and {len(dense) - 12} more" if len(dense) > 12 else "")
        log.info("to_compressed_inference: %d layer(s) without mask or codebook stay as they are: %s",
                 len(dense), shown)
    if not any(d.action == "convert" for d in decisions):
        log.warning("to_compressed_inference: no compressed layer could be converted; model unchanged")
    _log_zero_code_hint(model)


def _log_zero_code_hint(model: nn.Module) -> None:
    """One line for the layers that hold ``lut`` + bitmap only because their 16 shared values leave no code for the
    pruned zeros (:func:`dc_lightning.kernels.layouts.misses_tc_by_one`): ``zero_code=True`` would give them ``tc``."""
    short = [
        name or "<model>"
        for name, m in model.named_modules()
        if isinstance(m, CompressedLinear) and any(layouts.misses_tc_by_one(m.packed(n)) for n in m.layout_names)
    ]
    if short:
        shown = ", ".join(short[:12]) + (f" and {len(short) - 12} more" if len(short) > 12 else "")
        log.info(
            "to_compressed_inference: %d pruned layer(s) use 16 shared values, so their zero needs a 17th table "
            "entry and they take lut + bitmap (0.625 B/weight): %s; quantized with zero_code=True (15 values + "
            "the zero, EIE's table) they would take the tc tensor-core layout (0.5 B/weight)", len(short), shown,
        )


def to_compressed_inference(
    model_or_path: nn.Module | str | os.PathLike,
    device: torch.device | str | None = None,
    *,
    fuse_relu: bool = True,
    autotune_batches: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
    exclude: Sequence[str] = (),
    example_inputs: Any = None,
    tolerance: float | None = None,
    alternate: bool = False,
) -> nn.Module:
    """Replace every compressed layer that can safely be replaced by its compressed inference module (on a copy).

    ``nn.Linear`` (and subclasses) -> :class:`CompressedLinear`; ``nn.MultiheadAttention`` (as a whole), ``nn.LSTM``
    / ``nn.GRU`` / ``nn.RNN`` and ``nn.Embedding`` -> the modules of :mod:`dc_lightning.inference.attention`. A layer
    is converted when one of its weight matrices carries a mask or codebook; it is kept dense, with one log line
    saying why, when replacing it is not provably safe (an enclosing ``forward`` reads its weights or hands the
    layer to a function that may, it overrides ``forward``, has hooks...; rules in
    :mod:`dc_lightning.inference.conversion`). A tied weight (``lm_head.weight = wte.weight``) is converted once,
    both holders running from one packed table, or kept dense in all of them. Every decision is logged on the
    ``dc_lightning.inference`` logger.

    Args:
        model_or_path: a model whose layers carry the compression buffers (nested anywhere), or the path of a
            ``.dcz`` file (read with ``dc_lightning.io.load_compressed``).
        device: where the result goes (default: where the model is).
        fuse_relu: fold an ``nn.ReLU`` that directly follows a converted Linear inside an ``nn.Sequential`` into
            the kernel epilogue (the ReLU becomes ``nn.Identity``).
        autotune_batches: on CUDA, time the kernel configurations of every converted Linear for these batch sizes
            (see :meth:`CompressedLinear.autotune`); ``None`` keeps the shape heuristics.
        dtype: activation dtype the autotuning times.
        exclude: ``fnmatch`` patterns of module names (``"decoder"``, ``"encoder.layers.*"``) or parameter names
            (``"lstm.weight_hh_l0"``, ``"*.out_proj.weight"``) to keep dense.
        example_inputs: a sample input (a tensor, a tuple of positional arguments or a dict of keyword arguments):
            the original and the converted model both run on it and must agree. Layers handed to a function that
            may read their weights are converted on trial: if the converted model then fails or disagrees, they
            (and their tied partners) are kept dense, with a warning naming the function, and the rest is
            converted and compared again (a second copy of the dense model is held meanwhile).
        tolerance: largest relative L2 error allowed on ``example_inputs`` (default 1e-4 for float32 outputs, 2e-2
            for float16/bfloat16).
        alternate: every compressed matrix keeps a second encoding for the other end of the batch range where
            one can win (``CompressedLinear.from_linear(alternate=True)``: a sparse layer its 4-bit ``tc`` codes
            for batches of 8 and more, a 30-60 % dense-code layer a sparse copy for small batches). Memory: that
            encoding again, e.g. +0.5 B per weight on a 4 % sparse layer that holds ~0.1 B per weight (6x). The
            default holds one encoding per matrix (``inspect --memory`` / :func:`inference_memory` report it).

    Returns:
        The converted model in eval mode.

    Raises:
        TypeError: if ``model_or_path`` is neither a module nor a path, or ``alternate`` is not a bool.
        ValueError: the converted model fails on ``example_inputs`` or its outputs differ beyond ``tolerance``.
    """
    if not isinstance(alternate, bool):
        raise TypeError(f"to_compressed_inference: alternate must be True or False, got {alternate!r}")
    if isinstance(model_or_path, (str, os.PathLike)):
        from dc_lightning.io import load_compressed  # lazy: io imports safetensors and the Huffman codec

        model = load_compressed(model_or_path)
    elif isinstance(model_or_path, nn.Module):
        model = copy.deepcopy(model_or_path)
    else:
        raise TypeError(f"model_or_path must be an nn.Module or a path, got {type(model_or_path).__name__}")
    if device is not None:
        model = model.to(device)
    model.eval()
    checked = example_inputs is not None
    targets = [(name, m) for name, m, _ in named_targets(model)]
    reference, calls = reference_outputs(model, example_inputs, targets) if checked else (None, None)
    on_trial = checked and any(d.trial and d.action == "convert" for d in plan_conversion(model, exclude,
                                                                                           outputs_checked=True))
    dense = copy.deepcopy(model) if on_trial else None  # to convert again without the trials if they fail
    options = dict(fuse_relu=fuse_relu, outputs_checked=checked, log_decisions=False)
    token = ALTERNATE.set(alternate)
    try:
        return _convert_and_check(model, exclude, options, checked, example_inputs, reference, tolerance, calls,
                                  autotune_batches, dtype, dense)  # fmt: skip
    finally:
        ALTERNATE.reset(token)


def _convert_and_check(
    model: nn.Module, exclude: Sequence[str], options: dict, checked: bool, example_inputs: Any, reference: Any,
    tolerance: float | None, calls: Any, autotune_batches: Sequence[int] | None, dtype: torch.dtype,
    dense: nn.Module | None,
) -> nn.Module:  # fmt: skip
    model, decisions = convert_model(model, exclude, **options)
    if checked:
        try:
            _check(model, decisions, example_inputs, reference, tolerance, calls, autotune_batches, dtype)
        except ValueError as failure:
            trials = [d for d in decisions if d.action == "convert" and d.trial]
            if dense is None or not trials:
                _log(decisions, model)
                raise
            # the outputs rule the trials out: keep those layers (and their tied partners) dense and convert again
            what = str(failure).split(" Converted layers:")[0].removeprefix("to_compressed_inference: ").rstrip(".")
            keep = {d.name: f"{d.trial}; example_inputs rule its conversion out ({what})" for d in trials}
            model, decisions = convert_model(dense, exclude, keep=keep, **options)
            try:
                _check(model, decisions, example_inputs, reference, tolerance, calls, autotune_batches, dtype)
            finally:
                _log(decisions, model)
            return model
    elif autotune_batches:
        _autotune(model, autotune_batches, dtype)
    model.eval()
    _log(decisions, model)
    return model


def _autotune(model: nn.Module, batches: Sequence[int], dtype: torch.dtype) -> None:
    for m in model.modules():
        if isinstance(m, CompressedLinear) and m.device.type == "cuda":
            m.autotune(batches, dtype)
    model.eval()


def _check(
    model: nn.Module, decisions: list[Decision], example_inputs: Any, reference: Any, tolerance: float | None,
    calls: dict, autotune_batches: Sequence[int] | None, dtype: torch.dtype,
) -> None:  # fmt: skip
    """Autotune (``autotune_batches``), then compare the converted model's outputs with ``reference``."""
    if autotune_batches:
        _autotune(model, autotune_batches, dtype)
    model.eval()
    converted = [d.name for d in decisions if d.action == "convert"]
    err = check_outputs(model, example_inputs, reference, tolerance, converted, calls)
    log.info("to_compressed_inference: outputs match the original on example_inputs (relative error %.3g)", err)


def inference_memory(
    path: str | os.PathLike, device: torch.device | str = "cpu", *, model: nn.Module | None = None, trusted: Any = None
) -> dict:
    """What a ``.dcz`` file costs at each stage: bytes on disk, bytes every layer holds in ``device`` memory after
    :func:`to_compressed_inference` (converted or kept dense, each storage once), and their dense fp16 bytes
    (:func:`compressed_memory` per layer).

    Args:
        path: the file.
        device: where the converted model goes (``"cuda"`` for GPU memory).
        model, trusted: as :func:`dc_lightning.io.load_compressed`.

    Returns:
        :func:`compressed_memory`'s dict plus ``"file_bytes"`` and ``"device"``.
    """
    from dc_lightning.io import load_compressed  # lazy: io imports safetensors and the Huffman codec

    converted = to_compressed_inference(load_compressed(path, model=model, trusted=trusted), device=device)
    mem = compressed_memory(converted)
    mem.update(file_bytes=os.path.getsize(path), device=str(device))
    return mem
