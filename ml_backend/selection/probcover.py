"""ProbCover (Yehuda et al. 2022, "Active Learning Through a Covering Lens"): cover the pool.

A labeled image stands for every image within distance ``delta`` of it (its ball); with few labels
the most useful next image is the one whose ball holds the most images that no labeled or queued
image covers yet. So:

1. Rows are scaled to unit length (the self-supervised backbone is trained on cosine similarity;
   distances then lie in ``[0, 2]``).
2. ``delta``: given (the job passes ``PROBCOVER_RADIUS``, 0.5 by default: on the backend's
   self-supervised embeddings the rule below picks 0.2-0.3, where the median ball holds one
   image, and that queue lost 18-25 points to random on MNIST-5k; README), or the paper's rule:
   the largest value of ``DELTAS`` whose balls are *pure*: the rows are grouped by
   k-means into as many groups as the project has classes (a stand-in for the unknown classes),
   and a row is pure when every row within ``delta`` of it is in its own group. ``delta`` keeps
   at least ``alpha`` (0.95) of the rows pure; the smallest value when none does. Purity is
   measured over every row, or over a seeded sample of ``PURITY_ROWS`` in a larger pool.
3. The graph: an edge ``i -> j`` when ``||e_i - e_j|| <= delta`` (each row is in its own ball).
   Rows within ``delta`` of a labeled row are covered.
4. Greedy: the queue takes the unlabeled row whose ball holds the most uncovered rows, covers
   them, and repeats (ties to the lower row) while a pick covers something.
5. Then every other unlabeled row of the graph, by descending ball size (dense areas first, all
   of them already covered), ties to the lower row; then, in a larger pool, the rows outside the
   graph in row order.

Bounded memory and time (no ``N x N`` matrix; distances in tiles): the graph is built over the
unlabeled rows when there are at most ``GRAPH_ROWS``, else over a seeded sample whose size also
keeps the expected edge count (estimated from the purity sample at the chosen ``delta``) under
``MAX_EDGES``; coverage by labeled rows reads at most ``LABELED_ROWS`` of them (a seeded sample
beyond that, so coverage is then an estimate). Work: ``O((P^2 + G^2 + |L| G) d)`` with ``P``, ``G``
the purity and graph rows, at any ``N``.

Where this differs from scikit-activeml's ``ProbCover`` (cross-checked in
``tests/selection/test_selection_skactiveml.py``): rows are scaled to unit length first; ties go
to the lower row, not to a random one; after full coverage the queue goes on by ball size, where
it draws uniformly; the purity grid is finer (0.05 steps from 0.05 to 2.0, theirs 0.2 to 2.0).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ml_backend.errors import SelectionInputError
from ml_backend.selection.kcenter import _as_indices, _as_tensor, _exact_matmul, _resolve_device
from ml_backend.selection.kmeans import _TILE_ELEMENTS, FIT_ROWS, MAX_ITER, _sq_dist, kmeans_centred

DEFAULT_RADIUS = 0.5  # PROBCOVER_RADIUS's default (README: the purity rule picks 0.2-0.3 here)
ALPHA = 0.95  # share of rows whose ball must be pure (the paper's value)
DELTAS = np.round(np.arange(0.05, 2.0001, 0.05), 2)  # radii tried, on unit-length rows
PURITY_ROWS = 5_000  # purity is measured on at most this many rows (a seeded sample beyond)
GRAPH_ROWS = 10_000  # the covering graph holds at most this many unlabeled rows
LABELED_ROWS = 20_000  # coverage by labeled rows reads at most this many of them
MAX_EDGES = 20_000_000  # expected edges of the graph (int32 pairs: about 160 MB)


@dataclasses.dataclass(frozen=True)
class CoverResult:
    """The ProbCover order and what it was built from.

    Attributes:
        order: ``int64`` every unlabeled row, first to label first.
        covers: ``int64 [N]`` rows a greedy pick newly covered (itself included) when it was
            picked; 0 for every other row.
        ball: ``int64 [N]`` rows of the graph within ``delta`` of each graph row (itself
            included); 0 outside the graph and for labeled rows.
        delta: the ball radius used.
        purity: share of the purity rows whose ball was pure at ``delta``; NaN when the radius
            was given without ``n_classes`` (no groups to be pure in).
        covered_by_labels: graph rows the labeled rows covered before the first pick.
        graph_rows: unlabeled rows in the graph (all of them unless the pool is large).
        greedy: how many rows the greedy phase placed (the rest are covered already).
    """

    order: np.ndarray
    covers: np.ndarray
    ball: np.ndarray
    delta: float
    purity: float
    covered_by_labels: int
    graph_rows: int
    greedy: int


def probcover_order(
    embeddings,
    labeled_indices,
    *,
    n_classes: int | None = None,
    alpha: float = ALPHA,
    deltas=None,
    delta: float | None = None,
    seed: int | None = 0,
    device=None,
    clusters=None,
) -> CoverResult:
    """ProbCover order of the unlabeled rows (the algorithm: module docstring).

    Args:
        embeddings: ``[N, d]`` finite numbers, numpy array or torch tensor.
        labeled_indices: rows already labeled; they cover their balls and are never ordered.
        n_classes: classes of the project, >= 1: the k-means groups that ``delta`` is chosen by;
            needed by the purity rule only (``delta`` None).
        alpha: share of pure balls ``delta`` must keep, in (0, 1).
        deltas: radii to choose from (default ``DELTAS``), each in ``[0, 2]``.
        delta: a fixed radius, to skip the choice (tests, cross-checks).
        seed: seeds k-means and the samples of a large pool.
        device: torch device; None means CUDA when available, else CPU.
        clusters: ``int [N]`` group of each row for the purity, to skip k-means (cross-checks).

    Returns:
        A :class:`CoverResult`.

    Raises:
        SelectionInputError: bad shapes, indices, ``n_classes``, ``alpha`` or radii.
    """
    x = _as_tensor(embeddings)
    n = x.shape[0]
    labeled = _as_indices(labeled_indices, n, "labeled_indices", pool_limit=True)
    if n_classes is None and delta is None and clusters is None:
        raise SelectionInputError(
            "the purity rule needs n_classes (the number of classes); or give a radius (delta)"
        )
    if n_classes is not None and (
        isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1
    ):
        raise SelectionInputError(f"n_classes must be a whole number >= 1, got {n_classes!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise SelectionInputError(f"alpha must be a number in (0, 1), got {alpha!r}")
    grid = _radii(DELTAS if deltas is None else deltas, "deltas")
    if delta is not None:
        grid = _radii([delta], "delta")
    if clusters is not None:
        groups = np.asarray(clusters, dtype=np.int64).reshape(-1)
        if groups.shape != (n,) or (n and groups.min() < 0):
            raise SelectionInputError(f"clusters must be {n} group ids >= 0, got {groups.shape}")
    _check_finite(x)
    rng = np.random.default_rng(seed)
    dev = _resolve_device(device)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    is_labeled = np.zeros(n, dtype=bool)
    is_labeled[labeled] = True
    unlabeled = np.flatnonzero(~is_labeled)
    empty = np.zeros(n, dtype=np.int64)
    if not len(unlabeled):
        return CoverResult(np.empty(0, np.int64), empty, empty.copy(), float(grid[0]), 1.0, 0, 0, 0)
    with _exact_matmul(dev):
        # 2. the radius: the largest whose balls stay pure for alpha of the rows
        purity_rows = _sample(rng, np.arange(n), PURITY_ROWS)
        ps = _unit_rows(x, purity_rows, dev, dtype)
        if clusters is None and n_classes is None:  # a given radius: no groups to be pure in
            groups_p = np.zeros(len(purity_rows), dtype=np.int64)
        elif clusters is None:
            groups_p = kmeans_centred(ps, np.zeros(ps.shape[1]), int(n_classes), seed,
                                      MAX_ITER, FIT_ROWS).labels  # fmt: skip
        else:
            groups_p = groups[purity_rows]
        impure_d, ball_counts = _purity_pass(ps, groups_p, grid)
        purity = (impure_d[:, None] > grid[None, :]).mean(axis=0)
        # purity never grows with the radius, so the passing radii are a prefix of the grid
        pick = max(int((purity >= alpha).sum()) - 1, 0)
        radius, pure = float(grid[pick]), float(purity[pick])
        if clusters is None and n_classes is None:
            pure = float("nan")
        # 3. the graph, sized so that its expected edges stay under MAX_EDGES
        share = max(float(ball_counts[pick]) / (len(purity_rows) ** 2), 1.0 / len(purity_rows))
        cap = int(min(GRAPH_ROWS, max(1000, np.sqrt(MAX_EDGES / share))))
        graph = _sample(rng, unlabeled, cap)
        g = _unit_rows(x, graph, dev, dtype)
        indptr, indices = _ball_graph(g, radius)
        covered = _covered_by(x, _sample(rng, labeled, LABELED_ROWS), g, radius)
    ball = np.diff(indptr)
    picks, gains = _greedy(indptr, indices, covered.copy())
    rest = np.setdiff1d(np.arange(len(graph)), picks)
    rest = rest[np.lexsort((rest, -ball[rest]))]
    outside = np.setdiff1d(unlabeled, graph)
    order = np.concatenate([graph[picks], graph[rest], outside]).astype(np.int64)
    covers = empty.copy()
    covers[graph[picks]] = gains
    ball_n = empty.copy()
    ball_n[graph] = ball
    return CoverResult(
        order, covers, ball_n, radius, pure, int(covered.sum()), len(graph), len(picks)
    )


def _radii(values, name: str) -> np.ndarray:
    try:
        grid = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    except (TypeError, ValueError):
        raise SelectionInputError(f"{name} must be numbers in [0, 2], got {values!r}") from None
    if not len(grid) or not np.all(np.isfinite(grid)) or grid.min() < 0 or grid.max() > 2:
        raise SelectionInputError(f"{name} must be numbers in [0, 2], got {values!r}")
    return grid


def _check_finite(x: torch.Tensor) -> None:
    step = max(1, _TILE_ELEMENTS // max(1, x.shape[1]))
    for s in range(0, len(x), step):
        ok = torch.isfinite(x[s : s + step]).all(dim=1)
        if not bool(ok.all()):
            row = s + int(torch.nonzero(~ok).flatten()[0])
            raise SelectionInputError(
                f"embeddings must be finite, but row {row} holds NaN or inf "
                "(check the model's inference output)"
            )


def _unit_rows(x: torch.Tensor, rows: np.ndarray, dev, dtype) -> torch.Tensor:
    """The rows ``rows`` of ``x`` scaled to length 1 (a zero row stays zero), on ``dev``; only
    those rows are copied."""
    part = x[torch.from_numpy(rows)].to(dev, dtype)
    return part / part.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _sample(rng: np.random.Generator, rows: np.ndarray, size: int) -> np.ndarray:
    """``rows`` (ascending) when at most ``size``, else a seeded sample of them, ascending."""
    if len(rows) <= size:
        return rows
    return np.sort(rng.choice(rows, size=size, replace=False))


def _distances(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """``[len(a), len(b)]`` distances, given ``b``'s squared norms."""
    return _sq_dist(b, b_sq, a).sqrt_()


