"""BADGE: gradient embeddings, k-means++ seeding, and the cross-check with scikit-activeml's Badge.

Where ours and scikit-activeml's agree (tests below): the first pick (the largest gradient norm)
and, given the same earlier picks, the D^2 probabilities of the next draw, on the same embeddings
and probabilities. The draws themselves come from different random generators, so the rows drawn
after the first agree only in distribution (checked on well separated groups).
Both keep the origin (the gradient of a row the model is sure of) as a centre from the start, where
the paper's code does not. Where they differ, on purpose: scikit-activeml uses the embeddings as given; we standardise them
per column over the pool first, as the backend's head sees them. The cross-check passes
standardised embeddings, on which the two are the same.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_backend.errors import SelectionInputError
from ml_backend.selection import explain, rank
from ml_backend.selection.badge import badge_picks


def gradient_embeddings(probs, emb):
    """The textbook, materialised ``(p - onehot(argmax p)) (x) h`` on standardised ``emb``."""
    h = (emb - emb.mean(axis=0)) / (emb.std(axis=0) + 1e-6)
    a = probs.copy()
    a[np.arange(len(a)), probs.argmax(axis=1)] -= 1.0
    return (a[:, :, None] * h[:, None, :]).reshape(len(a), -1)


def random_pool(seed, n=120, c=4, d=6):
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(c) * 0.7, n), rng.normal(size=(n, d)), rng


@pytest.mark.parametrize("seed", range(4))
def test_first_pick_is_the_largest_gradient_and_distances_are_the_textbook_ones(seed):
    probs, emb, _ = random_pool(seed)
    g = gradient_embeddings(probs, emb)
    res = badge_picks(probs, emb, np.arange(len(g)), 1, seed=seed, device="cpu")
    first = int(np.argmax((g * g).sum(axis=1)))
    assert res.picks.tolist() == [first]
    np.testing.assert_allclose(res.pick_d2[0], (g[first] ** 2).sum(), rtol=1e-6)
    to_origin, to_first = (g * g).sum(axis=1), ((g - g[first]) ** 2).sum(axis=1)
    np.testing.assert_allclose(res.min_d2, np.minimum(to_origin, to_first), atol=1e-6)


def test_picks_are_distinct_unlabeled_and_reproducible():
    probs, emb, _ = random_pool(7, n=60)
    labeled = np.zeros(60, bool)
    labeled[::3] = True
    a = rank("badge", probs=probs, embeddings=emb, labeled_mask=labeled, batch=12, seed=5)
    b = rank("badge", probs=probs, embeddings=emb, labeled_mask=labeled, batch=12, seed=5)
    np.testing.assert_array_equal(a.order, b.order)
    assert sorted(a.order.tolist()) == np.flatnonzero(~labeled).tolist()  # every unlabeled row
    assert not labeled[a.order[:12]].any()
    assert set(a.reason[a.order[:12]]) == {"uncertain_varied"}
    assert set(a.reason[a.order[12:]]) == {"uncertain"}
    assert a.strategy == "badge"
    other = rank("badge", probs=probs, embeddings=emb, labeled_mask=labeled, batch=12, seed=6)
    assert other.order[0] == a.order[0]  # the first pick is not drawn


def duplicate_groups():
    """Three groups of exact duplicates: two unsure in different ways, one fairly sure."""
    emb = np.concatenate([np.tile([0.0, 0.0], (10, 1)), np.tile([4.0, 0.0], (10, 1)),
                          np.tile([0.0, 4.0], (10, 1))])  # fmt: skip
    probs = np.concatenate([np.tile([0.5, 0.45, 0.05], (10, 1)),
                            np.tile([0.05, 0.5, 0.45], (10, 1)),
                            np.tile([0.98, 0.01, 0.01], (10, 1))])  # fmt: skip
    return probs, emb


def test_one_pick_per_group_before_any_duplicate():
    probs, emb = duplicate_groups()
    for seed in range(10):
        res = badge_picks(probs, emb, np.arange(30), 3, seed=seed, device="cpu")
        assert sorted(res.picks // 10) == [0, 1, 2], seed  # never a duplicate of a pick
        np.testing.assert_array_equal(res.min_d2, 0.0)  # every row sits on a pick


def test_more_picks_than_distinct_rows_still_fills_the_batch():
    probs, emb = duplicate_groups()
    res = badge_picks(probs, emb, np.arange(30), 8, seed=0, device="cpu")
    assert len(set(res.picks.tolist())) == 8
    assert sorted(set((res.picks // 10).tolist())) == [0, 1, 2]


def test_cold_start_falls_back_to_typicality_and_bad_input_is_named():
    probs, emb, _ = random_pool(1, n=40)
    r = rank("badge", probs=None, embeddings=emb, labeled_mask=np.zeros(40, bool), batch=4)
    assert r.strategy == "typicality (cold start)"
    with pytest.raises(SelectionInputError, match="needs embeddings"):
        rank("badge", probs=probs, embeddings=None, labeled_mask=np.zeros(40, bool))


def test_torch_inputs_and_words():
    probs, emb, _ = random_pool(3, n=50, c=3)
    mask = np.zeros(50, bool)
    a = rank("badge", probs=probs, embeddings=emb, labeled_mask=mask, batch=5)
    b = rank("badge", probs=torch.tensor(probs), embeddings=torch.tensor(emb, dtype=torch.float32),
             labeled_mask=mask, batch=5)  # fmt: skip
    np.testing.assert_array_equal(a.order[:5], b.order[:5])
    top = int(a.order[0])
    words = explain(a, top, class_names=["Sunny", "Cloudy", "Rain"], probs=probs)
    assert words.endswith(", in a way unlike the other tasks picked with it")
    assert words.startswith(("the model is unsure (between ", "the model is fairly sure ("))


# ---------------------------------------------------------------- scikit-activeml's Badge


def _reference(x, probs_model, labeled, batch, seed):
    """scikit-activeml's Badge with a logistic regression fitted on ``labeled`` (its own copy)."""
    skactiveml_pool = pytest.importorskip("skactiveml.pool")
    from skactiveml.classifier import SklearnClassifier
    from sklearn.linear_model import LogisticRegression

    y = np.full(len(x), np.nan)
    y[labeled] = probs_model[labeled]
    clf = SklearnClassifier(LogisticRegression(max_iter=500), classes=np.unique(probs_model))
    clf.fit(x, y)
    qs = skactiveml_pool.Badge(random_state=seed)
    picks, utilities = qs.query(x, y, clf, fit_clf=False, batch_size=batch, return_utilities=True)
    return np.asarray(picks), utilities, clf.predict_proba(x)


