"""Compressed inference modules for every weight kind: attention, recurrent layers and embeddings.

Each module replaces a ``torch.nn`` layer whose weight matrices carry the per-parameter compression buffers of
:mod:`dc_lightning.buffers` (mask and/or codebook + assignments) and holds **no dense float copy** of a compressed
matrix: every matrix product runs on :class:`~dc_lightning.inference.linear.CompressedLinear` (the EIE kernel op, Triton on
CUDA, the PyTorch reference on the CPU), and an embedding decodes only the rows it is asked for. Biases, norms and
matrices that carry no compression buffer stay dense (they are small, or were not compressed).

=====================================  ===============================================================================
module                                 replaces
=====================================  ===============================================================================
:class:`CompressedMultiheadAttention`  ``nn.MultiheadAttention`` (``in_proj_weight`` split into q/k/v rows, or
                                       ``q/k/v_proj_weight``; ``out_proj``), attention by SDPA
:class:`CompressedLSTM`                ``nn.LSTM`` (every layer and direction, ``proj_size`` included)
:class:`CompressedGRU`                 ``nn.GRU``
:class:`CompressedRNN`                 ``nn.RNN`` (tanh or relu)
:class:`CompressedEmbedding`           ``nn.Embedding`` (row decode from a sparse-ELL or packed-code layout)
=====================================  ===============================================================================

:func:`compressed_memory` reports the bytes these modules (and ``CompressedLinear``) hold against their dense fp16
size. ``dc_lightning.inference.conversion`` decides which layers of a model may be replaced; ``to_compressed_inference`` is the
entry point.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from dc_lightning import buffers
from dc_lightning.inference.linear import CompressedLinear

__all__ = [
    "CompressedEmbedding",
    "CompressedGRU",
    "CompressedLSTM",
    "CompressedMultiheadAttention",
    "CompressedRNN",
    "compressed_matrix",
    "compressed_memory",
    "compressed_module_types",
    "dense_numel",
    "param_codes",
]

_MAX_CODES = 256


# ------------------------------------------------------------------------------------------- one matrix at a time


@torch.no_grad()
def param_codes(module: nn.Module, param: str, rows: slice | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(mask, codes, codebook)`` of a compressed parameter (optionally a row slice of it), on the parameter's device.

    ``mask`` is bool (True = kept; all True without a mask buffer), ``codes`` int64 codebook indices (0 where pruned),
    ``codebook`` float32. A quantized parameter gives its buffers; a pruned-only one gets a codebook of its distinct
    kept values (exact) when there are at most 256 of them.

    Raises:
        ValueError: the parameter carries no compression buffer, or it is pruned only and keeps more than 256 distinct
            values (the compressed path stores codebook indices, not floats).
    """
    weight = getattr(module, param)
    sl = slice(None) if rows is None else rows
    mask = buffers.get_mask(module, param)
    got = buffers.get_codebook(module, param)
    if mask is None and got is None:
        raise ValueError(f"{type(module).__name__}.{param} carries no mask or codebook: it is not compressed")
    mask = (torch.ones_like(weight, dtype=torch.bool) if mask is None else mask.to(torch.bool))[sl]
    if got is not None:
        codebook, assign = got
        codes = torch.where(mask, assign[sl].to(torch.int64), 0)
        return mask, codes, codebook.detach().reshape(-1).to(torch.float32)
    values = weight.detach()[sl]
    centroids, inverse = torch.unique(values[mask].to(torch.float32), return_inverse=True)
    if centroids.numel() > _MAX_CODES:
        raise ValueError(
            f"{type(module).__name__}.{param} is pruned but not quantized and keeps {centroids.numel()} distinct "
            f"values; the compressed path needs at most {_MAX_CODES} (quantize it first, e.g. quantize_model)"
        )
    if centroids.numel() == 0:
        centroids = torch.zeros(1, device=weight.device)
    codes = torch.zeros(mask.shape, dtype=torch.int64, device=weight.device)
    codes[mask] = inverse
    return mask, codes, centroids


