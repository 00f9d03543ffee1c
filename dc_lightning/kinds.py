"""The one registry of weight kinds: every torch layer type the compression knows, in one table.

A **kind** says, for one torch layer type, which of its parameters are weight matrices (the targets of
:mod:`dc_lightning.targets`), its paper **family** (``"fc"`` or ``"conv"``: the default codebook bits AND the default
relative-index bits both follow from it), whether the compression callbacks take it by default, what replacing it
removes, and the inference module that replaces it in ``to_compressed_inference``:

==========================  ======  ===============================================  =======  ========================
torch type                  family  weight matrices                                  default  replaced by
==========================  ======  ===============================================  =======  ========================
``nn.Linear``               fc      ``weight``                                       yes      ``CompressedLinear``
``nn.Conv1d/2d/3d``         conv    ``weight``                                       yes      (decoded dense)
torch's conv base           conv    ``weight``                                       no       (decoded dense)
(``ConvTranspose*d``...)
``nn.Embedding``            fc      ``weight``                                       yes      ``CompressedEmbedding``
``nn.MultiheadAttention``   fc      ``in_proj_weight``, or ``q/k/v_proj_weight``     yes      ``CompressedMultihead-
                                    when key/value sizes differ (``out_proj`` is              Attention`` (with its
                                    an ``nn.Linear``: a target of its own)                    ``out_proj``)
``nn.LSTM/GRU/RNN``         fc      every 2-D ``weight_*``: ``weight_ih_l{k}``,      yes      ``CompressedLSTM/GRU/
                                    ``weight_hh_l{k}`` (``_reverse``), an LSTM's              RNN``
                                    ``weight_hr_l{k}``
``nn.RNNBase`` (other)      fc      as ``nn.LSTM``                                   yes      (kept dense)
Hugging Face ``Conv1D``     fc      ``weight`` (``[in, out]``: ``y = x @ W + b``,    yes      ``CompressedConv1D``
(by name, see below)                a Linear's weight transposed)
==========================  ======  ===============================================  =======  ========================

**Lookup.** A module's kind is the entry of the nearest registered class in its MRO, so subclasses count
(``MultiheadAttention.out_proj`` is an ``nn.Linear`` subclass; a user's ``nn.Conv2d`` subclass is a Conv2d).

**Classes of optional packages** are registered by their qualified name, never imported here (transformers is
optional): :func:`named_type` gives a stand-in class for ``"transformers.pytorch_utils.Conv1D"`` whose
``isinstance``/``issubclass`` checks look for that qualified name in the class's MRO (so subclasses count, and
nothing needs importing: an instance of the class exists only once its module is imported). The stand-in sits in
:data:`DEFAULT_TARGET_TYPES` like any torch type and can be named in ``types=``; :func:`kind_of` returns the entry
with ``torch_type`` set to the real class found in the MRO. GPT-2's ``c_attn``/``c_proj``/``c_fc`` are ``Conv1D``.

**Families** [DC §2, §5]: fc layers get 5-bit codebooks (32 shared weights) and 5-bit relative indices, conv layers
8 and 8. Embedding tables, attention projections and recurrent gate matrices are matrix products like an fc layer's
(EIE's NT-LSTM layer ran on the same path as the fc layers): fc. :func:`paper_bits` and :func:`paper_index_bits`
both read :func:`family_of`, so the two defaults cannot disagree.

**Unknown modules** (one rule): a module of no registered kind (a user's module holding a ``weight`` parameter,
``nn.Bilinear``, ``nn.LayerNorm``) is never a default target. Named in ``types=``, its one weight matrix is its
``weight`` parameter and it is in the **fc family** (5-bit codebook, 5-bit index): an unknown weight is treated as a
matrix product. Subclass ``nn.Linear`` or torch's conv classes to get those kinds, or give ``bits=``/``index_bits=``.
It has no inference module: ``to_compressed_inference`` keeps it dense and says so.

**Adding a kind** is one :class:`Kind` entry in :data:`KINDS` plus one inference module; its converter is loaded
lazily (a function here that imports it), so that importing the registry (every target selection does) does not
import the inference modules and the kernels.
"""

from __future__ import annotations

import copyreg
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from torch import nn

from dc_lightning.buffers import WEIGHT