@pytest.mark.parametrize("seed", range(5))
def test_skactiveml_same_first_pick_and_same_d2_probabilities(seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 5)) * 2
    classes = rng.integers(0, 3, 90)
    x = centres[classes] + rng.normal(size=(90, 5))
    x = (x - x.mean(axis=0)) / x.std(axis=0)  # standardised: ours leaves it (almost) as it is
    labeled = np.concatenate([np.flatnonzero(classes == c)[:3] for c in range(3)])
    picks, utilities, probs = _reference(x, classes, labeled, 2, seed)
    unlabeled = np.setdiff1d(np.arange(90), labeled)
    ours = badge_picks(probs, x, unlabeled, 1, seed=seed, device="cpu")
    assert ours.picks[0] == picks[0]
    # after the same first pick, the next draw's probabilities are D^2 / sum D^2 on both sides
    d2 = ours.min_d2[unlabeled]
    theirs = utilities[1][unlabeled]  # NaN at the first pick
    assert np.isnan(theirs).sum() == 1 and np.isnan(theirs[unlabeled == picks[0]]).all()
    np.testing.assert_allclose((d2 / d2.sum())[unlabeled != picks[0]],
                               theirs[unlabeled != picks[0]], rtol=1e-4, atol=1e-9)  # fmt: skip
    assert np.isnan(utilities[1][labeled]).all()


def test_draws_follow_d2():
    # After the largest gradient, how often each group of duplicates wins the second draw follows
    # its share of D^2 (the probabilities the test above found equal to scikit-activeml's).
    probs, emb = duplicate_groups()
    x = (emb - emb.mean(axis=0)) / emb.std(axis=0)
    g = gradient_embeddings(probs, x)
    first = int(np.argmax((g * g).sum(axis=1)))
    d2 = np.minimum((g * g).sum(axis=1), ((g - g[first]) ** 2).sum(axis=1))
    share = {grp: d2[grp * 10 : grp * 10 + 10].sum() / d2.sum() for grp in range(3)}
    ours = [int(badge_picks(probs, x, np.arange(30), 2, seed=s, device="cpu").picks[1] // 10)
            for s in range(300)]  # fmt: skip
    for grp in range(3):
        assert abs(ours.count(grp) / 300 - share[grp]) < 0.1, (grp, share)


def test_chunked_passes_give_the_same_batch(monkeypatch):
    from ml_backend.selection import badge

    probs, emb, _ = random_pool(9, n=100)
    whole = badge_picks(probs, emb, np.arange(3, 100), 8, seed=2, device="cpu")
    monkeypatch.setattr(badge, "_ROWS_PER_CHUNK", 7)  # 100 rows in 15 chunks, the last short
    chunked = badge_picks(probs, emb, np.arange(3, 100), 8, seed=2, device="cpu")
    np.testing.assert_array_equal(whole.picks, chunked.picks)
    np.testing.assert_allclose(whole.min_d2, chunked.min_d2, rtol=1e-5, atol=1e-9)


def test_a_pick_is_never_drawn_again_even_when_rounding_leaves_it_a_distance():
    # Large embeddings make norm_i + norm_i - 2 cross_ii round to a small positive number; a
    # batch as large as the pool must still hold every row once.
    probs, emb, _ = random_pool(4, n=40)
    emb = emb * 1e4 + 3e5
    res = badge_picks(probs, emb.astype(np.float32), np.arange(40), 40, seed=1, device="cpu")
    assert sorted(res.picks.tolist()) == list(range(40))
    np.testing.assert_array_equal(res.min_d2, 0.0)
