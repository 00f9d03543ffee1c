import gzip
import shutil

import pytest
import torch
from conftest import needs_fashion_mnist
from PIL import Image

from dc_lightning.data import images as data_mod
from dc_lightning.data.images import (
    DEBIAN_FASHION_MNIST,
    FakeDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    load_fashion_mnist,
)


@needs_fashion_mnist
def test_fashion_mnist_real_images():
    dm = FashionMNISTDataModule(val_size=5000, seed=0, download=False)
    dm.setup()
    n = {k: len(v) for k, v in dm.splits.items()}
    assert n == {"train": 55000, "val": 5000, "test": 10000}
    x, y = dm.splits["test"][:]
    assert x.dtype == torch.uint8 and x.shape == (10000, 28, 28)
    assert y.min() == 0 and y.max() == 9 and torch.bincount(y).tolist() == [1000] * 10  # balanced test set
    assert 60 < x.float().mean() < 80  # Fashion-MNIST's mean pixel is ~72.9 (0.286 * 255)
    # same seed -> same split; another seed -> another split
    dm2 = FashionMNISTDataModule(val_size=5000, seed=0, download=False)
    dm2.setup()
    assert torch.equal(dm.splits["val"][:][1], dm2.splits["val"][:][1])
    dm3 = FashionMNISTDataModule(val_size=5000, seed=1, download=False)
    dm3.setup()
    assert not torch.equal(dm.splits["val"][:][0], dm3.splits["val"][:][0])


@needs_fashion_mnist
def test_torchvision_raw_layout_and_resize(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    src = next(p for p in data_mod.fashion_mnist_candidates(None) if (p / "t10k-labels-idx1-ubyte.gz").exists())
    for f in src.glob("*.gz"):  # torchvision keeps them unpacked
        with gzip.open(f) as fi, open(raw / f.stem, "wb") as fo:
            shutil.copyfileobj(fi, fo)
    data = load_fashion_mnist(tmp_path, download=False)
    assert data["train"][0].shape == (60000, 28, 28)
    dm = FashionMNISTDataModule(root=str(tmp_path), image_size=32, channels=3, batch_size=8, download=False)
    dm.setup()
    x, y = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (8,)
    assert torch.equal(x[:, 0], x[:, 2])  # grey repeated over channels


def test_missing_fashion_mnist_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
        load_fashion_mnist(tmp_path / "empty", download=False)
    assert str(tmp_path / "empty") in str(e.value)
    assert DEBIAN_FASHION_MNIST.name == "fashion-mnist"


def test_fake_data_shapes():
    dm = FakeDataModule(num_samples=20, image_size=64, channels=3, num_classes=7, batch_size=5)
    dm.setup()
    x, y = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert x.shape == (5, 3, 64, 64) and y.max() < 7
    again = FakeDataModule(num_samples=20, image_size=64, channels=3, num_classes=7, batch_size=5)
    again.setup()
    assert torch.equal(dm.splits["train"][:][0], again.splits["train"][:][0])  # seeded


def test_image_folder(tmp_path):
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (300, 260), color=(i * 100, 50, 200)).save(d / f"{i}.png")
    dm = ImageFolderDataModule(str(tmp_path), batch_size=2, num_workers=0)
    dm.setup()
    assert dm.num_classes == 2
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 224, 224)
    with pytest.raises(FileNotFoundError, match="train/ and val/"):
        ImageFolderDataModule(str(tmp_path / "nope")).setup()


def test_bad_arguments():
    with pytest.raises(ValueError, match="data.channels"):
        FashionMNISTDataModule(channels=2)
    with pytest.raises(ValueError, match="data.batch_size"):
        FakeDataModule(batch_size=0)
