"""spreading.py and the recipe's ``head+spread``: labels follow the pool's connected regions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_backend.model import heads, recipe, spreading
from ml_backend.model.recipe import RecipeConfig, _best, fit_head, fit_spread_head


def blobs(n_per: int = 60, k: int = 3, d: int = 32, seed: int = 0):
    """``k`` tight groups around random directions (cosine neighbours stay in their group)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    x = np.concatenate([c + 0.15 * rng.normal(size=(n_per, d)) for c in centres])
    return x.astype(np.float32), np.repeat(np.arange(k), n_per)


def two_bars(n_per: int = 100):
    """Two dense bars on a line, x in [-6, -1] (class 0) and [1, 6] (class 1), lifted off the
    origin (third coordinate 10) so that cosine neighbours are neighbours along the line."""
    xs = np.concatenate([np.linspace(-6, -1, n_per), np.linspace(1, 6, n_per)])
    rng = np.random.default_rng(1)
    emb = np.stack([xs, 0.02 * rng.normal(size=len(xs)), np.full(len(xs), 10.0)], axis=1)
    return emb.astype(np.float32), (xs > 0).astype(np.int64)


def test_one_label_per_group_reaches_the_whole_group():
    x, y = blobs()
    graph = spreading.build_graph(x, np.arange(0))
    seeds = np.array([0, 60, 120])
    probs = spreading.spread(graph, seeds, y[seeds], 3)
    assert probs.shape == (180, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert (probs.argmax(axis=1) == y).all()
    assert spreading.certainty(probs).min() > 0.5


def test_a_class_with_many_labels_does_not_flood_one_with_few():
    """Each class's seeds sum to 1: ten labels in one group, one in the other, both groups
    keep their own class."""
    x, y = blobs(k=2)
    seeds = np.concatenate([np.arange(10), [60]])
    probs = spreading.spread(spreading.build_graph(x, seeds), seeds, y[seeds], 2)
    assert (probs.argmax(axis=1) == y).all()


def test_unreached_nodes_are_uniform_and_count_as_unsure():
    x, y = blobs(k=2, n_per=30)
    probs = spreading.spread(spreading.build_graph(x, [0]), np.array([0]), np.array([0]), 3)
    unreached = probs[y == 1]  # no edge leads from group 0 into group 1
    np.testing.assert_allclose(unreached, 1 / 3)
    assert spreading.certainty(unreached).max() == pytest.approx(0.0)
    assert spreading.certainty(np.eye(3)).min() == pytest.approx(1.0)


def test_the_graph_is_bounded_holds_the_labeled_rows_and_is_symmetric():
    x, _ = blobs(n_per=200)
    must = np.array([3, 599])
    graph = spreading.build_graph(x, must, max_rows=50, k=5, seed=4)
    assert len(graph.nodes) == 50 and np.isin(must, graph.nodes).all()
    assert (np.diff(graph.nodes) > 0).all()
    dense = graph.s.toarray()
    np.testing.assert_allclose(dense, dense.T)
    assert np.diag(dense).max() == 0.0  # no node is its own neighbour
    assert graph.s.nnz <= 2 * 50 * 5
    np.testing.assert_array_equal(graph.nodes[graph.positions(must)], must)
    missing = np.setdiff1d(np.arange(600), graph.nodes)[:1]
    with pytest.raises(ValueError, match="not nodes"):
        graph.positions(missing)
    again = spreading.build_graph(x, must, max_rows=50, k=5, seed=4)
    np.testing.assert_array_equal(again.nodes, graph.nodes)  # the sample is seeded


def test_tiny_graphs_have_fewer_neighbours_or_none():
    x, _ = blobs(n_per=2, k=1)
    assert spreading.build_graph(x, [0], k=20).s.nnz == 2  # k capped at n - 1
    lonely = spreading.build_graph(x[:1], [0])
    assert lonely.s.shape == (1, 1) and lonely.s.nnz == 0


def test_spread_head_fixes_a_boundary_drawn_between_atypical_labels():
    """Labels at an inner edge of one bar and the outer edge of the other: the plain head puts
    the boundary halfway between them (inside bar 1); the spread labels pull it towards the gap,
    all the way when they weigh enough (the default, half the real labels' weight, goes part of
    the way: the real labels keep the last word)."""
    emb, y = two_bars()
    labeled = np.array([99, 199])  # x = -1 (class 0) and x = 6 (class 1)
    mean, scale = recipe.column_stats(emb)
    cfg = RecipeConfig()
    plain = fit_head(emb[labeled], y[labeled], 2, mean=mean, scale=scale, c=cfg.head_c)
    graph = spreading.build_graph(emb, labeled)
    spread = fit_spread_head(emb, labeled, y[labeled], 2, cfg, mean=mean, scale=scale, graph=graph)
    heavy = fit_spread_head(emb, labeled, y[labeled], 2, RecipeConfig(spread_weight=5.0),
                            mean=mean, scale=scale, graph=graph)  # fmt: skip
    plain_acc = (plain.logits(emb).argmax(axis=1) == y).mean()
    spread_acc = (spread.logits(emb).argmax(axis=1) == y).mean()
    assert (spreading.spread(graph, labeled, y[labeled], 2).argmax(axis=1) == y).all()
    assert plain_acc < 0.8
    assert spread_acc > plain_acc + 0.1
    assert (heavy.logits(emb).argmax(axis=1) == y).all()


def test_spread_labels_skip_validation_rows_and_weigh_at_most_half_the_real_ones(monkeypatch):
    x, y = blobs()
    labeled, held_out = np.array([0, 60, 120, 1]), np.array([2, 3, 61])
    seen = {}
    real_fit = heads.fit_head

    def spy(rows_x, labels, *args, weights=None, **kwargs):
        if weights is not None:
            seen["x"], seen["w"] = rows_x, weights
        return real_fit(rows_x, labels, *args, weights=weights, **kwargs)

    monkeypatch.setattr(heads, "fit_head", spy)
    mean, scale = recipe.column_stats(x)
    graph = spreading.build_graph(x, labeled)
    fit_spread_head(x, labeled, y[labeled], 3, RecipeConfig(), mean=mean, scale=scale,
                    graph=graph, exclude=held_out)  # fmt: skip
    assert len(seen["x"]) == len(x) - len(held_out)  # every other node, labeled rows first
    for row in held_out:
        assert not (seen["x"][len(labeled) :] == x[row]).all(axis=1).any()
    assert seen["w"][: len(labeled)].tolist() == [1.0] * len(labeled)
    assert seen["w"][len(labeled) :].sum() == pytest.approx(0.5 * len(labeled))


def test_spread_labels_are_a_bounded_seeded_sample(monkeypatch):
    x, y = blobs()
    monkeypatch.setattr(heads, "SPREAD_ROWS", 25)
    seen = []
    real_fit = heads.fit_head
    monkeypatch.setattr(
        heads,
        "fit_head",
        lambda rows_x, *a, weights=None, **k: (
            (weights is not None and seen.append(rows_x))
            or real_fit(rows_x, *a, weights=weights, **k)
        ),
    )
    labeled = np.array([0, 60, 120])
    mean, scale = recipe.column_stats(x)
    graph = spreading.build_graph(x, labeled)
    for _ in range(2):
        fit_spread_head(x, labeled, y[labeled], 3, RecipeConfig(), mean=mean, scale=scale,
                        graph=graph)  # fmt: skip
    assert len(seen[0]) == 3 + 25
    np.testing.assert_array_equal(seen[0], seen[1])


@pytest.mark.parametrize(
    ("gained", "lost", "served"),
    [
        (0, 0, "head"),  # a tie keeps the plain head
        (1, 0, "head"),  # one label is no evidence
        (2, 0, "other"),  # 2 >= max(2, sqrt 2)
        (3, 2, "head"),  # 1 < sqrt 5
        (10, 6, "other"),  # 4 >= sqrt 16
        (9, 6, "head"),  # 3 < sqrt 15
    ],
)
def test_another_head_is_served_only_with_a_clear_lead(gained, lost, served):
    n = 40
    head = np.zeros(n, bool)
    head[:lost] = True  # right where the other is wrong
    head[lost + gained : lost + gained + 10] = True  # both right
    other = np.zeros(n, bool)
    other[lost : lost + gained] = True
    other[lost + gained : lost + gained + 10] = True
    assert _best({"head": head, "other": other}, default="head") == served


def test_among_clear_leaders_the_most_right_wins():
    head = np.zeros(30, bool)
    a, b = head.copy(), head.copy()
    a[:5], b[:8] = True, True
    assert _best({"head": head, "a": a, "b": b}, default="head") == "b"
    assert _best({"head": np.zeros(0, bool), "a": np.zeros(0, bool)}, default="head") == "head"


def _rigged(monkeypatch, right: dict[str, np.ndarray]) -> None:
    """Make cross-validation report ``right`` (per head, right on each validation label)."""
    monkeypatch.setattr(
        recipe, "_cross_validate", lambda heads, *a, **k: {n: right[n] for n in heads}
    )


@pytest.mark.parametrize(
    ("head_right", "spread_right", "served"),
    [
        (20, 20, "head+spread"),  # a tie keeps the incumbent, the spread head
        (21, 20, "head+spread"),  # one label is no evidence
        (25, 20, "head"),  # a clear lead replaces it
        (20, 25, "head+spread"),
    ],
)
def test_the_spread_head_is_the_incumbent(monkeypatch, head_right, spread_right, served):
    """``choose_head`` serves the spread head unless another is clearly better in
    cross-validation; with spreading off the plain head is the incumbent again."""
    x, y = blobs()
    rows = np.arange(0, 180, 6)  # 30 labels, 10 per class
    n = len(rows)
    _rigged(monkeypatch, {
        "head": np.arange(n) < head_right,
        "head+pseudo": np.arange(n) < min(head_right, spread_right),
        "head+spread": np.arange(n) >= n - spread_right,
    })  # fmt: skip
    choice = recipe.choose_head(x, rows, y[rows], np.arange(len(x)), 3, RecipeConfig())
    assert choice.served == served
    if served == "head+spread" and head_right > spread_right:
        assert "head was not clearly better than head+spread" in choice.why
    off = recipe.choose_head(x, rows, y[rows], np.arange(len(x)), 3,
                             RecipeConfig(label_spreading=False))  # fmt: skip
    assert off.served == "head"  # head+pseudo is never ahead of the plain head here


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_graph_built_on_a_gpu_is_the_cpu_one():
    x, _ = blobs()
    cpu = spreading.build_graph(x, [0], device="cpu")
    gpu = spreading.build_graph(x, [0], device="cuda")
    np.testing.assert_array_equal(cpu.nodes, gpu.nodes)
    np.testing.assert_allclose(cpu.s.toarray(), gpu.s.toarray(), atol=1e-5)
