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

- ``typicality``: TypiClust (``typicality.py``): the most typical row of each of the largest
  groups of similar rows that hold no labeled row, then round-robin over the groups.
- ``badge``: BADGE (``badge.py``): k-means++ seeding over the gradient embeddings
  ``(p_i - onehot(argmax p_i)) (x) h_i`` of ``U`` for the batch (uncertain rows that differ in how
  the model is unsure or in what they show), then the rest of ``U`` by descending squared gradient
  distance to the nearest pick. Seeded by ``seed``; labeled rows are not centres.
- ``probcover``: ProbCover (``probcover.py``): the row whose ball of radius ``delta`` holds the most
  rows no labeled or earlier picked row covers, greedily; ``delta`` is ``probcover_radius`` (0.5
  by default), or with None the paper's purity rule: the largest radius whose balls stay within
  one k-means group (``n_classes`` groups) for 95% of the rows.
- ``herding``: uncertainty herding (``herding.py``; Bae et al. 2024, 2025): a Gaussian kernel
  ``k(x, y) = exp(-(||x - y|| / h)^2)`` on unit-length rows; greedily the row that most raises
  ``sum_i u_i max_{j in L + picks} k(x_i, x_j)`` over the unlabeled rows ``i``, with ``u_i = 1``
  before a model (MaxHerding: dense, mutually distant images first); then the rest by their
  gain after the batch.
- ``auto``: ``typicality`` until the model has earned trust, then ``herding``; the rule and the
  evidence it reads are in ``auto.py``.

