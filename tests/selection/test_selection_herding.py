"""Herding: hand-built clusters, a brute-force reference, weights, large pools, rank()."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from ml_backend.errors import SelectionInputError
from ml_backend.selection import explain, herding_order, rank

h_module = importlib.import_module("ml_backend.selection.herding")


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def three_blobs_and_an_outlier(seed=0):
    """Rows on the unit sphere: blobs of 40, 25 and 10 around e0, e1, e2 and an outlier near e3
    (rows 0-39, 40-64, 65-74, 75)."""
    rng = np.random.default_rng(seed)
    e = np.eye(4)
    blobs = [e[i] + rng.normal(scale=0.05, size=(s, 4)) for i, s in ((0, 40), (1, 25), (2, 10))]
    return unit(np.concatenate(blobs + [e[3][None] + 0.01]))


def brute_force(x, labeled, batch, h, w=None):
    """Uncertainty herding with a full float64 kernel over every unlabeled row (ties to the lower
    row), then the rest by the gain after the batch: what herding_order must give."""
    x = unit(np.asarray(x, dtype=np.float64))
    n = len(x)
    k = np.exp(-((np.linalg.norm(x[:, None] - x[None], axis=2) / h) ** 2))
    free = np.ones(n, bool)
    free[labeled] = False
    ref = np.flatnonzero(free)
    w = np.ones(n) if w is None else np.asarray(w, float)
    m = k[np.ix_(ref, labeled)].max(axis=1) if len(labeled) else np.zeros(len(ref))

    def gains():
        return (w[ref, None] * np.maximum(k[ref] - m[:, None], 0)).sum(axis=0) / len(ref)

    picks = []
    for _ in range(min(batch, len(ref))):
        g = np.where(free, gains(), -1.0)
        j = int(np.argmax(g))
        picks.append(j)
        free[j] = False
        m = np.maximum(m, k[ref, j])
    g = gains()
    rest = np.flatnonzero(free)
    return np.array(picks + rest[np.lexsort((rest, -g[rest]))].tolist())


def test_cold_start_takes_the_middle_of_each_blob_largest_first_and_the_outlier_last():
    x = three_blobs_and_an_outlier()
    res = herding_order(x, [], 3, bandwidth=0.5, device="cpu")
    first, second, third = res.order[:3]
    assert first < 40 and 40 <= second < 65 and 65 <= third < 75  # one per blob, largest first
    centre = unit(x[:40].mean(axis=0, keepdims=True))[0]
    closest = np.argsort(np.linalg.norm(x[:40] - centre, axis=1))[:10]
    assert first in closest  # the middle of the blob, not its rim
    assert 75 not in res.order[:3]  # the outlier is never an early pick
    assert res.stands_for[first] >= 35 and res.stands_for[second] >= 20
    assert not res.weighted and res.picks == 3


def test_labeled_rows_cover_their_blob():
    x = three_blobs_and_an_outlier()
    res = herding_order(x, [0], 2, bandwidth=0.5, device="cpu")
    assert 40 <= res.order[0] < 65 and 65 <= res.order[1] < 75  # blob 0 is covered
    assert 0 not in res.order


@pytest.mark.parametrize("seed", range(6))
def test_matches_a_brute_force_greedy(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(120, 5))
    labeled = rng.choice(120, size=seed * 2, replace=False)
    w = rng.uniform(size=120) if seed % 2 else None
    h = (0.5, 0.8, 1.0)[seed % 3]
    res = herding_order(x, labeled, 8, weights=w, bandwidth=h, device="cpu")
    np.testing.assert_array_equal(res.order, brute_force(x, labeled, 8, h, w))


def test_weights_send_the_batch_where_the_model_is_unsure():
    x = three_blobs_and_an_outlier()
    w = np.zeros(len(x))
    w[40:65] = 1.0  # unsure only about the middle blob
    res = herding_order(x, [], 3, weights=w, bandwidth=0.5, device="cpu")
    assert 40 <= res.order[0] < 65 and res.weighted
    unweighted = herding_order(x, [], 3, bandwidth=0.5, device="cpu")
    assert unweighted.order[0] < 40


def test_large_pool_uses_a_sample_and_puts_the_rest_last_by_weight(monkeypatch):
    monkeypatch.setattr(h_module, "REFERENCE_ROWS", 40)
    monkeypatch.setattr(h_module, "CANDIDATE_ROWS", 70)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 8))
    w = rng.uniform(size=300)
    res = herding_order(x, [3, 7], 10, weights=w, device="cpu")
    assert (res.reference_rows, res.candidate_rows) == (40, 70)
    assert sorted(res.order.tolist()) == [i for i in range(300) if i not in (3, 7)]
    tail = res.order[70:]
    assert np.all(np.diff(w[tail]) <= 0)  # outside the candidates: by descending weight
    assert np.all(np.isnan(res.gain[tail])) and np.all(np.isfinite(res.gain[res.order[:70]]))
    again = herding_order(x, [3, 7], 10, weights=w, device="cpu")
    np.testing.assert_array_equal(res.order, again.order)  # seeded: the same sample


def test_everything_labeled_and_bad_input():
    x = three_blobs_and_an_outlier()
    assert herding_order(x, np.arange(len(x)), 3).order.size == 0
    for kwargs, words in (
        ({"bandwidth": 0}, "bandwidth"),
        ({"bandwidth": float("nan")}, "bandwidth"),
        ({"weights": [1.0, 2.0]}, "weights"),
        ({"weights": -np.ones(len(x))}, "weights"),
        ({"weights": np.full(len(x), np.nan)}, "weights"),
    ):
        with pytest.raises(SelectionInputError, match=words):
            herding_order(x, [], 3, **kwargs)
    with pytest.raises(SelectionInputError, match="batch"):
        herding_order(x, [], 0)
    bad = x.copy()
    bad[17, 1] = np.nan
    with pytest.raises(SelectionInputError, match="row 17 holds NaN"):
        herding_order(bad, [], 3)


def test_rank_herding_reasons_and_words():
    x = three_blobs_and_an_outlier()
    mask = np.zeros(len(x), bool)
    mask[41] = True
    cold = rank("herding", embeddings=x, labeled_mask=mask, batch=2)
    assert cold.strategy == "herding"
    top = cold.order[0]
    assert cold.reason[top] == "covers" and cold.covers[top] >= 20
    assert explain(cold, top).startswith(f"it stands for {cold.covers[top] - 1} similar images")
    later = cold.order[5]
    assert cold.reason[later] == "herded" and explain(cold, later).startswith("after the batch")
    assert cold.reason[41] == ""
    probs = np.tile([0.9, 0.05, 0.05], (len(x), 1))
    probs[65:75] = [0.4, 0.35, 0.25]  # unsure about the small blob
    warm = rank("herding", probs=probs, embeddings=x, labeled_mask=mask, batch=2)
    top = warm.order[0]
    assert 65 <= top < 75 and warm.reason[top] == "covers_unsure"
    words = explain(warm, top, class_names=["Sunny", "Cloudy", "Rain"], probs=probs)
    assert words.startswith("the model is unsure (between Sunny 40% and Cloudy 35%), and it stands")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(9)
    centres = rng.normal(size=(12, 32))
    x = np.concatenate([c + rng.normal(scale=0.4, size=(300, 32)) for c in centres]).astype(
        np.float32
    )
    w = rng.uniform(size=len(x))
    cpu = herding_order(x, [0, 1, 2], 20, weights=w, device="cpu")
    gpu = herding_order(x, [0, 1, 2], 20, weights=w, device="cuda")
    np.testing.assert_array_equal(cpu.order[:20], gpu.order[:20])


def test_duplicates_never_repeat_a_pick():
    # once the first copy is picked every gain is 0: the batch still holds distinct rows
    x = np.tile([[1.0, 0.0, 0.0]], (6, 1))
    res = herding_order(x, [2], 4, device="cpu")
    assert sorted(res.order.tolist()) == [0, 1, 3, 4, 5]
    assert res.order[:4].tolist() == [0, 1, 3, 4]  # ties to the lower row


def test_words_when_a_pick_stands_for_no_other_image():
    # two far-apart rows and a labeled copy next to the second: the unsure pick covers itself only
    x = unit(np.array([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0]]))
    mask = np.array([False, False, True])
    probs = np.array([[0.5, 0.5], [0.6, 0.4], [0.9, 0.1]])
    r = rank("herding", probs=probs, embeddings=x, labeled_mask=mask, batch=2)
    alone = [row for row in r.order[:2] if r.covers[row] == 1]
    assert alone and explain(r, alone[0], probs=probs).endswith(
        "; every similar image is already closer to a labeled or queued one"
    )
