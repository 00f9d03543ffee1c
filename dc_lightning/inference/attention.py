"""``CompressedMultiheadAttention``: ``nn.MultiheadAttention`` with its q/k/v and output projections on
:class:`~dc_lightning.inference.linear.CompressedLinear`, attention by SDPA; :func:`make_capturable` takes the host
synchronisations out of the torch / Lightning containers around it (CUDA-graph capture refuses them)."""

from __future__ import annotations

import math
import sys
from collections.abc import Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ------------------------------------------------------------------------------------------------------ attention
from dc_lightning.inference.linear import CompressedLinear
from dc_lightning.inference.matrix import float_mask, linear_numel, projection
from dc_lightning.kernels.runtime import use_triton


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

    Where the compressed kernels run (CUDA, or the CPU under ``TRITON_INTERPRET=1``) the projections multiply straight
    from the compressed matrices. Elsewhere (the CPU) each compressed matrix is decoded once per call and multiplied
    by ``F.linear`` (the CPU reference of a compressed product decodes its matrix anyway; ``F.linear`` is torch's
    BLAS product); the decoded weights are dropped at the end of the call.

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
        # the registry (dc_lightning.kinds) routes nn.MultiheadAttention here; a direct call gets its shape contract
        missing = [a for a in ("embed_dim", "num_heads", "out_proj", "_qkv_same_embed_dim") if not hasattr(mha, a)]
        if missing:
            raise TypeError(f"from_module expects an nn.MultiheadAttention, got {type(mha).__name__} (no {missing})")
        E = mha.embed_dim
        b = mha.in_proj_bias.detach() if mha.in_proj_bias is not None else None
        qkv_bias = [None if b is None else b[i * E : (i + 1) * E] for i in range(3)]
        if mha._qkv_same_embed_dim:
            dense_in = "in_proj_weight" in keep_dense
            q, k, v = (
                projection(mha, "in_proj_weight", qkv_bias[i], slice(i * E, (i + 1) * E), dense_in) for i in range(3)
            )
        else:
            q, k, v = (
                projection(mha, f"{n}_proj_weight", qkv_bias[i], dense=f"{n}_proj_weight" in keep_dense)
                for i, n in enumerate(("q", "k", "v"))
            )
        out = mha.out_proj
        out_bias = out.bias.detach() if out.bias is not None else None
        out_proj = projection(out, "weight", out_bias, dense="out_proj.weight" in keep_dense)
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
        key_padding_mask = float_mask(key_padding_mask, "key_padding_mask", query.dtype)
        # attn_mask is tested first: nn.TransformerDecoder derives is_causal from the mask's values, a data-dependent
        # SymBool under torch.compile, so a compiled graph always applies the mask (the hint only selects a kernel)
        if attn_mask is None:
            if is_causal:
                raise ValueError("is_causal=True needs attn_mask as well (torch's convention: it is only a hint)")
        elif not torch.compiler.is_compiling() and is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the hint goes to scaled_dot_product_attention as is_causal (torch does the same)
        else:
            attn_mask = float_mask(attn_mask, "attn_mask", query.dtype)
        is_causal = attn_mask is None and bool(is_causal)
        kernels = use_triton(query)
        pairs = ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value))
        q, k, v = (self._project(m, t, kernels) for m, t in pairs)  # [L, N, E], [S, N, E], [S, N, E]
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
        out = self._project(self.out_proj, out, kernels).view(L, N, -1)
        if not is_batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    @staticmethod
    def _project(m: nn.Module, x: Tensor, kernels: bool) -> Tensor:
        """``m(x)`` on the compressed kernel, or ``F.linear`` with ``m``'s weight decoded for this call only."""
        if kernels or not isinstance(m, CompressedLinear):
            return m(x)
        bias = None if m.bias is None else m.bias.to(x.dtype)
        y = F.linear(x, m.dense_weight().to(x.dtype), bias)
        return torch.relu(y) if m.relu else y

    def dense_numel(self) -> int:
        extra = sum(t.numel() for t in (self.bias_k, self.bias_v) if t is not None)
        return sum(linear_numel(p) for p in (self.q_proj, self.k_proj, self.v_proj, self.out_proj)) + extra

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


