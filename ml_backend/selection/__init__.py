"""Acquisition: uncertainty scores, greedy k-center and the queue-ordering strategies.

Pure numpy/torch, no I/O. See ``strategies.py`` for the formulas and ``docs/selection.md``.
"""

from ml_backend.selection.kcenter import KCenterResult, k_center_greedy, k_center_greedy_details
from ml_backend.selection.strategies import STRATEGIES, Ranking, rank
from ml_backend.selection.uncertainty import (
    MEASURES,
    entropy,
    least_confidence,
    margin,
    uncertainty,
)

__all__ = [
    "MEASURES",
    "STRATEGIES",
    "KCenterResult",
    "Ranking",
    "entropy",
    "k_center_greedy",
    "k_center_greedy_details",
    "least_confidence",
    "margin",
    "rank",
    "uncertainty",
]
