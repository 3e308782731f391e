"""Acquisition strategies: a full queue order over every unlabeled row.

Each strategy is a small class that only says how to order the unlabeled rows (baal's heuristics
style); :func:`rank` owns the pipeline: validation, uncertainty scores, the cold-start fallback and
the :class:`Ranking` it returns. Notation: ``U`` the unlabeled rows, ``L`` the labeled rows,
``u_i`` the uncertainty of row ``i`` (see ``uncertainty.py``), ``e_i`` its embedding,
``dist(i, S) = min_{j in S} ||e_i - e_j||_2``.

- ``random``: a permutation of ``U`` seeded by ``seed``.
- ``uncertainty``: ``U`` by descending ``u_i``.
- ``coreset``: greedy k-center over ``U`` seeded with ``L``: ``x_t = argmax_{i in U} dist(i, L +
  {x_1..x_{t-1}})`` for ``t = 1..batch``; then the rest of ``U`` by descending ``dist(i, L + picks)``.
- ``diversified`` (default): shortlist ``S`` = the ``ceil(batch * shortlist_factor)`` rows of ``U``
  with the largest ``u_i``; ``x_t = argmax_{i in S} dist(i, L + {x_1..x_{t-1}})`` for ``t = 1..batch``
  (distances to labeled rows count); then every other row of ``U`` by descending ``u_i`` (the rest
  of the shortlist comes first, as it is the most uncertain). ``shortlist_factor = 1`` keeps the
  uncertainty batch and only orders it for diversity; a large factor approaches coreset. When every row
  left in ``S`` is at distance 0 (duplicates of labeled rows or picks) while rows outside ``S`` remain,
  ``S`` grows by the next ``|S|`` most uncertain rows, so the batch holds no duplicate while distinct
  rows exist.

Ties always go to the lower row index. ``probs=None`` is the cold start (no model yet): ``uncertainty``
and ``diversified`` fall back to ``coreset`` and ``Ranking.strategy`` reads ``"coreset (cold start)"``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ml_backend.errors import SelectionInputError
from ml_backend.selection.kcenter import k_center_greedy_details
from ml_backend.selection.uncertainty import uncertainty as score_uncertainty


@dataclasses.dataclass(frozen=True)
class Ranking:
    """A queue order over the unlabeled rows of a pool of ``N`` rows.

    Attributes:
        order: ``int64`` indices of every unlabeled row, first to label first; the top ``batch``
            rows are the strategy's batch. Empty when every row is labeled.
        uncertainty: ``float64 [N]`` score per row (labeled rows included); NaN without probs.
        distance: ``float64 [N]`` per row: distance to the nearest labeled or earlier-picked row
            when it was ranked; ``inf`` for the first pick of a pool with no labeled row; NaN where
            not computed (labeled rows, and every row for random / uncertainty).
        strategy: the strategy actually used, e.g. ``"coreset (cold start)"``.
    """

    order: np.ndarray
    uncertainty: np.ndarray
    distance: np.ndarray
    strategy: str


@dataclasses.dataclass(frozen=True)
class _Pool:
    """Validated inputs shared by the strategies."""

    unlabeled: np.ndarray  # int64, ascending
    labeled: np.ndarray  # int64, ascending
    scores: np.ndarray | None  # float64 [N] uncertainty, None at cold start
    embeddings: object
    batch: int
    shortlist_factor: float
    seed: int | None
    device: object


class Strategy:
    """Orders the unlabeled rows. Subclasses implement :meth:`order`."""

    needs_scores = False
    needs_embeddings = False

    def order(self, pool: _Pool, distance: np.ndarray) -> np.ndarray:
        """Return the queue order of ``pool.unlabeled``; write computed distances into ``distance``."""
        raise NotImplementedError


class RandomStrategy(Strategy):
    def order(self, pool, distance):
        return np.random.default_rng(pool.seed).permutation(pool.unlabeled)


class UncertaintyStrategy(Strategy):
    needs_scores = True

    def order(self, pool, distance):
        return _by_descending(pool.unlabeled, pool.scores)


class CoresetStrategy(Strategy):
    needs_embeddings = True

    def order(self, pool, distance):
        res = k_center_greedy_details(pool.embeddings, pool.labeled, pool.batch, device=pool.device)
        distance[pool.unlabeled] = res.min_distances[pool.unlabeled]
        distance[res.picks] = res.pick_distances
        rest = np.setdiff1d(pool.unlabeled, res.picks)
        return np.concatenate([res.picks, _by_descending(rest, res.min_distances)])


class DiversifiedStrategy(Strategy):
    needs_scores = True
    needs_embeddings = True

    def order(self, pool, distance):
        by_score = _by_descending(pool.unlabeled, pool.scores)
        size = max(pool.batch, math.ceil(pool.batch * pool.shortlist_factor))
        shortlist, picks = by_score[:size], np.empty(0, dtype=np.int64)
        while True:
            res = k_center_greedy_details(
                pool.embeddings,
                np.concatenate([pool.labeled, picks]),
                pool.batch - len(picks),
                device=pool.device,
                candidates=np.setdiff1d(shortlist, picks),
            )
            # Keep picks up to the first one at distance 0 (a duplicate) while the shortlist can
            # still grow; the next round looks for distinct rows among more uncertain ones.
            zero = np.flatnonzero(res.pick_distances == 0.0)
            can_grow = len(shortlist) < len(by_score)
            keep = zero[0] if (len(zero) and can_grow) else len(res.picks)
            distance[res.picks[:keep]] = res.pick_distances[:keep]
            picks = np.concatenate([picks, res.picks[:keep]])
            if keep == len(res.picks):
                break
            shortlist = by_score[: len(shortlist) + size]
        rest_of_shortlist = np.setdiff1d(shortlist, picks)
        distance[rest_of_shortlist] = res.min_distances[rest_of_shortlist]
        rest = by_score[~np.isin(by_score, picks)]
        return np.concatenate([picks, rest])


STRATEGIES: dict[str, Strategy] = {
    "diversified": DiversifiedStrategy(),
    "uncertainty": UncertaintyStrategy(),
    "coreset": CoresetStrategy(),
    "random": RandomStrategy(),
}
COLD_START_FALLBACK = "coreset"


def rank(
    strategy: str = "diversified",
    *,
    probs=None,
    embeddings=None,
    labeled_mask,
    batch: int = 20,
    shortlist_factor: float = 5,
    measure: str = "entropy",
    seed: int | None = 0,
    device=None,
) -> Ranking:
    """Order every unlabeled row for labeling with the named strategy (formulas: module docstring).

    Args:
        strategy: one of ``STRATEGIES``: "diversified", "uncertainty", "coreset", "random".
        probs: ``[N, C]`` class probabilities of the current model, or None at cold start.
        embeddings: ``[N, d]`` embeddings (numpy or torch); needed by coreset and diversified.
        labeled_mask: ``bool [N]``, True where the row is labeled. Defines ``N``.
        batch: size of the batch at the top of the queue (``QUEUE_BATCH``), >= 1.
        shortlist_factor: diversified picks its batch among the ``batch * shortlist_factor`` most
            uncertain rows (``SHORTLIST_FACTOR``), >= 1.
        measure: uncertainty measure: "entropy", "margin" or "least_confidence".
        seed: seed of the random strategy.
        device: torch device for k-center; None means CUDA when available, else CPU.

    Returns:
        A :class:`Ranking`.

    Raises:
        SelectionInputError: unknown strategy or measure, shapes that do not match ``labeled_mask``,
            missing embeddings, invalid probabilities or embeddings, batch < 1, factor < 1.
    """
    name = strategy
    if name not in STRATEGIES:
        raise SelectionInputError(
            f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}"
        )
    mask = _validated_mask(labeled_mask)
    n = len(mask)
    if probs is None and STRATEGIES[name].needs_scores:
        name = COLD_START_FALLBACK
    scores = None if probs is None else score_uncertainty(probs, measure)
    _check_rows("probs", scores, n)
    _check_rows("embeddings", embeddings, n)
    impl = STRATEGIES[name]
    if impl.needs_embeddings and embeddings is None:
        raise SelectionInputError(f"strategy {name!r} needs embeddings; got None")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise SelectionInputError(f"batch must be a whole number >= 1, got {batch!r}")
    if not (isinstance(shortlist_factor, (int, float, np.number)) and shortlist_factor >= 1):
        raise SelectionInputError(
            f"shortlist_factor must be a number >= 1, got {shortlist_factor!r}"
        )

    pool = _Pool(
        unlabeled=np.flatnonzero(~mask),
        labeled=np.flatnonzero(mask),
        scores=scores,
        embeddings=embeddings,
        batch=int(batch),
        shortlist_factor=float(shortlist_factor),
        seed=seed,
        device=device,
    )
    distance = np.full(n, np.nan)
    order = impl.order(pool, distance) if len(pool.unlabeled) else np.empty(0, dtype=np.int64)
    return Ranking(
        order=order.astype(np.int64),
        uncertainty=np.full(n, np.nan) if scores is None else scores,
        distance=distance,
        strategy=name if name == strategy else f"{name} (cold start)",
    )


def _by_descending(rows: np.ndarray, value: np.ndarray) -> np.ndarray:
    """``rows`` sorted by descending ``value[rows]``, ties by ascending row index."""
    return rows[np.argsort(-value[rows], kind="stable")]


def _validated_mask(labeled_mask) -> np.ndarray:
    if hasattr(labeled_mask, "detach"):
        labeled_mask = labeled_mask.detach().cpu().numpy()
    mask = np.asarray(labeled_mask)
    if mask.ndim != 1:
        raise SelectionInputError(f"labeled_mask must be 1-D [N], got shape {mask.shape}")
    if mask.dtype != bool:
        if mask.size and not np.isin(mask, (0, 1)).all():
            raise SelectionInputError("labeled_mask must be booleans (True = labeled) or 0/1")
        mask = mask.astype(bool)
    return mask


def _check_rows(name: str, array, n: int) -> None:
    rows = np.shape(array)[0] if array is not None and np.ndim(array) else None
    if array is not None and rows != n:
        raise SelectionInputError(
            f"{name} has {rows} rows but labeled_mask has {n}; "
            "all three must describe the same pool, row for row"
        )
