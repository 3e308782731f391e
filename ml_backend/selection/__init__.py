"""Acquisition: uncertainty scores, greedy k-center, typicality, ProbCover, herding and the queue-ordering strategies.

Pure numpy/torch, no I/O. See ``strategies.py`` for the formulas and ``docs/selection.md``.
"""

from ml_backend.selection.auto import EVIDENCE_KEYS, Decision, decide
from ml_backend.selection.herding import HerdingResult, herding_order
from ml_backend.selection.kcenter import KCenterResult, k_center_greedy, k_center_greedy_details
from ml_backend.selection.kmeans import KMeansResult, kmeans
from ml_backend.selection.probcover import CoverResult, probcover_order
from ml_backend.selection.reasons import REASONS, explain
from ml_backend.selection.strategies import STRATEGIES, Ranking, rank
from ml_backend.selection.typicality import TypicalityResult, typicality_order, typicality_scores
from ml_backend.selection.uncertainty import (
    MEASURES,
    entropy,
    least_confidence,
    margin,
    uncertainty,
)

__all__ = [
    "EVIDENCE_KEYS",
    "MEASURES",
    "REASONS",
    "STRATEGIES",
    "CoverResult",
    "Decision",
    "HerdingResult",
    "KCenterResult",
    "KMeansResult",
    "Ranking",
    "TypicalityResult",
    "decide",
    "entropy",
    "explain",
    "herding_order",
    "k_center_greedy",
    "k_center_greedy_details",
    "kmeans",
    "least_confidence",
    "margin",
    "probcover_order",
    "rank",
    "typicality_order",
    "typicality_scores",
    "uncertainty",
]
