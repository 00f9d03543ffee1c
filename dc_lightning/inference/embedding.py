"""``CompressedEmbedding``: ``nn.Embedding`` that decodes only the rows it is asked for; ``TiedEmbedding``: one whose
weight is tied to an output projection, decoding its rows from the projection's compressed table."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dc_lightning.inference.linear import CompressedLinear
from dc_lightning.inference.matrix import param_codes
from dc_lightning.kernels import layouts
from dc_lightning.kernels.layouts import Packed

__all__ = ["CompressedEmbedding", "TiedEmbedding"]


class CompressedEmbedding(nn.Module):
    """``nn.Embedding`` whose lookup decodes only the requested rows from the compressed form.

    It holds a table in one of the row layouts of the registry ``dc_lightning.kernels.layouts`` (those with a
    ``rows`` lookup, ``kernels/rows/``), under the buffer names of its entry; :meth:`from_module` keeps the one with
    fewer bytes (:func:`dc_lightning.kernels.layouts.choose_row_layout`):

    * ``"ell"`` (sparse rows): ``entries``, the (column, code) pairs of the kept entries of every row, padded to the
      longest row with a zero code; a lookup scatters the requested rows' ``codebook[codes]`` into zeros (five ops,
      fixed shapes, so it runs under ``torch.compile(fullgraph=True)`` and in CUDA graphs).
    * ``"codes"`` (dense codes): one 4- or 8-bit code per weight; a lookup is ``codebook[codes[rows]]``.

    The codebook is a float buffer (it follows ``module.to(dtype)``); the output has its dtype. ``padding_idx``
    only shapes gradients in torch, so its row is decoded like any other (it is kept as an attribute).

    Args:
        packed: the table in a row layout (``layouts.pack_layer(..., "ell")`` or a row layout's packer).
        padding_idx: the embedding's ``padding_idx`` (kept as an attribute).

    Raises:
        ValueError: if ``packed``'s layout has no row lookup.
    """

    def __init__(self, packed: Packed, *, padding_idx: int | None = None) -> None:
        super().__init__()
        spec = layouts.spec_of(packed)
        if spec.rows is None:
            raise ValueError(f"layout must be one of the row layouts {layouts.row_layouts()}, got {spec.name!r}")
        self.layout = spec.name
        self.num_embeddings = int(packed.out_features)
        self.embedding_dim = int(packed.in_features)
        self.padding_idx = padding_idx
        self.nnz = int(packed.nnz)
        self._layout_state = spec.state_of(packed)
        for name, t in spec.tensors(packed).items():
            self.register_buffer(name, t)

    @classmethod
    def from_module(cls, emb: nn.Embedding, layout: str | None = None) -> CompressedEmbedding:
        """Build from an ``nn.Embedding`` whose weight carries compression buffers.

        Args:
            emb: the embedding.
            layout: a row layout (``"ell"``, ``"codes"``) or ``None`` (the smaller one).

        Raises:
            TypeError: ``emb`` is not an ``nn.Embedding``.
            ValueError: ``max_norm`` is set (torch renormalises the dense weight in place on lookup), the weight
                cannot be coded (:func:`param_codes`), or ``layout`` is unknown / impossible.
        """
        # the registry (dc_lightning.kinds) routes nn.Embedding here; a direct call gets nn.Embedding's contract
        contract = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "weight")
        missing = [a for a in contract if not hasattr(emb, a)]
        if missing:
            raise TypeError(f"from_module expects an nn.Embedding, got {type(emb).__name__} (no {missing})")
        if emb.max_norm is not None:
            raise ValueError(f"embedding with max_norm={emb.max_norm} renormalises its dense weight on lookup")
        mask, codes, codebook = param_codes(emb, "weight")
        V, D = codes.shape
        if layout is None:
            layout = layouts.choose_row_layout(mask.sum(dim=1), D, codebook.numel())
        if layout not in layouts.row_layouts():
            raise ValueError(f"layout must be one of {layouts.row_layouts()} or None, got {layout!r}")
        rows, cols = mask.nonzero(as_tuple=True)
        packed = layouts.spec(layout).pack(V, D, rows, cols, codes[rows, cols], codebook.to(emb.weight.dtype))
        return cls(packed, padding_idx=emb.padding_idx)

    def packed(self) -> Packed:
        """The table in its row layout (views of this module's buffers).

        Built once and reused while the buffers are the same tensors (a lookup of a few tokens takes ~20 us, of
        which building the dataclass would be ~1.5); ``.to()``/``.half()`` (``_apply``), loading a state dict and a
        new extra state drop it, and a buffer replaced any other way is caught by the identity check.
        """
        # self._buffers, not getattr: nn.Module's attribute lookup is a visible share of a small lookup's time
        cached = self.__dict__.get("_packed_cache")
        bufs = self._buffers
        if cached is not None and all(getattr(cached[1], f) is bufs[b] for f, b in cached[0]):
            return cached[1]
        spec = layouts.spec(self.layout)
        got = spec.build(bufs, self._layout_state, self.num_embeddings, self.embedding_dim, self.nnz)
        self.__dict__["_packed_cache"] = (tuple(spec.buffers.items()), got)
        return got

    def _drop_packed(self) -> None:
        self.__dict__.pop("_packed_cache", None)

    def _apply(self, fn: Any, recurse: bool = True) -> CompressedEmbedding:
        self._drop_packed()  # the cache must not keep the old tensors alive after .to()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._drop_packed()
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, input: Tensor) -> Tensor:
        lookup = layouts.REGISTRY[self.layout].rows
        if input.dim() == 1:
            return lookup(self.packed(), input)
        return lookup(self.packed(), input.reshape(-1)).view(*input.shape, self.embedding_dim)

    def dense_numel(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def get_extra_state(self) -> dict:
        return {"layout": self.layout, "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx, "nnz": self.nnz, **self._layout_state}

    def set_extra_state(self, state: dict) -> None:
        self._drop_packed()
        for k, v in state.items():
            if k in self._layout_state:
                self._layout_state[k] = layouts.state_value(v)
            else:
                setattr(self, k, v)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, layout={self.layout}, nnz={self.nnz}"
        return s + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")


class TiedEmbedding(CompressedEmbedding):
    """An ``nn.Embedding`` tied to an output projection (``lm_head.weight = wte.weight``, Press & Wolf 2017): its
    lookups decode rows from the projection's compressed table, so the matrix is in memory once.

    It holds no table of its own. ``table`` is the :class:`CompressedLinear` that replaced the projection, kept as a
    plain reference, not a submodule: the projection's own place in the model owns the packed tensors, so
    ``state_dict``, ``model.to()``, ``copy.deepcopy`` and memory accounting see them once (moving this module alone
    does not move them). Rows come from the first of the projection's layouts with a row lookup (its ``tc`` or
    ``lut`` codes; a sparse projection keeps such a copy for them, ``CompressedLinear.from_linear(lookup=True)``).
    The projection's codebook stays float32, so the output is cast to the dtype the dense table would have: that of
    ``out_dtype``, an empty non-persistent buffer that follows ``module.to(dtype)`` / ``.half()``.

    Args:
        table: the converted projection.
        padding_idx: the embedding's ``padding_idx`` (kept as an attribute).
        dtype: the embedding's weight dtype.
        table_name: the projection's name in the model (shown by ``extra_repr``).

    Raises:
        ValueError: ``table`` holds no layout with a row lookup.
    """

    def __init__(
        self, table: CompressedLinear, *, padding_idx: int | None = None, dtype: torch.dtype = torch.float32,
        table_name: str = "",
    ) -> None:  # fmt: skip
        nn.Module.__init__(self)  # not CompressedEmbedding's: no buffers of its own
        held = [n for n in table.layout_names if layouts.spec(n).rows is not None]
        if not held:
            raise ValueError(
                f"the tied projection holds layouts {list(table.layout_names)}, none with a row lookup; row layouts: "
                f"{layouts.row_layouts()} (build it with CompressedLinear.from_linear(lookup=True))"
            )
        self.layout = held[0]
        self.num_embeddings = int(table.out_features)
        self.embedding_dim = int(table.in_features)
        self.padding_idx = padding_idx
        self.nnz = int(table.nnz)
        self._layout_state: dict[str, int] = {}
        self.table_name = table_name
        object.__setattr__(self, "table", table)  # a reference, not a registered submodule (see above)
        self.register_buffer("out_dtype", torch.empty(0, dtype=dtype, device=table.device), persistent=False)

    def packed(self) -> Packed:
        """The projection's table in its row layout (views of the projection's buffers)."""
        return self.table.packed(self.layout)

    def forward(self, input: Tensor) -> Tensor:
        rows = layouts.spec(self.layout).rows(self.packed(), input.reshape(-1))
        return rows.to(self.out_dtype.dtype).reshape(*input.shape, self.embedding_dim)

    def dense_numel(self) -> int:
        """0: the dense matrix is the projection's, counted with it (memory accounting counts it once)."""
        return 0

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, rows of {self.table_name or 'its table'} ({self.layout})"
        return s + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
