"""Lightning DataModules: Fashion-MNIST (in-memory, GPU-side resizing), ImageNet-layout folders, FakeData.

Fashion-MNIST is small enough (47 MB as uint8) to live in memory as tensors: batches are sliced from them (no
per-sample Python work) and converted, normalised and resized on the device in ``on_after_batch_transfer``,
which keeps the 2-core CPU and the GPU busy on the model instead of on data loading.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, TensorDataset

log = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (plain or .gz): big-endian magic, dims, then uint8 data."""
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"data: {path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"data: {path} holds {data.size} bytes, its header promises {int(np.prod(dims))}")
    return data.reshape(tuple(dims))


def _find_split(folder: Path, split: str) -> tuple[Path, Path] | None:
    found = []
    for stem in _FILES[split]:
        hit = next((folder / (stem + ext) for ext in ("", ".gz") if (folder / (stem + ext)).is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


def fashion_mnist_candidates(root: str | Path | None) -> list[Path]:
    """Folders searched, in order: ``<root>/FashionMNIST/raw`` (torchvision's layout), ``<root>``, the Debian one."""
    out = []
    if root:
        root = Path(root).expanduser()
        out += [root / "FashionMNIST" / "raw", root]
    out.append(DEBIAN_FASHION_MNIST)
    return out


def load_fashion_mnist(root: str | Path | None = None, download: bool = True) -> dict[str, tuple[torch.Tensor, ...]]:
    """Fashion-MNIST as uint8 tensors: ``{"train": (x [60000,28,28], y [60000]), "test": (x [10000,28,28], y)}``.

    Looks in ``<root>/FashionMNIST/raw``, ``<root>``, then ``/usr/share/datasets/fashion-mnist`` (Debian's
    ``dataset-fashion-mnist``), then tries torchvision's download into ``root`` when a root is given.

    Raises:
        FileNotFoundError: none of that worked; the message says what to install or pass.
    """
    tried = fashion_mnist_candidates(root)
    for folder in tried:
        paths = {s: _find_split(folder, s) for s in _FILES}
        if all(paths.values()):
            out = {}
            for split, (img, lab) in paths.items():
                x, y = _read_idx(img), _read_idx(lab)
                if x.shape[0] != y.shape[0] or x.shape[1:] != (28, 28):
                    raise ValueError(f"data: {img} / {lab} do not form a Fashion-MNIST split: {x.shape}, {y.shape}")
                out[split] = (torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64)))
            log.info("Fashion-MNIST from %s", folder)
            return out
    error = None
    if root and download:
        try:
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(str(Path(root).expanduser()), train=train, download=True)
            return load_fashion_mnist(root, download=False)
        except Exception as e:  # no network here is the common case
            error = e
    raise FileNotFoundError(
        "data: Fashion-MNIST not found. Looked for train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
        f"t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] in {[str(p) for p in tried]}"
        + (f"; torchvision's download failed: {error}" if error else "")
        + ". Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or pass data.root=<folder> "
        "holding those files (or a folder where torchvision can download them)."
    )


class TensorSplits:
    """Loaders over in-memory ``TensorDataset`` splits (``self.splits``), for the in-memory DataModules: seeded
    shuffling of the train split (``self.seed``), ``self.batch_size`` / ``self.eval_batch_size``.

    ``batch_size=None`` + a ``BatchSampler``: a split is indexed by a whole list of indices at once (one gather per
    batch instead of ``batch_size`` item lookups and a collate).
    """

    splits: dict[str, TensorDataset]
    batch_size: int
    eval_batch_size: int
    seed: int

    def _loader(self, split: str, train: bool) -> DataLoader:
        ds = self.splits[split]
        gen = torch.Generator().manual_seed(self.seed)
        sampler = RandomSampler(ds, generator=gen) if train else SequentialSampler(ds)
        bs = self.batch_size if train else self.eval_batch_size
        return DataLoader(ds, batch_size=None, sampler=BatchSampler(sampler, bs, drop_last=False))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


