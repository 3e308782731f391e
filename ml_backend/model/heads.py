"""Linear heads on frozen embeddings: the plain one and the two that learn from the pool.

- ``fit_head``: multinomial logistic regression on standardised embeddings, folded back onto raw
  embeddings (``W / s``, ``b - W m / s``) so it can become a ResNet18's ``fc``.
- ``fit_pseudo_head``: refit with the pool's confident predictions as labels (self-training).
- ``fit_spread_head``: refit with labels spread along the pool's kNN graph (``spreading``).

``recipe`` decides which one is served; the knobs come from its ``RecipeConfig``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from ml_backend.model import spreading

if TYPE_CHECKING:
    from ml_backend.model.recipe import RecipeConfig

# Pseudo-labels per real label at most (the most confident first): bounds the refit's cost.
PSEUDO_PER_LABEL = 5
# Pseudo-labels are drawn from at most this many unlabeled rows (a seeded sample of a larger
# pool): the refit then costs the same at 100,000 images as at 20,000.
PSEUDO_CANDIDATES = 20_000
# Spread labels at most (a seeded sample of a larger graph): bounds the refit's cost on a large
# pool. A sample, not the surest ones: the gain is at the uncertain edges between regions.
SPREAD_ROWS = 5_000
# Rows per float64 block when a head scores embeddings (never a float64 copy of the pool).
LOGIT_BLOCK = 16_384
# Logit of a class with no label yet: far below any fitted class, so it is never predicted.
ABSENT_LOGIT = -100.0


@dataclasses.dataclass
class LinearHead:
    """``logits = x @ weight.T + bias`` on raw embeddings (standardisation already folded in)."""

    weight: np.ndarray  # float64 [C, 512]
    bias: np.ndarray  # float64 [C]

    def logits(self, x: np.ndarray) -> np.ndarray:
        out = np.empty((len(x), len(self.bias)))
        for start in range(0, len(x), LOGIT_BLOCK):  # float64 per block, not of the whole pool
            block = np.asarray(x[start : start + LOGIT_BLOCK], dtype=np.float64)
            out[start : start + LOGIT_BLOCK] = block @ self.weight.T + self.bias
        return out

    def probs(self, x: np.ndarray) -> np.ndarray:
        z = self.logits(x)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def fit_head(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    mean: np.ndarray,
    scale: np.ndarray,
    c: float,
    weights: np.ndarray | None = None,
    init: LinearHead | None = None,
) -> LinearHead:
    """Multinomial logistic regression on ``(x - mean) / scale``, folded back onto raw ``x``.

    Classes without a label get zero weights and ``ABSENT_LOGIT``; with a single labeled class
    every image is that class. ``init``: a head fitted on similar rows (the same labels before
    pseudo-labels were added) to start L-BFGS from; the problem is convex, so it changes how
    many iterations the fit takes, not (beyond the solver's tolerance) where it ends.
    """
    present = np.unique(y)
    weight = np.zeros((num_classes, x.shape[1]))
    bias = np.full(num_classes, ABSENT_LOGIT)
    if len(present) == 1:
        bias[present[0]] = 0.0
        return LinearHead(weight, bias)
    clf = LogisticRegression(C=c, max_iter=300, tol=1e-4)
    if init is not None and not np.any(init.bias[present] <= ABSENT_LOGIT):
        # back to standardised space: coef = w * scale, intercept = b + w @ mean
        coef = init.weight[present] * scale
        intercept = init.bias[present] + init.weight[present] @ mean
        if len(present) == 2:  # sklearn's single row: logit(b) - logit(a)
            coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
        clf.set_params(warm_start=True)
        clf.coef_, clf.intercept_ = coef, intercept
    # One BLAS thread: at a few thousand rows x 512 a threaded OpenBLAS spends more on waking
    # and joining its threads than on the products (4x slower per L-BFGS step on 2 cores).
    with threadpool_limits(limits=1, user_api="blas"):
        clf.fit((x - mean) / scale, y, sample_weight=weights)
    coef, intercept = clf.coef_, clf.intercept_
    if len(present) == 2:  # sklearn keeps one row for two classes: logit(b) - logit(a)
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    w = coef / scale
    weight[clf.classes_] = w
    bias[clf.classes_] = intercept - w @ mean
    return LinearHead(weight, bias)


def fit_pseudo_head(
    embeddings: np.ndarray,
    labeled: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    cfg: RecipeConfig,
    *,
    mean: np.ndarray,
    scale: np.ndarray,
    exclude: np.ndarray | None = None,
    base: LinearHead | None = None,
) -> LinearHead:
    """``fit_head`` plus ``cfg.pseudo_rounds`` rounds of confident pool predictions as labels.

    ``labeled`` are rows of ``embeddings``; rows in ``exclude`` (a validation fold) are never
    pseudo-labeled. At most ``PSEUDO_PER_LABEL`` pseudo-labels per real label are kept (the most
    confident); each weighs ``cfg.pseudo_weight``, and together never more than the real labels,
    so a large pool cannot drown them. They are drawn from at most ``PSEUDO_CANDIDATES``
    unlabeled rows (a sample seeded by ``cfg.seed`` of a larger pool). ``base``: the plain head
    on these labels when the caller has it already (it is the first round); each round starts
    from the one before.
    """
    head = base or fit_head(
        embeddings[labeled], y, num_classes, mean=mean, scale=scale, c=cfg.head_c
    )
    if len(np.unique(y)) < 2:
        return head
    mask = np.ones(len(embeddings), dtype=bool)
    mask[labeled] = False
    if exclude is not None:
        mask[exclude] = False
    pool = np.flatnonzero(mask)
    if len(pool) > PSEUDO_CANDIDATES:
        pool = np.sort(
            np.random.default_rng(cfg.seed).choice(pool, PSEUDO_CANDIDATES, replace=False)
        )
    for _ in range(cfg.pseudo_rounds):
        probs = head.probs(embeddings[pool])
        confidence = probs.max(axis=1)
        sure = np.flatnonzero(confidence >= cfg.pseudo_threshold)
        if not len(sure):
            break
        sure = sure[np.argsort(-confidence[sure], kind="stable")[: PSEUDO_PER_LABEL * len(labeled)]]
        rows, guess = pool[sure], probs[sure].argmax(axis=1)
        w = np.full(len(rows), min(cfg.pseudo_weight, len(labeled) / len(rows)))
        head = _refit(head, embeddings, labeled, y, rows, guess, w, num_classes, mean, scale,
                      cfg.head_c)  # fmt: skip
    return head


def fit_spread_head(
    embeddings: np.ndarray,
    labeled: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    cfg: RecipeConfig,
    *,
    mean: np.ndarray,
    scale: np.ndarray,
    graph: spreading.Graph,
    exclude: np.ndarray | None = None,
    base: LinearHead | None = None,
) -> LinearHead:
    """``fit_head`` on the labels plus the labels ``spreading.spread`` gives the graph's other
    nodes (rows in ``exclude``, a validation fold, are never labeled by it).

    Each spread label weighs its ``spreading.certainty``, scaled down so that together they
    weigh at most ``cfg.spread_weight`` times the real labels: the real labels always have the
    last word where the graph's regions mix classes. ``graph`` must hold every row of
    ``labeled`` (``spreading.build_graph(..., must_include=labeled)``).
    """
    head = base or fit_head(
        embeddings[labeled], y, num_classes, mean=mean, scale=scale, c=cfg.head_c
    )
    if len(np.unique(y)) < 2:
        return head
    probs = spreading.spread(graph, labeled, y, num_classes)
    mask = np.ones(len(graph.nodes), dtype=bool)
    mask[graph.positions(np.asarray(labeled, dtype=np.int64))] = False
    if exclude is not None and len(exclude):
        inside = np.isin(np.asarray(exclude, dtype=np.int64), graph.nodes)
        mask[graph.positions(np.asarray(exclude, dtype=np.int64)[inside])] = False
    w = spreading.certainty(probs) * mask
    keep = np.flatnonzero(w > 0)
    if not len(keep):
        return head
    if len(keep) > SPREAD_ROWS:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(keep, SPREAD_ROWS, replace=False))
    w = w[keep] * min(1.0, cfg.spread_weight * len(labeled) / float(w[keep].sum()))
    return _refit(head, embeddings, labeled, y, graph.nodes[keep], probs[keep].argmax(axis=1), w,
                  num_classes, mean, scale, cfg.head_c)  # fmt: skip


def _refit(head, embeddings, labeled, y, rows, guess, weights, num_classes, mean, scale, c):
    """``fit_head`` on the real labels (weight 1) and ``guess`` for ``rows`` (``weights``),
    starting from ``head``."""
    x = np.concatenate([embeddings[labeled], embeddings[rows]])
    yy = np.concatenate([y, guess])
    w = np.concatenate([np.ones(len(labeled)), weights])
    return fit_head(x, yy, num_classes, mean=mean, scale=scale, c=c, weights=w, init=head)


def column_stats(emb: np.ndarray, block: int = LOGIT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std + 1e-6)`` of each column in float64, a block of rows at a time: no float64
    copy of a large pool (``ndarray.std`` made two, 0.6 s at 100,000 x 512)."""
    n, total, squares = len(emb), np.zeros(emb.shape[1]), np.zeros(emb.shape[1])
    for start in range(0, n, block):
        x = np.asarray(emb[start : start + block], dtype=np.float64)
        total += x.sum(axis=0)
        squares += np.einsum("ij,ij->j", x, x)
    mean = total / max(n, 1)
    return mean, np.sqrt(np.maximum(squares / max(n, 1) - mean * mean, 0.0)) + 1e-6
