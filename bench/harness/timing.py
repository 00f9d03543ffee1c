"""The one timing harness of ``bench/``: CUDA-graph rotation on the GPU, wall clock on the CPU.

GPU (:func:`time_calls`): the calls of one provider, one per copy of its weights, are captured in ONE CUDA graph.
With enough copies that together they exceed the L2 cache (:func:`copies_for`: twice the 60 MB of the H200), every
call reads its weights from HBM, as in a network pass, and replaying the graph leaves no launch gaps between them.
A timing is the median over ``repeats`` replays (CUDA events around each replay) divided by the calls per replay.

CPU: the same calls run back to back (:func:`cpu_us`: median wall time); numbers check the plumbing only.

:func:`eager_us` times single eager calls (Python dispatch and launch included), :func:`capture` and
:func:`replay_us` are the two halves of :func:`time_calls` for scripts that reuse the graph (energy readings), and
:func:`sync` waits for the device.

Example::

    fns = [make_provider(copy=i) for i in range(copies_for(weight_bytes))]
    us = time_calls([lambda f=f: f(x) for f in fns])   # µs per call
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

#: L2 cache of the H100 (50 MB) / H200 (60 MB); a rotation covers twice the larger one
L2_MB = 60.0


def sync(device: torch.device | str | None = None) -> None:
    """Wait for the CUDA device (no-op on the CPU)."""
    if torch.device(device or "cpu").type == "cuda":
        torch.cuda.synchronize(device)


def copies_for(weight_bytes: int, l2_mb: float = L2_MB, minimum: int = 2, maximum: int = 256) -> int:
    """Copies of a provider's weights that together exceed twice ``l2_mb`` (at least ``minimum``, at most
    ``maximum``)."""
    return int(min(max(minimum, math.ceil(l2_mb * 2e6 / max(weight_bytes, 1))), maximum))


def cpu_us(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock µs of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    spans = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        spans.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(spans)


def capture(calls: Sequence[Callable[[], Any]], warmup: int = 1) -> tuple[torch.cuda.CUDAGraph, list]:
    """Run every call ``warmup`` times on a side stream (allocations, compilation, tuned-table lookups), then
    capture them in order in one CUDA graph. Returns the graph and the outputs of the captured calls (static
    tensors that every replay rewrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [call() for call in calls]
    torch.cuda.synchronize()
    return graph, outs


def replay_us(graph: torch.cuda.CUDAGraph, repeats: int = 15, warmup: int = 3, per: int = 1) -> float:
    """Median µs of one replay of ``graph`` over ``repeats`` replays (CUDA events), divided by ``per``."""
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / per)
    return statistics.median(times)


def time_calls(calls: Sequence[Callable[[], Any]], repeats: int = 15, device: torch.device | str = "cuda") -> float:
    """µs per call: on CUDA the calls captured in one graph, median of ``repeats`` replays / ``len(calls)``; on the
    CPU the median wall time of ``repeats`` rounds of all calls / ``len(calls)``."""
    if not calls:
        raise ValueError("time_calls: no calls to time")
    if torch.device(device).type != "cuda":
        return cpu_us(lambda: [call() for call in calls], repeats=repeats, warmup=0) / len(calls)
    graph, _ = capture(calls)
    try:
        return replay_us(graph, repeats=repeats, per=len(calls))
    finally:
        del graph


def eager_us(fn: Callable[[], Any], repeats: int = 15, warmup: int = 3, device: torch.device | str = "cuda") -> float:
    """Median µs of one eager ``fn()`` (dispatch and launch included): CUDA events around each call on CUDA, wall
    clock on the CPU. The weights may sit in L2 between calls; use :func:`time_calls` for HBM-bound numbers."""
    if torch.device(device).type != "cuda":
        return cpu_us(fn, repeats=repeats, warmup=min(warmup, 1))
    for _ in range(warmup):
        fn()
    spans = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        spans.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) * 1e3 for a, b in spans)


def floor_parts(device: torch.device | str = "cuda") -> dict[str, float]:
    """What a roofline floor is built from: the device-to-device copy bandwidth (bytes/s, read + write, 256 MB
    copied four times in one graph) and the cost of one graph node (µs, 256 one-element adds in one graph). A
    floor is then ``graph_node_us + bytes_moved / copy_bw_Bps``. On the CPU nominal values (1e11 B/s, 1 µs)."""
    if torch.device(device).type != "cuda":
        return {"copy_bw_Bps": 1e11, "graph_node_us": 1.0}
    n = 1 << 28
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    copy_us = time_calls([lambda a=a, b=b: b.copy_(a)] * 4)
    z = torch.zeros(1, device=device)
    node_us = time_calls([lambda: z.add_(1)] * 256)
    return {"copy_bw_Bps": 2 * n / (copy_us * 1e-6), "graph_node_us": node_us}
