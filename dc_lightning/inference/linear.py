"""EIE inference path: drop-in modules that multiply straight from the compressed format.

:class:`CompressedLinear` replaces an ``nn.Linear`` that carries a codebook (docs/DESIGN.md buffers
``weight_mask`` / ``weight_codebook`` / ``weight_assign``). It holds only the buffers of a layout of the registry
``dc_lightning.kernels.layouts`` chosen by density (sparse sliced-ELL ``(column, code)`` entries, 4-bit ``tc``
codes, or dense packed 2-8-bit ``lut`` codes), the codebook and the bias, never a dense weight. On CUDA its forward
is the layout's Triton kernel; on the CPU the layout's pure-PyTorch reference (small batches of a sparse layer
multiply straight from its entries; otherwise the weight is decoded once per call, then ``F.linear``).

:func:`dc_lightning.inference.conversion.to_compressed_inference` converts a whole model (or a ``.dcz`` file via
``dc_lightning.io.load_compressed``);
convolutions keep their decoded dense weights; attention, recurrent layers and embeddings get the modules of
:mod:`dc_lightning.inference.attention`. EIE [EIE] §III computes ``b = ReLU(S[I] a)``: a ``Linear`` directly
followed by ``ReLU`` inside an ``nn.Sequential`` gets the ReLU fused into the kernel's epilogue.

Example::

    >>> import torch
    >>> from torch import nn
    >>> lin = nn.Linear(8, 4)
    >>> cb = torch.tensor([-0.5, 0.5])
    >>> assign = torch.randint(0, 2, (4, 8), dtype=torch.uint8)
    >>> lin.register_buffer("weight_codebook", cb)
    >>> lin.register_buffer("weight_assign", assign)
    >>> lin.weight.data = cb[assign.long()]
    >>> layer = CompressedLinear.from_linear(lin)
    >>> x = torch.randn(2, 8)
    >>> bool(torch.allclose(layer(x), lin(x), atol=1e-6))
    True
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn

from dc_lightning.buffers import CODEBOOK, MAX_CODES, get_codebook, get_mask, layer_codes
from dc_lightning.kernels import layouts
from dc_lightning.kernels.layouts import Packed

__all__ = ["ALTERNATE", "CompressedLinear"]

log = logging.getLogger(__name__)
#: the default of ``CompressedLinear.from_linear(alternate=None)``: ``to_compressed_inference(alternate=...)`` sets it
#: for one conversion, so every kind's matrices (attention, recurrent, Conv1D ...) follow it
ALTERNATE: ContextVar[bool] = ContextVar("dc_lightning_alternate", default=False)


class CompressedLinear(nn.Module):
    """``y = act(x W^T + b)`` with ``W`` kept in a GPU layout of its codebook indices (never a dense weight).

    The layouts are the entries of the registry ``dc_lightning.kernels.layouts.REGISTRY``: ``sparse`` (sliced-ELL
    ``(column, code)`` entries, ``kernels/sparse/``: fewest bytes, CUDA-core gathers of ``x`` per non-zero),
    ``tc`` (4-bit codes, four per 16-bit word in the tensor cores' fragment order, decoded in registers straight into
    the tensor cores, ``kernels/tc/``: EIE's 16-entry tables) and ``lut`` (dense packed 2-8-bit codes plus a bitmap
    or a zero code, ``kernels/lut/``: the other codebook sizes), or any other registered layout.
    :meth:`from_linear` drops codebook entries no kept weight uses, then picks one encoding by density
    (:func:`dc_lightning.kernels.layouts.choose_layout`): below 30 % sparse, from there on dense codes (``tc`` when
    the codebook fits 16 entries with the zero code, else ``lut``). With ``alternate=True`` a layer keeps a second
    encoding for the other end of the batch range (:func:`~dc_lightning.kernels.layouts.alternate_layout`; memory:
    that encoding's bytes again): batches of ``batch_min`` rows or more then run the one of higher ``batch_rank``
    (the dense codes), smaller ones the sparse one; :meth:`autotune` moves the switch to where it measures it.
    ``extra_repr`` says what the layer holds and why.

    Buffers (saved in ``state_dict``): each held layout's, under the names its registry entry gives (sparse:
    ``entries`` (int16/int32), ``block_ptr`` (int32), ``codebook`` (float32, ``2**bits + 1`` values, the last one
    0.0 for padding); tc: ``tc_codes`` (int16), ``tc_codebook`` (float32 ``[16]``); lut: ``lut_codes``,
    ``lut_mask`` (int32, or absent), ``lut_codebook`` (float32 ``[2**cbits]``)); ``bias`` (float32 or absent).
    The layouts' host values (integers; the tc table) travel as extra state.

    Args:
        packed: a layer packed by :func:`dc_lightning.kernels.layouts.pack_layer` (or a layout's own packer).
        bias: optional ``[out_features]``.
        relu: apply ReLU in the kernel's epilogue.
        alternate: optional copy of the same weights in another layout.
        batch_min: with two layouts, the smallest batch that runs the one of higher ``batch_rank``.
        reason: why these layouts (shown by ``extra_repr``).

    Example::

        >>> from dc_lightning.kernels.sparse.layout import pack
        >>> p = pack(3, 5, torch.tensor([0, 2]), torch.tensor([4, 1]), torch.tensor([0, 1]), torch.tensor([1., 2.]))
        >>> CompressedLinear(p)(torch.ones(1, 5))
        tensor([[1., 0., 2.]])
    """

    def __init__(
        self,
        packed: Packed,
        bias: Tensor | None = None,
        relu: bool = False,
        *,
        alternate: Packed | None = None,
        batch_min: int = 8,
        reason: str = "",
    ) -> None:
        super().__init__()
        held = sorted(
            ((layouts.spec_of(p), p) for p in (packed, alternate) if p is not None), key=lambda sp: sp[0].batch_rank
        )
        if len(held) == 2 and held[0][0] is held[1][0]:
            raise ValueError(f"alternate must be in the other layout than packed, got two {held[0][0].name} layers")
        if alternate is not None and (alternate.out_features, alternate.in_features) != (
            packed.out_features, packed.in_features,
        ):  # fmt: skip
            raise ValueError(
                f"alternate is {alternate.out_features}x{alternate.in_features}, packed "
                f"{packed.out_features}x{packed.in_features}: they must hold the same weights"
            )
        if int(batch_min) < 1:
            raise ValueError(f"batch_min must be >= 1, got {batch_min}")
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.nnz = packed.nnz
        self.relu = bool(relu)
        self.batch_min = int(batch_min) if alternate is not None else 0
        self.reason = reason
        #: the layouts this layer holds, the one for small batches first
        self.layout_names = tuple(s.name for s, _ in held)
        self._layout_state = {s.name: s.state_of(p) for s, p in held}
        for s, p in held:
            for name, t in s.tensors(p).items():
                self.register_buffer(name, t)
        if bias is not None:
            if bias.numel() != packed.out_features:
                raise ValueError(f"bias has {bias.numel()} values, expected out_features={packed.out_features}")
            self.register_buffer("bias", bias.detach().reshape(-1).to(torch.float32).to(self.device))
        else:
            self.register_buffer("bias", None)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        # the kernels read fp32 codebooks and an fp32 bias whatever the activation dtype: ``model.half()`` /
        # ``.to(bf16)`` must move these buffers (the only floating-point ones), never narrow them
        super()._apply(fn, recurse)
        for name, t in self._buffers.items():
            if t is not None and t.is_floating_point() and t.dtype != torch.float32:
                self._buffers[name] = t.float()
        return self

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        relu: bool = False,
        row_tile: int | None = None,
        chunk: int | None = None,
        layout: str = "auto",
        alternate: bool | None = None,
        lookup: bool = False,
        batch_min: int | None = None,
        sparse_below: float = layouts.SPARSE_BELOW,
        dual_below: float = layouts.DUAL_BELOW,
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> CompressedLinear:
        """Build from an ``nn.Linear``.

        A quantized layer (``weight_codebook`` + ``weight_assign``, optionally ``weight_mask``) is packed from its
        buffers. A pruned-only or plain layer gets a codebook of its distinct non-zero weight values when there are
        at most 256 (``MAX_CODES``) of them (exact); otherwise it is rejected: this path stores codebook indices,
        not floats.

        Args:
            linear: the layer.
            relu: fuse a following ReLU into the kernel.
            row_tile: rows per tile of the sparse layout (``None``: 8..32 from ``out_features``).
            chunk: columns per chunk of the sparse layout (``None``: chosen from the density).
            layout: ``"auto"`` (by density, see :func:`dc_lightning.kernels.layouts.choose_layout`) or a registered
                layout's name (``"sparse"``, ``"tc"``, ``"lut"``, ...): the layout of batch 1.
            alternate: also keep a second encoding where it can win (:func:`dc_lightning.kernels.layouts.
                alternate_layout`): a sparse layer a dense-code copy (``tc`` or ``lut``) for large batches, a
                dense-code layer below ``dual_below`` density a sparse copy for small ones. It costs that
                encoding's bytes again (a 4 % sparse layer: ~0.1 B per weight sparse, +0.5 B per weight for the
                ``tc`` copy); ``False``: one encoding, the least memory; ``None`` (the default): ``False``, or what
                ``to_compressed_inference(alternate=...)`` asks for.
            lookup: the layer must hold a layout with a row lookup (a tied embedding reads its rows from it):
                a sparse layer then keeps its dense-code copy whatever ``alternate`` says.
            batch_min: with two layouts, the smallest batch on the dense codes (``None``: by layout and density,
                :func:`dc_lightning.kernels.layouts.lut_batch_min`, until :meth:`autotune` measures it).
            sparse_below: density below which ``"auto"`` picks the sparse layout.
            dual_below: density below which a dense-code layer keeps a sparse copy (with ``alternate``).
            options: per layout name, keyword options of its packer (``row_tile`` / ``chunk`` are the sparse
                layout's, ``{"lut": {"bitmap": True}}`` ...); used for whichever layouts the layer gets.

        Raises:
            TypeError: if ``linear`` is not an ``nn.Linear``.
            ValueError: if the layer has no codebook and more than 256 distinct non-zero values, or on a bad
                ``layout``.
        """
        # the registry (dc_lightning.kinds) routes nn.Linear here; a direct call gets nn.Linear's shape contract
        weight = getattr(linear, "weight", None)
        shape = (getattr(linear, "out_features", None), getattr(linear, "in_features", None))
        if not (isinstance(weight, torch.Tensor) and hasattr(linear, "bias") and tuple(weight.shape) == shape):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        bias = linear.bias.detach() if linear.bias is not None else None
        device = linear.weight.device
        if get_codebook(linear) is not None:
            rows, cols, codes, centroids, _ = layer_codes(linear)
            rows, cols, codes, centroids = (torch.from_numpy(a) for a in (rows, cols, codes, centroids))
        else:
            w = linear.weight.detach().to(torch.float32)
            mask = get_mask(linear)
            keep = mask.to(torch.bool) if mask is not None else w != 0
            rows, cols = torch.nonzero(keep.cpu(), as_tuple=True)
            centroids, codes = torch.unique(w.cpu()[rows, cols], return_inverse=True)
            if centroids.numel() > MAX_CODES:
                raise ValueError(
                    f"layer {linear} has no {CODEBOOK} and {centroids.numel()} distinct non-zero weights; the "
                    f"EIE path needs at most {MAX_CODES} (quantize it first, e.g. dc_lightning.quantize_model)"
                )
            if centroids.numel() == 0:
                centroids = torch.zeros(1)
        codes, centroids = layouts.used_codebook(codes, centroids)  # unused entries cost table slots, nothing else
        n_out, n_in = linear.out_features, linear.in_features
        opts = {name: dict(o) for name, o in (options or {}).items()}
        sparse = opts.setdefault("sparse", {})
        sparse.update({k: v for k, v in (("row_tile", row_tile), ("chunk", chunk)) if v is not None})
        args = (n_out, n_in, rows, cols, codes, centroids)
        packed, why = layouts.pack_layer(*args, layout, device=device, sparse_below=sparse_below, options=opts)
        other = None
        name = layouts.layout_of(packed)
        if alternate is not None and not isinstance(alternate, bool):
            raise TypeError(f"from_linear: alternate must be True, False or None, got {alternate!r}")
        needs_rows = lookup and layouts.spec(name).rows is None
        if (ALTERNATE.get() if alternate is None else alternate) or needs_rows:
            other_name = layouts.alternate_layout(name, rows.numel(), n_out * n_in, dual_below, centroids.numel())
            if other_name is not None:
                other = layouts.pack_layer(*args, other_name, device=device, options=opts)[0]
                if needs_rows:
                    why += f"; a {other_name} copy for the tied embedding's row lookups"
        if batch_min is None:
            batch_min = layouts.lut_batch_min(rows.numel() / max(1, n_out * n_in),
                                              layouts.layout_of(other) if other is not None else "lut")  # fmt: skip
        return cls(packed, bias=bias, relu=relu, alternate=other, batch_min=batch_min, reason=why)

    # ----------------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input's last dimension must be in_features={self.in_features}, got shape {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        name = self.layout_for(x2.shape[0])
        y = layouts.spec(name).run(x2, self.packed(name), self.bias, self.relu)
        return y.reshape(*lead, self.out_features)

    def layout_for(self, batch: int) -> str:
        """The layout a batch of ``batch`` rows runs on."""
        if len(self.layout_names) > 1 and batch >= self.batch_min:
            return self.layout_names[-1]
        return self.layout_names[0]

    def path(self, batch: int) -> Packed:
        """The packed layer a batch of ``batch`` rows runs on."""
        return self.packed(self.layout_for(batch))

    @property
    def layout(self) -> str:
        """The layout batch 1 runs on (``"sparse"`` or ``"lut"``)."""
        return self.layout_for(1)

    def autotune(self, batch_sizes: Sequence[int] = (1,), dtype: torch.dtype = torch.float32) -> dict[int, dict]:
        """Time the kernel's launch configurations for these batch sizes once and remember the fastest (CUDA only).

        The choice is keyed by the layer's shapes and the activation dtype, so it also applies inside
        ``torch.compile`` and CUDA graphs captured later. A layer holding two layouts times both at every batch
        size and moves ``batch_min`` to the smallest tuned batch from which the large-batch layout (LUT) wins at
        every larger tuned batch. Returns ``{batch: config}`` (each with its median ``"us"`` and its ``"path"``).
        """
        names = self.layout_names
        batches = sorted({int(b) for b in batch_sizes})
        out: dict[int, dict] = {}
        for b in batches:
            timed = []
            for name in names:
                got = layouts.autotune(self.packed(name), (b,), dtype, self.bias, self.relu).get(b)
                if got is not None:
                    timed.append({**got, "path": name})
            if timed:
                out[b] = min(timed, key=lambda c: c["us"])
        if len(names) > 1 and len(out) == len(batches) and batches:
            large_wins = {b: out[b]["path"] == names[-1] for b in batches}
            i = next((i for i in range(len(batches)) if all(large_wins[c] for c in batches[i:])), len(batches))
            self.batch_min = batches[i] if i < len(batches) else batches[-1] + 1
        return out

    def dense_weight(self) -> Tensor:
        """The decoded float32 ``[out, in]`` weight (for checks; forward never builds it on CUDA)."""
        return layouts.spec(self.layout).decode(self.path(1))

    @property
    def device(self) -> torch.device:
        return next(t for t in self._buffers.values() if t is not None).device

    def packed(self, layout: str | None = None) -> Packed:
        """The packed layer in ``layout`` (default: the one batch 1 runs on), views of this module's buffers.

        Raises:
            ValueError: if this layer holds no layer in ``layout``.
        """
        name = self.layout if layout is None else layout
        if name not in self.layout_names:
            raise ValueError(f"this layer holds no {name} layout (it holds {list(self.layout_names)})")
        s = layouts.spec(name)
        tensors = {buf: getattr(self, buf) for buf in s.buffers.values()}
        return s.build(tensors, self._layout_state[name], self.out_features, self.in_features, self.nnz)

    _STATE = ("in_features", "out_features", "nnz", "relu", "batch_min")

    def get_extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {k: int(getattr(self, k)) for k in self._STATE}
        for name in self.layout_names:
            state.update(self._layout_state[name])
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            if k in self._STATE:
                setattr(self, k, bool(v) if k == "relu" else int(v))
        for name in self.layout_names:
            held = self._layout_state[name]
            held.update({k: layouts.state_value(state[k]) for k in held if k in state})

    def extra_repr(self) -> str:
        parts = [layouts.spec(name).describe(self.packed(name)) for name in self.layout_names]
        held = f"layouts=[{', '.join(parts)}]"
        if len(parts) > 1:
            held += f", {self.layout_names[-1]} from batch {self.batch_min}"
        why = f", why='{self.reason}'" if self.reason else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
            f"layout={self.layout}, {held}, bias={self.bias is not None}, relu={self.relu}{why}"
        )
