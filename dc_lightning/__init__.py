"""dc_lightning: Deep Compression (pruning, trained quantization, Huffman coding) and EIE inference for Lightning.

Everything public is importable from here. Imports are lazy (PEP 562) so that ``import dc_lightning`` and the
``dc-lightning`` console script stay fast and the algorithm modules never pull in Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what editors and type checkers see; at run time __getattr__ imports on first use
    from dc_lightning.callbacks.compressed_checkpoint import CompressedCheckpoint  # noqa: F401
    from dc_lightning.callbacks.magnitude_pruning import MagnitudePruning  # noqa: F401
    from dc_lightning.callbacks.trained_quantization import TrainedQuantization  # noqa: F401
    from dc_lightning.checkpoint import load_from_checkpoint  # noqa: F401
    from dc_lightning.data.images import FakeDataModule, FashionMNISTDataModule, ImageFolderDataModule  # noqa: F401
    from dc_lightning.data.text import TextDataModule  # noqa: F401
    from dc_lightning.dcz import CorruptFileError  # noqa: F401
    from dc_lightning.inference.conversion import to_compressed_inference  # noqa: F401
    from dc_lightning.inference.linear import CompressedLinear  # noqa: F401
    from dc_lightning.io import ModelMismatchError, load_compressed, save_compressed  # noqa: F401
    from dc_lightning.models import LeNet5, LeNet300100, alexnet, build_model, vgg16  # noqa: F401
    from dc_lightning.module import ClassifierModule, LanguageModule  # noqa: F401
    from dc_lightning.pruning.masks import apply_masks, magnitude_mask, prune_model  # noqa: F401
    from dc_lightning.pruning.sensitivity import sensitivity_analysis  # noqa: F401
    from dc_lightning.quantization.codebooks import quantize_model  # noqa: F401
    from dc_lightning.quantization.kmeans import kmeans_1d  # noqa: F401
    from dc_lightning.report import compression_report  # noqa: F401
    from dc_lightning.targets import select_targets  # noqa: F401

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # foundation
    "build_model": "dc_lightning.models",
    "LeNet300100": "dc_lightning.models",
    "LeNet5": "dc_lightning.models",
    "alexnet": "dc_lightning.models",
    "vgg16": "dc_lightning.models",
    "FashionMNISTDataModule": "dc_lightning.data.images",
    "ImageFolderDataModule": "dc_lightning.data.images",
    "FakeDataModule": "dc_lightning.data.images",
    "TextDataModule": "dc_lightning.data.text",
    "ClassifierModule": "dc_lightning.module",
    "LanguageModule": "dc_lightning.module",
    # what is compressed (parameter-level targets)
    "select_targets": "dc_lightning.targets",
    # pruning
    "MagnitudePruning": "dc_lightning.callbacks.magnitude_pruning",
    "magnitude_mask": "dc_lightning.pruning.masks",
    "apply_masks": "dc_lightning.pruning.masks",
    "prune_model": "dc_lightning.pruning.masks",
    "sensitivity_analysis": "dc_lightning.pruning.sensitivity",
    # quantization
    "TrainedQuantization": "dc_lightning.callbacks.trained_quantization",
    "kmeans_1d": "dc_lightning.quantization.kmeans",
    "quantize_model": "dc_lightning.quantization.codebooks",
    # file format
    "save_compressed": "dc_lightning.io",
    "load_compressed": "dc_lightning.io",
    "CorruptFileError": "dc_lightning.dcz",
    "ModelMismatchError": "dc_lightning.io",
    "load_from_checkpoint": "dc_lightning.checkpoint",
    "compression_report": "dc_lightning.report",
    "CompressedCheckpoint": "dc_lightning.callbacks.compressed_checkpoint",
    # inference
    "CompressedLinear": "dc_lightning.inference.linear",
    "to_compressed_inference": "dc_lightning.inference.conversion",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dc_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: the next access skips __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
