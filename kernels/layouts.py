"""The one registry of weight layouts, and the rules that pick a layout per layer.

A *layout* is how a compressed (pruned, weight-shared) matrix is stored on the device and multiplied or looked up
from there. Every layout is one family folder of ``kernels/`` plus one :class:`LayoutSpec` entry in
:data:`REGISTRY` below; everything that uses layouts goes through the registry (``CompressedLinear`` holds a layout
name and that layout's buffers, ``CompressedEmbedding`` likewise, the tests run every entry), so nothing else names
a layout's classes or functions:

* ``"sparse"`` (``sparse/``): sliced-ELL ``(column, code)`` entries, 16 bits per non-zero plus ELL padding; its
  kernels gather ``x`` per non-zero on CUDA cores. Fewest bytes at low density, the fastest at small batches.
  ``layout.py`` (packing, decode, reference), ``jit.py``, ``tuning.py``, ``op.py`` (op ``dc_lightning::eie_linear``).
* ``"lut"`` (``lut/``): every position holds a 2-8-bit code (plus a bitmap of kept positions, or a zero code); its
  kernel decodes a tile once per program and multiplies it on tensor cores with the batch tile. ``layout.py``,
  ``jit.py``, ``op.py`` (op ``dc_lightning::lut_linear``). It also decodes single rows (``rows``): the embedding
  of a tied output layer looks its rows up in the layer's LUT copy (``inference.embedding.TiedEmbedding``).
* ``"ell"``, ``"codes"`` (``rows/``): row layouts of embedding tables, pure PyTorch; a lookup decodes only the
  rows it is asked for (``LayoutSpec.rows``).

Adding a layout is one folder plus one entry:

1. ``kernels/<family>/layout.py``: a ``@dataclass`` deriving from ``runtime.PackedLayer`` (its tensors and integers
   plus ``out_features``, ``in_features``, ``nnz``; ``check()`` validates them for a call), the packer
   ``pack(out_features, in_features, rows, cols, codes, codebook, *, device=None, **options)`` (start from
   ``runtime.sorted_coordinates``), the dense ``decode(packed)`` and the PyTorch ``reference(x, packed, bias,
   relu)`` (``runtime.decoded_linear`` on the decode); for lookups ``rows(packed, idx)``. With a GPU kernel, also
   ``jit.py`` and ``op.py``: the launcher starts with ``runtime.start_launch``, the op is registered by
   ``runtime.register_op`` with ``runtime.run_op`` / ``runtime.fake_op`` as its body, ``autotune`` runs
   ``runtime.autotune_batches``.
2. One :class:`LayoutSpec` in :data:`REGISTRY` naming those functions, the module buffer each tensor field is
   stored under (the state-dict keys of the modules holding the layout) and the extra-state key of each integer.

The new layout then packs, runs, decodes, saves and loads in ``CompressedLinear.from_linear(layout="<name>")`` and,
with ``rows``, in ``CompressedEmbedding``, and ``tests/kernels/test_layouts.py`` checks it against a float64 reference.
Only the automatic choice names layouts: :func:`choose_layout` (sparse or LUT by density), :func:`lut_batch_min`
and :func:`alternate_layout` (the copy a layer keeps for the other end of the batch range: a sparse layer's LUT copy
for large batches, ``CompressedLinear``'s ``batch_min`` is the switch) and :func:`choose_row_layout`; a layout
joins that choice by a rule there.

Type tests against the packed classes live in this module only (:func:`spec_of`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from dc_lightning.buffers import MAX_CODES

from .lut import op as lut_op
from .lut.layout import LUTPacked, decode_dense_lut, lut_encoding, lut_linear_reference, lut_rows, pack_lut
from .rows import layout as rows_layout
from .rows.layout import RowCodes, RowELL
from .runtime import PackedLayer, check_call, use_triton
from .sparse import op as sparse_op
from .sparse.layout import EIEPacked, decode_dense, eie_linear_reference, pack
from .tc import layout as tc_layout
from .tc import op as tc_op
from .tc.layout import TCPacked, decode_dense_tc, pack_tc, tc_linear_reference, tc_rows

__all__ = [
    "Layout",
    "LayoutSpec",
    "Packed",
    "REGISTRY",
    "SPARSE_BELOW",
    "DUAL_BELOW",
    "spec",
    "spec_of",
    "state_value",
    "row_layouts",
    "dense_layout",
    "choose_layout",
    "used_codebook",
    "misses_tc_by_one",
    "lut_batch_min",
    "alternate_layout",
    "choose_row_layout",
    "layout_of",
    "pack_layer",
    "linear",
    "reference",
    "decode_dense",
    "rows",
    "autotune",
]

Packed = PackedLayer  # the packed layer of any layout

# H200, bench_eie_layouts.py 2026-12-02 (bench/RESULTS.md): at batch 1 the sparse kernel beat the LUT kernel on every
# layer up to 30 % density (VGG-8, 23 %: 7.3 vs 16.1 us; T-4096x4096 at 30 %: 15.0 vs 42 us), so it is the batch-1
# layout up to there; the LUT copy takes over at large batches (see lut_batch_min)
SPARSE_BELOW = 0.30
# a LUT layer below this density keeps a sparse copy for small batches (CompressedLinear.from_linear's default)
DUAL_BELOW = 0.6
_ELL_BYTES_PER_NNZ = 2.3  # 16-bit entry x ~1.15 ELL padding (bench/RESULTS.md)


@dataclass(frozen=True)
class LayoutSpec:
    """One layout: how to pack, run, decode and store a layer in it.

    Attributes:
        name: the registry key (configs, ``extra_repr``, ``CompressedLinear.from_linear(layout=...)``).
        packed: its ``runtime.PackedLayer`` dataclass.
        pack: ``pack(out_features, in_features, rows, cols, codes, codebook, *, device=None, **options)``.
        reference: ``reference(x, packed, bias=None, relu=False)``, the PyTorch product (decode once, ``F.linear``).
        decode: ``decode(packed)``, the dense ``[out_features, in_features]`` weight.
        buffers: packed field -> the module buffer holding it (a state-dict key), in registration order.
        describe: ``describe(packed)``, the layout's phrase in ``extra_repr``.
        state: packed host field (an integer, or a tuple of floats) -> its key in the module's extra state.
        linear: the registered ``torch.library`` op (Triton on CUDA, the reference elsewhere); ``None``: the
            reference everywhere.
        autotune: ``autotune(packed, batch_sizes, dtype, bias, relu)`` -> ``{batch: config with "us"}``, or ``None``.
        rows: ``rows(packed, idx)``, the decoded rows ``idx`` (embedding lookups), or ``None``.
        batch_rank: of two layouts held by one layer, the lower rank runs batches below ``batch_min``.
    """

    name: str
    packed: type[PackedLayer]
    pack: Callable[..., PackedLayer]
    reference: Callable[..., Tensor]
    decode: Callable[[Any], Tensor]
    buffers: Mapping[str, str]
    describe: Callable[[Any], str]
    state: Mapping[str, str] = field(default_factory=dict)
    linear: Callable[..., Tensor] | None = None
    autotune: Callable[..., dict[int, dict[str, Any]]] | None = None
    rows: Callable[[Any, Tensor], Tensor] | None = None
    batch_rank: int = 0

    def run(self, x: Tensor, packed: PackedLayer, bias: Tensor | None = None, relu: bool = False) -> Tensor:
        """``act(x @ W.T + bias)``: the op, or the checked reference for a layout without one. An eager call the op
        would hand to the reference (the CPU) calls it directly: the op's dispatch costs ~0.1 ms, a third of a
        batch-1 product of a 1024x1024 layer (bench/RESULTS.md "CPU path vs dense")."""
        if self.linear is not None and (use_triton(x) or torch.compiler.is_compiling()):
            return self.linear(x, packed, bias, relu)
        check_call(x, packed, bias)
        return self.reference(x, packed, bias, relu)

    def tensors(self, packed: PackedLayer) -> dict[str, Tensor | None]:
        """The layer's tensors by module buffer name (what a module registers)."""
        return {buf: getattr(packed, f) for f, buf in self.buffers.items()}

    def state_of(self, packed: PackedLayer) -> dict[str, Any]:
        """The layer's host values by extra-state key (integers; the ``tc`` table: a tuple of floats)."""
        return {key: state_value(getattr(packed, f)) for f, key in self.state.items()}

    def build(
        self, tensors: Mapping[str, Tensor | None], state: Mapping[str, int], out_features: int, in_features: int,
        nnz: int = -1,
    ) -> PackedLayer:  # fmt: skip
        """The packed layer from a module's buffers (by buffer name) and integers (by extra-state key)."""
        fields = {f: tensors[buf] for f, buf in self.buffers.items()}
        fields.update({f: state_value(state[key]) for f, key in self.state.items()})
        return self.packed(**fields, out_features=out_features, in_features=in_features, nnz=nnz)


