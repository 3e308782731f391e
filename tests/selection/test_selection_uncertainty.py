"""Uncertainty scores: hand-computed values, orderings, validation, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ml_backend.errors import SelectionInputError
from ml_backend.selection import MEASURES, entropy, least_confidence, margin, uncertainty

PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [1.0, 0.0, 0.0],
        [1 / 3, 1 / 3, 1 / 3],
        [0.5, 0.4, 0.1],
    ],
    dtype=np.float32,
)


def test_least_confidence_by_hand():
    expected = [(1 - 0.7) / (1 - 1 / 3), 0.0, 1.0, (1 - 0.5) / (1 - 1 / 3)]
    np.testing.assert_allclose(least_confidence(PROBS), expected, atol=1e-6)


def test_margin_by_hand():
    expected = [1 - (0.7 - 0.2), 0.0, 1.0, 1 - (0.5 - 0.4)]
    np.testing.assert_allclose(margin(PROBS), expected, atol=1e-6)


def test_entropy_by_hand():
    h = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(3)
    h4 = -(0.5 * math.log(0.5) + 0.4 * math.log(0.4) + 0.1 * math.log(0.1)) / math.log(3)
    np.testing.assert_allclose(entropy(PROBS), [h, 0.0, 1.0, h4], atol=1e-6)


def test_binary_margin_and_least_confidence():
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5]])
    np.testing.assert_allclose(margin(p), [0.2, 0.8, 1.0])
    np.testing.assert_allclose(least_confidence(p), [0.2, 0.8, 1.0])


@pytest.mark.parametrize("measure", MEASURES)
def test_known_ordering(measure):
    # Most certain to least certain, under every measure.
    p = np.array([[0.98, 0.01, 0.01], [0.8, 0.15, 0.05], [0.5, 0.3, 0.2], [0.34, 0.33, 0.33]])
    scores = uncertainty(p, measure)
    assert list(np.argsort(scores)) == [0, 1, 2, 3]
    assert scores.dtype == np.float64


def test_measures_disagree_where_they_should():
    # Same top probability: least confidence ties; margin and entropy see the runner-up.
    p = np.array([[0.5, 0.5, 0.0], [0.5, 0.25, 0.25]])
    lc, mg, en = least_confidence(p), margin(p), entropy(p)
    assert lc[0] == pytest.approx(lc[1])
    assert mg[0] > mg[1]  # two-way tie is the smallest margin
    assert en[1] > en[0]  # spreading over three classes is more entropy


def test_dispatch_matches_functions():
    for name, fn in [
        ("entropy", entropy),
        ("margin", margin),
        ("least_confidence", least_confidence),
    ]:
        np.testing.assert_array_equal(uncertainty(PROBS, name), fn(PROBS))


def test_torch_and_lists_accepted():
    np.testing.assert_allclose(entropy(torch.from_numpy(PROBS)), entropy(PROBS))
    np.testing.assert_allclose(margin(PROBS.tolist()), margin(PROBS))


def test_single_class_is_certain():
    p = np.ones((4, 1), dtype=np.float32)
    for measure in MEASURES:
        np.testing.assert_array_equal(uncertainty(p, measure), np.zeros(4))


def test_empty_pool():
    for measure in MEASURES:
        assert uncertainty(np.zeros((0, 3)), measure).shape == (0,)


def test_rows_within_tolerance_are_renormalised():
    p = np.array([[0.3335, 0.3335, 0.3335]])  # sums to 1.0005
    assert least_confidence(p)[0] == pytest.approx(1.0)
    assert entropy(p)[0] <= 1.0


@pytest.mark.parametrize(
    ("probs", "match"),
    [
        ([[0.5, np.nan, 0.5]], r"finite; row 0"),
        ([[0.5, 0.5], [np.inf, 0.0]], r"finite; row 1"),
        ([[0.5, 0.5], [1.2, -0.2]], r"non-negative; row 1"),
        ([[0.5, 0.5], [0.5, 0.5], [0.6, 0.6]], r"sum to 1.*row 2 sums to 1.2"),
        ([[2.0, 1.0]], r"not logits"),
        ([0.5, 0.5], r"2-D"),
        (np.zeros((3, 0)), r"C >= 1"),
        ([["a", "b"]], r"real numbers"),
    ],
)
def test_bad_input_is_refused(probs, match):
    with pytest.raises(SelectionInputError, match=match):
        entropy(np.asarray(probs) if not isinstance(probs, np.ndarray) else probs)


def test_unknown_measure_lists_choices():
    with pytest.raises(SelectionInputError, match="entropy, margin, least_confidence"):
        uncertainty(PROBS, "variance")


def _probabilities(raw: np.ndarray) -> np.ndarray:
    return raw / raw.sum(axis=1, keepdims=True)


prob_rows = arrays(
    np.float64,
    st.tuples(st.integers(1, 20), st.integers(2, 8)),
    elements=st.floats(0.0, 1.0, allow_nan=False),
).filter(lambda a: (a.sum(axis=1) > 1e-6).all())


@settings(max_examples=150, deadline=None)
@given(prob_rows, st.sampled_from(MEASURES))
def test_scores_in_unit_interval(raw, measure):
    scores = uncertainty(_probabilities(raw), measure)
    assert scores.shape == (raw.shape[0],)
    assert ((scores >= 0.0) & (scores <= 1.0)).all()


@settings(max_examples=100, deadline=None)
@given(prob_rows, st.sampled_from(MEASURES), st.randoms(use_true_random=False))
def test_scores_ignore_class_order(raw, measure, rnd):
    p = _probabilities(raw)
    perm = list(range(p.shape[1]))
    rnd.shuffle(perm)
    np.testing.assert_allclose(
        uncertainty(p[:, perm], measure), uncertainty(p, measure), atol=1e-12
    )


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 50), st.integers(0, 49), st.sampled_from(MEASURES))
def test_one_hot_zero_uniform_one(c, hot, measure):
    one_hot = np.eye(c)[[hot % c]]
    uniform = np.full((1, c), 1.0 / c)
    assert uncertainty(one_hot, measure)[0] == 0.0
    assert uncertainty(uniform, measure)[0] == pytest.approx(1.0, abs=1e-12)
