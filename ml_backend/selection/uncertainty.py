"""Uncertainty scores from class probabilities, each normalised to [0, 1].

0 means a one-hot prediction (the model is sure), 1 a uniform one (it has no idea), so the three
measures can be compared and mixed. For ``C`` classes, ``p1 >= p2`` the two largest probabilities:

- least confidence: ``(1 - p1) / (1 - 1/C)``
- margin:           ``1 - (p1 - p2)``
- entropy:          ``-sum_c p_c log p_c / log C`` (with ``0 log 0 = 0``)

Input is validated once per public call: a 2-D ``[N, C]`` array of finite, non-negative
probabilities whose rows sum to 1 within ``1e-3`` (rows are then renormalised to sum exactly to 1,
so float32 softmax output scores the same as its float64 twin). With a single class (``C = 1``)
every prediction is certain: all scores are 0.
"""

from __future__ import annotations

import numpy as np

from ml_backend.errors import SelectionInputError

ROW_SUM_TOLERANCE = 1e-3


def least_confidence(probs) -> np.ndarray:
    """``(1 - max p) / (1 - 1/C)`` per row, ``float64 [N]`` in [0, 1].

    Raises:
        SelectionInputError: see :func:`uncertainty`.
    """
    return _least_confidence(_validated(probs))


def margin(probs) -> np.ndarray:
    """``1 - (p1 - p2)`` per row (largest minus second largest), ``float64 [N]`` in [0, 1].

    Raises:
        SelectionInputError: see :func:`uncertainty`.
    """
    return _margin(_validated(probs))


def entropy(probs) -> np.ndarray:
    """Shannon entropy over ``log C`` per row, ``float64 [N]`` in [0, 1].

    Raises:
        SelectionInputError: see :func:`uncertainty`.
    """
    return _entropy(_validated(probs))


def uncertainty(probs, measure: str) -> np.ndarray:
    """Score every row of ``probs`` with the named measure.

    Args:
        probs: ``[N, C]`` class probabilities (numpy array, torch tensor or nested lists).
        measure: one of ``MEASURES``: "entropy", "margin", "least_confidence".

    Returns:
        ``float64 [N]`` in [0, 1]: 0 for a one-hot row, 1 for a uniform row.

    Raises:
        SelectionInputError: unknown measure; not 2-D; NaN or inf; a negative entry or a row that
            does not sum to 1 (the message names the first such row).
    """
    try:
        score = _SCORERS[measure]
    except (KeyError, TypeError):
        raise SelectionInputError(
            f"unknown uncertainty measure {measure!r}; choose one of {', '.join(MEASURES)}"
        ) from None
    return score(_validated(probs))


def _least_confidence(p: np.ndarray) -> np.ndarray:
    c = p.shape[1]
    if c == 1:
        return np.zeros(len(p))
    return _unit((1.0 - p.max(axis=1)) / (1.0 - 1.0 / c))


def _margin(p: np.ndarray) -> np.ndarray:
    if p.shape[1] == 1:
        return np.zeros(len(p))
    top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
    return _unit(1.0 - (top2[:, 1] - top2[:, 0]))


def _entropy(p: np.ndarray) -> np.ndarray:
    c = p.shape[1]
    if c == 1:
        return np.zeros(len(p))
    plogp = p * np.log(np.where(p > 0, p, 1.0))  # 0 log 0 = 0
    return _unit(-plogp.sum(axis=1) / np.log(c))


def _unit(score: np.ndarray) -> np.ndarray:
    # Rounding can step a hair outside [0, 1] (e.g. entropy of a uniform row); the contract is [0, 1].
    return np.clip(score, 0.0, 1.0)


def _validated(probs) -> np.ndarray:
    """Check ``probs`` once and return it as float64 rows summing exactly to 1."""
    if hasattr(probs, "detach"):  # torch tensor, possibly on a GPU
        probs = probs.detach().cpu().numpy()
    p = np.asarray(probs)
    if p.ndim != 2 or p.shape[1] < 1:
        raise SelectionInputError(
            f"probs must be a 2-D array [N, C] of class probabilities with C >= 1, "
            f"got shape {p.shape}"
        )
    if p.dtype.kind not in "fiu":
        raise SelectionInputError(f"probs must hold real numbers, got dtype {p.dtype}")
    p = p.astype(np.float64)
    bad = ~np.isfinite(p).all(axis=1)
    if bad.any():
        raise SelectionInputError(
            f"probs must be finite; row {int(np.argmax(bad))} holds NaN or inf "
            f"({int(bad.sum())} such rows)"
        )
    bad = (p < 0).any(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise SelectionInputError(
            f"probs must be non-negative; row {row} has {p[row].min():.6g} "
            f"({int(bad.sum())} such rows); pass softmax output, not logits"
        )
    sums = p.sum(axis=1)
    bad = np.abs(sums - 1.0) > ROW_SUM_TOLERANCE
    if bad.any():
        row = int(np.argmax(bad))
        raise SelectionInputError(
            f"each row of probs must sum to 1 (within {ROW_SUM_TOLERANCE:g}); row {row} sums to "
            f"{sums[row]:.6g} ({int(bad.sum())} such rows); pass softmax output, not logits"
        )
    return p / sums[:, None] if len(p) else p


_SCORERS = {"entropy": _entropy, "margin": _margin, "least_confidence": _least_confidence}
MEASURES = tuple(_SCORERS)
# The backend's default (setting UNCERTAINTY). Margin, measured against entropy with the recipe's
# head after auto's switch (MNIST-5k, digits, weather; 5 seeds; docs/selection.md): it asks
# "which two classes is the model torn between", which is what a label settles, where entropy
# also rewards spreading a little mass over many unlikely classes.
DEFAULT_MEASURE = "margin"