def compressed_matrix(
    module: nn.Module, param: str, bias: Tensor | None = None, rows: slice | None = None
) -> CompressedLinear:
    """A :class:`CompressedLinear` computing ``x @ W[rows].T + bias`` for the 2-D parameter ``module.<param>``.

    Every matrix goes through :meth:`CompressedLinear.from_linear` (one packing path, whatever layout it picks): the
    parameter's codes are handed to it on a temporary ``nn.Linear`` that shares the weight (never copied) and
    carries the mask/codebook buffers of :mod:`dc_lightning.buffers`.

    Raises:
        ValueError: as :func:`param_codes`.
    """
    weight = getattr(module, param)
    mask, codes, codebook = param_codes(module, param, rows)
    w = weight.detach()[slice(None) if rows is None else rows]
    shell = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    shell.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        shell.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    buffers.set_mask(shell, mask)
    buffers.set_codebook(shell, codebook, codes.to(torch.uint8))
    return CompressedLinear.from_linear(shell)


def _projection(
    module: nn.Module, param: str, bias: Tensor | None = None, rows: slice | None = None, dense: bool = False
) -> nn.Module:
    """The compressed matrix of ``module.<param>`` when it carries compression buffers (and ``dense`` is False),
    else a dense ``nn.Linear`` holding a copy of the rows."""
    if buffers.has_compression(module, param) and not dense:
        return compressed_matrix(module, param, bias, rows)
    w = getattr(module, param).detach()[slice(None) if rows is None else rows]
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias.detach())
    return lin.requires_grad_(False)


def _linear_numel(m: nn.Module) -> int:
    if isinstance(m, CompressedLinear):
        return m.in_features * m.out_features + (m.out_features if getattr(m, "bias", None) is not None else 0)
    return sum(p.numel() for p in m.parameters())