__all__ = [
    "DEFAULT_TARGET_TYPES",
    "FAMILIES",
    "HF_CONV1D",
    "KINDS",
    "PAPER_BITS",
    "PAPER_INDEX_BITS",
    "UNKNOWN_FAMILY",
    "Converter",
    "Kind",
    "compressed_module_types",
    "family_of",
    "held_weights",
    "kind_of",
    "named_type",
    "paper_bits",
    "paper_index_bits",
    "qualified_name",
    "weight_params",
]

FAMILIES = ("fc", "conv")
#: [DC §5]: shared-weight (codebook) bits: 8 for conv layers (256 shared weights), 5 for fc layers (32)
PAPER_BITS = {"conv": 8, "fc": 5}
#: [DC §2]: relative-index bits: 8 for conv layers, 5 for fc layers
PAPER_INDEX_BITS = {"conv": 8, "fc": 5}
#: the family of a module of no registered kind (see the module docstring)
UNKNOWN_FAMILY = "fc"


class Converter(NamedTuple):
    """The inference module that replaces a kind, and how to build it from a layer."""

    module_type: type[nn.Module]
    #: ``build(layer, relu, keep_dense)``: ``relu`` fuses a following ``nn.ReLU`` (kinds with ``fuses_relu``),
    #: ``keep_dense`` names compressed weights to keep dense inside the replacement
    build: Callable[[nn.Module, bool, tuple[str, ...]], nn.Module]


# ---------------------------------------------------------------------------- classes of optional packages


def qualified_name(cls: type) -> str:
    """``"<module>.<qualname>"`` of a class (``"transformers.pytorch_utils.Conv1D"``)."""
    return f"{cls.__module__}.{cls.__qualname__}"


class _NamedType(type):
    """Metaclass of :func:`named_type`'s stand-ins: ``isinstance``/``issubclass`` by qualified name in the MRO."""

    qualified: str

    def __instancecheck__(cls, obj: object) -> bool:
        return cls.__subclasscheck__(type(obj))

    def __subclasscheck__(cls, sub: type) -> bool:
        return sub is cls or any(qualified_name(c) == cls.qualified for c in getattr(sub, "__mro__", ()))

    def __call__(cls, *args: object, **kwargs: object) -> nn.Module:
        raise TypeError(f"{cls!r} only stands in for {cls.qualified} in isinstance checks; build the real class")

    def __repr__(cls) -> str:
        return f"<class {cls.qualified!r} (by name)>"


@functools.cache
def named_type(qualified: str) -> type[nn.Module]:
    """A stand-in for the ``nn.Module`` class ``qualified`` (``"pkg.module.Class"``) of an optional package, for
    ``isinstance`` checks and ``types=`` tuples, that never imports the package: an object is an instance when a
    class of that qualified name is in its type's MRO (subclasses count). One object per name (pickles by name)."""
    return _NamedType(qualified.rpartition(".")[2], (nn.Module,), {"qualified": qualified, "__module__": __name__})


copyreg.pickle(_NamedType, lambda cls: (named_type, (cls.qualified,)))  # ddp_spawn pickles callbacks' types=

#: Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections), by name (:func:`named_type`)
HF_CONV1D = named_type("transformers.pytorch_utils.Conv1D")


# ---------------------------------------------------------------------------------------- weights and removals


def _own(m: nn.Module) -> dict[str, nn.Parameter]:
    return dict(m.named_parameters(recurse=False))


def _own_weight(m: nn.Module) -> list[str]:
    """``["weight"]`` when ``weight`` is a parameter of ``m`` (Linear, Conv, Embedding, unknown modules)."""
    return [WEIGHT] if isinstance(_own(m).get(WEIGHT), nn.Parameter) else []


def _weight_attr(m: nn.Module) -> set[tuple[str | None, str]]:
    return {(None, WEIGHT)}


_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _mha_weights(m: nn.Module) -> list[str]:
    own = _own(m)  # in_proj_weight, or q/k/v_proj_weight when key/value sizes differ (the others are None)
    return [n for n in _MHA_WEIGHTS if n in own]


def _mha_removed(m: nn.Module) -> set[tuple[str | None, str]]:
    return {(None, n) for n in _MHA_WEIGHTS} | {("out_proj", WEIGHT)}


