"""inference.py: shapes, probabilities, embeddings, empty pools, progress, memmaps."""

from __future__ import annotations

import numpy as np
import torch

from ml_backend.model.data import normalize
from ml_backend.model.inference import predict
from ml_backend.model.network import build_model, embed_and_classify


def test_predict_shapes_and_probabilities(weather_small):
    images, _ = weather_small
    model, _ = build_model(3, "none", seed=0)
    calls = []
    probs, embeddings = predict(
        model, images[:25], device="cpu", batch_size=8, progress=lambda d, t: calls.append((d, t))
    )
    assert probs.shape == (25, 3) and probs.dtype == np.float32
    assert embeddings.shape == (25, 512) and embeddings.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs >= 0).all() and np.isfinite(embeddings).all()
    assert calls[-1] == (25, 25)
    assert all(0 <= done <= total == 25 for done, total in calls)
    assert not model.training


def test_predict_matches_a_plain_forward_pass(weather_small):
    images, _ = weather_small
    model, _ = build_model(3, "none", seed=1)
    probs, embeddings = predict(model, images[:10], device="cpu", batch_size=4)
    with torch.inference_mode():
        logits, emb = embed_and_classify(model, normalize(torch.from_numpy(images[:10]), False))
    np.testing.assert_allclose(probs, logits.softmax(1).numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(embeddings, emb.numpy(), rtol=1e-4, atol=1e-5)


def test_predict_empty_pool():
    model, _ = build_model(4, "none")
    calls = []
    probs, embeddings = predict(
        model, np.zeros((0, 32, 32, 3), dtype=np.uint8), device="cpu", batch_size=8,
        progress=lambda d, t: calls.append((d, t)),
    )  # fmt: skip
    assert probs.shape == (0, 4) and probs.dtype == np.float32
    assert embeddings.shape == (0, 512) and embeddings.dtype == np.float32
    assert calls == [(0, 0)]


def test_predict_from_memmap(weather_small, tmp_path):
    images, _ = weather_small
    path = tmp_path / "pool.u8"
    images.tofile(path)
    pool = np.memmap(path, dtype=np.uint8, mode="r", shape=images.shape)
    model, _ = build_model(3, "none", seed=0)
    from_memmap, _ = predict(model, pool, device="cpu", batch_size=16)
    in_memory, _ = predict(model, images, device="cpu", batch_size=16)
    np.testing.assert_array_equal(from_memmap, in_memory)