def _float_mask(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """A bool mask (True = not allowed) as an additive float mask; float masks pass through (torch's convention)."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool or floating-point tensor, got dtype {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


# ------------------------------------------------------------------------------------------------------ attention


class CompressedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with its four projections on the compressed kernel and attention by
    ``F.scaled_dot_product_attention``.

    ``in_proj_weight`` ([3E, E], one codebook) is packed as three matrices, its q, k and v rows, so that
    cross-attention projects the query and the key/value with only the rows each needs (self-attention runs the
    three kernels on the same input). With ``kdim``/``vdim`` different from ``embed_dim`` the separate
    ``q/k/v_proj_weight`` are packed as they are. A projection whose weight carries no compression buffer stays a
    dense ``nn.Linear``.

    ``forward`` has ``nn.MultiheadAttention``'s signature and semantics (``batch_first`` both ways, unbatched input,
    bool or float ``attn_mask`` of shape [L, S] or [N*heads, L, S], ``key_padding_mask`` [N, S], ``is_causal``,
    ``bias_k``/``bias_v``, ``add_zero_attn``). ``need_weights=True`` (torch's default) computes the attention
    weights with a plain ``softmax(q k^T / sqrt(d) + mask)`` path and returns them (averaged over heads unless
    ``average_attn_weights=False``); ``need_weights=False`` uses ``scaled_dot_product_attention`` (fused kernels).
    Dropout applies in training mode only, as in torch.

    ``batch_first``, ``_qkv_same_embed_dim`` and ``in_proj_bias`` are exposed because ``nn.TransformerEncoderLayer``
    reads them before it chooses its fused fast path (which needs dense weights and is switched off on converted
    layers by ``dc_lightning.inference.conversion``).
    """

    def __init__(
        self,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        out_proj: nn.Module,
        *,
        num_heads: int,
        batch_first: bool = False,
        bias_k: Tensor | None = None,
        bias_v: Tensor | None = None,
        add_zero_attn: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed_dim = int(q_proj.out_features)
        self.kdim = int(k_proj.in_features)
        self.vdim = int(v_proj.in_features)
        self.num_heads = int(num_heads)
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        self.batch_first = bool(batch_first)
        self.add_zero_attn = bool(add_zero_attn)
        self.dropout = float(dropout)
        self._qkv_same_embed_dim = self.kdim == self.embed_dim and self.vdim == self.embed_dim
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.register_buffer("bias_k", None if bias_k is None else bias_k.detach().clone())
        self.register_buffer("bias_v", None if bias_v is None else bias_v.detach().clone())

    @classmethod
    def from_module(
        cls, mha: nn.MultiheadAttention, keep_dense: Collection[str] = ()
    ) -> CompressedMultiheadAttention:
        """Build from an ``nn.MultiheadAttention`` whose weights carry compression buffers (see the class docstring).

        Args:
            mha: the attention.
            keep_dense: weights to keep as dense ``nn.Linear`` although compressed (``"in_proj_weight"``,
                ``"q_proj_weight"``..., ``"out_proj.weight"``).

        Raises:
            TypeError: ``mha`` is not an ``nn.MultiheadAttention``.
            ValueError: a compressed projection cannot be packed (:func:`param_codes`).
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_module expects an nn.MultiheadAttention, got {type(mha).__name__}")
        E = mha.embed_dim
        b = mha.in_proj_bias.detach() if mha.in_proj_bias is not None else None
        qkv_bias = [None if b is None else b[i * E : (i + 1) * E] for i in range(3)]
        if mha._qkv_same_embed_dim:
            dense_in = "in_proj_weight" in keep_dense
            q, k, v = (
                _projection(mha, "in_proj_weight", qkv_bias[i], slice(i * E, (i + 1) * E), dense_in) for i in range(3)
            )
        else:
            q, k, v = (
                _projection(mha, f"{n}_proj_weight", qkv_bias[i], dense=f"{n}_proj_weight" in keep_dense)
                for i, n in enumerate(("q", "k", "v"))
            )
        out = mha.out_proj
        out_bias = out.bias.detach() if out.bias is not None else None
        out_proj = _projection(out, "weight", out_bias, dense="out_proj.weight" in keep_dense)
        kw = {a: getattr(mha, a) for a in ("num_heads", "batch_first", "bias_k", "bias_v", "add_zero_attn", "dropout")}
        return cls(q, k, v, out_proj, **kw)

    @property
    def in_proj_bias(self) -> Tensor | None:
        """The concatenated q/k/v biases (``None`` without bias), as ``nn.MultiheadAttention`` exposes them."""
        bs = [getattr(p, "bias", None) for p in (self.q_proj, self.k_proj, self.v_proj)]
        return None if any(b is None for b in bs) else torch.cat([b.reshape(-1) for b in bs])

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not is_batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        L, N, E = query.shape  # sequence-first from here: [L, N, E], key/value [S, N, kdim/vdim]
        H, hd = self.num_heads, self.head_dim
        if E != self.embed_dim:
            raise ValueError(f"query's last dimension must be embed_dim={self.embed_dim}, got {E}")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key's (S, N) {tuple(key.shape[:2])} differ from value's {tuple(value.shape[:2])}")
        key_padding_mask = _float_mask(key_padding_mask, "key_padding_mask", query.dtype)
        # attn_mask is tested first: nn.TransformerDecoder derives is_causal from the mask's values, a data-dependent
        # SymBool under torch.compile, so a compiled graph always applies the mask (the hint only selects a kernel)
        if attn_mask is None:
            if is_causal:
                raise ValueError("is_causal=True needs attn_mask as well (torch's convention: it is only a hint)")
        elif not torch.compiler.is_compiling() and is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the hint goes to scaled_dot_product_attention as is_causal (torch does the same)
        else:
            attn_mask = _float_mask(attn_mask, "attn_mask", query.dtype)
        is_causal = attn_mask is None and bool(is_causal)
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)  # [L, N, E], [S, N, E], [S, N, E]
        S = k.shape[0]
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (L, S):
                    raise ValueError(f"2-D attn_mask must have shape (L, S)={(L, S)}, got {tuple(attn_mask.shape)}")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() != 3 or tuple(attn_mask.shape) != (N * H, L, S):
                raise ValueError(
                    f"attn_mask must have shape (L, S)={(L, S)} or (N*num_heads, L, S)={(N * H, L, S)}, "
                    f"got {tuple(attn_mask.shape)}"
                )
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.to(k.dtype).repeat(1, N, 1)])
            v = torch.cat([v, self.bias_v.to(v.dtype).repeat(1, N, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.reshape(L, N * H, hd).transpose(0, 1)  # [N*H, L, hd]
        k = k.reshape(k.shape[0], N * H, hd).transpose(0, 1)  # [N*H, S', hd]
        v = v.reshape(v.shape[0], N * H, hd).transpose(0, 1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N * H, 1, hd)], dim=1)
            v = torch.cat([v, v.new_zeros(N * H, 1, hd)], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        S = k.shape[1]
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (N, S):
                raise ValueError(
                    f"key_padding_mask must have shape (N, S)={(N, S)}, got {tuple(key_padding_mask.shape)}"
                )
            kpm = key_padding_mask.view(N, 1, 1, S).expand(-1, H, -1, -1).reshape(N * H, 1, S)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            scores = torch.bmm(q * (1.0 / math.sqrt(hd)), k.transpose(1, 2))  # [N*H, L, S]
            if attn_mask is not None:
                scores = scores + attn_mask
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(L * N, E)
            weights = weights.view(N, H, L, S)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            if attn_mask is not None:
                attn_mask = attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1 else attn_mask.view(N, H, -1, S)
            out = F.scaled_dot_product_attention(
                q.view(N, H, L, hd), k.view(N, H, S, hd), v.view(N, H, S, hd), attn_mask, dropout_p, is_causal
            )  # [N, H, L, hd]
            out = out.permute(2, 0, 1, 3).reshape(L * N, E)
            weights = None
        out = self.out_proj(out).view(L, N, -1)
        if not is_batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def dense_numel(self) -> int:
        extra = sum(t.numel() for t in (self.bias_k, self.bias_v) if t is not None)
        return sum(_linear_numel(p) for p in (self.q_proj, self.k_proj, self.v_proj, self.out_proj)) + extra

    def get_extra_state(self) -> dict[str, int | float | bool]:
        return {"num_heads": self.num_heads, "batch_first": self.batch_first, "add_zero_attn": self.add_zero_attn,
                "dropout": self.dropout}

    def set_extra_state(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}, "
            f"batch_first={self.batch_first}"
        )


# ------------------------------------------------------------------------------------------------ recurrent layers


class _CompressedRNNBase(nn.Module):
    """Shared loop of :class:`CompressedLSTM` / :class:`CompressedGRU` / :class:`CompressedRNN`.

    Layout of the gate products (EIE's NT-LSTM layer multiplies one [4H x (I+H)] matrix by ``[x_t; h_{t-1}]`` per
    step, [EIE] Table III): here ``W_ih`` and ``W_hh`` stay two compressed matrices. The input half does not depend
    on the recurrence, so it runs ONCE per layer and direction over all timesteps (``W_ih @ [x_1 .. x_T]``: a
    batch of ``T * B`` columns, far better weight reuse than T products of ``B`` columns); only ``W_hh @ h_{t-1}``
    (+ ``W_hr`` for an LSTM with ``proj_size``) runs per step. Biases ``b_ih`` / ``b_hh`` are fused into those two
    products (the GRU needs ``W_hn h + b_hn`` separately from the input half, which this split gives for free).

    ``cells[layer * num_directions + direction]`` is a ``ModuleDict`` with ``ih``, ``hh`` (and ``hr``): a
    :class:`~dc_lightning.inference.linear.CompressedLinear` for a compressed matrix, a dense ``nn.Linear`` otherwise.
    Inter-layer dropout applies in training mode only. ``PackedSequence`` input is rejected (pad it and pass the
    padded tensor; outputs past a sequence's length are then not meaningful).
    """

    _gates: int
    _torch_type: type[nn.RNNBase]

    def __init__(
        self,
        cells: Iterable[nn.ModuleDict],
        *,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        bidirectional: bool,
        batch_first: bool,
        dropout: float = 0.0,
        proj_size: int = 0,
    ) -> None:
        super().__init__()
        self.cells = nn.ModuleList(cells)
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.bidirectional = bool(bidirectional)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.proj_size = int(proj_size)
        if len(self.cells) != self.num_layers * self.num_directions:
            raise ValueError(f"expected {self.num_layers * self.num_directions} cells, got {len(self.cells)}")

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @classmethod
    def from_module(cls, rnn: nn.RNNBase, keep_dense: Collection[str] = ()) -> _CompressedRNNBase:
        """Build from the matching ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``.

        Args:
            rnn: the recurrent layer.
            keep_dense: weights to keep as dense ``nn.Linear`` although compressed (``"weight_hh_l0"``...).

        Raises:
            TypeError: ``rnn`` is not of the matching type.
            ValueError: a compressed matrix cannot be packed (:func:`param_codes`).
        """
        if not isinstance(rnn, cls._torch_type):
            raise TypeError(
                f"{cls.__name__}.from_module expects an nn.{cls._torch_type.__name__}, got {type(rnn).__name__}"
            )
        cells = []
        for layer in range(rnn.num_layers):
            for sfx in ("", "_reverse")[: 2 if rnn.bidirectional else 1]:
                s = f"l{layer}{sfx}"
                b_ih, b_hh = (getattr(rnn, f"bias_{k}_{s}").detach() if rnn.bias else None for k in ("ih", "hh"))
                cell = {
                    "ih": _projection(rnn, f"weight_ih_{s}", b_ih, dense=f"weight_ih_{s}" in keep_dense),
                    "hh": _projection(rnn, f"weight_hh_{s}", b_hh, dense=f"weight_hh_{s}" in keep_dense),
                }
                if getattr(rnn, "proj_size", 0):
                    cell["hr"] = _projection(rnn, f"weight_hr_{s}", dense=f"weight_hr_{s}" in keep_dense)
                cells.append(nn.ModuleDict(cell))
        return cls(cells, **cls._config(rnn))

    @staticmethod
    def _config(rnn: nn.RNNBase) -> dict:
        return {
            "input_size": rnn.input_size,
            "hidden_size": rnn.hidden_size,
            "num_layers": rnn.num_layers,
            "bidirectional": rnn.bidirectional,
            "batch_first": rnn.batch_first,
            "dropout": rnn.dropout,
            "proj_size": getattr(rnn, "proj_size", 0),
        }

    def flatten_parameters(self) -> None:
        """No-op (cuDNN's flat weight buffer does not exist here); kept so that user code calling it still runs."""

    def _step(self, gi: Tensor, h: Tensor, c: Tensor | None, cell: nn.ModuleDict) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def _run(self, x: Tensor, h0: Tensor, c0: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """x: [T, B, I]; h0: [L*D, B, H_out]; c0: [L*D, B, H] or None. Returns output [T, B, D*H_out], h_n, c_n."""
        T = x.shape[0]
        D = self.num_directions
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            if layer > 0 and self.training and self.dropout > 0.0:
                layer_input = F.dropout(layer_input, p=self.dropout)
            outs = []
            for d in range(D):
                cell = self.cells[layer * D + d]
                gi = cell["ih"](layer_input)  # [T, B, G*H]: the input half for every timestep in one product
                h = h0[layer * D + d]
                c = None if c0 is None else c0[layer * D + d]
                ys: list[Tensor] = [h] * T
                for t in range(T - 1, -1, -1) if d == 1 else range(T):
                    h, c = self._step(gi[t], h, c, cell)
                    ys[t] = h
                outs.append(torch.stack(ys))
                h_n.append(h)
                if c is not None:
                    c_n.append(c)
            layer_input = outs[0] if D == 1 else torch.cat(outs, dim=2)
        return layer_input, torch.stack(h_n), (torch.stack(c_n) if c_n else None)

    def _prepare(self, input: Tensor) -> tuple[Tensor, bool]:
        if isinstance(input, PackedSequence):
            raise TypeError(
                f"{type(self).__name__} does not take a PackedSequence; pass the padded tensor "
                "(torch.nn.utils.rnn.pad_packed_sequence) instead"
            )
        if input.dim() not in (2, 3):
            raise ValueError(f"{type(self).__name__} expects a 2-D or 3-D input, got shape {tuple(input.shape)}")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"input's last dimension must be input_size={self.input_size}, got {input.shape[-1]}")
        is_batched = input.dim() == 3
        if not is_batched:
            input = input.unsqueeze(1)
        elif self.batch_first:
            input = input.transpose(0, 1)
        return input, is_batched

    def _zeros(self, x: Tensor, size: int) -> Tensor:
        return x.new_zeros(self.num_layers * self.num_directions, x.shape[1], size)

    def _check_state(self, h: Tensor, x: Tensor, size: int, name: str) -> Tensor:
        want = (self.num_layers * self.num_directions, x.shape[1], size)
        if tuple(h.shape) != want:
            raise ValueError(f"{type(self).__name__}: {name} must have shape {want}, got {tuple(h.shape)}")
        return h

    def _finish(self, out: Tensor, is_batched: bool) -> Tensor:
        if not is_batched:
            return out.squeeze(1)
        return out.transpose(0, 1) if self.batch_first else out

    def dense_numel(self) -> int:
        return sum(_linear_numel(m) for cell in self.cells for m in cell.values())

    def get_extra_state(self) -> dict:
        return self._config(self)

    def set_extra_state(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def extra_repr(self) -> str:
        s = (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"bidirectional={self.bidirectional}, batch_first={self.batch_first}"
        )
        return s + (f", proj_size={self.proj_size}" if self.proj_size else "")


class CompressedLSTM(_CompressedRNNBase):
    """``nn.LSTM`` on the compressed kernel (gate order i, f, g, o; ``proj_size`` supported). See
    :class:`_CompressedRNNBase` for the layout. ``forward(input, (h0, c0)=None) -> output, (h_n, c_n)``."""

    _gates = 4
    _torch_type = nn.LSTM

    def _step(self, gi: Tensor, h: Tensor, c: Tensor | None, cell: nn.ModuleDict) -> tuple[Tensor, Tensor]:
        i, f, g, o = (gi + cell["hh"](h)).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if "hr" in cell:
            h = cell["hr"](h)
        return h, c

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        x, is_batched = self._prepare(input)
        if hx is None:
            h0, c0 = self._zeros(x, self.proj_size or self.hidden_size), self._zeros(x, self.hidden_size)
        else:
            h0, c0 = hx if is_batched else (t.unsqueeze(1) for t in hx)
            h0 = self._check_state(h0, x, self.proj_size or self.hidden_size, "h0")
            c0 = self._check_state(c0, x, self.hidden_size, "c0")
        out, h_n, c_n = self._run(x, h0, c0)
        if not is_batched:
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return self._finish(out, is_batched), (h_n, c_n)


class _CompressedSingleState(_CompressedRNNBase):
    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, is_batched = self._prepare(input)
        if hx is None:
            h0 = self._zeros(x, self.hidden_size)
        else:
            h0 = self._check_state(hx if is_batched else hx.unsqueeze(1), x, self.hidden_size, "h0")
        out, h_n, _ = self._run(x, h0, None)
        return self._finish(out, is_batched), (h_n if is_batched else h_n.squeeze(1))


class CompressedGRU(_CompressedSingleState):
    """``nn.GRU`` on the compressed kernel (gate order r, z, n; ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``).
    ``forward(input, h0=None) -> output, h_n``."""

    _gates = 3
    _torch_type = nn.GRU

    def _step(self, gi: Tensor, h: Tensor, c: None, cell: nn.ModuleDict) -> tuple[Tensor, None]:
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = cell["hh"](h).chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1.0 - z) * n + z * h, None


class CompressedRNN(_CompressedSingleState):
    """``nn.RNN`` (``nonlinearity`` tanh or relu) on the compressed kernel.
    ``forward(input, h0=None) -> output, h_n``."""

    _gates = 1
    _torch_type = nn.RNN

    def __init__(self, cells: Iterable[nn.ModuleDict], *, nonlinearity: str = "tanh", **kwargs) -> None:
        super().__init__(cells, **kwargs)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity

    @staticmethod
    def _config(rnn: nn.RNNBase) -> dict:
        return {**_CompressedRNNBase._config(rnn), "nonlinearity": rnn.nonlinearity}

    def _step(self, gi: Tensor, h: Tensor, c: None, cell: nn.ModuleDict) -> tuple[Tensor, None]:
        pre = gi + cell["hh"](h)
        return (torch.tanh(pre) if self.nonlinearity == "tanh" else torch.relu(pre)), None


# ------------------------------------------------------------------------------------------------------ embeddings


class CompressedEmbedding(nn.Module):
    """``nn.Embedding`` whose lookup decodes only the requested rows from the compressed form.

    Two layouts; :meth:`from_module` keeps the one with fewer bytes:

    * ``"ell"`` (sparse rows): ``cols`` [V, L] (uint8 up to 256 columns, int16 up to 32767, else int32) and
      ``codes`` [V, L] (uint8) of the kept entries of every row, padded to the longest row ``L``, with ``lengths``
      [V] (int16, or int32). A lookup gathers the
      requested rows' entries and scatters ``codebook[codes]`` into zeros of shape [N, D]: fixed shapes, so it runs
      under ``torch.compile(fullgraph=True)`` and in CUDA graphs.
    * ``"codes"`` (dense codes): one code per weight, 4 bits (two per byte) when the codebook plus a 0.0 slot for
      pruned weights fits 16 entries, else 8 bits; a lookup is ``codebook[codes[rows]]``.

    The codebook is a float buffer (it follows ``module.to(dtype)``); the output has its dtype. ``padding_idx``
    only shapes gradients in torch, so its row is decoded like any other (it is kept as an attribute).
    """

    def __init__(
        self,
        layout: str,
        codes: Tensor,
        codebook: Tensor,
        *,
        num_embeddings: int,
        embedding_dim: int,
        cols: Tensor | None = None,
        lengths: Tensor | None = None,
        padding_idx: int | None = None,
        nnz: int | None = None,
    ) -> None:
        super().__init__()
        if layout not in ("ell", "codes"):
            raise ValueError(f"layout must be 'ell' or 'codes', got {layout!r}")
        if layout == "ell" and (cols is None or lengths is None):
            raise ValueError("the 'ell' layout needs cols and lengths")
        self.layout = layout
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.padding_idx = padding_idx
        self.nnz = int(nnz) if nnz is not None else -1
        self.register_buffer("codes", codes)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cols", cols)
        self.register_buffer("lengths", lengths)

    @classmethod
    def from_module(cls, emb: nn.Embedding, layout: str | None = None) -> CompressedEmbedding:
        """Build from an ``nn.Embedding`` whose weight carries compression buffers.

        Args:
            emb: the embedding.
            layout: ``"ell"``, ``"codes"`` or ``None`` (the smaller of the two).

        Raises:
            TypeError: ``emb`` is not an ``nn.Embedding``.
            ValueError: ``max_norm`` is set (torch renormalises the dense weight in place on lookup), the weight
                cannot be coded (:func:`param_codes`), or ``layout`` is unknown / impossible.
        """
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"from_module expects an nn.Embedding, got {type(emb).__name__}")
        if emb.max_norm is not None:
            raise ValueError(f"embedding with max_norm={emb.max_norm} renormalises its dense weight on lookup")
        mask, codes, codebook = param_codes(emb, "weight")
        V, D = codes.shape
        dtype = emb.weight.dtype
        lengths = mask.sum(dim=1)
        width = max(int(lengths.max()) if V else 0, 1)
        col_dtype = torch.uint8 if D <= 256 else torch.int16 if D <= 32767 else torch.int32
        len_dtype = torch.int16 if D <= 32767 else torch.int32
        ell_bytes = V * width * (1 + col_dtype.itemsize) + V * len_dtype.itemsize
        pruned = not bool(mask.all())
        n_codes = codebook.numel() + (1 if pruned else 0)  # slot n-1 = 0.0 for pruned weights
        code_bits = 4 if n_codes <= 16 else 8
        codes_bytes = V * -(-D * code_bits // 8) if n_codes <= _MAX_CODES else None
        if layout is None:
            layout = "codes" if codes_bytes is not None and codes_bytes <= ell_bytes else "ell"
        if layout == "codes":
            if codes_bytes is None:
                raise ValueError(
                    f"the 'codes' layout needs a free code for pruned weights; the codebook has {codebook.numel()}"
                )
            full = torch.cat([codebook, codebook.new_zeros(1)]) if pruned else codebook
            c = torch.where(mask, codes, full.numel() - 1).to(torch.uint8)
            if code_bits == 4:
                c = F.pad(c, (0, D % 2)).view(V, -1, 2)
                c = c[..., 0] | (c[..., 1] << 4)  # two codes per byte, the even column in the low nibble
            return cls("codes", c.contiguous(), full.to(dtype), num_embeddings=V, embedding_dim=D,
                       padding_idx=emb.padding_idx, nnz=int(mask.sum()))
        if layout != "ell":
            raise ValueError(f"layout must be 'ell', 'codes' or None, got {layout!r}")
        # per row: the kept columns first, in column order (stable sort of "pruned" flags)
        order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]
        valid = torch.arange(width, device=mask.device) < lengths.unsqueeze(1)
        cols = torch.where(valid, order, 0)
        ell_codes = torch.where(valid, codes.gather(1, order), 0).to(torch.uint8)
        return cls("ell", ell_codes, codebook.to(dtype), num_embeddings=V, embedding_dim=D,
                   cols=cols.to(col_dtype), lengths=lengths.to(len_dtype), padding_idx=emb.padding_idx,
                   nnz=int(mask.sum()))

    def forward(self, input: Tensor) -> Tensor:
        idx = input.reshape(-1)
        D = self.embedding_dim
        if self.layout == "codes":
            c = self.codes[idx]  # [N, bytes per row]
            if c.shape[1] != D:  # 4-bit: low nibble = even column
                c = torch.stack([c & 15, c >> 4], dim=-1).reshape(c.shape[0], -1)[:, :D]
            rows = self.codebook[c.long()]
        else:
            cols = self.cols[idx].long()  # [N, L]
            vals = self.codebook[self.codes[idx].long()]
            valid = torch.arange(cols.shape[1], device=cols.device) < self.lengths[idx].unsqueeze(1)
            vals = torch.where(valid, vals, vals.new_zeros(()))
            rows = vals.new_zeros(idx.shape[0], D).scatter_add_(1, cols, vals)
        return rows.reshape(*input.shape, D)

    def dense_numel(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def get_extra_state(self) -> dict:
        return {"layout": self.layout, "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx, "nnz": self.nnz}

    def set_extra_state(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, layout={self.layout}, nnz={self.nnz}"
        return s + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")


# ----------------------------------------------------------------------------------------------------- accounting


def compressed_module_types() -> tuple[type[nn.Module], ...]:
    """The module types that hold compressed weights after ``to_compressed_inference``."""
    return (CompressedLinear, CompressedMultiheadAttention, _CompressedRNNBase, CompressedEmbedding)


def dense_numel(module: nn.Module) -> int:
    """Parameters (weights and biases) the dense layer that ``module`` replaced had."""
    if isinstance(module, CompressedLinear):
        return _linear_numel(module)
    return module.dense_numel()


def compressed_memory(model: nn.Module) -> dict:
    """Bytes held by the compressed layers of a converted model against their dense fp16 size.

    Walks ``model`` for the outermost compressed modules (``CompressedLinear`` and this module's classes; a
    ``CompressedLinear`` inside a ``CompressedMultiheadAttention`` counts with it) and sums the bytes of every tensor
    they hold (parameters and buffers, each storage once: packed indices, codebooks, biases, small dense parts).

    Returns:
        ``{"layers": [{"name", "type", "device", "bytes", "dense_fp16_bytes", "ratio"}...], "bytes": total,
        "dense_fp16_bytes": total, "ratio": dense / compressed}``; ``ratio`` is 0.0 for an empty model.
    """
    kinds = compressed_module_types()
    rows = []
    taken: list[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, kinds) or any(name.startswith(t + ".") for t in taken):
            continue
        taken.append(name)
        seen: dict[tuple[int, int], int] = {}
        device = None
        for t in list(m.parameters()) + list(m.buffers()):
            seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
            device = device or str(t.device)
        nbytes = sum(seen.values())
        dense = 2 * dense_numel(m)
        rows.append({"name": name, "type": type(m).__name__, "device": device, "bytes": nbytes,
                     "dense_fp16_bytes": dense, "ratio": dense / nbytes if nbytes else 0.0})
    total = sum(r["bytes"] for r in rows)
    dense = sum(r["dense_fp16_bytes"] for r in rows)
    return {"layers": rows, "bytes": total, "dense_fp16_bytes": dense, "ratio": dense / total if total else 0.0}
