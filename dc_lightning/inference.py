"""EIE inference path: drop-in modules that multiply straight from the compressed format.

:class:`CompressedLinear` replaces an ``nn.Linear`` that carries a codebook (docs/DESIGN.md buffers
``weight_mask`` / ``weight_codebook`` / ``weight_assign``). It holds only the packed sparse layout (16-bit
``(column, code)`` entries in sliced-ELL blocks, see ``dc_lightning.kernels.eie_spmv``), the codebook and the bias,
never a dense weight. On CUDA its forward is the Triton kernel; on the CPU it is the pure-PyTorch reference.

:func:`to_compressed_inference` converts a whole model (or a ``.dcz`` file via ``dc_lightning.io.load_compressed``);
convolutions keep their decoded dense weights; attention, recurrent layers and embeddings get the modules of
:mod:`dc_lightning.compressed_modules`. EIE [EIE] §III computes ``b = ReLU(S[I] a)``: a ``Linear`` directly
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

import argparse
import copy
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dc_lightning.kernels import eie_spmv
from dc_lightning.kernels.eie_spmv import EIEPacked, pack, pack_from_layer_buffers

__all__ = ["CompressedLinear", "to_compressed_inference", "cli_predict"]

log = logging.getLogger(__name__)

_MAX_CENTROIDS = 256


class CompressedLinear(nn.Module):
    """``y = act(x W^T + b)`` with ``W`` kept in the EIE kernel layout (codebook + sparse indices).

    Buffers (saved in ``state_dict``): ``entries`` (int16/int32), ``block_ptr`` (int32), ``codebook`` (float32,
    ``2**bits + 1`` values, the last one 0.0 for padding) and ``bias`` (float32 or absent). The layout's integers
    travel as extra state.

    Args:
        packed: a layer packed by :func:`dc_lightning.kernels.eie_spmv.pack`.
        bias: optional ``[out_features]``.
        relu: apply ReLU in the kernel's epilogue.

    Example::

        >>> from dc_lightning.kernels.eie_spmv import pack
        >>> p = pack(3, 5, torch.tensor([0, 2]), torch.tensor([4, 1]), torch.tensor([0, 1]), torch.tensor([1., 2.]))
        >>> CompressedLinear(p)(torch.ones(1, 5))
        tensor([[1., 0., 2.]])
    """

    def __init__(self, packed: EIEPacked, bias: Tensor | None = None, relu: bool = False) -> None:
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.row_tile = packed.row_tile
        self.chunk = packed.chunk
        self.code_shift = packed.code_shift
        self.nnz = packed.nnz
        self.relu = bool(relu)
        self.register_buffer("entries", packed.entries)
        self.register_buffer("block_ptr", packed.block_ptr)
        self.register_buffer("codebook", packed.codebook)
        if bias is not None:
            if bias.numel() != packed.out_features:
                raise ValueError(f"bias has {bias.numel()} values, expected out_features={packed.out_features}")
            self.register_buffer("bias", bias.detach().reshape(-1).to(torch.float32).to(packed.entries.device))
        else:
            self.register_buffer("bias", None)

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, relu: bool = False, row_tile: int | None = None, chunk: int | None = None
    ) -> CompressedLinear:
        """Build from an ``nn.Linear``.

        A quantized layer (``weight_codebook`` + ``weight_assign``, optionally ``weight_mask``) is packed from its
        buffers. A pruned-only or plain layer gets a codebook of its distinct non-zero weight values when there are
        at most 256 of them (exact); otherwise it is rejected: this path stores codebook indices, not floats.

        Args:
            linear: the layer.
            relu: fuse a following ReLU into the kernel.
            row_tile: rows per tile of the packed layout (``None``: 8..32 from ``out_features``).
            chunk: columns per chunk (``None``: chosen from the density).

        Raises:
            TypeError: if ``linear`` is not an ``nn.Linear``.
            ValueError: if the layer has no codebook and more than 256 distinct non-zero values.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        mask = getattr(linear, "weight_mask", None)
        codebook = getattr(linear, "weight_codebook", None)
        assign = getattr(linear, "weight_assign", None)
        bias = linear.bias.detach() if linear.bias is not None else None
        device = linear.weight.device
        if codebook is not None and assign is not None:
            packed = pack_from_layer_buffers(mask, assign, codebook, row_tile=row_tile, chunk=chunk, device=device)
        else:
            w = linear.weight.detach().to(torch.float32)
            keep = mask.to(torch.bool) if mask is not None else w != 0
            rows, cols = torch.nonzero(keep.cpu(), as_tuple=True)
            values = w.cpu()[rows, cols]
            centroids, codes = torch.unique(values, return_inverse=True)
            if centroids.numel() > _MAX_CENTROIDS:
                raise ValueError(
                    f"layer {linear} has no weight_codebook and {centroids.numel()} distinct non-zero weights; the "
                    f"EIE path needs at most {_MAX_CENTROIDS} (quantize it first, e.g. dc_lightning.quantize_model)"
                )
            if centroids.numel() == 0:
                centroids = torch.zeros(1)
            packed = pack(
                w.shape[0], w.shape[1], rows, cols, codes, centroids, row_tile=row_tile, chunk=chunk, device=device
            )
        return cls(packed, bias=bias, relu=relu)

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
        y = eie_spmv.eie_linear(
            x2,
            self.entries,
            self.block_ptr,
            self.codebook,
            self.bias,
            self.out_features,
            self.in_features,
            self.row_tile,
            self.chunk,
            self.code_shift,
            self.relu,
        )
        return y.reshape(*lead, self.out_features)

    def autotune(self, batch_sizes: Sequence[int] = (1,), dtype: torch.dtype = torch.float32) -> dict[int, dict]:
        """Time the kernel's launch configurations for these batch sizes once and remember the fastest (CUDA only).

        The choice is keyed by the layer's shapes and the activation dtype, so it also applies inside
        ``torch.compile`` and CUDA graphs captured later. Returns ``{batch: config}``.
        """
        return eie_spmv.autotune(self.packed(), tuple(int(b) for b in batch_sizes), dtype, self.bias, self.relu)

    def dense_weight(self) -> Tensor:
        """The decoded float32 ``[out, in]`` weight (for checks; forward never builds it on CUDA)."""
        return eie_spmv.decode_dense(self.packed())

    def packed(self) -> EIEPacked:
        return EIEPacked(
            self.entries,
            self.block_ptr,
            self.codebook,
            self.out_features,
            self.in_features,
            self.row_tile,
            self.chunk,
            self.code_shift,
            self.nnz,
        )

    def get_extra_state(self) -> dict[str, int]:
        return {
            k: int(getattr(self, k))
            for k in ("in_features", "out_features", "row_tile", "chunk", "code_shift", "nnz", "relu")
        }

    def set_extra_state(self, state: dict[str, int]) -> None:
        for k, v in state.items():
            setattr(self, k, bool(v) if k == "relu" else int(v))

    def extra_repr(self) -> str:
        bits = self.code_shift - 1
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
            f"codebook_bits={bits}, bias={self.bias is not None}, relu={self.relu}"
        )


