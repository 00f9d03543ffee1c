"""The decoded view of a ``.dcz`` file: :class:`CompressedFile` (metadata, layers, plain tensors) and
:class:`CompressedLayer` (one compressed parameter's coordinates, codes, codebook or kept values).

:func:`dc_lightning.dcz.decode.read_compressed` builds them; :func:`dc_lightning.io.load_compressed` and the
inference path read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dc_lightning import buffers
from dc_lightning.buffers import matrix_shape
from dc_lightning.dcz.container import DEFAULT_ALIASES, CorruptFileError

__all__ = ["MAX_DENSE_EXPANSION", "STORAGES", "CompressedFile", "CompressedLayer"]

#: a file may not expand (dense state dict) to more than this many times its size, floor 1 GiB (see decompress)
MAX_DENSE_EXPANSION = 1024
_MIN_DENSE_CAP = 1 << 30
#: what the file stores for a layer (its record's ``kind`` field): pruned+quantized, quantized only, pruned only
STORAGES = ("pq", "q", "p")


@dataclass
class CompressedLayer:
    """One compressed layer as decoded by :func:`read_compressed` (what the inference path builds layouts from).

    The weight's matrix view is ``weight.reshape(shape[0], -1)`` of shape ``(R, C)``; entry ``k`` sits at
    ``(rows[k], cols[k])``, entries in row-major (CSR) order.

    Attributes:
        name: the target's name (:mod:`dc_lightning.targets`): the qualified module name for a ``weight``,
            ``<module>.<param>`` for another parameter (``attn.in_proj_weight``).
        key: state-dict key of the weight (``<module>.<param>``).
        shape: the weight's shape.
        kind: the layer's storage (:data:`STORAGES`, the record's ``kind`` field): ``"pq"`` pruned+quantized,
            ``"q"`` quantized only (every position stored), ``"p"`` pruned only.
        has_mask: whether the layer carried a mask buffer (``weight_mask``).
        bits: codebook-index width (``None`` for ``"p"``); index_bits: relative-index width (``None`` for ``"q"``).
        rows, cols: int64 coordinates of the stored entries; codes: uint8 codebook indices (``None`` for ``"p"``).
        codebook: float32 centroids (``None`` for ``"p"``); values: float32 kept values (only for ``"p"``).
        record: the layer's metadata record.
    """

    name: str
    key: str
    shape: tuple[int, ...]
    kind: str
    has_mask: bool
    bits: int | None
    index_bits: int | None
    rows: np.ndarray
    cols: np.ndarray
    codes: np.ndarray | None
    codebook: np.ndarray | None
    values: np.ndarray | None
    record: dict = field(default_factory=dict, repr=False)

    @property
    def nnz(self) -> int:
        return int(self.rows.size)

    def _scatter(self, values: Any, dtype: Any) -> np.ndarray:
        r, c = matrix_shape(self.shape)
        out = np.zeros((r, c), dtype=dtype)
        out[self.rows, self.cols] = values
        return out.reshape(self.shape)

    def dense(self) -> np.ndarray:
        """The weight as a float32 array of ``shape``: ``where(mask, codebook[codes], 0)`` (or the kept values)."""
        return self._scatter(self.codebook[self.codes] if self.codes is not None else self.values, np.float32)

    def mask(self) -> np.ndarray:
        return self._scatter(True, bool)

    def assign(self) -> np.ndarray:
        return self._scatter(self.codes, np.uint8)

    @property
    def module_name(self) -> str:
        """The qualified name of the module holding the parameter."""
        return self.key.rpartition(".")[0]

    @property
    def param(self) -> str:
        """The parameter's name in its module (``weight``, ``in_proj_weight``, ``weight_hh_l0`` ...)."""
        return self.key.rpartition(".")[2]

    def buffer_key(self, kind: str) -> str:
        """The state-dict key of this layer's buffer ``kind`` (``"mask"``, ``"codebook"``, ``"assign"``: the buffer
        roles of :mod:`dc_lightning.buffers`; ``kind`` here is not the layer's storage)."""
        module = self.module_name
        return (module + "." if module else "") + buffers.buffer_name(kind, self.param)


@dataclass
class CompressedFile:
    """Metadata plus decoded layers and plain tensors of a ``.dcz`` file (see :func:`read_compressed`)."""

    path: str
    metadata: dict
    layers: dict[str, CompressedLayer]
    tensors: dict[str, torch.Tensor]
    file_size: int

    @property
    def builder(self) -> dict | None:
        return self.metadata.get("builder")

    @property
    def aliases(self) -> dict[str, str]:
        """``{alias key: stored key}``: the state-dict keys of tensors stored once under another key (tied weights;
        ``{}`` for a file without ties)."""
        return self.metadata.get("aliases", DEFAULT_ALIASES)

    def dense_state_dict(self, with_buffers: bool = False) -> dict[str, torch.Tensor]:
        """A plain state dict: dense weights plus every other tensor, an alias key (:attr:`aliases`) holding the same
        tensor object as the key it names; with ``with_buffers`` also the mask/codebook/assign buffers of
        :mod:`dc_lightning.buffers`.

        Raises:
            CorruptFileError: the dense weights would exceed ``MAX_DENSE_EXPANSION`` times the file size.
        """
        dense_bytes = sum(4 * int(np.prod(layer.shape, dtype=np.int64)) for layer in self.layers.values())
        cap = max(_MIN_DENSE_CAP, MAX_DENSE_EXPANSION * self.file_size)
        if dense_bytes > cap:
            raise CorruptFileError(
                f"{self.path}: dense weights would take {dense_bytes} bytes, more than {cap} "
                f"({MAX_DENSE_EXPANSION}x the file size); the header's shapes are not plausible"
            )
        out = dict(self.tensors)
        for layer in self.layers.values():
            out[layer.key] = torch.from_numpy(layer.dense())
            if with_buffers:
                if layer.has_mask:
                    out[layer.buffer_key("mask")] = torch.from_numpy(layer.mask())
                if layer.codes is not None:
                    out[layer.buffer_key("codebook")] = torch.from_numpy(layer.codebook.copy())
                    out[layer.buffer_key("assign")] = torch.from_numpy(layer.assign())
        out.update({alias: out[key] for alias, key in self.aliases.items() if key in out})
        return out
