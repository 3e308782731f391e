"""The embedding cache: rows per (image, backbone), computed once, exact, bounded on disk."""

import time

import numpy as np
import pytest
import torch

from ml_backend.model import embeddings as emb
from ml_backend.model.embeddings import (
    EmbeddingCache,
    backbone_key,
    cached_embeddings,
    head_probs,
    image_key,
)
from ml_backend.model.inference import predict
from ml_backend.model.network import new_resnet18


@pytest.fixture
def model():
    torch.manual_seed(0)
    return new_resnet18(3).eval()


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)


def keys_of(n, start=0):
    return np.array([image_key(f"/data/upload/{i}.png") for i in range(start, start + n)], "S16")


class Counting:
    """The embed function of a job, counting the images it is asked for."""

    def __init__(self, model):
        self.model, self.seen = model, 0

    def __call__(self, images):
        self.seen += len(images)
        return predict(self.model, images, device="cpu", batch_size=5)[1]


def test_rows_are_computed_once_and_equal_a_fresh_pass(tmp_path, model, images):
    cache, embed = EmbeddingCache(tmp_path, 1), Counting(model)
    probs, fresh = predict(model, images, device="cpu", batch_size=4)
    first, info = cached_embeddings(cache, model, images[:8], keys_of(8), embed)
    assert info["computed"] == 8 and info["cached"] == 0 and embed.seen == 8
    # Four new images and the eight known ones, in another order: only the four are computed.
    order = np.array([11, 3, 8, 0, 9, 10, 1, 2, 4, 5, 6, 7])
    again, info = cached_embeddings(cache, model, images[order], keys_of(12)[order], embed)
    assert info["computed"] == 4 and info["cached"] == 8 and embed.seen == 12
    np.testing.assert_allclose(first, fresh[:8], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(again, fresh[order], rtol=1e-5, atol=1e-6)
    # The head on cached rows gives what a full forward pass gives.
    np.testing.assert_allclose(head_probs(model, again), probs[order], rtol=1e-4, atol=1e-6)


def test_another_backbone_or_size_is_another_cache_but_fc_is_not(model):
    key = backbone_key(model, 32)
    assert backbone_key(model, 64) != key
    with torch.no_grad():
        model.fc.weight.add_(1.0)  # a new head on the same frozen backbone: same embeddings
    assert backbone_key(model, 32) == key
    with torch.no_grad():
        model.layer4[1].bn2.running_mean.add_(0.5)  # any backbone weight or buffer changes it
    assert backbone_key(model, 32) != key


def test_without_keys_nothing_is_stored(tmp_path, model, images):
    cache, embed = EmbeddingCache(tmp_path, 1), Counting(model)
    cached_embeddings(cache, model, images, None, embed)
    cached_embeddings(cache, model, images, None, embed)
    assert embed.seen == 24 and not (tmp_path / "1").exists()


def test_parts_are_merged_newest_row_first(tmp_path, monkeypatch):
    monkeypatch.setattr(emb, "MAX_PARTS", 3)
    cache = EmbeddingCache(tmp_path, 1)
    for round_ in range(5):  # the same two keys every time, new values each round
        cache.add("b", keys_of(2), np.full((2, 512), round_, np.float32))
        cache.add("b", keys_of(1, start=10 + round_), np.full((1, 512), 10 + round_, np.float32))
    assert len(list((tmp_path / "1" / "embeddings" / "b").glob("part-*.npz"))) <= 3
    vectors, missing = cache.lookup("b", np.concatenate([keys_of(2), keys_of(5, start=10)]))
    assert len(missing) == 0
    assert vectors[:2, 0].tolist() == [4, 4]
    assert vectors[2:, 0].tolist() == [10, 11, 12, 13, 14]


def test_lookup_in_any_order_with_repeated_keys_and_later_parts_winning(tmp_path):
    cache = EmbeddingCache(tmp_path, 1)
    keys = keys_of(6)
    cache.add("b", keys, np.arange(6, dtype=np.float32)[:, None].repeat(512, axis=1))
    aligned, missing = cache.lookup("b", keys)  # the pool in the order it was stored: no copy
    assert len(missing) == 0 and aligned[:, 0].tolist() == [0, 1, 2, 3, 4, 5]
    asked = np.concatenate([keys[::-1], keys[2:3], keys_of(1, start=99)])
    vectors, missing = cache.lookup("b", asked)  # reversed, a key twice, one unknown
    assert vectors[:, 0].tolist() == [5, 4, 3, 2, 1, 0, 2, 0] and missing.tolist() == [7]
    cache.add("b", keys[1:2], np.full((1, 512), 50, np.float32))  # a newer row of key 1
    vectors, missing = cache.lookup("b", keys)
    assert len(missing) == 0 and vectors[:, 0].tolist() == [0, 50, 2, 3, 4, 5]
    vectors[0] = 7  # the rows are the caller's to change
    assert cache.lookup("b", keys)[0][0, 0] == 0


def test_only_the_most_recently_used_backbones_are_kept(tmp_path):
    cache = EmbeddingCache(tmp_path, 1, keep=2)
    one = np.zeros((1, 512), np.float32)
    for name in ("old", "used", "new"):
        time.sleep(0.02)  # distinct modification times
        cache.add(name, keys_of(1), one)
        if name == "used":
            time.sleep(0.02)
            cache.lookup("old", keys_of(1))  # "old" is used again after "used" was written
    # "old" was used after "used" was written; "new" is newest: "used" goes.
    assert sorted(p.name for p in (tmp_path / "1" / "embeddings").iterdir()) == ["new", "old"]


def test_a_damaged_part_is_ignored_and_recomputed(tmp_path, model, images):
    cache, embed = EmbeddingCache(tmp_path, 1), Counting(model)
    cached_embeddings(cache, model, images, keys_of(12), embed)
    (part,) = (tmp_path / "1" / "embeddings").glob("*/part-*.npz")
    part.write_bytes(b"not a zip")
    again, info = cached_embeddings(cache, model, images, keys_of(12), embed)
    assert info["computed"] == 12
    fresh = predict(model, images, device="cpu", batch_size=4)[1]
    np.testing.assert_allclose(again, fresh, rtol=1e-5, atol=1e-6)


def test_parts_are_read_once_per_process_and_forgotten_when_merged_away(tmp_path, monkeypatch):
    """A part read before comes from memory (read-only, no second ``np.load``); a part merged
    away leaves the memo; a part larger than ``MEMO_BYTES`` is read every time."""
    cache = EmbeddingCache(tmp_path, 1)
    keys = keys_of(4)
    cache.add("b", keys, np.arange(4, dtype=np.float32)[:, None].repeat(512, axis=1))
    loads, real_load = [], np.load
    monkeypatch.setattr(np, "load", lambda path, *a, **k: loads.append(path) or real_load(path))
    first, _ = cache.lookup("b", keys)
    second, missing = cache.lookup("b", keys)
    assert len(loads) == 1 and second is first and len(missing) == 0
    with pytest.raises(ValueError, match="read-only"):
        second[0] = 7
    monkeypatch.setattr(emb, "MAX_PARTS", 1)
    cache.add("b", keys[:1], np.full((1, 512), 50, np.float32))  # merged into one new part
    loads.clear()
    merged, _ = cache.lookup("b", keys)
    assert merged[:, 0].tolist() == [50, 1, 2, 3] and len(loads) == 1
    folder = str(tmp_path / "1" / "embeddings" / "b")
    assert [name[0] for name in emb._memo if name[0].startswith(folder)] == [str(loads[0])]
    monkeypatch.setattr(emb, "MEMO_BYTES", 100)
    emb._forget(tmp_path / "1" / "embeddings" / "b")
    cache.lookup("b", keys)
    cache.lookup("b", keys)
    assert len(loads) == 3
