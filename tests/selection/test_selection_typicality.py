"""k-means and typicality: hand-built clusters, float64 references, edge cases, validation."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from ml_backend.errors import SelectionInputError
from ml_backend.selection import kmeans, rank, typicality_order, typicality_scores

# the package re-exports functions of the same names, so reach the modules themselves
kmeans_module = importlib.import_module("ml_backend.selection.kmeans")
typ_module = importlib.import_module("ml_backend.selection.typicality")


def blobs(sizes, d=2, spread=20.0, seed=0):
    """Well separated isotropic Gaussian blobs of the given sizes; returns (x, blob id, centres)."""
    rng = np.random.default_rng(seed)
    centres = np.stack([np.eye(d)[i % d] * spread * (1 + i // d) for i in range(len(sizes))])
    x = np.concatenate([c + rng.normal(size=(s, d)) for c, s in zip(centres, sizes, strict=True)])
    return x, np.repeat(np.arange(len(sizes)), sizes), centres


def reference_typicality(x, clusters, k):
    """Brute force in float64: 1 / mean distance to the k nearest other rows of the group."""
    out = np.zeros(len(x))
    for c in np.unique(clusters):
        rows = np.flatnonzero(clusters == c)
        if len(rows) < 2:
            continue
        d = np.linalg.norm(x[rows][:, None] - x[rows][None], axis=2)
        np.fill_diagonal(d, np.inf)
        kk = min(k, len(rows) - 1)
        out[rows] = 1.0 / np.sort(d, axis=1)[:, :kk].mean(axis=1)
    return out


# ---------------------------------------------------------------- k-means


def test_kmeans_recovers_separated_blobs():
    x, blob, _ = make_blobs(3000, centers=7, n_features=12, random_state=0, return_centers=True)
    res = kmeans(x, 7, device="cpu")
    assert adjusted_rand_score(blob, res.labels) == 1.0
    assert res.sizes.sum() == 3000 and res.labels.dtype == np.int64
    sk = KMeans(7, random_state=0, n_init=1).fit(x)
    assert res.inertia == pytest.approx(sk.inertia_, rel=1e-6)


def test_kmeans_inertia_close_to_sklearn_on_unstructured_data():
    x = np.random.default_rng(3).normal(size=(2000, 8))
    ours = kmeans(x, 40, device="cpu").inertia
    best = KMeans(40, random_state=0, n_init=3).fit(x).inertia_
    assert ours <= 1.03 * best


def test_kmeans_tiles_and_fit_sample_paths(monkeypatch):
    x, blob = make_blobs(1500, centers=5, n_features=6, random_state=1)
    whole = kmeans(x, 5, device="cpu")
    monkeypatch.setattr(kmeans_module, "_TILE_ELEMENTS", 37)
    tiled = kmeans(x, 5, device="cpu")
    np.testing.assert_array_equal(whole.labels, tiled.labels)
    sampled = kmeans(x, 5, device="cpu", fit_rows=300)  # fit on 300 rows, assign all 1,500
    assert adjusted_rand_score(blob, sampled.labels) == 1.0


def test_kmeans_more_clusters_than_distinct_rows():
    x = np.repeat(np.eye(3), 5, axis=0)
    res = kmeans(x, 6, device="cpu")
    assert len(res.sizes) == 6 and res.sizes.sum() == 15
    assert len(np.unique(res.labels)) == 3  # duplicates cannot be split
    assert kmeans(np.eye(3), 10, device="cpu").sizes.tolist() == [1, 1, 1]
    assert kmeans(np.zeros((0, 4)), 3, device="cpu").labels.size == 0


def test_kmeans_is_seeded():
    x = np.random.default_rng(4).normal(size=(500, 5))
    a, b = kmeans(x, 9, seed=1, device="cpu"), kmeans(x, 9, seed=1, device="cpu")
    np.testing.assert_array_equal(a.labels, b.labels)


@pytest.mark.parametrize(
    ("x", "k", "match"),
    [
        (np.zeros((4, 2)), 0, "n_clusters must be"),
        (np.zeros((4, 2)), 2.0, "n_clusters must be"),
        (np.array([[0.0, np.nan]]), 1, "row 0 holds NaN"),
        (np.zeros(4), 1, "2-D"),
    ],
)
def test_kmeans_bad_input(x, k, match):
    with pytest.raises(SelectionInputError, match=match):
        kmeans(x, k, device="cpu")


# ---------------------------------------------------------------- typicality scores


@pytest.mark.parametrize("k", [1, 5, 20])
def test_typicality_matches_brute_force(k):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(120, 4)) * rng.uniform(0.5, 3, size=4)
    clusters = rng.integers(0, 4, size=120)
    clusters[7] = 9  # a group of one: 0
    ours = typicality_scores(x, clusters, neighbours=k, device="cpu")
    ref = reference_typicality(x, clusters, k)
    np.testing.assert_allclose(ours, ref, rtol=1e-9)
    assert ours[7] == 0.0


def test_typicality_tiles_and_reference_sample(monkeypatch):
    x = np.random.default_rng(5).normal(size=(300, 3))
    clusters = np.zeros(300, dtype=np.int64)
    exact = typicality_scores(x, clusters, neighbours=5, device="cpu")
    monkeypatch.setattr(typ_module, "_TILE_ELEMENTS", 50)
    np.testing.assert_allclose(typicality_scores(x, clusters, neighbours=5, device="cpu"), exact)
    # neighbours among a 100-row sample: an estimate that still ranks the dense middle first
    sampled = typicality_scores(x, clusters, neighbours=5, device="cpu", reference_rows=100)
    assert np.isfinite(sampled).all() and (sampled > 0).all()
    radius = np.linalg.norm(x - x.mean(axis=0), axis=1)
    assert radius[np.argmax(sampled)] < np.quantile(radius, 0.2)


def test_a_large_pool_scores_a_sample_of_each_group_and_still_picks_central_rows(monkeypatch):
    x, blob, centres = blobs([3000, 2000, 1000], d=2, seed=4)
    monkeypatch.setattr(typ_module, "MIN_SCORED", 50)
    monkeypatch.setattr(typ_module, "SCORE_ROWS", 600)  # 10%: 300, 200 and 100 rows scored
    res = typicality_order(x, [], 3, device="cpu")
    scored = res.typicality > 0
    assert [int(scored[blob == b].sum()) for b in range(3)] == [300, 200, 100]
    assert blob[res.order[:3]].tolist() == [0, 1, 2]
    for row in res.order[:3]:  # the most typical of its group's sample: central (< sigma)
        assert np.linalg.norm(x[row] - centres[blob[row]]) < 1.0
    # the group of 1,000 (all its rows are neighbour references): exactly the sample's best
    sample = np.flatnonzero((blob == 2) & scored)
    exact = reference_typicality(x, res.cluster, 20)
    assert res.order[2] == sample[np.argmax(exact[sample])]
    np.testing.assert_allclose(res.typicality[sample], exact[sample], rtol=1e-4)
    # per group, the scored rows come first, the others after them in row order
    for b in range(3):
        queue = [r for r in res.order.tolist() if blob[r] == b]
        assert all(scored[queue[: scored[blob == b].sum()]])
        rest = queue[scored[blob == b].sum() :]
        assert rest == sorted(rest) and not scored[rest].any()
    # below SCORE_ROWS every row is scored, as before
    monkeypatch.setattr(typ_module, "SCORE_ROWS", 6000)
    assert (typicality_order(x, [], 3, device="cpu").typicality > 0).all()


def test_typical_point_of_a_blob_is_near_its_centre():
    x, _, centres = blobs([800], d=2, seed=1)
    res = typicality_order(x, [], 1, device="cpu")
    top = x[res.order[0]]
    radius = np.linalg.norm(x - centres[0], axis=1)
    # the densest sample point, not the exact centre: within half a sigma, among the 10% most central
    assert np.linalg.norm(top - centres[0]) < 0.5
    assert np.linalg.norm(top - centres[0]) <= np.quantile(radius, 0.1)


def test_outliers_are_never_picked_first_and_come_last():
    x, _, _ = blobs([100, 80, 60], d=3, seed=2)
    outliers = np.array([[500.0, 0, 0], [0, -500.0, 0], [0, 0, 700.0]])
    x = np.concatenate([x, outliers])
    out_rows = {240, 241, 242}
    for labeled in ([], [0], [0, 100, 180]):
        res = typicality_order(x, labeled, 3, device="cpu")
        assert not out_rows & set(res.order[:3].tolist())
        assert set(res.order[-3:].tolist()) == out_rows  # groups of fewer than 5 rows: last
    # k-center, for contrast, serves exactly these outliers first
    r = rank("coreset", embeddings=x, labeled_mask=np.zeros(len(x), bool), batch=3)
    assert set(r.order[:3].tolist()) == out_rows


def test_one_pick_per_blob_largest_first():
    x, blob, centres = blobs([90, 150, 40, 120], d=2, seed=3)
    res = typicality_order(x, [], 4, device="cpu")
    assert blob[res.order[:4]].tolist() == [1, 3, 0, 2]  # by blob size, descending
    for row in res.order[:4]:
        radius = np.linalg.norm(x[blob == blob[row]] - centres[blob[row]], axis=1)
        # central (sampling noise moves the densest point a little): inside the inner third, < sigma
        assert np.linalg.norm(x[row] - centres[blob[row]]) <= min(1.0, np.quantile(radius, 0.35))
    assert res.n_clusters == 4


def test_labeled_blob_is_covered():
    x, blob, _ = blobs([200, 100, 50], d=2, seed=4)
    res = typicality_order(x, [5], 2, device="cpu")  # K = 1 + 2 = 3; blob 0 holds the label
    assert blob[res.order[:2]].tolist() == [1, 2]
    assert res.cluster_labeled[5] == 1 and res.cluster_size[5] == 200
    # the rest goes round-robin: blob 0's most typical row leads the next round
    assert blob[res.order[2]] == 0
    assert res.queued_before[res.order[:3]].tolist() == [0, 0, 0]


def test_fewer_rows_than_clusters():
    x = np.array([[0.0, 0.0], [5.0, 5.0], [9.0, 0.0]])
    res = typicality_order(x, [], 5, device="cpu")
    assert sorted(res.order.tolist()) == [0, 1, 2] and res.n_clusters == 3
    assert (res.typicality == 0).all()  # groups of one


def test_all_labeled_and_empty():
    x = np.random.default_rng(6).normal(size=(10, 3))
    assert typicality_order(x, range(10), 3, device="cpu").order.size == 0
    assert typicality_order(np.zeros((0, 3)), [], 3, device="cpu").order.size == 0


def test_duplicates_do_not_share_the_top_batch():
    distinct = np.random.default_rng(7).normal(size=(6, 4)) * 10
    x = np.repeat(distinct, 8, axis=0)  # 6 distinct rows, 8 copies each
    res = typicality_order(x, [], 6, device="cpu")
    assert len({tuple(r) for r in x[res.order[:6]]}) == 6


def test_given_clusters_skip_kmeans():
    x, blob, _ = blobs([30, 20], d=2, seed=8)
    res = typicality_order(x, [], 2, clusters=blob, device="cpu")
    np.testing.assert_array_equal(res.cluster, blob)
    assert blob[res.order[:2]].tolist() == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch": 0}, "batch must be"),
        ({"max_clusters": 0}, "max_clusters must be"),
        ({"neighbours": 0}, "neighbours must be"),
        ({"clusters": [0, 1]}, "clusters must be"),
        ({"labeled_indices": [12]}, "in \\[0, 10\\)"),
    ],
)
def test_typicality_bad_input(kwargs, match):
    args = {"embeddings": np.zeros((10, 2)), "labeled_indices": [], "batch": 2}
    args.update(kwargs)
    with pytest.raises(SelectionInputError, match=match):
        typicality_order(args.pop("embeddings"), args.pop("labeled_indices"), **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    x, blob = make_blobs(4000, centers=12, n_features=32, random_state=9)
    x = x.astype(np.float32)
    cpu = typicality_order(x, [0, 1, 2], 9, device="cpu")
    gpu = typicality_order(x, [0, 1, 2], 9, device="cuda")
    assert adjusted_rand_score(cpu.cluster, gpu.cluster) == 1.0
    np.testing.assert_allclose(cpu.typicality, gpu.typicality, rtol=1e-3)
    np.testing.assert_array_equal(cpu.order[:9], gpu.order[:9])
