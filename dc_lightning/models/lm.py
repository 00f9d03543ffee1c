"""Language models of the LM recipes: NeuralTalk's LSTM shapes (EIE's ``NT-*`` layers) and a decoder-only transformer.

Both map int64 tokens ``[B, T]`` to logits ``[B, T, vocab_size]`` and name their layers after what EIE's benchmark
calls them, so the recipes' densities and the per-layer report read alike:

- ``LSTMLanguageModel``: ``embed`` (EIE's ``NT-We``, 4096x600 there over a word vocabulary; 256x600 here over
  bytes), ``lstm`` (``NT-LSTM``: PyTorch keeps the gate matrix as ``weight_ih_l0`` [2400, 600] and ``weight_hh_l0``
  [2400, 600] plus biases; EIE's 1201x2400 matrix is ``[W_ih | W_hh | b]`` for 600 + 600 + 1 inputs), ``decoder``
  (``NT-Wd``, 600x8791 there, 600x256 here).
- ``TransformerLanguageModel``: token and position embeddings, ``nn.TransformerEncoderLayer`` blocks (pre-norm, GELU)
  run with a causal mask and ``is_causal=True``, a final LayerNorm and an untied ``decoder``.

Incremental decoding (:func:`decode_state`, :func:`decode_step`): one token per sequence per call, with the state in
preallocated tensors updated in place (the LSTM's ``(h, c)``; the transformer's key/value cache) and the position
as a device tensor, so one step can be captured in a CUDA graph and replayed. It reads the layers through their
modules only, so it runs the dense model and the converted one (``to_compressed_inference``) alike.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: the LM networks :func:`dc_lightning.models.build_model` builds, with their default sizes
LM_DEFAULTS: dict[str, dict[str, int | float]] = {
    "lstm_lm": {"vocab_size": 256, "embed_dim": 600, "hidden_size": 600, "num_layers": 1, "dropout": 0.0},
    "transformer_lm": {"vocab_size": 256, "width": 384, "num_layers": 6, "num_heads": 6, "max_len": 512,
                       "dropout": 0.0},
}


class LSTMLanguageModel(nn.Module):
    """Embedding -> LSTM -> Linear decoder ([NT]'s shapes at the defaults: 600-dim embedding, 600 hidden units)."""

    def __init__(self, vocab_size: int = 256, embed_dim: int = 600, hidden_size: int = 600, num_layers: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.decoder = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.drop(self.embed(tokens)))  # [B, T, hidden]
        return self.decoder(self.drop(h))  # [B, T, vocab]


class TransformerLanguageModel(nn.Module):
    """Decoder-only transformer: ``num_layers`` causal self-attention blocks of ``width`` with ``num_heads`` heads.

    ``nn.TransformerEncoderLayer`` is a decoder block once its attention is causal; the mask is passed together with
    ``is_causal=True`` (the hint alone is not a mask, the mask alone leaves the fused kernels unaware).
    """

    def __init__(self, vocab_size: int = 256, width: int = 384, num_layers: int = 6, num_heads: int = 6,
                 max_len: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"model.width: {width} is not divisible by model.num_heads = {num_heads}")
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(max_len, width)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, num_heads, 4 * width, dropout, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(width)
        self.decoder = nn.Linear(width, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.max_len:
            raise ValueError(f"TransformerLanguageModel: {t} tokens exceed model.max_len = {self.max_len}")
        x = self.drop(self.embed(tokens) + self.pos(torch.arange(t, device=tokens.device)))  # [B, T, width]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device, dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return self.decoder(self.norm(x))  # [B, T, vocab]


# ---------------------------------------------------------------------------------------------- incremental decoding


def decode_state(model: nn.Module, batch: int, length: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Zeroed decoding state of ``model`` (an :class:`LSTMLanguageModel` or :class:`TransformerLanguageModel`, dense
    or converted) for ``batch`` sequences of at most ``length`` tokens: ``{"h", "c"}`` ([layers, B, hidden]) or
    ``{"k<i>", "v<i>"}`` per block ([B, heads, length, head_dim]), in ``dtype`` on ``device``.

    Raises:
        TypeError: ``model`` is neither network.
        ValueError: ``length`` exceeds the transformer's ``max_len``, or ``batch``/``length`` < 1.
    """
    if batch < 1 or length < 1:
        raise ValueError(f"decode_state: batch={batch} and length={length} must be >= 1")
    if isinstance(model, LSTMLanguageModel):
        shape = (model.lstm.num_layers, batch, model.lstm.hidden_size)
        return {n: torch.zeros(shape, device=device, dtype=dtype) for n in ("h", "c")}
    if isinstance(model, TransformerLanguageModel):
        if length > model.max_len:
            raise ValueError(f"decode_state: length={length} exceeds model.max_len = {model.max_len}")
        state = {}
        for i, layer in enumerate(model.layers):
            heads = layer.self_attn.num_heads
            shape = (batch, heads, length, layer.self_attn.embed_dim // heads)
            state[f"k{i}"] = torch.zeros(shape, device=device, dtype=dtype)
            state[f"v{i}"] = torch.zeros(shape, device=device, dtype=dtype)
        return state
    raise TypeError(f"decode_state: expects an LSTMLanguageModel or TransformerLanguageModel, got "
                    f"{type(model).__name__}")


def decode_step(model: nn.Module, tokens: torch.Tensor, pos: torch.Tensor, state: dict[str, torch.Tensor]
                ) -> torch.Tensor:
    """The logits ``[B, vocab]`` of the token after ``tokens`` (int64 ``[B, 1]``, at position ``pos``: an int64
    0-d tensor on the model's device, the same for every sequence), updating ``state`` (:func:`decode_state`) in
    place. No host synchronisation, no shape that depends on ``pos``: a step can be captured in a CUDA graph.

    The transformer attends over the whole cache with positions after ``pos`` masked out (a static shape), so a
    step costs the cache's length, not the context's. Call in eval mode (dropout is not applied).
    """
    if isinstance(model, LSTMLanguageModel):
        h, (h_n, c_n) = model.lstm(model.embed(tokens), (state["h"], state["c"]))  # [B, 1, hidden]
        state["h"].copy_(h_n)
        state["c"].copy_(c_n)
        return model.decoder(h[:, 0])
    if not isinstance(model, TransformerLanguageModel):
        raise TypeError(f"decode_step: expects an LSTMLanguageModel or TransformerLanguageModel, got "
                        f"{type(model).__name__}")
    x = model.embed(tokens) + model.pos(pos.view(1, 1))  # [B, 1, W]
    length = state["k0"].shape[2]
    visible = (torch.arange(length, device=pos.device) <= pos).view(1, 1, 1, length)  # SDPA bool mask: True = attend
    for i, layer in enumerate(model.layers):
        x = _decode_block(layer, x, pos, visible, state[f"k{i}"], state[f"v{i}"])
    return model.decoder(model.norm(x))[:, 0]


def _decode_block(layer: nn.TransformerEncoderLayer, x: torch.Tensor, pos: torch.Tensor, visible: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """One ``nn.TransformerEncoderLayer`` (its slow path in eval mode: no dropout) on the new position [B, 1, W]."""

    def sa(y: torch.Tensor) -> torch.Tensor:
        return _cached_attention(layer.self_attn, y, pos, visible, k_cache, v_cache)

    def ff(y: torch.Tensor) -> torch.Tensor:
        return layer.linear2(layer.activation(layer.linear1(y)))

    if layer.norm_first:
        x = x + sa(layer.norm1(x))
        return x + ff(layer.norm2(x))
    x = layer.norm1(x + sa(x))
    return layer.norm2(x + ff(x))


def _cached_attention(attn: nn.Module, x: torch.Tensor, pos: torch.Tensor, visible: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """Self-attention of one new position ``x`` [B, 1, E] over the cache, after writing its key/value at ``pos``.
    ``nn.MultiheadAttention`` projects with ``in_proj_weight``; the converted attention holds one module per
    projection (``q_proj``/``k_proj``/``v_proj``: compressed kernels)."""
    B, _, E = x.shape
    H, hd = k_cache.shape[1], k_cache.shape[3]
    if isinstance(getattr(attn, "q_proj", None), nn.Module):
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    else:
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(B, 1, H, hd).transpose(1, 2) for t in (q, k, v))  # [B, H, 1, hd]
    k_cache.index_copy_(2, pos.view(1), k.to(k_cache.dtype))
    v_cache.index_copy_(2, pos.view(1), v.to(v_cache.dtype))
    out = F.scaled_dot_product_attention(q, k_cache.to(q.dtype), v_cache.to(q.dtype), visible)  # [B, H, 1, hd]
    return attn.out_proj(out.transpose(1, 2).reshape(B, 1, E))


def build_lm(name: str, **kwargs: int | float) -> nn.Module:
    """``lstm_lm`` or ``transformer_lm`` with :data:`LM_DEFAULTS` overridden by ``kwargs`` (None = the default).

    Raises:
        ValueError: an unknown name, or an argument the network does not take (the message lists those it takes).
    """
    if name not in LM_DEFAULTS:
        raise ValueError(f"model.name: {name!r} is not a language model; valid: {list(LM_DEFAULTS)}")
    unknown = sorted(set(kwargs) - set(LM_DEFAULTS[name]))
    if unknown:
        raise ValueError(f"model: {name} takes no argument {unknown}; it takes {sorted(LM_DEFAULTS[name])}")
    args = {**LM_DEFAULTS[name], **{k: v for k, v in kwargs.items() if v is not None}}
    return (LSTMLanguageModel if name == "lstm_lm" else TransformerLanguageModel)(**args)


@torch.no_grad()
def next_token_logits(model: nn.Module, window: torch.Tensor, where: str = "model") -> torch.Tensor:
    """The logits of the token after ``window`` (int64 ``[T]``): ``model(window[None])`` read as ``[1, T, vocab]``
    (a tensor, the first element of a tuple, or an output object's ``.logits`` as Hugging Face models return).

    Raises:
        ValueError: the model does not map token ids ``[1, T]`` to logits ``[1, T, vocab]`` (e.g. a classifier).
    """
    try:
        out = model(window[None])
    except (RuntimeError, TypeError, IndexError, ValueError) as e:
        raise ValueError(f"{where}: not a language model: calling it on token ids [1, {window.numel()}] failed "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    out = getattr(out, "logits", out)
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != (1, window.numel()):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{where}: not a language model: token ids [1, {window.numel()}] gave {shape}, not logits "
                         f"[1, {window.numel()}, vocab]")
    return out[0, -1].float()


def _context_limit(model: nn.Module) -> int | None:
    """The longest context the model takes: ``max_len`` (this module's networks) or a Hugging Face config's
    ``n_positions`` / ``max_position_embeddings``."""
    inner = getattr(model, "model", model)
    for obj in (inner, model, getattr(model, "config", None)):
        for attr in ("max_len", "n_positions", "max_position_embeddings"):
            value = getattr(obj, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def sample(model: nn.Module, prompt: torch.Tensor, tokens: int, temperature: float = 1.0, top_k: int | None = None,
           generator: torch.Generator | None = None, max_context: int | None = None, where: str = "model"
           ) -> torch.Tensor:
    """Extend ``prompt`` (int64 ``[T]``) by ``tokens`` tokens sampled from ``model`` (tokens ``[1, T]`` -> logits
    ``[1, T, vocab]``, dense or compressed); returns the generated ids only, ``[tokens]``.

    Each step runs the model on the whole context (at most ``max_context`` trailing tokens; default: the model's
    ``max_len``, or a Hugging Face config's position limit), so any causal LM works unchanged (this module's networks,
    a user's model, a Hugging Face ``...ForCausalLM``), the compressed inference modules included. ``temperature=0``
    is greedy decoding.

    Raises:
        ValueError: an empty prompt, ``tokens < 0``, a negative temperature or ``top_k < 1``; a model that does not
            map token ids to logits (:func:`next_token_logits`).
    """
    if prompt.dim() != 1 or prompt.numel() == 0:
        raise ValueError(f"sample: the prompt must be a non-empty 1-D tensor of token ids, got shape "
                         f"{tuple(prompt.shape)}")
    if tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"sample: tokens={tokens}, temperature={temperature}, top_k={top_k}: need tokens >= 0, "
                         "temperature >= 0 (0 = greedy), top_k >= 1 or None")
    max_context = max_context or _context_limit(model)
    # compressed inference modules may hold buffers only (codes, codebooks): either tells the device
    device = next(iter([*model.parameters(), *model.buffers()]), torch.empty(0)).device
    ctx = prompt.to(device)
    out = []
    for _ in range(tokens):
        window = ctx if max_context is None else ctx[-max_context:]
        logits = next_token_logits(model, window, where)  # [vocab]
        if temperature == 0:
            nxt = logits.argmax()
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                kth = logits.topk(top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=generator)[0].to(device)
        out.append(nxt)
        ctx = torch.cat([ctx, nxt.view(1)])
    return torch.stack(out).cpu() if out else torch.empty(0, dtype=torch.long)


def generate_ids(model: nn.Module, prompt: torch.Tensor, tokens: int, *, byte_level: bool, where: str = "model",
                 **kwargs: Any) -> torch.Tensor:
    """:func:`sample` for ``dc-lightning generate``: with ``byte_level`` the model must predict 256 byte values.

    Raises:
        ValueError: as :func:`sample`; a byte-level prompt for a model whose vocabulary is not 256 bytes (the message
            says to pass token ids or a tokenizer).
    """
    if byte_level:
        device = next(iter([*model.parameters(), *model.buffers()]), torch.empty(0)).device
        with torch.no_grad():
            vocab = next_token_logits(model, torch.zeros(1, dtype=torch.long, device=device), where).numel()
        if vocab != 256:
            raise ValueError(f"{where}: the model predicts {vocab} tokens, not 256 bytes; give the prompt as token ids "
                             "(--prompt-ids 15496,11) or a tokenizer folder (--tokenizer DIR)")
    with torch.no_grad():
        return sample(model, prompt, tokens, where=where, **kwargs)
