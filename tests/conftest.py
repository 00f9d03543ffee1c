"""Shared test settings: no wandb network, no login prompt, quiet Lightning, small thread count."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# the native CPU decode (kernels/native.py) is built once per test session, in a folder of its own
if "DC_LIGHTNING_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["DC_LIGHTNING_CACHE_DIR"] = tempfile.mkdtemp(prefix="dc_lightning_native_")

import pytest  # noqa: E402
import torch  # noqa: E402

from dc_lightning.data.images import fashion_mnist_candidates  # noqa: E402

# tiny models: one intra-op thread is fastest, and keeps 2-process DDP tests from oversubscribing 2 cores
torch.set_num_threads(1)


def skip_or_fail_missing_data(reason: str) -> None:
    """Skip a test whose data set is not installed; under ``CI=true`` fail it instead: CI installs the data
    (scripts/test.sh), so a missing data set there is a broken setup that a skip would hide."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def _fashion_mnist_available() -> bool:
    return any((p / "train-images-idx3-ubyte.gz").is_file() or (p / "train-images-idx3-ubyte").is_file()
               for p in fashion_mnist_candidates(os.environ.get("DC_FASHION_MNIST_ROOT")))


FASHION_MNIST = _fashion_mnist_available()


@pytest.fixture
def _fashion_mnist():
    if not FASHION_MNIST:
        skip_or_fail_missing_data(
            "Fashion-MNIST not installed: apt-get install dataset-fashion-mnist (or set DC_FASHION_MNIST_ROOT)")


needs_fashion_mnist = pytest.mark.usefixtures("_fashion_mnist")


def _fortunes_available() -> bool:
    from dc_lightning.data.text import DEBIAN_FORTUNES

    return DEBIAN_FORTUNES.is_dir() and any(p.is_file() and not p.suffix for p in DEBIAN_FORTUNES.iterdir())


FORTUNES = _fortunes_available()


@pytest.fixture
def _fortunes():
    if not FORTUNES:
        skip_or_fail_missing_data("fortunes corpus not installed: apt-get install fortunes")


needs_fortunes = pytest.mark.usefixtures("_fortunes")
