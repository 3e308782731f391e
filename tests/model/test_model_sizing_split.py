"""sizing.py and split.py: the image-size rule and hash folds that never move a task."""

from __future__ import annotations

import numpy as np
import pytest

from ml_backend.model.sizing import choose_image_size
from ml_backend.model.split import fold_of, hash_split

FOLDS_OF_1_TO_8 = [1, 1, 3, 1, 2, 2, 1, 0]  # sha256 of "1".."8", 10,000 buckets


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ([], 224),
        ([(28, 28)] * 5, 32),
        ([(8, 8)], 32),  # clamped up
        ([(33, 20)], 64),  # rounded up, larger side
        ([(20, 33)], 64),
        ([(64, 48), (100, 80), (4000, 3000)], 128),  # median 100 -> 128
        ([(640, 480)] * 3, 224),  # clamped down
        ([(96, 96), (96, 96)], 96),  # already a multiple of 32
    ],
)
def test_choose_image_size(sizes, expected):
    assert choose_image_size(sizes) == expected


def test_choose_image_size_takes_a_generator_and_rejects_empty_images():
    assert choose_image_size((s, s) for s in (30, 31, 200)) == 32
    with pytest.raises(ValueError, match="positive"):
        choose_image_size([(0, 10)])


def test_folds_are_stable_and_known():
    ids = np.arange(1, 2001)
    a, b = fold_of(ids, 5), fold_of(ids.copy(), 5)
    assert np.array_equal(a, b) and a.dtype == np.int64
    assert set(np.unique(a)) == set(range(5))
    # Fixed values: the same in every process (Python's hash() of a str would change them).
    assert fold_of(np.array([1, 2, 3, 4, 5, 6, 7, 8]), 5).tolist() == FOLDS_OF_1_TO_8
    counts = np.bincount(a, minlength=5)
    assert counts.min() > 330 and counts.max() < 470  # 400 expected each


def test_hash_split_proportions_and_disjoint():
    ids = np.arange(10_000, 13_000)
    train, val = hash_split(ids, 0.2)
    assert len(np.intersect1d(train, val)) == 0
    assert len(train) + len(val) == len(ids)
    assert 0.17 < len(val) / len(ids) < 0.23
    assert hash_split(ids, 0.0)[1].size == 0
    with pytest.raises(ValueError, match="val_fraction"):
        hash_split(ids, 1.0)


def test_adding_tasks_never_moves_an_existing_task():
    old = np.arange(500)
    new = np.concatenate([old, np.arange(500, 900)])[::-1]  # more tasks, another order
    _, val_old = hash_split(old, 0.25)
    _, val_new = hash_split(new, 0.25)
    assert set(old[val_old]) == set(new[val_new]) & set(old)
    f_old = dict(zip(old.tolist(), fold_of(old, 5).tolist(), strict=True))
    f_new = dict(zip(new.tolist(), fold_of(new, 5).tolist(), strict=True))
    assert all(f_new[t] == f for t, f in f_old.items())


def test_validation_is_fold_zero_of_the_matching_k():
    ids = np.arange(3000)
    _, val = hash_split(ids, 0.2)
    assert set(val) == set(np.flatnonzero(fold_of(ids, 5) == 0))


def test_fold_of_rejects_k_below_one():
    with pytest.raises(ValueError, match="k must be"):
        fold_of(np.arange(3), 0)
