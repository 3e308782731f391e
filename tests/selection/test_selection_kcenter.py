"""Greedy k-center: equality with a float64 brute-force reference, edge cases, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_backend.errors import SelectionInputError
from ml_backend.selection import k_center_greedy, k_center_greedy_details
from ml_backend.selection import kcenter as kc


def reference(x, labeled, k, candidates=None):
    """Textbook farthest-first traversal in float64 numpy: (picks, pick distances, min distances)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    labeled = sorted(set(int(i) for i in labeled))
    allowed = np.ones(n, bool) if candidates is None else np.isin(np.arange(n), candidates)
    allowed[labeled] = False
    min_d = np.full(n, np.inf)
    for j in labeled:
        min_d = np.minimum(min_d, np.linalg.norm(x - x[j], axis=1))
    picks, dists = [], []
    for _ in range(min(k, int(allowed.sum()))):
        if not labeled and not picks:
            v = int(
                np.argmax(
                    np.linalg.norm(x - x.mean(axis=0), axis=1) + np.where(allowed, 0, -np.inf)
                )
            )
        else:
            v = int(np.argmax(np.where(allowed, min_d, -np.inf)))
        picks.append(v)
        dists.append(min_d[v])
        allowed[v] = False
        min_d = np.minimum(min_d, np.linalg.norm(x - x[v], axis=1))
    return np.array(picks, dtype=np.int64), np.array(dists), min_d


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_reference(dtype, seed):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(50, 400)), int(rng.integers(2, 64))
    x = (rng.normal(size=(n, d)) * rng.uniform(0.1, 10) + rng.normal(size=d) * 5).astype(dtype)
    labeled = rng.choice(n, size=int(rng.integers(0, n // 3)), replace=False)
    k = int(rng.integers(1, n))
    res = k_center_greedy_details(x, labeled, k, device="cpu")
    picks, dists, min_d = reference(x, labeled, k)
    np.testing.assert_array_equal(res.picks, picks)
    np.testing.assert_allclose(res.pick_distances, dists, rtol=1e-4)
    on_pool = np.isfinite(min_d)
    np.testing.assert_allclose(res.min_distances[on_pool], min_d[on_pool], rtol=1e-4, atol=1e-4)


def test_small_blocks_and_tiles_still_exact(monkeypatch):
    # Force many blocks, tiny tiles and labeled tiles so every chunked path runs at test size.
    monkeypatch.setattr(kc, "_TILE_ELEMENTS", 64)
    monkeypatch.setattr(kc, "_LABELED_TILE", 3)
    monkeypatch.setattr(kc, "_BLOCK_BYTES", 300 * 4 * 5)
    monkeypatch.setattr(kc, "_MIN_BLOCK", 2)
    monkeypatch.setattr(kc, "_FIRST_BLOCK", 2)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 12)).astype(np.float32)
    labeled = rng.choice(300, size=40, replace=False)
    res = k_center_greedy_details(x, labeled, 120, device="cpu")
    picks, dists, _ = reference(x, labeled, 120)
    np.testing.assert_array_equal(res.picks, picks)
    np.testing.assert_allclose(res.pick_distances, dists, rtol=1e-4)


def test_torch_input_same_as_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    a = k_center_greedy(x, [3, 5], 30, device="cpu")
    b = k_center_greedy(torch.from_numpy(x), torch.tensor([3, 5]), 30, device="cpu")
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int64


def test_input_is_not_modified():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 8)).astype(np.float32)
    before = x.copy()
    k_center_greedy(x, [], 10, device="cpu")
    np.testing.assert_array_equal(x, before)


def test_cold_start_begins_farthest_from_mean():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -10.0]])
    res = k_center_greedy_details(x, [], 2, device="cpu")
    assert res.picks[0] == 4
    assert res.pick_distances[0] == np.inf
    # then the point farthest from (0, -10): (0, 1) at distance 11
    assert res.picks[1] == 2
    assert res.pick_distances[1] == pytest.approx(11.0)


def test_known_order_on_a_line():
    x = np.array([[0.0], [1.0], [2.5], [3.0], [10.0]])
    # Labeled 0: farthest is 10 (d=10), then 3 (d=3 to 0, 7 to 10), then 1 (d=1 to 0; 2.5 is 0.5
    # from 3), then 2.5 (0.5).
    res = k_center_greedy_details(x, [0], 10, device="cpu")
    np.testing.assert_array_equal(res.picks, [4, 3, 1, 2])
    np.testing.assert_allclose(res.pick_distances, [10, 3, 1, 0.5])
    np.testing.assert_allclose(res.min_distances, [0, 0, 0, 0, 0])