# ------------------------------------------------------------------------------ the containers around the attention
# CUDA-graph capture refuses a device-to-host read and a copy from pageable host memory. Our modules do neither in
# forward; two of the modules around them do, and a forward pre-hook on the converted model takes each out:
#
# * ``nn.TransformerEncoder.forward`` / ``nn.TransformerDecoder.forward`` (torch/nn/modules/transformer.py) call
#   ``_detect_is_causal_mask(mask, is_causal, seq_len)`` and, when ``is_causal`` is None and a mask is given, that
#   reads ``bool((mask == causal_comparison).all())`` on the host. The detected hint changes no result (a causal
#   mask and the hint say the same; the attention applies the mask either way, the hint only picks a kernel), so
#   the hook passes ``is_causal=False`` where the caller left it ``None``: no read. A caller who passes
#   ``is_causal=True`` with a causal mask keeps the fused causal kernel.
# * Lightning's demo ``Transformer.forward`` (lightning/pytorch/demos/transformer.py) builds its causal masks on the
#   CPU and copies them to the device every call (``self.generate_square_subsequent_mask(t).to(inputs.device)``, for
#   ``mask`` when none is passed and for ``self.src_mask`` when the length changes). The hook builds the same float
#   mask (0 on and below the diagonal, -inf above) on the input's device with ``nn.Transformer``'s generator and
#   passes it, so the CPU one is never made.

#: torch container -> (position, name) of its attention mask and of its causal hint in ``forward``
_CAUSAL_HINTS: dict[type, tuple[int, str, int, str]] = {
    nn.TransformerEncoder: (1, "mask", 3, "is_causal"),
    nn.TransformerDecoder: (2, "tgt_mask", 6, "tgt_is_causal"),
}
#: where Lightning's demo Transformer lives (``lightning`` and the standalone ``pytorch_lightning``)
_DEMO_MODULES = ("lightning.pytorch.demos.transformer", "pytorch_lightning.demos.transformer")


def pin_causal_hint(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of ``nn.TransformerEncoder`` / ``nn.TransformerDecoder``: a mask with the causal hint left
    ``None`` gets ``False`` (torch would read the mask on the host to detect it; see the comment above)."""
    mask_at, mask_name, hint_at, hint_name = _CAUSAL_HINTS[type(module)]
    mask = args[mask_at] if len(args) > mask_at else kwargs.get(mask_name)
    if mask is None or len(args) > hint_at or kwargs.get(hint_name) is not None:
        return None
    return args, {**kwargs, hint_name: False}


def demo_masks_on_device(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of Lightning's demo ``Transformer``: its causal masks made on the input's device (see the
    comment above)."""
    inputs = args[0] if args else kwargs["inputs"]
    t, device = inputs.shape[1], inputs.device
    src_mask = module.src_mask
    if src_mask is None or src_mask.size(0) != t or src_mask.device != device:
        module.src_mask = nn.Transformer.generate_square_subsequent_mask(t, device=device)
    if len(args) < 3 and kwargs.get("mask") is None:
        kwargs = {**kwargs, "mask": nn.Transformer.generate_square_subsequent_mask(t, device=device)}
    return args, kwargs


def _capture_hook(m: nn.Module) -> Any:
    """The pre-hook that makes ``m``'s own forward capturable, or ``None`` when it needs none."""
    if type(m) in _CAUSAL_HINTS:  # the exact class: a subclass may have its own forward and signature
        return pin_causal_hint
    demo = [getattr(sys.modules.get(name), "Transformer", None) for name in _DEMO_MODULES]
    return demo_masks_on_device if type(m) in demo else None


def make_capturable(model: nn.Module, converted: Collection[str]) -> list[str]:
    """Register, on every torch / Lightning container above a converted module (``converted``: module names), the
    forward pre-hook that takes its host synchronisation out (see the comment above). Registering twice is a no-op.
    Returns the names of the modules that got a hook."""
    hooked = []
    for name, m in model.named_modules():
        if not any(c.startswith(name + ".") or not name for c in converted):
            continue
        hook = _capture_hook(m)
        if hook is None or any(h is hook for h in m._forward_pre_hooks.values()):
            continue
        m.register_forward_pre_hook(hook, with_kwargs=True)
        hooked.append(name)
    return hooked
