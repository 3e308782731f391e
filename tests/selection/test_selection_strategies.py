"""Strategies: known orderings, the diversified formula, cold start, edge cases, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ml_backend import config
from ml_backend.errors import SelectionInputError
from ml_backend.selection import MEASURES, STRATEGIES, margin, rank


def pool(n=60, c=3, d=8, labeled=6, seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(c) * 0.7, size=n).astype(np.float32)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    mask = np.zeros(n, bool)
    mask[rng.choice(n, size=labeled, replace=False)] = True
    return probs, emb, mask


def brute_k_center(emb, centres, candidates, k):
    emb = emb.astype(np.float64)
    centres, candidates, picks = list(centres), list(candidates), []
    for _ in range(min(k, len(candidates))):
        dist = [min(np.linalg.norm(emb[i] - emb[j]) for j in centres + picks) for i in candidates]
        v = candidates[int(np.argmax(dist))]
        picks.append(v)
        candidates.remove(v)
    return picks


def test_names_match_the_settings():
    assert tuple(STRATEGIES) == config.STRATEGIES
    assert set(MEASURES) == set(config.UNCERTAINTY_MEASURES)


def test_uncertainty_known_order():
    probs = np.array([[0.9, 0.1], [0.5, 0.5], [0.7, 0.3], [0.6, 0.4], [0.6, 0.4]])
    mask = np.array([False, False, False, True, False])
    r = rank("uncertainty", probs=probs, labeled_mask=mask, batch=2, measure="margin")
    np.testing.assert_array_equal(r.order, [1, 4, 2, 0])  # 3 is labeled; ties by index
    np.testing.assert_allclose(r.uncertainty, [0.2, 1.0, 0.6, 0.8, 0.8])
    assert np.isnan(r.distance).all()
    assert r.strategy == "uncertainty"


def test_default_measure_is_margin_where_entropy_disagrees():
    # Torn between two classes (margin 1.0, entropy 0.5) against a little mass on every class
    # (margin 0.8, entropy 0.96): the default (margin) asks about the first, entropy the second.
    probs = np.array([[0.5, 0.5, 0.0, 0.0], [0.4, 0.2, 0.2, 0.2], [1.0, 0.0, 0.0, 0.0]])
    mask = np.zeros(3, bool)
    assert rank("uncertainty", probs=probs, labeled_mask=mask, batch=1).order.tolist() == [0, 1, 2]
    by_entropy = rank("uncertainty", probs=probs, labeled_mask=mask, batch=1, measure="entropy")
    assert by_entropy.order.tolist() == [1, 0, 2]


def test_random_is_a_seeded_permutation():
    probs, emb, mask = pool()
    a = rank("random", labeled_mask=mask, seed=3)
    b = rank("random", labeled_mask=mask, seed=3)
    c = rank("random", labeled_mask=mask, seed=4)
    np.testing.assert_array_equal(a.order, b.order)
    assert not np.array_equal(a.order, c.order)
    assert sorted(a.order) == list(np.flatnonzero(~mask))
    assert np.isnan(a.uncertainty).all()


def test_coreset_known_order_on_a_line():
    emb = np.array([[0.0], [1.0], [2.5], [3.0], [10.0], [9.0]])
    mask = np.array([True, False, False, False, False, False])
    r = rank("coreset", embeddings=emb, labeled_mask=mask, batch=2)
    # picks: 10 (d=10), then 3 (d=3); the rest by distance to {0, 10, 3}: 9 (1), 1 (1), 2.5 (0.5)
    np.testing.assert_array_equal(r.order, [4, 3, 1, 5, 2])
    np.testing.assert_allclose(r.distance, [np.nan, 1, 0.5, 3, 10, 1], equal_nan=True)


def test_coreset_rest_sorted_by_distance():
    probs, emb, mask = pool(n=120)
    r = rank("coreset", probs=probs, embeddings=emb, labeled_mask=mask, batch=10)
    rest = r.distance[r.order[10:]]
    assert (np.diff(rest) <= 1e-12).all()
    assert np.isnan(r.distance[mask]).all()
    np.testing.assert_allclose(r.uncertainty, margin(probs))  # the default measure


def test_diversified_is_the_documented_formula():
    probs, emb, mask = pool(n=80, labeled=8, seed=1)
    batch, factor = 5, 3
    r = rank(
        "diversified",
        probs=probs,
        embeddings=emb,
        labeled_mask=mask,
        batch=batch,
        shortlist_factor=factor,
        measure="least_confidence",
    )
    u = r.uncertainty
    unlabeled = np.flatnonzero(~mask)
    by_u = sorted(unlabeled, key=lambda i: (-u[i], i))
    shortlist = by_u[: batch * factor]
    picks = brute_k_center(emb, np.flatnonzero(mask), shortlist, batch)
    expected = picks + [i for i in by_u if i not in picks]
    np.testing.assert_array_equal(r.order, expected)
    assert r.strategy == "diversified"
    # distances: picks and the rest of the shortlist computed, the others not
    assert np.isfinite(r.distance[shortlist]).all()
    assert np.isnan(r.distance[by_u[batch * factor :]]).all()


def test_shortlist_factor_one_is_the_uncertainty_batch_reordered():
    probs, emb, mask = pool(seed=2)
    a = rank("diversified", probs=probs, embeddings=emb, labeled_mask=mask, shortlist_factor=1)
    b = rank("uncertainty", probs=probs, embeddings=emb, labeled_mask=mask)
    assert set(a.order[:20]) == set(b.order[:20])
    np.testing.assert_array_equal(a.order[20:], b.order[20:])


def test_fractional_shortlist_factor():
    probs, emb, mask = pool(seed=3)
    r = rank(
        "diversified", probs=probs, embeddings=emb, labeled_mask=mask, batch=4, shortlist_factor=1.6
    )
    assert np.isfinite(r.distance).sum() == math.ceil(4 * 1.6)


@pytest.mark.parametrize("name", ["diversified", "uncertainty"])
def test_cold_start_falls_back_to_typicality(name):
    _, emb, mask = pool()
    r = rank(name, probs=None, embeddings=emb, labeled_mask=mask, batch=5)
    t = rank("typicality", probs=None, embeddings=emb, labeled_mask=mask, batch=5)
    np.testing.assert_array_equal(r.order, t.order)
    assert r.strategy == "typicality (cold start)"
    assert t.strategy == "typicality" and t.decision == ""
    assert "no model yet" in r.decision
    assert np.isnan(r.uncertainty).all()
    assert set(r.reason[r.order[:5]]) <= {"typical", "typical_again"}


def test_coreset_without_any_label():
    _, emb, _ = pool()
    r = rank("coreset", embeddings=emb, labeled_mask=np.zeros(len(emb), bool), batch=3)
    assert r.distance[r.order[0]] == np.inf
    assert np.isfinite(r.distance[r.order[1:]]).all()


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_fewer_unlabeled_than_batch(name):
    probs, emb, _ = pool(n=10)
    mask = np.ones(10, bool)
    mask[[2, 7, 9]] = False
    r = rank(name, probs=probs, embeddings=emb, labeled_mask=mask, batch=20)
    assert sorted(r.order) == [2, 7, 9]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_everything_labeled_gives_an_empty_queue(name):
    probs, emb, _ = pool(n=10)
    r = rank(name, probs=probs, embeddings=emb, labeled_mask=np.ones(10, bool))
    assert r.order.shape == (0,) and r.order.dtype == np.int64
    assert r.uncertainty.shape == (10,) and np.isnan(r.distance).all()


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_empty_pool(name):
    r = rank(
        name, probs=np.zeros((0, 3)), embeddings=np.zeros((0, 4)), labeled_mask=np.zeros(0, bool)
    )
    assert r.order.size == 0


def test_duplicates_never_share_the_top_batch():
    rng = np.random.default_rng(5)
    distinct = rng.normal(size=(30, 16)).astype(np.float32) + 20
    emb = np.concatenate([np.repeat(distinct[:3], 15, axis=0), distinct])  # 45 copies of 3 rows
    probs = np.full((len(emb), 2), 0.5, dtype=np.float32)
    probs[45:] = [0.8, 0.2]  # the copies are the most uncertain: the shortlist is all copies
    mask = np.zeros(len(emb), bool)
    mask[45] = True
    r = rank(
        "diversified", probs=probs, embeddings=emb, labeled_mask=mask, batch=10, shortlist_factor=2
    )
    top = [tuple(row) for row in emb[r.order[:10]]]
    assert len(set(top)) == 10
    assert (r.distance[r.order[:10]] > 0).all()
    assert sorted(r.order) == list(np.flatnonzero(~mask))


def test_duplicates_fill_the_batch_only_when_nothing_else_is_left():
    emb = np.repeat(np.eye(3), 4, axis=0)  # 3 distinct rows, 4 copies each
    probs = np.full((12, 2), 0.5)
    r = rank("diversified", probs=probs, embeddings=emb, labeled_mask=np.zeros(12, bool), batch=5)
    assert len({tuple(row) for row in emb[r.order[:3]]}) == 3
    np.testing.assert_array_equal(r.distance[r.order[3:5]], [0, 0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"probs": np.full((5, 2), 0.5)}, "probs has 5 rows but labeled_mask has 6"),
        ({"embeddings": np.zeros((7, 2))}, "embeddings has 7 rows but labeled_mask has 6"),
        ({"labeled_mask": np.zeros((2, 3), bool)}, "labeled_mask must be 1-D"),
        ({"labeled_mask": np.array([0, 1, 2, 0, 0, 0])}, "booleans"),
        ({"embeddings": None}, "needs embeddings"),
        ({"batch": 0}, "batch must be"),
        ({"shortlist_factor": 0.5}, "shortlist_factor must be"),
        ({"measure": "variance"}, "unknown uncertainty measure"),
        ({"probs": np.full((6, 2), 0.7)}, "sum to 1"),
        ({"embeddings": np.full((6, 2), np.nan)}, "finite"),
    ],
)
def test_bad_input_is_refused(kwargs, match):
    args = {
        "probs": np.full((6, 2), 0.5),
        "embeddings": np.zeros((6, 2)),
        "labeled_mask": np.zeros(6, bool),
    }
    args.update(kwargs)
    with pytest.raises(SelectionInputError, match=match):
        rank("diversified", **args)


def test_unknown_strategy_lists_choices():
    with pytest.raises(SelectionInputError, match="diversified, uncertainty, coreset, random"):
        rank("bald", labeled_mask=np.zeros(3, bool))


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(list(STRATEGIES)),
    st.integers(0, 40),
    st.integers(1, 8),
    st.floats(1, 4),
    st.integers(0, 2**16),
    st.booleans(),
)
def test_order_is_a_permutation_of_the_unlabeled_rows(name, n, batch, factor, seed, cold):
    rng = np.random.default_rng(seed)
    probs = None if cold else rng.dirichlet(np.ones(3), size=n)
    emb = rng.integers(0, 3, size=(n, 2)).astype(np.float32)  # many duplicates and ties
    mask = rng.random(n) < 0.3
    r = rank(
        name,
        probs=probs,
        embeddings=emb,
        labeled_mask=mask,
        batch=batch,
        shortlist_factor=factor,
        seed=seed,
    )
    assert sorted(r.order.tolist()) == np.flatnonzero(~mask).tolist()
    assert r.uncertainty.shape == r.distance.shape == (n,)
    if not cold:
        assert ((r.uncertainty >= 0) & (r.uncertainty <= 1)).all()
    assert (r.reason[r.order] != "").all() and (r.reason[mask] == "").all()
    if name == "coreset" or (name == "diversified" and not cold):
        top = r.order[:batch]
        positive = r.distance[top] > 0
        # a zero-distance pick only once no positive-distance row was left to pick
        if not positive.all():
            assert not positive[np.argmin(positive) :].any()