REGISTRY: dict[str, LayoutSpec] = {
    s.name: s
    for s in (
        LayoutSpec(
            "sparse", EIEPacked, pack, eie_linear_reference, decode_dense,
            buffers={"entries": "entries", "block_ptr": "block_ptr", "codebook": "codebook"},
            describe=lambda p: f"sparse codebook_bits={p.code_shift - 1}",
            state={"row_tile": "row_tile", "chunk": "chunk", "code_shift": "code_shift"},
            linear=sparse_op.eie_linear, autotune=sparse_op.autotune, batch_rank=0,
        ),
        LayoutSpec(
            "lut", LUTPacked, pack_lut, lut_linear_reference, decode_dense_lut,
            buffers={"codes": "lut_codes", "mask": "lut_mask", "codebook": "lut_codebook"},
            describe=lambda p: f"lut code_bits={p.cbits} bitmap={p.mask is not None}",
            state={"cbits": "lut_cbits"},
            linear=lut_op.lut_linear, autotune=lut_op.autotune_lut, rows=lut_rows, batch_rank=1,
        ),
        LayoutSpec(
            "tc", TCPacked, pack_tc, tc_linear_reference, decode_dense_tc,
            buffers={"codes": "tc_codes", "codebook": "tc_codebook"},
            describe=lambda p: "tc code_bits=4",
            state={"table": "tc_table"},
            linear=tc_op.tc_linear, autotune=tc_op.autotune_tc, rows=tc_rows, batch_rank=1,
        ),
        LayoutSpec(
            "ell", RowELL, rows_layout.pack_ell, rows_layout.ell_reference, rows_layout.decode_ell,
            buffers={"entries": "entries", "codebook": "codebook"},
            describe=lambda p: "ell", rows=rows_layout.ell_rows,
        ),
        LayoutSpec(
            "codes", RowCodes, rows_layout.pack_codes, rows_layout.codes_reference, rows_layout.decode_codes,
            buffers={"codes": "codes", "codebook": "codebook"},
            describe=lambda p: f"codes code_bits={rows_layout.codes_bits(p.codebook.numel())}",
            rows=rows_layout.codes_rows,
        ),
    )
}  # fmt: skip


