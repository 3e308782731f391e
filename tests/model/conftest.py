"""Fixtures for the model tests: small generated weather images, one CPU thread."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_backend.devtools import synthetic


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    # The test machine has two cores shared with other suites running at the same time; with
    # one thread per process, torch does not thrash when they overlap (2 threads ran 3x slower).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def weather_arrays(n: int, seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic images as ``uint8 [n, size, size, 3]`` plus int64 label indices."""
    images, labels = synthetic.make_dataset(n, seed=seed, size=size)
    x = np.stack([np.asarray(img, dtype=np.uint8) for img in images])
    y = np.array([synthetic.LABELS.index(label) for label in labels], dtype=np.int64)
    return x, y


@pytest.fixture(scope="session")
def weather_small() -> tuple[np.ndarray, np.ndarray]:
    return weather_arrays(60, seed=3)


@pytest.fixture(scope="session")
def weather_train() -> tuple[np.ndarray, np.ndarray]:
    return weather_arrays(150, seed=1)


@pytest.fixture(scope="session")
def weather_pool() -> tuple[np.ndarray, np.ndarray]:
    """64 images of 32 px: a pool for pretraining and the low-label recipe."""
    return weather_arrays(64, seed=4, size=32)