Ties always go to the lower row index. ``probs=None`` is the cold start (no model yet): ``uncertainty``
and ``diversified`` fall back to ``typicality`` and ``Ranking.strategy`` reads
``"typicality (cold start)"``. Every ranked row gets a reason code (``reasons.py``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ml_backend.errors import SelectionInputError
from ml_backend.selection.auto import AUTO_LABELS_PER_CLASS, AUTO_MIN_ACCURACY, decide
from ml_backend.selection.badge import badge_picks
from ml_backend.selection.herding import herding_order
from ml_backend.selection.inputs import check_rows, is_number, validated_mask
from ml_backend.selection.kcenter import k_center_greedy_details
from ml_backend.selection.probcover import DEFAULT_RADIUS, probcover_order
from ml_backend.selection.typicality import typicality_order
from ml_backend.selection.uncertainty import DEFAULT_MEASURE
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
            not computed (labeled rows, and every row for random / uncertainty / typicality).
        strategy: the strategy actually used, e.g. ``"typicality (cold start)"``,
            ``"herding (auto)"``.
        reason: ``str [N]`` code of the rule that placed each unlabeled row (``reasons.REASONS``);
            ``""`` for labeled rows. :func:`ml_backend.selection.explain` says it in words.
        group: ``int64 [N]`` typicality group of each row; -1 when the strategy made none.
        group_size: ``int64 [N]`` rows in that group (labeled included); 0 without groups.
        group_labeled: ``int64 [N]`` labeled rows in that group; 0 without groups.
        group_queued: ``int64 [N]`` unlabeled rows of that group ahead in the queue; 0 otherwise.
        covers: ``int64 [N]`` for probcover's and herding's greedy picks, the rows each newly
            covered (itself included; herding: within one bandwidth, estimated over the pool);
            0 otherwise.
        decision: why this strategy was used (``auto``'s rule, or the cold-start fallback), in a
            sentence; ``""`` when the named strategy simply ran.
    """

    order: np.ndarray
    uncertainty: np.ndarray
    distance: np.ndarray
    strategy: str
    reason: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0, dtype="<U16"))
    group: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0, dtype=np.int64))
    group_size: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0, np.int64))
    group_labeled: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0, np.int64))
    group_queued: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0, np.int64))
    covers: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0, np.int64))
    decision: str = ""


@dataclasses.dataclass(frozen=True)
class _Pool:
    """Validated inputs shared by the strategies."""

    unlabeled: np.ndarray  # int64, ascending
    labeled: np.ndarray  # int64, ascending
    scores: np.ndarray | None  # float64 [N] uncertainty, None at cold start
    probs: object  # [N, C] probabilities as given, None at cold start
    embeddings: object
    batch: int
    shortlist_factor: float
    seed: int | None
    device: object
    n_classes: int | None
    probcover_radius: float | None


class _Notes:
    """Per-row values a strategy writes besides the order (the ``Ranking`` fields)."""

    def __init__(self, n: int):
        self.distance = np.full(n, np.nan)
        self.reason = np.full(n, "", dtype="<U16")
        self.group = np.full(n, -1, dtype=np.int64)
        self.group_size = np.zeros(n, dtype=np.int64)
        self.group_labeled = np.zeros(n, dtype=np.int64)
        self.group_queued = np.zeros(n, dtype=np.int64)
        self.covers = np.zeros(n, dtype=np.int64)


class Strategy:
    """Orders the unlabeled rows. Subclasses implement :meth:`order`."""

    needs_scores = False
    needs_embeddings = False

    def order(self, pool: _Pool, notes: _Notes) -> np.ndarray:
        """Return the queue order of ``pool.unlabeled``; write distances and reasons into ``notes``."""
        raise NotImplementedError


class RandomStrategy(Strategy):
    def order(self, pool, notes):
        notes.reason[pool.unlabeled] = "random"
        return np.random.default_rng(pool.seed).permutation(pool.unlabeled)


class UncertaintyStrategy(Strategy):
    needs_scores = True

    def order(self, pool, notes):
        notes.reason[pool.unlabeled] = "uncertain"
        return _by_descending(pool.unlabeled, pool.scores)


class CoresetStrategy(Strategy):
    needs_embeddings = True

    def order(self, pool, notes):
        res = k_center_greedy_details(pool.embeddings, pool.labeled, pool.batch, device=pool.device)
        notes.distance[pool.unlabeled] = res.min_distances[pool.unlabeled]
        notes.distance[res.picks] = res.pick_distances
        notes.reason[pool.unlabeled] = "far"
        rest = np.setdiff1d(pool.unlabeled, res.picks)
        return np.concatenate([res.picks, _by_descending(rest, res.min_distances)])


class DiversifiedStrategy(Strategy):
    needs_scores = True
    needs_embeddings = True

    def order(self, pool, notes):
        distance = notes.distance
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
        notes.reason[pool.unlabeled] = "uncertain"
        notes.reason[picks] = "uncertain_far"
        rest = by_score[~np.isin(by_score, picks)]
        return np.concatenate([picks, rest])


class BadgeStrategy(Strategy):
    needs_scores = True
    needs_embeddings = True

    def order(self, pool, notes):
        res = badge_picks(pool.probs, pool.embeddings, pool.unlabeled, pool.batch,
                          seed=pool.seed, device=pool.device)  # fmt: skip
        notes.reason[pool.unlabeled] = "uncertain"
        notes.reason[res.picks] = "uncertain_varied"
        rest = np.setdiff1d(pool.unlabeled, res.picks)
        return np.concatenate([res.picks, _by_descending(rest, res.min_d2)])


class TypicalityStrategy(Strategy):
    needs_embeddings = True

    def order(self, pool, notes):
        res = typicality_order(
            pool.embeddings, pool.labeled, pool.batch, seed=pool.seed, device=pool.device
        )
        u = pool.unlabeled
        first = (res.cluster_labeled[u] + res.queued_before[u]) == 0
        notes.reason[u] = np.where(first, "typical", "typical_again")
        notes.group[:] = res.cluster
        notes.group_size[:] = res.cluster_size
        notes.group_labeled[:] = res.cluster_labeled
        notes.group_queued[u] = res.queued_before[u]
        return res.order


class ProbCoverStrategy(Strategy):
    needs_embeddings = True

    def order(self, pool, notes):
        if pool.n_classes is None and pool.probcover_radius is None:
            raise SelectionInputError(
                "strategy 'probcover' with the purity rule needs the number of classes "
                "(n_classes, or probs, or evidence['labels_per_class'] per class)"
            )
        # the class count only serves the purity rule: with a given radius it would cost a
        # k-means per ranking for a purity figure nobody reads
        classes = pool.n_classes if pool.probcover_radius is None else None
        res = probcover_order(pool.embeddings, pool.labeled, n_classes=classes,
                              delta=pool.probcover_radius, seed=pool.seed,
                              device=pool.device)  # fmt: skip
        notes.reason[pool.unlabeled] = "covered"
        picks = res.order[: res.greedy]
        notes.reason[picks] = "covers"
        notes.covers[:] = res.covers
        return res.order


class HerdingStrategy(Strategy):
    needs_embeddings = True  # scores are optional: without a model every weight is 1

    def order(self, pool, notes):
        res = herding_order(pool.embeddings, pool.labeled, pool.batch, weights=pool.scores,
                            seed=pool.seed, device=pool.device)  # fmt: skip
        notes.reason[pool.unlabeled] = "herded"
        picks = res.order[: res.picks]
        notes.reason[picks] = "covers_unsure" if res.weighted else "covers"
        notes.covers[picks] = res.stands_for[picks]
        return res.order


class AutoStrategy(Strategy):
    """Never orders: :func:`rank` resolves ``auto`` to typicality or herding (``auto.py``)."""

    needs_embeddings = True


STRATEGIES: dict[str, Strategy] = {
    "diversified": DiversifiedStrategy(),
    "uncertainty": UncertaintyStrategy(),
    "coreset": CoresetStrategy(),
    "random": RandomStrategy(),
    "typicality": TypicalityStrategy(),
    "badge": BadgeStrategy(),
    "probcover": ProbCoverStrategy(),
    "herding": HerdingStrategy(),
    "auto": AutoStrategy(),
}
COLD_START_FALLBACK = "typicality"


def rank(
    strategy: str = "diversified",
    *,
    probs=None,
    embeddings=None,
    labeled_mask,
    batch: int = 20,
    shortlist_factor: float = 5,
    measure: str = DEFAULT_MEASURE,
    seed: int | None = 0,
    device=None,
    evidence=None,
    auto_labels_per_class: float = AUTO_LABELS_PER_CLASS,
    auto_min_accuracy: float = AUTO_MIN_ACCURACY,
    n_classes: int | None = None,
    probcover_radius: float | None = DEFAULT_RADIUS,
) -> Ranking:
    """Order every unlabeled row for labeling with the named strategy (formulas: module docstring).

    Args:
        strategy: one of ``STRATEGIES``: "diversified", "uncertainty", "coreset", "random",
            "typicality", "badge", "probcover", "herding", "auto".
        probs: ``[N, C]`` class probabilities of the current model, or None at cold start.
        embeddings: ``[N, d]`` embeddings (numpy or torch); needed by coreset, diversified, badge,
            typicality, probcover, herding and auto.
        labeled_mask: ``bool [N]``, True where the row is labeled. Defines ``N``.
        batch: size of the batch at the top of the queue (``QUEUE_BATCH``), >= 1.
        shortlist_factor: diversified picks its batch among the ``batch * shortlist_factor`` most
            uncertain rows (``SHORTLIST_FACTOR``), >= 1.
        measure: uncertainty measure: "margin" (the default, ``DEFAULT_MEASURE``), "entropy" or
            "least_confidence".
        seed: seed of the random strategy and of typicality's k-means.
        device: torch device for k-center and k-means; None means CUDA when available, else CPU.
        evidence: for ``auto``: None or a mapping with ``labels_per_class``, ``val_accuracy``,
            ``acceptance`` (see ``auto.py``); ignored by the other strategies.
        auto_labels_per_class: ``auto`` switches to herding from this many labels per class
            (``AUTO_LABELS_PER_CLASS``), > 0.
        auto_min_accuracy: ``auto`` also needs the model's accuracy evidence, when given, to reach
            this (``AUTO_MIN_ACCURACY``), in [0, 1].
        n_classes: the project's classes, for probcover's radius; None reads it from ``probs``,
            else from ``evidence['labels_per_class']`` when that lists every class.
        probcover_radius: probcover's ball radius on unit-length embeddings, in [0, 2]
            (``PROBCOVER_RADIUS``, default 0.5); None chooses it by the purity rule, which needs
            the number of classes (``probcover.py``).

    Returns:
        A :class:`Ranking`.

    Raises:
        SelectionInputError: unknown strategy or measure, shapes that do not match ``labeled_mask``,
            missing embeddings, invalid probabilities, embeddings or evidence, batch < 1,
            factor < 1, auto thresholds out of range.
    """
    name, decision = strategy, ""
    if name not in STRATEGIES:
        raise SelectionInputError(
            f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}"
        )
    mask = validated_mask(labeled_mask)
    n = len(mask)
    scores = None if probs is None else score_uncertainty(probs, measure)
    check_rows("probs", scores, n)
    check_rows("embeddings", embeddings, n)
    if not (is_number(auto_labels_per_class) and auto_labels_per_class > 0):
        raise SelectionInputError(
            f"auto_labels_per_class must be a number > 0, got {auto_labels_per_class!r}"
        )
    if not (is_number(auto_min_accuracy) and 0 <= auto_min_accuracy <= 1):
        raise SelectionInputError(
            f"auto_min_accuracy must be a number in [0, 1], got {auto_min_accuracy!r}"
        )
    if name == "auto":
        chosen = decide(
            evidence,
            has_model=probs is not None,
            n_labeled=int(mask.sum()),
            n_classes=0 if probs is None else int(np.shape(probs)[1]),
            labels_per_class=float(auto_labels_per_class),
            min_accuracy=float(auto_min_accuracy),
        )
        name, decision = chosen.strategy, chosen.why
    elif probs is None and STRATEGIES[name].needs_scores:
        name, decision = COLD_START_FALLBACK, "no model yet, so the most typical images come first"
    impl = STRATEGIES[name]
    if impl.needs_embeddings and embeddings is None:
        raise SelectionInputError(f"strategy {name!r} needs embeddings; got None")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise SelectionInputError(f"batch must be a whole number >= 1, got {batch!r}")
    if not (is_number(shortlist_factor) and shortlist_factor >= 1):
        raise SelectionInputError(
            f"shortlist_factor must be a number >= 1, got {shortlist_factor!r}"
        )

    pool = _Pool(
        unlabeled=np.flatnonzero(~mask),
        labeled=np.flatnonzero(mask),
        scores=scores,
        probs=None if probs is None else _numpy(probs),
        embeddings=embeddings,
        batch=int(batch),
        shortlist_factor=float(shortlist_factor),
        seed=seed,
        device=device,
        n_classes=_class_count(n_classes, probs, evidence),
        probcover_radius=probcover_radius,
    )
    notes = _Notes(n)
    order = impl.order(pool, notes) if len(pool.unlabeled) else np.empty(0, dtype=np.int64)
    if strategy == "auto":
        shown = f"{name} (auto)"
    else:
        shown = name if name == strategy else f"{name} (cold start)"
    return Ranking(
        order=order.astype(np.int64),
        uncertainty=np.full(n, np.nan) if scores is None else scores,
        distance=notes.distance,
        strategy=shown,
        reason=notes.reason,
        group=notes.group,
        group_size=notes.group_size,
        group_labeled=notes.group_labeled,
        group_queued=notes.group_queued,
        covers=notes.covers,
        decision=decision,
    )


def _class_count(n_classes, probs, evidence) -> int | None:
    """The number of classes: given, else the columns of ``probs``, else the length of a
    per-class ``labels_per_class`` in the evidence; None when nothing says."""
    if n_classes is not None:
        if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)):
            raise SelectionInputError(f"n_classes must be a whole number >= 1, got {n_classes!r}")
        if n_classes < 1:
            raise SelectionInputError(f"n_classes must be a whole number >= 1, got {n_classes!r}")
        return int(n_classes)
    if probs is not None:
        return int(np.shape(probs)[1])
    per_class = (evidence or {}).get("labels_per_class") if isinstance(evidence, dict) else None
    if isinstance(per_class, (list, tuple, dict)) and per_class:
        return len(per_class)
    return None


def _numpy(values) -> np.ndarray:
    """A numpy view of probabilities given as numpy or torch (any device)."""
    if hasattr(values, "detach"):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _by_descending(rows: np.ndarray, value: np.ndarray) -> np.ndarray:
    """``rows`` sorted by descending ``value[rows]``, ties by ascending row index."""
    return rows[np.argsort(-value[rows], kind="stable")]
