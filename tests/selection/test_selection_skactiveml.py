"""Cross-check of typicality against scikit-activeml's TypiClust (the reference implementation).

Where the two agree: given the same groups, the top batch is the same rows in the same order
(each is the most typical row of the largest group without a label, typicality being
``1 / mean distance to the k nearest neighbours in the group``). With their scikit-learn KMeans and
our torch k-means on well separated data the groups, hence the picks, are the same too.

Where they differ, on purpose (each has its test below):
- ties (equal-size groups; with ``k = 1`` two mutual nearest neighbours, which have the same
  typicality): scikit-activeml breaks them at random, we take the lower row;
- a batch larger than the number of groups without a label: scikit-activeml then draws among all
  candidates uniformly (typicality set to 1, and it may draw a row it already picked), we go on
  round-robin: the most typical unlabeled row of the group with the fewest labeled or queued rows;
- groups smaller than ``MIN_CLUSTER_SIZE`` come last here (as in the TypiClust authors' code,
  which drops them); scikit-activeml treats them like any other group.
BADGE's cross-check is in ``test_selection_badge.py``.

ProbCover against scikit-activeml's ``ProbCover``, given the same groups and radius grid, on rows
of unit length (ours scales rows to unit length, theirs does not): the same radius, and every
pick of ours covers as many new rows as the best of theirs at that step (their utilities, with
our earlier picks as labeled rows, which is how a batch goes on in both). Where the best is one
row, the picks are the same rows in the same order; on ties they draw at random, we take the
lower row.

Herding (unweighted: MaxHerding) against scikit-activeml's ``MaxHerding`` with the same Gaussian
kernel (``gamma = 1 / h^2``) on unit-length rows, both scaling the rows: the same batch in the
same order. Both measure coverage over the unlabeled rows; where two rows tie they draw at random,
we take the lower row (random rows in general position do not tie).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from ml_backend.selection import herding_order, kmeans, probcover_order, typicality_order

skactiveml_pool = pytest.importorskip("skactiveml.pool")


class GivenGroups:
    """A scikit-learn-style clusterer that returns precomputed groups (same input for both)."""

    def __init__(self, n_clusters=None, groups=None, random_state=None):
        self.groups = groups

    def fit_predict(self, x):
        return self.groups


def reference(x, labeled, batch, groups=None, k=5, seed=0):
    y = np.full(len(x), np.nan)
    y[labeled] = 0
    if groups is None:
        qs = skactiveml_pool.TypiClust(random_state=seed, k=k)
    else:
        qs = skactiveml_pool.TypiClust(
            random_state=seed, k=k, cluster_algo=GivenGroups, cluster_algo_dict={"groups": groups}
        )
    return qs.query(x, y, batch_size=batch)


def distinct_size_blobs(seed, n_blobs=8, d=6):
    rng = np.random.default_rng(seed)
    sizes = rng.choice(np.arange(12, 80), size=n_blobs, replace=False)  # all different
    centres = rng.normal(size=(n_blobs, d)) * 3  # overlapping: k-means groups are not the blobs
    x = np.concatenate([c + rng.normal(size=(s, d)) for c, s in zip(centres, sizes, strict=True)])
    return x, rng


@pytest.mark.parametrize("seed", range(8))
def test_same_groups_same_picks_in_the_same_order(seed):
    x, rng = distinct_size_blobs(seed)
    labeled = rng.choice(len(x), size=int(rng.integers(0, 6)), replace=False)
    batch = int(rng.integers(1, 6))
    groups = kmeans(x, len(labeled) + batch, seed=seed, device="cpu").labels
    sizes = np.bincount(groups)
    uncovered = np.setdiff1d(np.arange(len(sizes)), groups[labeled])
    if len(set(sizes[uncovered])) < len(uncovered):
        pytest.skip("two uncovered groups of equal size: tie broken differently (tested below)")
    ours = typicality_order(
        x, labeled, batch, neighbours=5, min_cluster_size=1, clusters=groups, device="cpu"
    )
    np.testing.assert_array_equal(ours.order[:batch], reference(x, labeled, batch, groups))


@pytest.mark.parametrize("k", [2, 3, 20])
def test_neighbour_counts_agree(k):
    # (k = 1 is left out: two mutual nearest neighbours tie exactly, see the equal-size case)
    x, rng = distinct_size_blobs(11)
    groups = kmeans(x, 6, seed=0, device="cpu").labels
    ours = typicality_order(x, [], 6, neighbours=k, min_cluster_size=1, clusters=groups)
    np.testing.assert_array_equal(ours.order[:6], reference(x, [], 6, groups, k=k))


def test_their_kmeans_and_ours_agree_on_separated_blobs():
    rng = np.random.default_rng(3)
    sizes = [70, 55, 40, 30, 20]
    x = np.concatenate(
        [c * 25 + rng.normal(size=(s, 4)) for c, s in zip(np.eye(5, 4), sizes, strict=True)]
    )
    labeled = [0, 71]  # one label in each of the two largest blobs
    ours = typicality_order(x, labeled, 3, neighbours=5, device="cpu")
    np.testing.assert_array_equal(ours.order[:3], reference(x, labeled, 3))


def test_equal_size_groups_same_rows_other_order_possible():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(size=(30, 3)), rng.normal(size=(30, 3)) + 40])
    groups = np.repeat([0, 1], 30)
    ours = typicality_order(x, [], 2, neighbours=5, clusters=groups, device="cpu").order[:2]
    for seed in range(5):
        theirs = reference(x, [], 2, groups, seed=seed)
        assert set(theirs) == set(ours)  # the same two rows; the order is their coin flip
    assert ours.tolist()[0] < 30  # ours: the tie goes to the group of the lower row


def test_batch_beyond_uncovered_groups():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(size=(40, 3)), rng.normal(size=(25, 3)) + 40])
    groups = np.repeat([0, 1], [40, 25])
    labeled = [0]  # group 0 is covered; only group 1 is not
    ours = typicality_order(x, labeled, 3, neighbours=5, clusters=groups, device="cpu")
    theirs = reference(x, labeled, 3, groups)
    assert ours.order[0] == theirs[0]  # the one uncovered group: same most typical row
    # then ours: group 0's most typical unlabeled row, then group 1's second (round-robin)
    typ = ours.typicality
    g0 = np.setdiff1d(np.arange(40), labeled)
    assert ours.order[1] == g0[np.argmax(typ[g0])]
    assert groups[ours.order[2]] == 1
    # theirs: after the uncovered group, a uniform draw among all candidates, not by typicality
    draws = {int(reference(x, labeled, 3, groups, seed=s)[1]) for s in range(6)}
    assert len(draws) > 1


# ---------------------------------------------------------------- ProbCover

THEIR_DELTAS = np.round(np.arange(0.2, 2.01, 0.2), 1)  # their default grid


def probcover_reference(x, labeled, batch, groups, seed=0):
    """(picks, utilities per step, chosen radius) of scikit-activeml's ProbCover."""
    y = np.full(len(x), np.nan)
    y[labeled] = 0
    qs = skactiveml_pool.ProbCover(
        n_classes=int(groups.max()) + 1, deltas=THEIR_DELTAS, cluster_algo=GivenGroups,
        cluster_algo_dict={"groups": groups}, random_state=seed,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # their warning when no radius is pure enough
        picks, utilities = qs.query(x, y, batch_size=batch, return_utilities=True)
    return picks, utilities, qs.delta_max_


def unit_blobs(seed, n_blobs=5, d=4, scale=0.35):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_blobs, d))
    sizes = rng.integers(10, 40, size=n_blobs)
    x = np.concatenate(
        [c + rng.normal(scale=scale, size=(s, d)) for c, s in zip(centres, sizes, strict=True)]
    )
    return x / np.linalg.norm(x, axis=1, keepdims=True), rng