def state_value(v: Any) -> Any:
    """A layout's host value as extra state keeps it: a sequence becomes a tuple of floats, anything else an int."""
    if isinstance(v, (tuple, list)):
        return tuple(float(e) for e in v)
    return int(v)


def spec(name: str | Enum) -> LayoutSpec:
    """The registry entry of a layout name (a :class:`Layout` member too).

    Raises:
        ValueError: on an unknown name, listing the registered ones.
    """
    key = name.value if isinstance(name, Enum) else name
    got = REGISTRY.get(key) if isinstance(key, str) else None
    if got is None:
        raise ValueError(f"unknown layout {name!r}; registered layouts: {list(REGISTRY)}")
    return got


def spec_of(packed: PackedLayer) -> LayoutSpec:
    """The registry entry of a packed layer (the one place that tests a packed layer's class).

    Raises:
        TypeError: if ``packed`` is no registered layout's packed layer.
    """
    for s in REGISTRY.values():
        if isinstance(packed, s.packed):
            return s
    names = [s.packed.__name__ for s in REGISTRY.values()]
    raise TypeError(f"expected a packed layer of a registered layout ({', '.join(names)}), got {type(packed).__name__}")


def row_layouts() -> list[str]:
    """The layouts that decode single rows (embedding lookups)."""
    return [name for name, s in REGISTRY.items() if s.rows is not None]


# --------------------------------------------------------------------------------------------------------------
# The choice rules
# --------------------------------------------------------------------------------------------------------------


class Layout(str, Enum):
    """The layouts :func:`choose_layout` picks between (values are their registry names)."""

    SPARSE = "sparse"
    LUT = "lut"
    TC = "tc"


def dense_layout(n_centroids: int, dense: bool) -> Layout:
    """The dense-code layout of a codebook: ``tc`` (4-bit codes decoded in registers, tensor cores) when the
    codebook fits its 16-entry table (15 centroids + the zero code when pruned), else ``lut`` (2-8-bit codes)."""
    return Layout.TC if tc_layout.fits(n_centroids, dense) else Layout.LUT