def test_labeled_never_picked_and_k_larger_than_pool():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 4))
    labeled = np.arange(0, 30, 3)
    picks = k_center_greedy(x, labeled, 100, device="cpu")
    assert sorted(picks) == sorted(set(range(30)) - set(labeled))


def test_all_labeled_and_zero_k():
    x = np.eye(4)
    assert k_center_greedy(x, range(4), 3, device="cpu").size == 0
    res = k_center_greedy_details(x, [1], 0, device="cpu")
    assert res.picks.size == 0
    np.testing.assert_allclose(res.min_distances, [np.sqrt(2), 0, np.sqrt(2), np.sqrt(2)])
    assert k_center_greedy(np.zeros((0, 3)), [], 5, device="cpu").size == 0


def test_no_centre_no_pick_means_inf_distance():
    res = k_center_greedy_details(np.eye(3), [], 0, device="cpu")
    assert np.isinf(res.min_distances).all()


def test_duplicates_never_picked_before_distinct_points():
    rng = np.random.default_rng(4)
    base = rng.normal(size=(10, 32)).astype(np.float32) * 3 + 50  # offset: cancellation risk
    x = np.concatenate([base, base, base[:5], base[:5]])  # 30 rows, 10 distinct
    res = k_center_greedy_details(x, [0], 29, device="cpu")
    first = res.picks[:9]
    assert len({tuple(r) for r in x[first]} | {tuple(x[0])}) == 10  # all distinct, none = labeled
    assert (res.pick_distances[:9] > 0).all()
    assert (res.pick_distances[9:] == 0).all()
    # zero-distance rows come by index, deterministically
    np.testing.assert_array_equal(res.picks[9:], sorted(res.picks[9:]))


def test_candidates_restrict_picks_and_distances():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(80, 6))
    cand = np.arange(20, 60)
    res = k_center_greedy_details(x, [1, 2, 25], 10, device="cpu", candidates=cand)
    picks, dists, min_d = reference(x, [1, 2, 25], 10, candidates=cand)
    np.testing.assert_array_equal(res.picks, picks)
    assert 25 not in res.picks
    outside = np.setdiff1d(np.arange(80), np.concatenate([cand, [1, 2]]))
    assert np.isnan(res.min_distances[outside]).all()
    np.testing.assert_allclose(res.min_distances[cand], min_d[cand], rtol=1e-6)


def test_device_is_resolved_at_call_time(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kc._resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert kc._resolve_device(None) == torch.device("cuda")
    assert kc._resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5000, 64)).astype(np.float32)
    labeled = rng.choice(5000, size=100, replace=False)
    cpu = k_center_greedy_details(x, labeled, 200, device="cpu")
    gpu = k_center_greedy_details(x, labeled, 200, device="cuda")
    np.testing.assert_array_equal(cpu.picks, gpu.picks)
    np.testing.assert_allclose(cpu.pick_distances, gpu.pick_distances, rtol=1e-4)


@pytest.mark.parametrize(
    ("x", "labeled", "k", "match"),
    [
        (np.zeros(5), [], 1, "2-D"),
        (np.zeros((5, 0)), [], 1, "d >= 1"),
        (np.array([[0.0, 1.0], [np.nan, 0.0]]), [], 1, "row 1 holds NaN"),
        (np.array([[0.0, np.inf], [1.0, 0.0]]), [], 1, "row 0 holds NaN or inf"),
        (np.array([[0.0, 1.0], [1.0, 0.0], [np.nan, 0.0]]), [2], 1, "row 2 holds NaN"),
        (np.zeros((3, 2)), [3], 1, r"in \[0, 3\).*got 3"),
        (np.zeros((3, 2)), [-1], 1, "got -1"),
        (np.zeros((3, 2)), [0, 1, 2, 0], 1, "4 entries but the pool has only 3 rows"),
        (np.zeros((3, 2)), np.array([True, False, True]), 1, "np.flatnonzero"),
        (np.zeros((3, 2)), [[0, 1]], 1, "1-D"),
        (np.zeros((3, 2)), [0], -1, "k must be"),
        (np.zeros((3, 2)), [0], 1.5, "k must be"),
        (np.array([["a", "b"]]), [], 1, "real numbers"),
    ],
)
def test_bad_input_is_refused(x, labeled, k, match):
    with pytest.raises(SelectionInputError, match=match):
        k_center_greedy(x, labeled, k, device="cpu")
