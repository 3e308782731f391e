"""k-means in torch (greedy k-means++ seeding, Lloyd iterations), blocked so memory stays bounded.

Used by the typicality strategy to split the pool into groups of similar images. Distances are
squared Euclidean, from ``||x||^2 + ||c||^2 - 2 x.c`` on rows centred on their mean (cancellation),
computed tile by tile: no ``N x k`` matrix beyond one tile of ``2**24`` numbers, no ``N x N``.

Cost: seeding is greedy k-means++ (as scikit-learn's: ``2 + ln k`` candidates per centre, the one
that lowers the inertia most is kept) on at most ``max(4096, 16 k)`` rows, ``O(k^2 log k d)`` on
that sample. Lloyd iterations run on at most ``fit_rows`` rows (a seeded sample of a larger pool),
``O(fit_rows k d)`` each, until at most 0.1% of the rows change group or ``max_iter``; a larger
pool is then assigned to the final centres in one ``O(N k d)`` pass. Memory: one centred copy of the input
(float32, or float64 for float64 input), ``k x d`` sums, one tile.

An empty cluster is re-seeded at the row farthest from its centre (exact duplicates can still
leave clusters empty when there are fewer distinct rows than clusters; they stay empty).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ml_backend.errors import SelectionInputError
from ml_backend.selection.kcenter import _as_tensor, _exact_matmul, _resolve_device

_TILE_ELEMENTS = 2**24  # cap on one temporary tile (64 MiB in float32)
_SETTLED = 1e-3  # Lloyd stops when at most this share of the rows changed group
MAX_ITER = 20  # most Lloyd iterations
FIT_ROWS = 20_000  # larger pools fit the centres on a sample of this many rows (>= 40 per group)


@dataclasses.dataclass(frozen=True)
class KMeansResult:
    """One k-means run.

    Attributes:
        labels: ``int64 [N]`` cluster of each row, in ``[0, k)``.
        centroids: ``float64 [k, d]`` cluster means in the input's coordinates (the seed row for a
            cluster that ended empty).
        sizes: ``int64 [k]`` rows per cluster.
        inertia: sum of squared distances of the rows to their centroid.
        iterations: Lloyd iterations run.
    """

    labels: np.ndarray
    centroids: np.ndarray
    sizes: np.ndarray
    inertia: float
    iterations: int


def kmeans(
    embeddings,
    n_clusters: int,
    *,
    seed: int | None = 0,
    device=None,
    max_iter: int = MAX_ITER,
    fit_rows: int = FIT_ROWS,
) -> KMeansResult:
    """Cluster the rows of ``embeddings`` into ``min(n_clusters, N)`` groups.

    Args:
        embeddings: ``[N, d]`` finite numbers, numpy array or torch tensor (any device).
        n_clusters: clusters wanted, >= 1 (capped at ``N``).
        seed: seeds the sampling of the seeding and of the fit sample (same seed, same clusters
            on the same device).
        device: torch device; None (or "auto") means CUDA when available, else CPU.
        max_iter: most Lloyd iterations.
        fit_rows: pools larger than this fit the centres on a seeded sample of this many rows,
            then assign every row once.

    Returns:
        A :class:`KMeansResult`.

    Raises:
        SelectionInputError: not 2-D, non-finite values, ``n_clusters`` not a whole number >= 1.
    """
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)):
        raise SelectionInputError(f"n_clusters must be a whole number >= 1, got {n_clusters!r}")
    if n_clusters < 1:
        raise SelectionInputError(f"n_clusters must be a whole number >= 1, got {n_clusters!r}")
    x = _as_tensor(embeddings)
    n, d = x.shape
    if n == 0:
        return KMeansResult(np.empty(0, np.int64), np.empty((0, d)), np.empty(0, np.int64), 0.0, 0)
    dev = _resolve_device(device)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with _exact_matmul(dev):
        xc, mean = centred_copy(x, dev, dtype)
        return kmeans_centred(xc, mean, int(n_clusters), seed, max_iter, fit_rows)


def kmeans_centred(xc, mean, n_clusters: int, seed, max_iter: int, fit_rows: int) -> KMeansResult:
    """:func:`kmeans` on rows already centred (by ``centred_copy``) and validated."""
    n, k = len(xc), int(min(n_clusters, len(xc)))
    rng = np.random.default_rng(seed)
    fit = xc if n <= fit_rows else xc[_sample(rng, n, fit_rows, xc.device)]
    init_n = min(len(fit), max(4096, 16 * k))
    init = fit if init_n == len(fit) else fit[_sample(rng, len(fit), init_n, xc.device)]
    centres = _kmeans_pp(init, k, rng)
    labels, centres, iterations, min_d2 = _lloyd(fit, centres, max_iter)
    del fit, init
    if n > fit_rows:
        labels, min_d2 = _assign(xc, centres)
    sizes = torch.bincount(labels, minlength=k)
    return KMeansResult(
        labels=labels.cpu().numpy().astype(np.int64),
        centroids=centres.double().cpu().numpy() + mean,
        sizes=sizes.cpu().numpy().astype(np.int64),
        inertia=float(min_d2.double().sum()),
        iterations=iterations,
    )


def centred_copy(x: torch.Tensor, dev, dtype) -> tuple[torch.Tensor, np.ndarray]:
    """``x - mean(x)`` on ``dev`` in ``dtype``, copied tile by tile; checks finiteness.

    Returns ``(centred rows, float64 mean)``.
    """
    n, d = x.shape
    out = torch.empty((n, d), dtype=dtype, device=dev)
    total = np.zeros(d)
    step = max(1, _TILE_ELEMENTS // max(d, 1))
    for s in range(0, n, step):
        part = out[s : s + step]
        part.copy_(x[s : s + step].to(dev, dtype))
        chunk = part.sum(dim=0, dtype=torch.float64).cpu().numpy()
        if not np.isfinite(chunk).all():
            bad = torch.nonzero(~torch.isfinite(part).all(dim=1)).flatten().tolist()
            where = f"row {s + bad[0]} holds NaN or inf" if bad else "values overflow"
            raise SelectionInputError(
                f"embeddings must be finite, but {where} (check the model's inference output)"
            )
        total += chunk
    mean = total / max(1, n)
    m = torch.from_numpy(mean).to(dev, dtype)
    for s in range(0, n, step):
        out[s : s + step].sub_(m)
    return out, mean


def _sample(rng: np.random.Generator, n: int, size: int, dev) -> torch.Tensor:
    return torch.from_numpy(np.sort(rng.choice(n, size=size, replace=False))).to(dev)


def _sq_dist(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``[len(c), len(x)]`` squared distances (clamped at 0)."""
    c_sq = (c * c).sum(dim=1, keepdim=True)
    return torch.addmm(c_sq + x_sq[None, :], c, x.T, alpha=-2.0).clamp_min_(0.0)