class _InMemoryDataModule(TensorSplits, pl.LightningDataModule):
    """Shared batching/transform logic for uint8 image tensors held in memory."""

    mean: float = FASHION_MNIST_MEAN
    std: float = FASHION_MNIST_STD

    def __init__(self, batch_size: int, eval_batch_size: int | None, image_size: int, channels: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size: {batch_size} must be >= 1")
        if image_size < 8:
            raise ValueError(f"data.image_size: {image_size} must be >= 8 pixels")
        if channels not in (1, 3):
            raise ValueError(f"data.channels: {channels} must be 1 or 3")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.image_size, self.channels = image_size, channels
        self.splits: dict[str, TensorDataset] = {}


    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        if x.dtype == torch.uint8:  # [B, H, W] uint8 -> [B, C, S, S] float, normalised, on the device
            x = (x.float().unsqueeze(1) / 255.0 - self.mean) / self.std
            if x.shape[-1] != self.image_size:
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
            if self.channels != 1:
                x = x.expand(-1, self.channels, -1, -1).contiguous()
        return x, y


class FashionMNISTDataModule(_InMemoryDataModule):
    """Fashion-MNIST (10 classes, 28x28): train/val split of the 60k training images, the 10k test images.

    Args:
        root: folder holding the IDX files (or torchvision's ``FashionMNIST/raw`` layout); optional.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        val_size: images held out of the training set for validation (seeded split).
        image_size: side after resizing (28 = native; 32 for VGG-16, 64 for AlexNet).
        channels: 1, or 3 to repeat the grey channel for ImageNet-shaped networks.
        seed: seed of the train/val split and of the shuffling.
        download: let torchvision try a download into ``root`` when no local copy exists.

    Raises:
        FileNotFoundError: in ``setup`` when the data cannot be found (see ``load_fashion_mnist``).
    """

    num_classes = 10

    def __init__(self, root: str | None = None, batch_size: int = 128, eval_batch_size: int | None = 1000,
                 val_size: int = 5000, image_size: int = 28, channels: int = 1, seed: int = 0,
                 download: bool = True) -> None:
        super().__init__(batch_size, eval_batch_size, image_size, channels)
        if not 0 <= val_size < 60000:
            raise ValueError(f"data.val_size: {val_size} must be in [0, 60000)")
        self.root, self.val_size, self.seed, self.download = root, val_size, seed, download

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        data = load_fashion_mnist(self.root, self.download)
        x, y = data["train"]
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed))
        val, train = perm[: self.val_size], perm[self.val_size:]
        self.splits = {"train": TensorDataset(x[train], y[train]), "val": TensorDataset(x[val], y[val]),
                       "test": TensorDataset(*data["test"])}
        if self.val_size == 0:  # validate on the test split rather than on nothing
            self.splits["val"] = self.splits["test"]


class FakeDataModule(_InMemoryDataModule):
    """torchvision ``FakeData`` of a configurable shape (random images, random labels) for smoke tests.

    The images are materialised once as uint8 tensors so batches flow through the same path as real data.
    """

    mean, std = 0.5, 0.25

    def __init__(self, num_samples: int = 64, image_size: int = 28, channels: int = 1, num_classes: int = 10,
                 batch_size: int = 16, eval_batch_size: int | None = None, seed: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, image_size, channels)
        self.num_samples, self.num_classes, self.seed = num_samples, num_classes, seed

    def _make(self, n: int, offset: int) -> TensorDataset:
        from torchvision.datasets import FakeData
        from torchvision.transforms.functional import pil_to_tensor

        ds = FakeData(n, (1, self.image_size, self.image_size), self.num_classes, random_offset=self.seed + offset)
        xs, ys = zip(*[(pil_to_tensor(img.convert("L"))[0], int(label)) for img, label in ds], strict=True)
        return TensorDataset(torch.stack(xs), torch.tensor(ys, dtype=torch.int64))

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            n_eval = max(self.num_samples // 4, 1)
            self.splits = {"train": self._make(self.num_samples, 0), "val": self._make(n_eval, 10_000),
                           "test": self._make(n_eval, 20_000)}


class ImageFolderDataModule(pl.LightningDataModule):
    """ImageNet layout: ``<root>/train/<class>/*.JPEG`` and ``<root>/val/<class>/*.JPEG``.

    Standard transforms: RandomResizedCrop(224) + horizontal flip for training; Resize(256) + CenterCrop(224) for
    evaluation (scaled with ``image_size``), ImageNet mean/std. ``val/`` doubles as the test split.

    Raises:
        FileNotFoundError: in ``setup`` when ``root/train`` or ``root/val`` is missing.
    """

    def __init__(self, root: str, batch_size: int = 256, eval_batch_size: int | None = None, image_size: int = 224,
                 num_workers: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.root, self.batch_size, self.eval_batch_size = root, batch_size, eval_batch_size or batch_size
        self.image_size, self.num_workers, self.seed = image_size, num_workers, seed
        self.num_classes: int | None = None

    def setup(self, stage: str | None = None) -> None:
        from torchvision import datasets
        from torchvision import transforms as T

        root = Path(self.root).expanduser()
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise FileNotFoundError(
                    f"data.root: {str(root / split)!r} is not a folder; an ImageNet-layout root holds train/ and "
                    "val/, each with one sub-folder of images per class"
                )
        norm = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
        s = self.image_size
        train_tf = T.Compose([T.RandomResizedCrop(s), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        eval_tf = T.Compose([T.Resize(round(s * 256 / 224)), T.CenterCrop(s), T.ToTensor(), norm])
        self.train_set = datasets.ImageFolder(str(root / "train"), train_tf)
        self.val_set = datasets.ImageFolder(str(root / "val"), eval_tf)
        self.num_classes = len(self.train_set.classes)

    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size if train else self.eval_batch_size, shuffle=train,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0, drop_last=train)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)