def _rnn_weights(m: nn.Module) -> list[str]:
    return [n for n, p in _own(m).items() if n.startswith("weight_") and p.dim() >= 2]


def _rnn_removed(m: nn.Module) -> set[tuple[str | None, str]]:
    names = set(_own(m)) | {"_flat_weights", "all_weights"}
    return {(None, n) for n in names}


def _embedding_refuses(m: nn.Module) -> str:
    if m.max_norm is not None:
        return f"max_norm={m.max_norm}: torch renormalises the dense weight in place on lookup"
    return ""


# ---------------------------------------------------------------------- converters (lazy: inference imports kernels)


def _linear() -> Converter:
    from dc_lightning.inference.linear import CompressedLinear

    return Converter(CompressedLinear, lambda m, relu, keep_dense: CompressedLinear.from_linear(m, relu=relu))


def _embedding() -> Converter:
    from dc_lightning.inference.embedding import CompressedEmbedding

    return Converter(CompressedEmbedding, lambda m, relu, keep_dense: CompressedEmbedding.from_module(m))


def _attention() -> Converter:
    from dc_lightning.inference.attention import CompressedMultiheadAttention as C

    return Converter(C, lambda m, relu, keep_dense: C.from_module(m, keep_dense))


def _lstm() -> Converter:
    from dc_lightning.inference.recurrent import CompressedLSTM as C

    return Converter(C, lambda m, relu, keep_dense: C.from_module(m, keep_dense))


def _gru() -> Converter:
    from dc_lightning.inference.recurrent import CompressedGRU as C

    return Converter(C, lambda m, relu, keep_dense: C.from_module(m, keep_dense))


def _rnn() -> Converter:
    from dc_lightning.inference.recurrent import CompressedRNN as C

    return Converter(C, lambda m, relu, keep_dense: C.from_module(m, keep_dense))


def _conv1d() -> Converter:
    from dc_lightning.inference.conv1d import CompressedConv1D as C

    return Converter(C, lambda m, relu, keep_dense: C.from_module(m))


# ------------------------------------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class Kind:
    """One weight kind (see the module docstring).

    Attributes:
        torch_type: the torch class (subclasses count), or a :func:`named_type` stand-in for a class of an optional
            package (:func:`kind_of` returns the entry with the real class found in the module's MRO).
        family: ``"fc"`` or ``"conv"``: the paper defaults of :data:`PAPER_BITS` and :data:`PAPER_INDEX_BITS`.
        weights: the names of a module's weight matrices (its targets), in registration order.
        default_target: whether the compression callbacks take it without ``types=``.
        removes: the ``(owner, attribute)`` reads (owner ``None`` = the layer itself, else a submodule name) that
            break once the layer is replaced (what the conversion's source check looks for).
        parts: submodules the replacement absorbs, their weight matrices converted with it (an attention's
            ``out_proj``).
        converter: loads the :class:`Converter` (``None``: no inference module; the layer stays dense).
        fuses_relu: the converter can fold an ``nn.ReLU`` that follows the layer in an ``nn.Sequential``.
        refuses: why a layer of this kind cannot be replaced (``""`` when it can).
    """

    torch_type: type[nn.Module]
    family: str
    weights: Callable[[nn.Module], list[str]] = _own_weight
    default_target: bool = True
    removes: Callable[[nn.Module], set[tuple[str | None, str]]] = _weight_attr
    parts: tuple[str, ...] = ()
    converter: Callable[[], Converter] | None = None
    fuses_relu: bool = False
    refuses: Callable[[nn.Module], str] | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"kind {self.name}: family {self.family!r} is unknown; valid: {list(FAMILIES)}")

    @property
    def name(self) -> str:
        """The torch class name (``"Linear"``, ``"LSTM"``): what conversion decisions call the kind."""
        return self.torch_type.__name__


