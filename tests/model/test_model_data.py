"""data.py: device batches from uint8 arrays (memmaps too), normalisation, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_backend.model.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    augment,
    check_images,
    iter_device_batches,
    normalize,
)


def test_batches_follow_indices_including_memmap(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "pool.u8"
    images.tofile(path)
    pool = np.memmap(path, dtype=np.uint8, mode="r", shape=images.shape)
    indices = [slice(0, 4), np.array([9, 1, 5]), slice(4, 10)]
    batches = list(iter_device_batches(pool, indices, torch.device("cpu")))
    assert [b.shape[0] for b in batches] == [4, 3, 6]
    for index, batch in zip(indices, batches, strict=True):
        assert batch.dtype == torch.uint8
        np.testing.assert_array_equal(batch.numpy(), images[index])


def test_consumer_stopping_early_does_not_hang():
    images = np.zeros((100, 4, 4, 3), dtype=np.uint8)
    indices = [slice(i, i + 1) for i in range(100)]
    for k, _ in enumerate(iter_device_batches(images, indices, torch.device("cpu"))):
        if k == 2:
            break


def test_producer_errors_reach_the_caller():
    images = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    with pytest.raises(IndexError):
        list(iter_device_batches(images, [np.array([0]), np.array([7])], torch.device("cpu")))


def test_check_images_rejects_wrong_layout():
    with pytest.raises(ValueError, match="uint8"):
        check_images(np.zeros((2, 3, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        check_images(np.zeros((2, 8, 8, 3), dtype=np.float32))


def test_normalize_uses_imagenet_statistics():
    batch = torch.full((1, 2, 2, 3), 255, dtype=torch.uint8)
    x = normalize(batch, channels_last=False)
    assert x.shape == (1, 3, 2, 2) and x.dtype == torch.float32
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor(expected))
    assert normalize(batch, channels_last=True).is_contiguous(memory_format=torch.channels_last)


def test_augment_is_seeded_and_light():
    x = torch.rand(16, 3, 24, 24)
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    c = augment(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    # A crop of a constant image stays constant (no black borders from padding).
    flat = torch.full((4, 3, 16, 16), 0.5)
    torch.testing.assert_close(augment(flat, torch.Generator().manual_seed(0)), flat)


def test_augment_flips_some_images():
    # Left half dark, right half bright: a mirrored image has its bright side on the left.
    x = torch.zeros(64, 1, 16, 16)
    x[..., 8:] = 1.0
    out = augment(x, torch.Generator().manual_seed(0), min_scale=1.0, max_ratio=1.0)
    mirrored = (out[..., :8].mean(dim=(1, 2, 3)) > out[..., 8:].mean(dim=(1, 2, 3))).sum().item()
    assert 15 < mirrored < 49
