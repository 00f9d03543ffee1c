"""CompressedCheckpoint: one file at fit end (rank 0), optional file per Lightning checkpoint, metrics logged."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dc_lightning.callbacks.compressed_checkpoint import CompressedCheckpoint
from dc_lightning.io import load_compressed


class Tiny(pl.LightningModule):
    def __init__(self, hidden: int = 12):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 3))
        lin = self.net[0]
        g = torch.Generator().manual_seed(0)
        mask = torch.rand(lin.weight.shape, generator=g) < 0.3
        cb = torch.linspace(-0.5, 0.5, 16)
        assign = torch.randint(0, 16, lin.weight.shape, generator=g).to(torch.uint8) * mask
        lin.register_buffer("weight_mask", mask)
        lin.register_buffer("weight_codebook", cb)
        lin.register_buffer("weight_assign", assign)
        with torch.no_grad():
            lin.weight.copy_(torch.where(mask, cb[assign.long()], 0.0))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # weights stay on the codebook: invariants hold

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        ds = TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g))
        return DataLoader(ds, batch_size=8)


class RecordingLogger(Logger):
    def __init__(self):
        super().__init__()
        self.metrics = {}

    @property
    def name(self):
        return "rec"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)


def _trainer(tmp_path, callbacks, **kw):
    args = dict(
        max_epochs=1,
        limit_train_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    args.update(kw)
    return pl.Trainer(callbacks=callbacks, **args)


def test_writes_exactly_one_file_at_fit_end(tmp_path):
    model = Tiny()
    cb = CompressedCheckpoint()
    _trainer(tmp_path, [cb]).fit(model)
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.dcz"))
    assert [str(f) for f in files] == ["compressed.dcz"]
    assert cb.last_path == tmp_path / "compressed.dcz"
    assert cb.report is not None and cb.report.total.ratio_pqh > 1
    loaded = load_compressed(tmp_path / "compressed.dcz", trusted=[f"{Tiny.__module__}:Tiny"])  # Tiny + hparams
    assert isinstance(loaded, Tiny)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_every_checkpoint_and_metrics(tmp_path):
    logger = RecordingLogger()
    cb = CompressedCheckpoint(dirpath=tmp_path / "dcz", every_checkpoint=True, index_bits=4)
    _trainer(tmp_path, [cb], max_epochs=2, enable_checkpointing=True, logger=logger).fit(Tiny())
    names = sorted(p.name for p in (tmp_path / "dcz").glob("*.dcz"))
    assert names == ["compressed-epoch=0-step=2.dcz", "compressed-epoch=1-step=4.dcz", "compressed.dcz"]
    assert logger.metrics["compression/ratio"] == pytest.approx(cb.report.total.ratio_pqh)
    assert logger.metrics["compression/file_bytes"] == (tmp_path / "dcz" / "compressed.dcz").stat().st_size


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"codebook_dtype": "int8"}, "codebook_dtype"),
        ({"dense_dtype": "x"}, "dense_dtype"),
        ({"filename": ""}, "filename"),
        ({"every_checkpoint": "yes"}, "every_checkpoint"),
        ({"index_bits": "5"}, "index_bits"),
    ],
)
def test_argument_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressedCheckpoint(**kwargs)
