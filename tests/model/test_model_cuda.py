"""The CUDA paths (pinned buffers, async copies, AMP, channels_last); skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_backend.model.inference import predict
from ml_backend.model.network import build_model
from ml_backend.model.train import fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_training_learns(weather_train):
    images, labels = weather_train
    model, _ = build_model(3, "none", seed=0)
    result = fit(
        model, images, labels, epochs=8, batch_size=32, lr=3e-3, val_fraction=0.3, seed=0,
        device="cuda",
    )  # fmt: skip
    assert result.device.startswith("cuda") and result.amp in ("bf16", "fp16")
    assert result.val_accuracy >= 0.8, result.history


def test_cuda_predict_matches_cpu(weather_small, tmp_path):
    images, _ = weather_small
    path = tmp_path / "pool.u8"
    images.tofile(path)
    pool = np.memmap(path, dtype=np.uint8, mode="r", shape=images.shape)
    model, _ = build_model(3, "none", seed=0)
    cpu_probs, cpu_emb = predict(model, images, device="cpu", batch_size=16)
    calls = []
    probs, emb = predict(
        model, pool, device="cuda", batch_size=7, progress=lambda d, t: calls.append((d, t))
    )
    assert calls[-1] == (len(images), len(images))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)
    # Mixed precision: close, not equal.
    np.testing.assert_allclose(probs, cpu_probs, atol=0.03)
    cosine = (emb * cpu_emb).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(cpu_emb, axis=1)
    assert cosine.min() > 0.99