# --------------------------------------------------------------------------------------------------------------


def to_compressed_inference(
    model_or_path: nn.Module | str | os.PathLike,
    device: torch.device | str | None = None,
    *,
    fuse_relu: bool = True,
    autotune_batches: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
    exclude: Sequence[str] = (),
    example_inputs: Any = None,
    tolerance: float | None = None,
) -> nn.Module:
    """Replace every compressed layer that can safely be replaced by its compressed inference module (on a copy).

    ``nn.Linear`` (and subclasses) -> :class:`CompressedLinear`; ``nn.MultiheadAttention`` (as a whole), ``nn.LSTM``
    / ``nn.GRU`` / ``nn.RNN`` and ``nn.Embedding`` -> the modules of :mod:`dc_lightning.compressed_modules`. A layer
    is converted when one of its weight matrices carries a mask or codebook; it is kept dense, with one log line
    saying why, when replacing it is not provably safe (an enclosing ``forward`` reads its weights, it overrides
    ``forward``, has hooks...; rules in :mod:`dc_lightning.conversion`). Every decision is logged on the
    ``dc_lightning.inference`` logger.

    Args:
        model_or_path: a model whose layers carry the compression buffers (nested anywhere), or the path of a
            ``.dcz`` file (read with ``dc_lightning.io.load_compressed``).
        device: where the result goes (default: where the model is).
        fuse_relu: fold an ``nn.ReLU`` that directly follows a converted Linear inside an ``nn.Sequential`` into
            the kernel epilogue (the ReLU becomes ``nn.Identity``).
        autotune_batches: on CUDA, time the kernel configurations of every converted Linear for these batch sizes
            (see :meth:`CompressedLinear.autotune`); ``None`` keeps the shape heuristics.
        dtype: activation dtype the autotuning times.
        exclude: ``fnmatch`` patterns of module names (``"decoder"``, ``"encoder.layers.*"``) or parameter names
            (``"lstm.weight_hh_l0"``, ``"*.out_proj.weight"``) to keep dense.
        example_inputs: a sample input (a tensor, a tuple of positional arguments or a dict of keyword arguments):
            the original and the converted model both run on it and must agree.
        tolerance: largest relative L2 error allowed on ``example_inputs`` (default 1e-4 for float32 outputs, 2e-2
            for float16/bfloat16).

    Returns:
        The converted model in eval mode.

    Raises:
        TypeError: if ``model_or_path`` is neither a module nor a path.
        ValueError: the converted model fails on ``example_inputs`` or its outputs differ beyond ``tolerance``.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        from dc_lightning.io import load_compressed  # lazy: io imports safetensors and the Huffman codec

        model = load_compressed(model_or_path)
    elif isinstance(model_or_path, nn.Module):
        model = copy.deepcopy(model_or_path)
    else:
        raise TypeError(f"model_or_path must be an nn.Module or a path, got {type(model_or_path).__name__}")
    from dc_lightning import conversion  # lazy: conversion imports this module

    if device is not None:
        model = model.to(device)
    model.eval()
    checked = example_inputs is not None
    reference, calls = conversion.reference_outputs(model, example_inputs) if checked else (None, None)
    model, decisions = conversion.convert_model(model, exclude, fuse_relu=fuse_relu, outputs_checked=checked)
    if autotune_batches:
        for m in model.modules():
            if isinstance(m, CompressedLinear) and m.entries.is_cuda:
                m.autotune(autotune_batches, dtype)
    model.eval()
    if checked:
        converted = [d.name for d in decisions if d.action == "convert"]
        err = conversion.check_outputs(model, example_inputs, reference, tolerance, converted, calls)
        log.info("to_compressed_inference: outputs match the original on example_inputs (relative error %.3g)", err)
    return model


# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _top1(
    model: nn.Module, loader: Any, device: torch.device, limit: int | None, transform: Any = None
) -> tuple[float, int, Tensor]:
    """Top-1 over ``loader``; ``transform(batch)`` runs on the device first (the DataModule's
    ``on_after_batch_transfer``: the in-memory datasets convert uint8 images to normalised floats there)."""
    correct, total, preds = 0, 0, []
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        x, y = batch[0].to(device), batch[1].to(device)
        if transform is not None:
            x, y = transform((x, y))
        p = model(x).argmax(dim=-1)
        preds.append(p.cpu())
        correct += int((p == y).sum())
        total += int(y.numel())
    return correct / max(total, 1), total, torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def cli_predict(argv: Sequence[str] | None = None) -> int:
    """``dc-lightning predict FILE.dcz --recipe NAME [overrides]``: top-1 of the dense decode and the kernel path.

    Returns 0 when both paths give the same predictions, 1 otherwise.
    """
    parser = argparse.ArgumentParser(
        prog="dc-lightning predict", description="evaluate a compressed file through the EIE inference path"
    )
    parser.add_argument("path", help="compressed .dcz file")
    parser.add_argument("--recipe", required=True, help="recipe whose data to evaluate on (e.g. lenet300)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--limit-batches", type=int, default=None, help="evaluate only this many batches")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.batch_size=256")
    # intermixed: `predict model.dcz --recipe lenet300 data.root=...` (overrides after the options) must parse
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))

    from dc_lightning.config import build_datamodule, compose  # lazy: Hydra is heavy
    from dc_lightning.io import load_compressed

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = compose(args.recipe, args.overrides)
    dm = build_datamodule(cfg)
    if hasattr(dm, "prepare_data"):
        dm.prepare_data()
    dm.setup("test" if args.split == "test" else "validate")
    loader = dm.test_dataloader() if args.split == "test" else dm.val_dataloader()

    dense = load_compressed(args.path).to(device).eval()
    fast = to_compressed_inference(dense, device=device)
    transform = (lambda b: dm.on_after_batch_transfer(b, 0)) if hasattr(dm, "on_after_batch_transfer") else None
    acc_dense, n, p_dense = _top1(dense, loader, device, args.limit_batches, transform)
    acc_fast, _, p_fast = _top1(fast, loader, device, args.limit_batches, transform)
    agree = float((p_dense == p_fast).float().mean()) if n else 1.0
    path_name = "triton" if device.type == "cuda" else "pytorch-reference"
    print(f"{args.path}: {n} {args.split} samples on {device}")
    print(f"  top-1 dense decode         : {acc_dense * 100:.2f}%")
    print(f"  top-1 compressed ({path_name}): {acc_fast * 100:.2f}%")
    print(f"  prediction agreement       : {agree * 100:.2f}%")
    return 0 if p_dense.equal(p_fast) else 1