def _kmeans_pp(x: torch.Tensor, k: int, rng: np.random.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding: ``k`` rows of ``x`` (scikit-learn's rule, ``2 + ln k`` trials)."""
    n = len(x)
    x_sq = (x * x).sum(dim=1)
    trials = 2 + int(math.log(k))
    chosen = [int(rng.integers(n))]
    closest = _sq_dist(x, x_sq, x[chosen])[0]
    potential = float(closest.sum())
    for _ in range(1, k):
        if potential <= 0.0:  # every row sits on a centre (duplicates): any unused row will do
            free = np.setdiff1d(np.arange(n), chosen)
            chosen.append(int(rng.choice(free)))
            continue
        cumulative = torch.cumsum(closest.double(), dim=0)
        draws = torch.from_numpy(rng.random(trials) * float(cumulative[-1])).to(x.device)
        candidates = torch.searchsorted(cumulative, draws).clamp_max_(n - 1)
        new_closest = torch.minimum(closest[None, :], _sq_dist(x, x_sq, x[candidates]))
        potentials = new_closest.double().sum(dim=1)
        best = int(torch.argmin(potentials))
        chosen.append(int(candidates[best]))
        closest, potential = new_closest[best], float(potentials[best])
    return x[torch.tensor(chosen, device=x.device)].clone()


def _assign(x: torch.Tensor, centres: torch.Tensor, x_sq: torch.Tensor | None = None):
    """Nearest centre of every row and the squared distance to it, tile by tile.

    ``x_sq``: the rows' squared norms, when the caller has them (Lloyd reuses them).
    """
    n, k = len(x), len(centres)
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    min_d2 = torch.empty(n, dtype=x.dtype, device=x.device)
    c_sq = (centres * centres).sum(dim=1)
    step = max(1, _TILE_ELEMENTS // k)
    for s in range(0, n, step):
        part = x[s : s + step]
        d2 = torch.addmm(c_sq[None, :], part, centres.T, alpha=-2.0)  # ||c||^2 - 2 x.c
        best = d2.min(dim=1)
        labels[s : s + step] = best.indices
        sq = (part * part).sum(dim=1) if x_sq is None else x_sq[s : s + step]
        min_d2[s : s + step] = (best.values + sq).clamp_min_(0.0)
    return labels, min_d2


def _lloyd(x: torch.Tensor, centres: torch.Tensor, max_iter: int):
    """Lloyd iterations until at most ``_SETTLED`` of the rows change group (or ``max_iter``).

    Returns ``(labels, centres, iterations, squared distance of each row to its centre)``, the
    labels being the assignment to the returned centres. Sums accumulate in the rows' dtype:
    the rows are centred, so float32 loses nothing that moves a centroid measurably.
    """
    k, d = centres.shape
    x_sq = (x * x).sum(dim=1)
    labels, min_d2 = _assign(x, centres, x_sq)
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 (the count is returned)
        sums = torch.zeros((k, d), dtype=x.dtype, device=x.device).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        empty = torch.nonzero(counts == 0).flatten()
        new = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        if len(empty):  # re-seed each empty cluster at one of the rows farthest from its centre
            far = torch.topk(min_d2, min(len(empty), len(x))).indices
            new[empty[: len(far)]] = x[far]
        centres = new
        new_labels, min_d2 = _assign(x, centres, x_sq)
        changed = int((new_labels != labels).sum())
        labels = new_labels
        if changed <= _SETTLED * len(x):
            break
    return labels, centres, iterations, min_d2
