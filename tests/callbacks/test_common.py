"""The helpers every compression callback shares: rank-0 broadcast, logger step and metrics, per-layer tables."""

import os
import socket
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dc_lightning.callbacks.common import broadcast_from_rank_zero, log_metrics, logger_step, print_table


def test_broadcast_is_a_no_op_outside_distributed():
    mask = torch.tensor([True, False])
    assert broadcast_from_rank_zero(mask) is mask


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _broadcast_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mask = torch.tensor([True, False, True]) if rank == 0 else torch.tensor([False, False, False])
        codes = torch.arange(4, dtype=torch.uint8) + 10 * rank
        codebook = torch.full((2,), float(rank))
        got_mask = broadcast_from_rank_zero(mask)
        same = broadcast_from_rank_zero(codes) is codes and broadcast_from_rank_zero(codebook) is codebook
        results[rank] = (got_mask.dtype, got_mask.tolist(), codes.tolist(), codebook.tolist(), same)
    finally:
        dist.destroy_process_group()


def test_broadcast_gives_every_rank_rank_zeros_values():
    """Two gloo processes: a bool mask (through uint8) and uint8/float tensors (in place) end up as rank 0's."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_broadcast_worker, args=(_free_port(), results), nprocs=2, join=True)
        results = dict(results)
    expected = (torch.bool, [True, False, True], [0, 1, 2, 3], [0.0, 0.0], True)
    assert results == {0: expected, 1: expected}


class RecordingLogger:
    def __init__(self) -> None:
        self.calls = []

    def log_metrics(self, metrics, step):
        self.calls.append((metrics, step))


def _trainer(global_zero: bool, batches_stepped: int | None, global_step: int = 7):
    epoch_loop = SimpleNamespace()
    if batches_stepped is not None:
        epoch_loop._batches_that_stepped = batches_stepped
    return SimpleNamespace(is_global_zero=global_zero, global_step=global_step, loggers=[RecordingLogger()],
                           fit_loop=SimpleNamespace(epoch_loop=epoch_loop))


def test_logger_step_and_log_metrics():
    trainer = _trainer(True, batches_stepped=3)
    assert logger_step(trainer) == 3  # the loggers' x axis, not trainer.global_step
    assert logger_step(_trainer(True, batches_stepped=None)) == 7  # fallback
    log_metrics(trainer, {"compression/density": 0.1})
    log_metrics(trainer, {"compression/ratio": 40.0}, step=9)
    assert trainer.loggers[0].calls == [({"compression/density": 0.1}, 3), ({"compression/ratio": 40.0}, 9)]
    other_rank = _trainer(False, batches_stepped=3)
    log_metrics(other_rank, {"compression/density": 0.1})
    assert other_rank.loggers[0].calls == []


def test_print_table(capsys):
    print_table("round 1/3", ("layer", "kept"), [("model.ip1", "8.00%"), ("model.ip2", "9.00%")],
                total=("total", "8.10%"))
    out = capsys.readouterr().out
    assert "round 1/3" in out and "model.ip2" in out and "9.00%" in out
    assert out.index("model.ip1") < out.index("model.ip2") < out.index("total")
    print_table("to stderr", ("layer",), [("model.ip3",)], stderr=True)
    captured = capsys.readouterr()
    assert "model.ip3" in captured.err and captured.out == ""
