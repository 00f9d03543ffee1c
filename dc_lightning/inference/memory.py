"""Memory accounting of converted models: the bytes every layer holds, converted or kept dense, against the dense
model's fp16 size."""

from __future__ import annotations

from torch import nn

from dc_lightning import buffers
from dc_lightning.inference.matrix import linear_numel
from dc_lightning.kinds import compressed_module_types

__all__ = ["compressed_memory", "dense_numel"]


def dense_numel(module: nn.Module) -> int:
    """Parameters (weights and biases) the dense layer that ``module`` replaced had: its ``dense_numel()``, or, for
    a module without one (``CompressedLinear``), :func:`~dc_lightning.inference.matrix.linear_numel`."""
    own = getattr(module, "dense_numel", None)
    return own() if callable(own) else linear_numel(module)


def compressed_memory(model: nn.Module) -> dict:
    """Bytes held by every layer of a converted model against the dense model's fp16 size, each storage once.

    One row per layer, in ``named_modules()`` order (every name of a module registered twice):

    * a **compressed** module (the inference modules of :mod:`dc_lightning.kinds`, outermost: a ``CompressedLinear``
      inside a ``CompressedMultiheadAttention`` counts with it): the tensors it holds (packed indices, codebooks,
      biases, small dense parts) against ``2 * dense_numel`` (a ``TiedEmbedding`` holds nothing and replaced
      nothing of its own: its table and dense matrix are its projection's row);
    * every **other** module holding tensors of its own (a layer kept dense, a norm, a bias-only module): its
      parameters and buffers, against 2 bytes per floating-point element (other tensors at their size; the
      compression buffers a layer kept dense still carries count in the bytes, not in the dense size).

    Every storage is counted once across the model (a tied weight kept dense, tensors two converted modules share,
    a module registered twice): the row that meets it first counts it, later rows 0 bytes for it, in both columns.

    Returns:
        ``{"layers": [{"name", "type", "compressed", "device", "bytes", "dense_fp16_bytes", "ratio"}...], "bytes":
        total, "dense_fp16_bytes": total, "ratio": dense / compressed}``; a ratio is 0.0 when its bytes are 0.
    """
    kinds = compressed_module_types()
    rows = []
    taken: list[str] = []
    counted: set[tuple[int, int]] = set()
    replaced: set[int] = set()  # compressed modules whose dense size is counted (a module registered twice: once)
    for name, m in model.named_modules(remove_duplicate=False):
        if any(name.startswith(t + ".") or not t for t in taken):
            continue
        compressed = isinstance(m, kinds)
        if compressed:
            taken.append(name)
            tensors = [(t, False) for t in [*m.parameters(), *m.buffers()]]
        else:
            state = {k for k, _ in m.named_buffers(recurse=False) if _compression_buffer(m, k)}
            tensors = [(t, False) for t in m.parameters(recurse=False)]
            tensors += [(t, k in state) for k, t in m.named_buffers(recurse=False)]
            if not tensors:
                continue
        nbytes, dense, device = 0, 0, None
        for t, overhead in tensors:
            key = (t.data_ptr(), t.numel() * t.element_size())
            device = device or str(t.device)
            if key in counted:
                continue
            counted.add(key)
            nbytes += key[1]
            if not (compressed or overhead):  # a dense model holds no mask/codebook/assign buffers
                dense += 2 * t.numel() if t.is_floating_point() else key[1]
        if compressed and id(m) not in replaced:
            replaced.add(id(m))
            dense = 2 * dense_numel(m)
        rows.append({"name": name, "type": type(m).__name__, "compressed": compressed, "device": device,
                     "bytes": nbytes, "dense_fp16_bytes": dense, "ratio": dense / nbytes if nbytes else 0.0})
    total = sum(r["bytes"] for r in rows)
    dense = sum(r["dense_fp16_bytes"] for r in rows)
    return {"layers": rows, "bytes": total, "dense_fp16_bytes": dense, "ratio": dense / total if total else 0.0}


def _compression_buffer(module: nn.Module, name: str) -> bool:
    """Whether buffer ``name`` of ``module`` is the mask/codebook/assign of one of its tensors."""
    parsed = buffers.parse_buffer_key(name)
    return parsed is not None and parsed[1] in buffers.compressed_params(module)