def _purity_pass(ps: torch.Tensor, groups: np.ndarray, grid: np.ndarray):
    """Per purity row, the distance to its nearest row of another group (``inf`` if none); and,
    per radius, the number of ordered pairs within it (self pairs included)."""
    n = len(ps)
    sq = (ps * ps).sum(dim=1)
    g = torch.from_numpy(groups).to(ps.device)
    bounds = torch.from_numpy(grid).to(ps.device, ps.dtype)
    nearest_other = np.empty(n)
    pairs = np.zeros(len(grid), dtype=np.int64)
    step = max(1, _TILE_ELEMENTS // n)
    for s in range(0, n, step):
        d = _distances(ps[s : s + step], ps, sq)
        idx = torch.arange(s, min(s + step, n), device=ps.device)
        d[torch.arange(len(idx), device=ps.device), idx] = 0.0  # exactly 0 to itself
        other = d.masked_fill(g[s : s + step, None] == g[None, :], torch.inf)
        nearest_other[s : s + step] = other.min(dim=1).values.double().cpu().numpy()
        # pairs within each radius: a histogram of the radius index each distance first fits
        first = torch.searchsorted(bounds, d.flatten().contiguous(), right=False)
        pairs += np.bincount(first.cpu().numpy(), minlength=len(grid) + 1)[: len(grid)]
    return nearest_other, np.cumsum(pairs)


def _ball_graph(g: torch.Tensor, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """CSR of the graph over the rows ``g``: row ``i``'s ball is ``indices[indptr[i]:indptr[i+1]]``
    (itself included), ascending."""
    n = len(g)
    sq = (g * g).sum(dim=1)
    step = max(1, _TILE_ELEMENTS // max(n, 1))
    counts, parts = [], []
    for s in range(0, n, step):
        d = _distances(g[s : s + step], g, sq)
        idx = torch.arange(s, min(s + step, n), device=g.device)
        d[torch.arange(len(idx), device=g.device), idx] = 0.0
        hit = d <= radius
        counts.append(hit.sum(dim=1).cpu().numpy())
        parts.append(torch.nonzero(hit)[:, 1].to(torch.int32).cpu().numpy())
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
    return indptr, np.concatenate(parts) if parts else np.empty(0, np.int32)


def _covered_by(x: torch.Tensor, labeled: np.ndarray, g: torch.Tensor, radius: float):
    """``bool [len(g)]``: graph rows (unit length) within ``radius`` of a labeled row of ``x``."""
    covered = torch.zeros(len(g), dtype=torch.bool, device=g.device)
    if not len(labeled):
        return covered.cpu().numpy()
    sq = (g * g).sum(dim=1)
    step = max(1, _TILE_ELEMENTS // max(len(g), 1))
    for s in range(0, len(labeled), step):
        rows = _unit_rows(x, labeled[s : s + step], g.device, g.dtype)
        covered |= (_distances(rows, g, sq) <= radius).any(dim=0)
    return covered.cpu().numpy()


def _greedy(indptr: np.ndarray, indices: np.ndarray, covered: np.ndarray):
    """Greedy max coverage: each pick is the row whose ball holds the most uncovered rows (ties to
    the lower row), while that is at least one. Returns (picks, rows each newly covered)."""
    n = len(covered)
    owner = np.repeat(np.arange(n), np.diff(indptr))
    # degree: uncovered rows in each ball (balls are symmetric: j in ball(i) iff i in ball(j))
    degree = np.bincount(owner, weights=~covered[indices], minlength=n).astype(np.int64)
    picks, gains = [], []
    while n:
        best = int(np.argmax(degree))
        if degree[best] <= 0:
            break
        ball = indices[indptr[best] : indptr[best + 1]]
        new = ball[~covered[ball]]
        covered[new] = True
        picks.append(best)
        gains.append(len(new))
        # every ball holding a newly covered row loses it
        starts, ends = indptr[new], indptr[new + 1]
        lens = ends - starts
        flat = np.repeat(starts - np.cumsum(np.r_[0, lens[:-1]]), lens) + np.arange(lens.sum())
        degree -= np.bincount(indices[flat], minlength=n)
    return np.asarray(picks, dtype=np.int64), np.asarray(gains, dtype=np.int64)