def used_codebook(codes: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """``(codes, codebook)`` with the codebook entries no kept weight uses dropped (codes renumbered; values and
    order of the rest unchanged). A table of 16 entries of which a pruned layer's kept weights use 15 (k-means left
    one empty, or ``zero_code=True`` reserved a 0.0 for the pruned positions: EIE's 15 values + 0) then fits the
    ``tc`` layout's 16-entry table with its zero code. Nothing kept: unchanged."""
    if codes.numel() == 0:
        return codes, codebook
    used, inverse = torch.unique(codes, return_inverse=True)
    if used.numel() == codebook.numel():
        return codes, codebook
    return inverse.to(codes.dtype), codebook[used.to(device=codebook.device, dtype=torch.int64)]


def misses_tc_by_one(packed: PackedLayer) -> bool:
    """Whether ``packed`` is a ``lut`` layer with a bitmap and 4-bit codes: as :func:`lut_encoding` chooses them, a
    pruned layer whose kept weights use 16 shared values, so its zero would be a 17th table entry. With one value
    fewer (``zero_code=True`` at quantization: EIE's 15 values + the zero) it would fit the ``tc`` layout (0.5 bytes
    per position instead of 0.625, decoded in registers for the tensor cores)."""
    return isinstance(packed, LUTPacked) and packed.mask is not None and packed.cbits == 4 and tc_layout.fits(15, False)


def choose_layout(
    out_features: int, in_features: int, nnz: int, n_centroids: int, sparse_below: float = SPARSE_BELOW
) -> tuple[Layout, str]:
    """The layout of a layer by density, and a one-line reason.

    Below ``sparse_below`` the sparse layout (its ~2.3 bytes per non-zero beat 0.5-1.1 bytes per position); from
    there on dense codes (:func:`dense_layout`), whose tensor-core kernels reuse each decoded weight across the
    batch.

    Raises:
        ValueError: if ``sparse_below`` is not in ``[0, 1]`` or the shape is empty.
    """
    if not 0.0 <= sparse_below <= 1.0:
        raise ValueError(f"sparse_below must lie in [0, 1], got {sparse_below}")
    positions = int(out_features) * int(in_features)
    if positions < 1:
        raise ValueError(f"out_features and in_features must be >= 1, got {out_features} and {in_features}")
    density = nnz / positions
    n_cb = max(1, min(int(n_centroids), MAX_CODES))
    ell_b = _ELL_BYTES_PER_NNZ * density
    dense = dense_layout(n_cb, nnz == positions)
    if dense is Layout.TC:
        code, dense_b = "4-bit codes (16-entry table)", tc_layout.bytes_per_position(out_features, in_features)
    else:
        cbits, bitmap = lut_encoding(n_cb, nnz == positions)
        code, dense_b = f"{cbits}-bit codes{' + bitmap' if bitmap else ''}", (cbits + bitmap) / 8.0
    if density < sparse_below:
        why = f"density {density:.1%} < {sparse_below:.0%}: sparse ~{ell_b:.2f} B/position vs {dense.value} " \
              f"{dense_b:.2f}"
        return Layout.SPARSE, why
    return dense, f"density {density:.1%} >= {sparse_below:.0%}: {code}, {dense_b:.2f} B/position"


def lut_batch_min(density: float, layout: str = "lut") -> int:
    """The smallest batch that runs a layer's dense-code copy (``layout``) beside its sparse one, until
    :meth:`CompressedLinear.autotune` measures it.

    ``lut``, measured on the H200 (bench/RESULTS.md, 2026-12-02): below 10 % density the sparse kernel still won
    at batch 16 (VGG-6 46 us vs the LUT's 150+) and lost at 64 (Alex-6 56 vs 117 us); from 10 % on the LUT won from
    batch 16 (Alex-8 9.4 vs 15.2 us, NT-LSTM 8.6 vs 9.1 us). ``tc``: from batch 8 (the design memo's crossover,
    ``kernels-batch.md`` section 7) until measured.
    """
    if layout == Layout.TC.value:
        return 8
    return 64 if density < 0.10 else 16


def alternate_layout(
    name: str, nnz: int, positions: int, dual_below: float = DUAL_BELOW, n_centroids: int = 16
) -> str | None:
    """The layout of the copy a layer in ``name`` may keep for the other end of the batch range, or ``None``.

    A sparse layer: its dense-code layout (:func:`dense_layout`) for large batches; a dense-code layer below
    ``dual_below`` density a sparse copy for small ones (measured on the H200: the sparse kernel wins at batch 1 up
    to 30 % density and stays close up to 60 %); other layouts none. A second copy is the caller's choice
    (``CompressedLinear.from_linear(alternate=True)``): it costs that layout's bytes again.
    """
    if name == Layout.SPARSE.value:
        return dense_layout(n_centroids, nnz == positions).value
    if name in (Layout.LUT.value, Layout.TC.value) and nnz < dual_below * positions:
        return Layout.SPARSE.value
    return None


def choose_row_layout(row_lengths: Tensor, n_cols: int, n_centroids: int) -> str:
    """The row layout of a table whose rows keep ``row_lengths`` entries: the one with fewer index bytes
    (``"codes"`` on a tie; ``"ell"`` when a pruned table leaves ``"codes"`` no free code)."""
    n_rows = row_lengths.numel()
    pruned = int(row_lengths.sum()) < n_rows * n_cols
    dense_b = rows_layout.codes_bytes(n_rows, n_cols, n_centroids, pruned)
    ell_b = rows_layout.ell_bytes(row_lengths, n_cols, n_centroids)
    return "codes" if dense_b is not None and dense_b <= ell_b else "ell"


# --------------------------------------------------------------------------------------------------------------
# Dispatch through the registry
# --------------------------------------------------------------------------------------------------------------


def layout_of(packed: PackedLayer) -> str:
    """The registry name of a packed layer's layout.

    Raises:
        TypeError: if ``packed`` is not a packed layer.
    """
    return spec_of(packed).name


def pack_layer(
    out_features: int,
    in_features: int,
    rows: Tensor,
    cols: Tensor,
    codes: Tensor,
    codebook: Tensor,
    layout: str | Layout = "auto",
    *,
    device: torch.device | str | None = None,
    sparse_below: float = SPARSE_BELOW,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[PackedLayer, str]:
    """Pack a layer in ``layout`` (``"auto"``: :func:`choose_layout`); returns ``(packed, reason)``.

    ``options`` maps a layout name to keyword options of its packer (``{"sparse": {"row_tile": 16}}``); the entry
    of the layout the layer gets is used.

    Raises:
        ValueError: on an unknown layout name, or what the packer raises.
    """
    if layout == "auto":
        layout, why = choose_layout(out_features, in_features, int(torch.as_tensor(rows).numel()),
                                    int(torch.as_tensor(codebook).numel()), sparse_below)  # fmt: skip
    else:
        why = "requested"
    try:
        s = spec(layout)
    except ValueError:
        raise ValueError(f"layout must be one of {['auto', *REGISTRY]}, got {layout!r}") from None
    opts = dict((options or {}).get(s.name, {}))
    return s.pack(out_features, in_features, rows, cols, codes, codebook, device=device, **opts), why


def linear(x: Tensor, packed: PackedLayer, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """``act(x @ W.T + bias)`` through the layout's registered op (Triton on CUDA, PyTorch reference on CPU)."""
    return spec_of(packed).run(x, packed, bias, relu)


def reference(x: Tensor, packed: PackedLayer, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """The layout's pure-PyTorch product (the CPU fallback): the weight decoded once, then ``F.linear`` (the sparse
    layout multiplies small batches straight from its entries)."""
    return spec_of(packed).reference(x, packed, bias, relu)


def decode_dense(packed: PackedLayer) -> Tensor:
    """The dense ``[out, in]`` weight of a packed layer of any layout (float32; a row layout's codebook dtype)."""
    return spec_of(packed).decode(packed)


def rows(packed: PackedLayer, idx: Tensor) -> Tensor:
    """The decoded rows ``idx`` (1-D) of a row layout's table, ``[len(idx), in_features]``.

    Raises:
        ValueError: if the layout has no row lookup.
    """
    s = spec_of(packed)
    if s.rows is None:
        raise ValueError(f"layout {s.name!r} has no row lookup; row layouts: {row_layouts()}")
    return s.rows(packed, idx)


def autotune(
    packed: PackedLayer,
    batch_sizes: tuple[int, ...] = (1,),
    dtype: torch.dtype = torch.float32,
    bias: Tensor | None = None,
    relu: bool = False,
    rep_ms: int = 20,
) -> dict[int, dict[str, Any]]:
    """Time the layout's launch configurations once per batch size and record the fastest (CUDA only); ``{}`` for
    a layout without launch configurations."""
    s = spec_of(packed)
    if s.autotune is None:
        return {}
    return s.autotune(packed, batch_sizes, dtype, bias, relu, rep_ms)
