"""Language models a user brings (issue 22), written here the way users write them: tied embeddings, a nanoGPT-style
GPT whose output layer reads the tied weight through a module-level helper, a bidirectional GRU over packed
sequences, and tiny Hugging Face ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` configurations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class TiedLSTMLM(nn.Module):
    """Embedding -> 2-layer LSTM -> decoder whose weight *is* the embedding's (Press & Wolf, 2017)."""

    def __init__(self, vocab: int = 48, dim: int = 32) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers=2, batch_first=True)
        self.decoder = nn.Linear(dim, vocab)
        self.decoder.weight = self.embedding.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embedding(idx))
        return self.decoder(h)


def output_logits(x: torch.Tensor, emb: nn.Embedding) -> torch.Tensor:
    """Logits against the (tied) embedding table: reads ``emb.weight`` outside any method of the model."""
    return x @ emb.weight.t()


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(dim)
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))  # [B, H, T, D]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's shape: ``wte``/``wpe``, pre-LN blocks, ``lm_head`` tied to ``wte``; with ``helper=True`` the logits
    come from :func:`output_logits` reading ``self.wte.weight`` instead of ``self.lm_head``."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 2, layers: int = 2, block: int = 32,
                 helper: bool = False) -> None:
        super().__init__()
        self.helper = helper
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(block, dim)
        self.h = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=1 / math.sqrt(dim))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        return output_logits(x, self.wte) if self.helper else self.lm_head(x)


class PackedBiGRU(nn.Module):
    """A bidirectional GRU tagger over variable-length sequences (``pack_padded_sequence``, unsorted lengths)."""

    def __init__(self, vocab: int = 40, dim: int = 16, hidden: int = 24, classes: int = 5) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.gru = nn.GRU(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.embedding(idx), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=idx.shape[1])
        return self.head(out)


def tiny_gpt2(vocab: int = 96, seed: int = 0) -> nn.Module:
    """``transformers.GPT2LMHeadModel`` with a tiny config (``Conv1D`` projections, ``lm_head`` tied to ``wte``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(vocab: int = 96, seed: int = 0) -> nn.Module:
    """``transformers.LlamaForCausalLM`` with a tiny config (``nn.Linear`` projections, untied ``lm_head``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()