#: every weight kind; order is the order of :data:`DEFAULT_TARGET_TYPES` (lookup goes by MRO, not by this order)
KINDS: tuple[Kind, ...] = (
    Kind(nn.Linear, "fc", converter=_linear, fuses_relu=True),
    Kind(nn.Conv1d, "conv"),
    Kind(nn.Conv2d, "conv"),
    Kind(nn.Conv3d, "conv"),
    Kind(nn.Embedding, "fc", converter=_embedding, refuses=_embedding_refuses),
    Kind(nn.MultiheadAttention, "fc", _mha_weights, removes=_mha_removed, parts=("out_proj",), converter=_attention),
    Kind(nn.RNNBase, "fc", _rnn_weights, removes=_rnn_removed),
    Kind(nn.LSTM, "fc", _rnn_weights, removes=_rnn_removed, converter=_lstm),
    Kind(nn.GRU, "fc", _rnn_weights, removes=_rnn_removed, converter=_gru),
    Kind(nn.RNN, "fc", _rnn_weights, removes=_rnn_removed, converter=_rnn),
    # torch's conv base: ConvTranspose1d/2d/3d and any other conv; a target only when named in types=
    Kind(nn.modules.conv._ConvNd, "conv", default_target=False),
    # Hugging Face's transposed Linear (transformers is optional: named, not imported)
    Kind(HF_CONV1D, "fc", converter=_conv1d),
)
_BY_TYPE = {k.torch_type: k for k in KINDS if not isinstance(k.torch_type, _NamedType)}
_BY_NAME = {k.torch_type.qualified: k for k in KINDS if isinstance(k.torch_type, _NamedType)}
assert len(_BY_TYPE) + len(_BY_NAME) == len(KINDS), "one entry per torch type"


def _minimal(types: list[type[nn.Module]]) -> tuple[type[nn.Module], ...]:
    """``types`` without those a broader one covers (``nn.LSTM`` under ``nn.RNNBase``)."""
    return tuple(t for t in types if not any(o is not t and issubclass(t, o) for o in types))


#: module types whose weight matrices the compression callbacks target by default (``isinstance``)
DEFAULT_TARGET_TYPES: tuple[type[nn.Module], ...] = _minimal([k.torch_type for k in KINDS if k.default_target])


def kind_of(module: nn.Module) -> Kind | None:
    """The kind of ``module``: the entry of the nearest registered class in its MRO; ``None`` when unknown. An
    entry registered by name (:func:`named_type`) comes back with ``torch_type`` the real class of the MRO."""
    return _kind_of_class(type(module))


@functools.cache
def _kind_of_class(module_type: type) -> Kind | None:
    for cls in module_type.__mro__:
        kind = _BY_TYPE.get(cls)
        if kind is not None:
            return kind
        kind = _BY_NAME.get(qualified_name(cls))
        if kind is not None:
            return dataclasses.replace(kind, torch_type=cls)
    return None


def weight_params(module: nn.Module) -> list[str]:
    """The names of the weight matrices of ``module`` (``[]`` when it has none); an unknown module's is its
    ``weight`` parameter."""
    kind = kind_of(module)
    return (kind.weights if kind is not None else _own_weight)(module)


def family_of(module: nn.Module) -> str:
    """``"fc"`` or ``"conv"``: the kind's family, :data:`UNKNOWN_FAMILY` for an unknown module."""
    kind = kind_of(module)
    return kind.family if kind is not None else UNKNOWN_FAMILY


def paper_bits(module: nn.Module) -> int:
    """Default codebook bits of ``module``'s weight matrices [DC §5]: 8 for the conv family, 5 for fc."""
    return PAPER_BITS[family_of(module)]


def paper_index_bits(module: nn.Module) -> int:
    """Default relative-index bits of ``module``'s weight matrices [DC §2]: 8 for the conv family, 5 for fc."""
    return PAPER_INDEX_BITS[family_of(module)]


def held_weights(module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """``(owner, parameter, label)`` of every weight matrix the replacement of ``module`` holds: its own (label =
    the parameter) and those of its absorbed parts (label ``<part>.<parameter>``, e.g. ``out_proj.weight``)."""
    kind = kind_of(module)
    out = [(module, p, p) for p in weight_params(module)]
    for part in kind.parts if kind is not None else ():
        sub = getattr(module, part)
        out += [(sub, p, f"{part}.{p}") for p in weight_params(sub)]
    return out


@functools.cache
def compressed_module_types() -> tuple[type[nn.Module], ...]:
    """The inference module types that hold compressed weights after ``to_compressed_inference`` (every kind's
    converter; this imports the inference modules)."""
    return tuple(dict.fromkeys(k.converter().module_type for k in KINDS if k.converter is not None))
