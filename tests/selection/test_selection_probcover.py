"""ProbCover: hand-built clusters, a brute-force reference, the radius rule, large pools, rank()."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from ml_backend.errors import SelectionInputError
from ml_backend.selection import explain, probcover_order, rank

pc_module = importlib.import_module("ml_backend.selection.probcover")


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def two_blobs_and_an_outlier(seed=0):
    """Rows on the unit sphere: a tight blob of 40 around e0, a looser one of 15 around e1, and
    one outlier near e2 (rows 0-39, 40-54, 55)."""
    rng = np.random.default_rng(seed)
    e = np.eye(3)
    dense = e[0] + rng.normal(scale=0.03, size=(40, 3))
    loose = e[1] + rng.normal(scale=0.08, size=(15, 3))
    return unit(np.concatenate([dense, loose, e[2][None] + 0.01])), rng


def brute_force(x, labeled, delta):
    """The greedy of the paper with a full float64 distance matrix (ties to the lower row), then
    the rest by descending ball size: the order probcover_order must give."""
    x = unit(np.asarray(x, dtype=np.float64))
    n = len(x)
    edges = np.linalg.norm(x[:, None] - x[None], axis=2) <= delta
    covered = edges[labeled].any(axis=0) if len(labeled) else np.zeros(n, bool)
    candidate = np.ones(n, bool)
    candidate[labeled] = False
    picks, gains = [], []
    while True:
        degree = np.where(candidate, (edges & ~covered[None, :]).sum(axis=1), -1)
        best = int(np.argmax(degree))
        if degree[best] <= 0:
            break
        picks.append(best)
        gains.append(int(degree[best]))
        covered |= edges[best]
        candidate[best] = False
    rest = np.flatnonzero(candidate)
    ball = np.delete(edges, labeled, axis=1).sum(axis=1)  # the graph holds unlabeled rows only
    rest = rest[np.lexsort((rest, -ball[rest]))]
    return np.array(picks + rest.tolist()), np.array(gains)


def test_first_pick_is_the_middle_of_the_densest_blob_and_the_outlier_comes_last_of_the_picks():
    x, _ = two_blobs_and_an_outlier()
    res = probcover_order(x, [], n_classes=3, delta=0.3, device="cpu")
    first, second = res.order[:2]
    assert first < 40  # the dense blob
    assert res.covers[first] >= 30  # its ball holds most of the blob
    # the middle: closer to the blob's centre than most of its rows
    centre = unit(x[:40].mean(axis=0, keepdims=True))[0]
    d = np.linalg.norm(x[:40] - centre, axis=1)
    assert d[first] <= np.median(d)
    assert 40 <= second < 55  # then the other blob, not the outlier
    greedy = res.order[: res.greedy]
    # gains never grow (degrees only fall), so the outlier, whose ball is itself, comes after
    # every pick that covers more
    assert res.covers[greedy].tolist() == sorted(res.covers[greedy].tolist(), reverse=True)
    assert greedy[-1] == 55 and res.covers[55] == 1 and res.covers[greedy[-2]] > 1


def test_a_labeled_row_covers_its_ball():
    x, _ = two_blobs_and_an_outlier()
    res = probcover_order(x, [0], n_classes=3, delta=0.3, device="cpu")
    assert res.covered_by_labels >= 30
    assert 40 <= res.order[0] < 55  # the dense blob is covered: the loose one comes first
    assert 0 not in res.order


@pytest.mark.parametrize("seed", range(6))
def test_matches_a_brute_force_greedy(seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, 4))
    x = np.concatenate(
        [c + rng.normal(scale=0.3, size=(int(rng.integers(10, 40)), 4)) for c in centres]
    )
    labeled = rng.choice(len(x), size=int(rng.integers(0, 5)), replace=False)
    res = probcover_order(x, labeled, n_classes=5, device="cpu", seed=seed)
    order, gains = brute_force(x, labeled, res.delta)
    np.testing.assert_array_equal(res.order, order)
    np.testing.assert_array_equal(res.covers[order[: len(gains)]], gains)
    assert res.greedy == len(gains)
    assert sorted(res.order.tolist()) == sorted(set(range(len(x))) - set(labeled.tolist()))


def test_radius_is_the_largest_that_keeps_balls_in_their_group():
    # two groups on the sphere whose rows are within 0.2 of each other, 1.41 apart
    rng = np.random.default_rng(1)
    e = np.eye(2)
    x = unit(np.concatenate([e[0] + rng.uniform(-0.05, 0.05, (30, 2)),
                             e[1] + rng.uniform(-0.05, 0.05, (30, 2))]))  # fmt: skip
    groups = np.repeat([0, 1], 30)
    res = probcover_order(x, [], n_classes=2, clusters=groups, device="cpu")
    gap = np.linalg.norm(x[:30, None] - x[None, 30:], axis=2).min()
    assert res.delta < gap <= res.delta + 0.05 + 1e-9  # the last grid radius under the gap
    assert res.purity == 1.0
    assert res.greedy == 2  # one pick per group covers everything
    # with alpha close to 1 and a row of group 0 placed inside group 1, no radius is pure enough
    x2 = x.copy()
    x2[0] = x[45]
    res2 = probcover_order(x2, [], n_classes=2, clusters=groups, alpha=0.99, device="cpu")
    assert res2.delta == pc_module.DELTAS[0] and res2.purity < 0.99


def test_large_pool_uses_a_sample_and_puts_the_rest_last(monkeypatch):
    monkeypatch.setattr(pc_module, "GRAPH_ROWS", 50)
    monkeypatch.setattr(pc_module, "PURITY_ROWS", 60)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 8))
    res = probcover_order(x, [3, 7], n_classes=4, device="cpu")
    assert res.graph_rows <= 50
    assert sorted(res.order.tolist()) == [i for i in range(300) if i not in (3, 7)]
    tail = res.order[res.graph_rows :]
    assert tail.tolist() == sorted(tail.tolist())  # outside the graph: row order
    assert np.all(res.ball[tail] == 0) and np.all(res.ball[res.order[: res.graph_rows]] >= 1)
    again = probcover_order(x, [3, 7], n_classes=4, device="cpu")
    np.testing.assert_array_equal(res.order, again.order)  # seeded: the same sample


def test_everything_labeled_and_bad_input():
    x, _ = two_blobs_and_an_outlier()
    assert probcover_order(x, np.arange(len(x)), n_classes=3).order.size == 0
    for kwargs, words in (
        ({"n_classes": 0}, "n_classes"),
        ({"n_classes": 2, "alpha": 1.0}, "alpha"),
        ({"n_classes": 2, "deltas": [0.1, 2.5]}, "deltas"),
        ({"n_classes": 2, "delta": -1}, "delta"),
        ({"n_classes": 2, "clusters": [0, 1]}, "clusters"),
    ):
        with pytest.raises(SelectionInputError, match=words):
            probcover_order(x, [], **kwargs)
    bad = x.copy()
    bad[17, 1] = np.nan
    with pytest.raises(SelectionInputError, match="row 17 holds NaN"):
        probcover_order(bad, [], n_classes=3)


def test_rank_probcover_reasons_and_words():
    x, _ = two_blobs_and_an_outlier()
    mask = np.zeros(len(x), bool)
    mask[41] = True
    r = rank("probcover", embeddings=x, labeled_mask=mask, batch=3, n_classes=3)
    assert r.strategy == "probcover"
    top = r.order[0]
    assert r.reason[top] == "covers" and r.covers[top] >= 30
    assert explain(r, top).startswith(f"it stands for {r.covers[top] - 1} similar images")
    after = r.order[np.flatnonzero(r.reason[r.order] == "covered")]
    assert len(after) and explain(r, after[0]).startswith("every image is now close to")
    assert r.reason[41] == ""
    # the class count can come from the evidence's labels per class, as the job passes it
    r2 = rank("probcover", embeddings=x, labeled_mask=mask, batch=3,
              evidence={"labels_per_class": {"a": 1, "b": 0, "c": 0}})  # fmt: skip
    np.testing.assert_array_equal(r.order, r2.order)
    # a given radius needs no class count (the default, 0.5); the purity rule does
    r3 = rank("probcover", embeddings=x, labeled_mask=mask, batch=3)
    np.testing.assert_array_equal(r.order, r3.order)
    with pytest.raises(SelectionInputError, match="number of classes"):
        rank("probcover", embeddings=x, labeled_mask=mask, batch=3, probcover_radius=None)
    with pytest.raises(SelectionInputError, match="n_classes"):
        rank("probcover", embeddings=x, labeled_mask=mask, batch=3, n_classes=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(9)
    centres = rng.normal(size=(12, 32))
    x = np.concatenate([c + rng.normal(scale=0.4, size=(300, 32)) for c in centres]).astype(
        np.float32
    )
    groups = np.repeat(np.arange(12), 300)  # the same groups: k-means may differ by device
    cpu = probcover_order(x, [0, 1, 2], n_classes=12, clusters=groups, device="cpu")
    gpu = probcover_order(x, [0, 1, 2], n_classes=12, clusters=groups, device="cuda")
    assert cpu.delta == gpu.delta
    np.testing.assert_array_equal(cpu.order[:20], gpu.order[:20])


def test_a_given_radius_needs_no_class_count():
    x, _ = two_blobs_and_an_outlier()
    without = probcover_order(x, [2], delta=0.3)
    with_classes = probcover_order(x, [2], n_classes=3, delta=0.3)
    np.testing.assert_array_equal(without.order, with_classes.order)
    assert np.isnan(without.purity) and 0 < with_classes.purity <= 1
    with pytest.raises(SelectionInputError, match="purity rule needs n_classes"):
        probcover_order(x, [2])


def test_rank_passes_a_fixed_radius():
    x, _ = two_blobs_and_an_outlier()
    mask = np.zeros(len(x), bool)
    fixed = rank("probcover", embeddings=x, labeled_mask=mask, n_classes=3, probcover_radius=0.3)
    direct = probcover_order(x, [], n_classes=3, delta=0.3)
    np.testing.assert_array_equal(fixed.order, direct.order)
    chosen = probcover_order(x, [], n_classes=3)
    assert chosen.delta != 0.3  # the purity rule picks another radius on this pool
    with pytest.raises(SelectionInputError, match="delta"):
        rank("probcover", embeddings=x, labeled_mask=mask, n_classes=3, probcover_radius=3.0)
