"""Memory accounting of converted models: the bytes the compressed modules hold against their dense fp16 size."""

from __future__ import annotations

from torch import nn

from dc_lightning.inference.matrix import linear_numel
from dc_lightning.kinds import compressed_module_types

__all__ = ["compressed_memory", "dense_numel"]


def dense_numel(module: nn.Module) -> int:
    """Parameters (weights and biases) the dense layer that ``module`` replaced had: its ``dense_numel()``, or, for
    a module without one (``CompressedLinear``), :func:`~dc_lightning.inference.matrix.linear_numel`."""
    own = getattr(module, "dense_numel", None)
    return own() if callable(own) else linear_numel(module)


def compressed_memory(model: nn.Module) -> dict:
    """Bytes held by the compressed layers of a converted model against their dense fp16 size.

    Walks ``model`` for the outermost compressed modules (the inference modules of :mod:`dc_lightning.kinds`; a
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
