"""Fixtures for the selection tests: one torch thread (the two CPU cores are shared)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Other suites run at the same time on two cores; torch's threaded kernels thrash then.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
