"""``CompressedEmbedding``: ``nn.Embedding`` that decodes only the rows it is asked for."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ------------------------------------------------------------------------------------------------------ embeddings
from dc_lightning.inference.matrix import MAX_CODES, param_codes


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
        codes_bytes = V * -(-D * code_bits // 8) if n_codes <= MAX_CODES else None
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
