"""1-D k-means for weight sharing [DC §3.1-3.2]: minimise the within-cluster sum of squares (WCSS) of a layer's
surviving weights.

Because the data are 1-D, the values are sorted once; after that a Lloyd iteration costs O(k log n): a cluster is a
contiguous run of the sorted values between the midpoints of neighbouring centroids (found with ``searchsorted``)
and its mean comes from float64 prefix sums. The iterations run on the host in NumPy float64.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

#: centroid initialisations compared in [DC §3.2, Fig. 4/8]; "linear" is the paper's choice
INITS = ("linear", "density", "random")


def acc_dtype(device: torch.device) -> torch.dtype:
    # float64 prefix sums keep segment sums exact enough for millions of weights; MPS has no float64
    return torch.float32 if device.type == "mps" else torch.float64


def wcss(values: Tensor, centroids: Tensor, assign: Tensor) -> float:
    """Within-cluster sum of squares Σ_i (x_i − c_{a_i})² in float64 [DC §3.1]."""
    if values.numel() == 0:
        return 0.0
    v = values.reshape(-1).to(acc_dtype(values.device))
    c = centroids.to(v.device, v.dtype)[assign.reshape(-1).long()]
    return float(((v - c) ** 2).sum())


# ----------------------------------------------------------------------------------------------------------------------
# 1-D k-means
# ----------------------------------------------------------------------------------------------------------------------
def _check_k_init(k: int, init: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"kmeans_1d: k must be a positive int, got {k!r}")
    if init not in INITS:
        raise ValueError(f"kmeans_1d: init must be one of {INITS}, got {init!r} ('linear' is the paper's choice)")


def _init_sorted(xs: Tensor, k: int, init: str, seed: int) -> Tensor:
    """Initial centroids (float64, sorted, length k) from sorted float32 values ``xs`` (n >= 1)."""
    n = xs.numel()
    acc = acc_dtype(xs.device)
    lo, hi = xs[0].to(acc), xs[-1].to(acc)
    if init == "linear":  # evenly spaced over [min, max] [DC §3.2]
        return torch.linspace(0.0, 1.0, k, dtype=acc, device=xs.device) * (hi - lo) + lo
    if init == "density":  # evenly spaced on the CDF's y-axis, mapped back: the (j+1/2)/k quantiles
        q = (torch.arange(k, dtype=acc, device=xs.device) + 0.5) / k
        pos = q * (n - 1)
        i0 = pos.floor().long().clamp_(0, n - 1)
        i1 = (i0 + 1).clamp_(max=n - 1)
        frac = pos - i0.to(acc)
        x0, x1 = xs[i0].to(acc), xs[i1].to(acc)
        return x0 + (x1 - x0) * frac
    # Forgy: k distinct observed values drawn with a seeded CPU generator (identical on every rank/device)
    u = torch.unique_consecutive(xs)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    pick = torch.randperm(u.numel(), generator=gen)[: min(k, u.numel())].to(xs.device)
    c = u[pick].to(acc)
    if c.numel() < k:  # fewer distinct values than k: repeat the largest (never referenced)
        c = torch.cat([c, c.max().expand(k - c.numel())])
    return c.sort().values


def kmeans_init(values: Tensor, k: int, init: str = "linear", seed: int = 0) -> Tensor:
    """Initial centroids of :func:`kmeans_1d` (float32, sorted ascending, length ``k``) [DC §3.2].

    * ``linear``: ``k`` points evenly spaced over ``[min, max]`` (the paper's choice: keeps centroids for the rare
      large weights).
    * ``density``: the ``(j + 1/2)/k`` quantiles, j = 0..k-1 (evenly spaced on the CDF's y-axis).
    * ``random`` (Forgy): ``k`` distinct observed values picked with ``torch.Generator().manual_seed(seed)``.

    Raises:
        ValueError: bad ``k`` or ``init``.
    """
    _check_k_init(k, init)
    xs = values.detach().reshape(-1).float()
    if xs.numel() == 0:
        return torch.zeros(k, dtype=torch.float32, device=values.device)
    return _init_sorted(xs.sort().values, k, init, seed).float()


def kmeans_1d(
    values: Tensor,
    k: int,
    init: str = "linear",
    max_iter: int = 300,
    tol: float = 0.0,
    seed: int = 0,
    refine: bool = True,
    restart: bool = False,
    refine_sample: int | None = 65536,
) -> tuple[Tensor, Tensor]:
    """Cluster 1-D ``values`` into ``k`` clusters minimising the WCSS (Lloyd's algorithm on sorted data) [DC §3.1].

    The values are sorted once. A Lloyd iteration then places the cluster boundaries at the midpoints between
    neighbouring centroids (``searchsorted`` into the sorted values) and recomputes each centroid as its segment's mean
    from float64 prefix sums, O(k log n). Iterations stop when no boundary moves (a fixed point), when no centroid
    moves by more than ``tol * (max - min)``, or after ``max_iter``. A cluster that falls empty is re-seeded at the
    value farthest from its centroid inside the widest cluster (deterministic; this strictly lowers the WCSS, so the
    iteration still terminates). The sort and the final assignment run on the device of ``values``, the iterations
    on the host in NumPy float64 (a chain of small dependent steps: a GPU launch or host sync per step cost more
    than the arithmetic; VGG-16's 10.5M kept weights, 16 layers, refined: 1.5 s on a loaded 2-core CPU).
    Deterministic for a given ``seed`` (only ``init="random"`` uses it).

    Plain Lloyd on discrete 1-D data stalls where the values are sparse (a centroid's step becomes smaller than the gap
    to the next value), so from the linear init it keeps too many centroids in the tails: on pruned VGG-16 layers its
    WCSS was 0.4-55 % above scikit-learn's k-means++ (n_init=10). ``refine=True`` (default) adds a split/merge/swap
    local search between Lloyd passes (``_split_merge``), which beat k-means++ by 1-6 % there (bench/RESULTS.md).
    Trade-off: the refined solution moves centroids from the rare large weights into the dense region, whereas
    [DC §3.2, Fig. 8] chose the linear init precisely because it keeps centroids for the large weights (better
    accuracy, worse WCSS). ``refine=False`` reproduces the paper's procedure exactly (Lloyd from ``init`` only).

    Degenerate inputs never give NaN: ``n == 0`` returns zero centroids; with at most ``k`` distinct values the
    centroids are those values (WCSS 0) and the unused codebook slots repeat the largest one.

    Args:
        values: any shape, flattened; float dtype. Non-finite values are rejected.
        k: number of clusters (``2**bits``).
        init: ``"linear"`` (default, the paper's choice), ``"density"`` or ``"random"``; see :func:`kmeans_init`.
        max_iter: Lloyd iterations at most; 0 returns the initial centroids with nearest-centroid assignments.
        tol: relative centroid-shift threshold for early stopping; 0 iterates to the fixed point.
        seed: seed of the ``random`` init.
        refine: add the split/merge/swap local search (see above).
        restart: with ``refine``, also start from the density init and keep the lower WCSS (rarely helps since the
            search tries swaps; doubles the time).
        refine_sample: run the local search on this many evenly strided values of the sorted data (quantiles)
            when there are more, then polish with Lloyd on all values; None = always all values.

    Returns:
        ``(centroids, assignments)``: float32 ``[k]`` sorted ascending, and int64 ``[n]`` cluster indices in the
        original order of ``values.reshape(-1)``; every value is assigned to its nearest centroid.

    Raises:
        ValueError: bad ``k``/``init``/``max_iter`` or non-finite values.

    Example::

        c, a = kmeans_1d(layer.weight[layer.weight_mask], k=32)
    """
    _check_k_init(k, init)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"kmeans_1d: max_iter must be an int >= 0, got {max_iter!r}")
    orig_device = values.device
    x = values.detach().reshape(-1)
    if x.device.type == "mps":  # needs float64 prefix sums
        x = x.cpu()
    x = x.float()
    n = x.numel()
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=orig_device)
        return torch.zeros(k, dtype=torch.float32, device=orig_device), empty
    host = x.device.type == "cpu"  # NumPy's single-threaded sort/compare/search beat torch's on the CPU
    xs = torch.from_numpy(np.sort(x.numpy())) if host else x.sort().values
    if not bool(torch.isfinite(xs[[0, -1]]).all()):  # sorted: -inf first, +inf and NaN last
        raise ValueError(f"kmeans_1d: values contain {int((~torch.isfinite(x)).sum())} non-finite entries (NaN/inf)")
    if host:
        distinct = int(np.count_nonzero(xs.numpy()[1:] != xs.numpy()[:-1])) + 1
    else:
        distinct = int((xs[1:] != xs[:-1]).sum()) + 1
    if distinct <= k:  # exact: one centroid per distinct value
        u = torch.unique_consecutive(xs)
        c = torch.cat([u, u[-1].expand(k - u.numel())])
        a = torch.searchsorted(u, x)
        return c.to(orig_device), a.to(orig_device)

    c = _init_sorted(xs, k, init, seed).double().cpu().numpy()
    if max_iter > 0:
        xs_h = xs.cpu().numpy()  # iterations on the host (see the note above _boundaries); VGG-16 fc6: 16 MB
        if not refine:
            c = _lloyd_sorted(xs_h, c, max_iter, tol)
        else:
            # the local search runs on an evenly strided (quantile) subsample of the sorted values, the final Lloyd
            # polish on all of them: the search decides how many centroids each region gets, Lloyd where they sit
            sub = xs_h
            if refine_sample and n > refine_sample:
                sub = xs_h[np.round(np.linspace(0, n - 1, refine_sample)).astype(np.int64)]
            c = _split_merge(sub, c, max_iter)
            if restart and init != "density":
                # a second deterministic start; keep the lower WCSS (ties keep ``init``'s solution)
                c0 = _init_sorted(torch.from_numpy(sub), k, "density", seed).double().numpy()
                c2 = _split_merge(sub, c0, max_iter)
                if _wcss_sorted(sub, c2) < _wcss_sorted(sub, c):
                    c = c2
            if sub is not xs_h:
                c = _lloyd_sorted(xs_h, c, max_iter, tol)
    c32 = c.astype(np.float32)
    if host:
        a = torch.from_numpy(np.searchsorted(_boundaries(c32), x.numpy(), side="right").astype(np.int64))
    else:
        a = torch.searchsorted(torch.from_numpy(_boundaries(c32)).to(x.device), x, right=True)
    return torch.from_numpy(c32).to(orig_device), a.to(orig_device)


def _wcss_sorted(xs: np.ndarray, c: np.ndarray) -> float:
    """WCSS of sorted ``xs`` under nearest-centroid assignment to sorted ``c`` (float32 boundaries, as returned)."""
    c32 = c.astype(np.float32)
    a = np.searchsorted(_boundaries(c32), xs, side="right")
    return float(((xs.astype(np.float64) - c32.astype(np.float64)[a]) ** 2).sum())


# The search below runs on the host in NumPy float64, whatever the device of the data: it is a long chain of
# small dependent steps (k-sized arrays, a decision per round), where a GPU or torch's intra-op thread pool costs
# more per step than the arithmetic. Only the sort and the final assignment run on the data's device.


def _boundaries(c: np.ndarray) -> np.ndarray:
    """Decision boundaries between sorted centroids, as float32 so they compare exactly like the data."""
    c = c.astype(np.float64)
    return ((c[:-1] + c[1:]) * 0.5).astype(np.float32)


def _prefix_sums(xs: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Prefix sums of the sorted values and of their squares, ``[n + 1]`` each (float64), and the mean.

    The values are centred on their mean first so that Σx² − (Σx)²/m does not cancel catastrophically.
    """
    xd = xs.astype(np.float64)
    mean = float(xd.mean())
    xd -= mean
    s1 = np.zeros(xd.size + 1)
    s2 = np.zeros(xd.size + 1)
    np.cumsum(xd, out=s1[1:])
    np.cumsum(xd * xd, out=s2[1:])
    return s1, s2, mean


def _segments(xs: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Edges ``[k + 1]`` of the nearest-centroid segments of sorted ``xs``: cluster j = ``xs[e[j]:e[j+1]]``."""
    edges = np.empty(c.size + 1, dtype=np.int64)
    edges[0], edges[-1] = 0, xs.size
    edges[1:-1] = np.searchsorted(xs, _boundaries(c))
    return edges


def _sse(s1: np.ndarray, s2: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared error of the sorted values ``[a, b)`` around their mean, from prefix sums (0 for empty ranges)."""
    m = (b - a).astype(np.float64)
    s = s1[b] - s1[a]
    out = (s2[b] - s2[a]) - s * s / np.maximum(m, 1.0)
    return np.where(m > 0, np.maximum(out, 0.0), 0.0)


def _lloyd_sorted(
    xs: np.ndarray, c: np.ndarray, max_iter: int, tol: float, s1: np.ndarray | None = None, shift0: float = 0.0
) -> np.ndarray:
    """Lloyd iterations on sorted float32 ``xs`` from sorted float64 centroids ``c``; returns float64 centroids.

    ``s1``, ``shift0``: cached ``_prefix_sums(xs)[0]`` and the mean it was centred on.
    """
    if s1 is None:
        s1, _, shift0 = _prefix_sums(xs)
    span = float(xs[-1]) - float(xs[0])
    prev = None
    for _ in range(max_iter):
        edges = _segments(xs, c)
        if prev is not None and np.array_equal(edges, prev):
            break  # fixed point: the means below would be the same
        cnt = np.diff(edges)
        nonempty = cnt > 0
        prev = edges
        new_c = np.where(nonempty, (s1[edges[1:]] - s1[edges[:-1]]) / np.maximum(cnt, 1) + shift0, c)
        n_empty = int((~nonempty).sum())
        if n_empty:
            new_c = _reseed_empty(xs, edges, cnt, new_c, nonempty, n_empty)
            prev = None  # centroids were moved by hand: not a fixed point yet
        new_c = np.sort(new_c)
        moved = float(np.abs(new_c - c).max()) if tol > 0 else None
        c = new_c
        if moved is not None and moved <= tol * span:
            break
    return c


def _reseed_empty(
    xs: np.ndarray, edges: np.ndarray, cnt: np.ndarray, c: np.ndarray, nonempty: np.ndarray, n_empty: int
) -> np.ndarray:
    """Move empty centroids onto the value farthest from its centroid in the widest clusters (deterministic)."""
    start, end = edges[:-1], edges[1:]
    lo_v = xs[np.minimum(start, xs.size - 1)].astype(np.float64)
    hi_v = xs[np.maximum(end - 1, 0)].astype(np.float64)
    # rank donor clusters by (max − min)² · size, exactly 0 for clusters of identical values (which cannot be split)
    spread = np.where(nonempty & (hi_v > lo_v), (hi_v - lo_v) ** 2 * cnt, -1.0)
    n_split = min(n_empty, int((spread > 0).sum()))
    if n_split == 0:
        return c
    donors = np.argsort(-spread, kind="stable")[:n_split]
    far = np.where(np.abs(hi_v[donors] - c[donors]) >= np.abs(c[donors] - lo_v[donors]), hi_v[donors], lo_v[donors])
    c = c.copy()
    c[np.flatnonzero(~nonempty)[:n_split]] = far
    return c


def _split_merge(
    xs: np.ndarray, c: np.ndarray, max_iter: int, max_rounds: int = 200, round_tol: float = 1e-4, trials: int = 8
) -> np.ndarray:
    """Lloyd + split/merge local search on sorted ``xs``; returns float64 centroids with WCSS <= Lloyd's.

    Lloyd on discrete 1-D data stalls once a centroid's step is smaller than the gap to the next value (typical in
    the sparse tails), so centroids never migrate between regions. Each round therefore pairs the cheapest merges of
    two adjacent clusters (cost n1·n2/(n1+n2)·(μ1−μ2)²) with the best optimal 2-splits of other clusters (gain from
    prefix sums, O(n) for all clusters at once) and applies every disjoint pair whose gain exceeds its cost. Each
    applied pair lowers the WCSS of the partition and Lloyd never raises it. When no pair gains on the fixed
    partition, up to ``trials`` single moves are tried with a Lloyd pass after each and the first that lowers the
    WCSS is kept. The WCSS strictly decreases from round to round, so the search terminates.
    """
    n, k = xs.size, c.size
    s1, s2, shift0 = _prefix_sums(xs)
    pos = np.arange(n)
    for _ in range(max_rounds):
        c = _lloyd_sorted(xs, c, max_iter, round_tol, s1=s1, shift0=shift0)
        edges = _segments(xs, c)
        s, e = edges[:-1], edges[1:]
        cnt = e - s
        cur = _sse(s1, s2, s, e)
        mu = (s1[e] - s1[s]) / np.maximum(cnt, 1)
        n1, n2 = cnt[:-1].astype(np.float64), cnt[1:].astype(np.float64)
        mcost = np.where((n1 > 0) & (n2 > 0), n1 * n2 / np.maximum(n1 + n2, 1) * (mu[:-1] - mu[1:]) ** 2, 0.0)
        # best 2-split of every cluster: split point p in (s_j, e_j), cost sse(s_j, p) + sse(p, e_j); the clusters
        # are contiguous runs of positions, so per-cluster minima are reduceat over their starts
        seg = np.repeat(np.arange(k), cnt)  # cluster of sorted position i, [n]
        ss, ee = np.repeat(s, cnt), np.repeat(e, cnt)  # == s[seg], e[seg]
        cost = np.where(pos > ss, _split_cost(s1, s2, ss, ee, cnt, s, e), np.inf)
        best = np.full(k, np.inf)
        full = np.flatnonzero(cnt > 0)
        best[full] = np.minimum.reduceat(cost, s[full])
        gain = np.where(np.isfinite(best), cur - best, 0.0)
        hit = np.flatnonzero((cost == best[seg]) & (pos > ss))
        bpos = np.full(k, n, dtype=np.int64)
        first_hit, at = np.unique(seg[hit], return_index=True)  # positions ascend: the first hit is the smallest
        bpos[first_hit] = hit[at]
        order_m = np.argsort(mcost, kind="stable").tolist()
        order_s = np.argsort(-gain, kind="stable").tolist()
        mc, gn, bp, sl, el = mcost.tolist(), gain.tolist(), bpos.tolist(), s.tolist(), e.tolist()

        def moved(pairs: list[tuple[int, int]]) -> np.ndarray:
            return _apply_moves(c, pairs, mu, n1, n2, bp, sl, el, s1, shift0)  # noqa: B023 (called right here)

        # greedy: every disjoint (split, merge) pair whose exact partition gain exceeds its cost
        used: set[int] = set()
        pairs: list[tuple[int, int]] = []
        im = 0
        for m in order_s:
            if gn[m] <= 0:
                break
            if m in used:
                continue
            while im < len(order_m) and {order_m[im], order_m[im] + 1} & (used | {m}):
                im += 1
            if im >= len(order_m) or gn[m] <= mc[order_m[im]] * (1 + 1e-9):
                break
            j = order_m[im]
            im += 1
            used.update((j, j + 1, m))
            pairs.append((m, j))
        if pairs:
            c = moved(pairs)
            continue
        # stalled: try the most promising single moves with a Lloyd pass after each (a swap heuristic); a move
        # that loses on the fixed partition can win once the neighbouring boundaries re-adjust
        total = float(cur.sum())
        cand = sorted(
            ((gn[m] - mc[j], m, j) for m in order_s[:trials] for j in order_m[:trials] if m not in (j, j + 1)),
            reverse=True,
        )[:trials]
        for _, m, j in cand:
            trial = _lloyd_sorted(xs, moved([(m, j)]), max_iter, round_tol, s1=s1, shift0=shift0)
            te = _segments(xs, trial)
            if float(_sse(s1, s2, te[:-1], te[1:]).sum()) < total * (1 - 1e-9):
                c = trial
                break
        else:
            break
    return _lloyd_sorted(xs, c, max_iter, 0.0, s1=s1, shift0=shift0)  # polish to the fixed point


def _split_cost(
    s1: np.ndarray, s2: np.ndarray, ss: np.ndarray, ee: np.ndarray, cnt: np.ndarray, s: np.ndarray, e: np.ndarray
) -> np.ndarray:
    """``_sse(ss, pos) + _sse(pos, ee)`` for every sorted position ``pos``, the same arithmetic without gathering
    at ``pos`` (a slice) or at the cluster edges ``ss``/``ee`` (repeats of per-cluster values)."""
    n = ss.size
    s1p, s2p = s1[:n], s2[:n]
    s1a, s2a = np.repeat(s1[s], cnt), np.repeat(s2[s], cnt)
    s1b, s2b = np.repeat(s1[e], cnt), np.repeat(s2[e], cnt)
    pos = np.arange(n)
    m_left = (pos - ss).astype(np.float64)
    m_right = (ee - pos).astype(np.float64)
    t = s1p - s1a
    left = np.where(m_left > 0, np.maximum((s2p - s2a) - t * t / np.maximum(m_left, 1.0), 0.0), 0.0)
    t = s1b - s1p
    right = np.where(m_right > 0, np.maximum((s2b - s2p) - t * t / np.maximum(m_right, 1.0), 0.0), 0.0)
    return left + right


def _apply_moves(
    c: np.ndarray,
    pairs: list[tuple[int, int]],
    mu: np.ndarray,
    n1: np.ndarray,
    n2: np.ndarray,
    bp: list[int],
    sl: list[int],
    el: list[int],
    s1: np.ndarray,
    shift0: float,
) -> np.ndarray:
    """Centroids after merging clusters (j, j+1) and splitting cluster m at its best point, for each (m, j)."""
    out = c.copy()
    for m, j in pairs:
        out[j] = (mu[j] * n1[j] + mu[j + 1] * n2[j]) / (n1[j] + n2[j]) + shift0  # merged pair
        p = bp[m]
        out[j + 1] = (s1[p] - s1[sl[m]]) / (p - sl[m]) + shift0  # the freed centroid takes the left half of m
        out[m] = (s1[el[m]] - s1[p]) / (el[m] - p) + shift0  # right half
    return np.sort(out)


# ----------------------------------------------------------------------------------------------------------------------
# per-layer codebooks
