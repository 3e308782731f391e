"""Validation folds that follow the task, not the retrain: a stable hash of the task id.

``split_indices`` in ``train.py`` draws a fresh random split per retrain, so a task validated on
in one version is trained on in the next and accuracies of successive versions are not
comparable. Here a task's fold is a pure function of its id (SHA-256, not Python's salted
``hash``), the same in every process and retrain, and adding tasks never moves an old one.
"""

from __future__ import annotations

import hashlib

import numpy as np

# Buckets of the hash: fine enough that val_fraction is honoured to 1e-4.
_BUCKETS = 10_000


def _bucket(task_ids: np.ndarray) -> np.ndarray:
    """A number in ``[0, _BUCKETS)`` per task id, uniform and stable across processes."""
    ids = np.asarray(task_ids).reshape(-1)
    out = np.empty(len(ids), dtype=np.int64)
    for i, task in enumerate(ids.tolist()):
        digest = hashlib.sha256(str(task).encode()).digest()
        out[i] = int.from_bytes(digest[:8], "big") % _BUCKETS
    return out


def fold_of(task_ids: np.ndarray, k: int) -> np.ndarray:
    """The fold (``0..k-1``) of every task id; ``int64`` array shaped like the input.

    Raises:
        ValueError: ``k`` is below 1.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    # Contiguous bucket ranges per fold, so fold_of(ids, 5) == 0 is the same set of tasks as
    # hash_split(ids, 0.2)'s validation part.
    return (_bucket(task_ids) * k // _BUCKETS).astype(np.int64)


def hash_split(task_ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, val_idx)``: positions in ``task_ids``, validation about ``val_fraction``.

    A task is validated on when its hash bucket falls below ``val_fraction`` of the range, so
    raising the fraction only moves tasks from train to validation, and new tasks never move
    old ones.

    Raises:
        ValueError: ``val_fraction`` is outside ``[0, 1)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    val = _bucket(task_ids) < round(val_fraction * _BUCKETS)
    return np.flatnonzero(~val), np.flatnonzero(val)