@pytest.mark.parametrize("seed", range(8))
def test_probcover_same_radius_and_every_pick_is_a_best_one(seed):
    x, rng = unit_blobs(seed)
    groups = kmeans(x, 5, seed=seed, device="cpu").labels
    labeled = rng.choice(len(x), size=int(rng.integers(0, 5)), replace=False)
    batch = 6
    ours = probcover_order(x, labeled, n_classes=5, deltas=THEIR_DELTAS, clusters=groups,
                           device="cpu")  # fmt: skip
    _, _, their_delta = probcover_reference(x, labeled, 1, groups)
    assert ours.delta == pytest.approx(their_delta)
    picks = ours.order[: min(batch, ours.greedy)]
    for b, pick in enumerate(picks):
        # their step b, with our picks before it as labeled rows
        _, utilities, _ = probcover_reference(x, np.r_[labeled, picks[:b]], 1, groups)
        best = np.nanmax(utilities[0])
        assert utilities[0][pick] == best == ours.covers[pick]


def test_probcover_same_picks_in_the_same_order_without_ties():
    # blobs of distinct sizes, each far tighter than the gaps: a ball is its blob, so every
    # step has one best row (the largest uncovered blob; inside it, ties go to our lower row,
    # so the blob, not the row, is compared)
    rng = np.random.default_rng(7)
    sizes = [31, 24, 17, 12, 7]
    x = np.concatenate([np.eye(5)[i] + rng.normal(scale=0.01, size=(s, 5))
                        for i, s in enumerate(sizes)])  # fmt: skip
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    blob = np.repeat(np.arange(5), sizes)
    labeled = [31]  # one label in the second blob
    ours = probcover_order(x, labeled, n_classes=5, deltas=THEIR_DELTAS, clusters=blob,
                           device="cpu")  # fmt: skip
    theirs, _, delta = probcover_reference(x, labeled, 4, blob)
    assert ours.delta == delta and 1.0 <= delta < np.sqrt(2)  # under the gap between blobs
    np.testing.assert_array_equal(blob[ours.order[:4]], blob[theirs])
    assert blob[ours.order[:4]].tolist() == [0, 2, 3, 4]


@pytest.mark.parametrize("seed", range(6))
def test_maxherding_same_picks_in_the_same_order(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(250, 8)) + rng.normal(size=(1, 8)) * 2  # off-centre: scaling matters
    labeled = rng.choice(250, size=3 * seed, replace=False)
    y = np.full(len(x), np.nan)
    y[labeled] = 0
    h = (0.6, 1.0, 1.4)[seed % 3]
    theirs = skactiveml_pool.MaxHerding(metric="rbf", metric_dict={"gamma": 1 / h**2},
                                        random_state=seed).query(x, y, batch_size=10)  # fmt: skip
    ours = herding_order(x, labeled, 10, bandwidth=h, device="cpu")
    np.testing.assert_array_equal(ours.order[:10], theirs)
