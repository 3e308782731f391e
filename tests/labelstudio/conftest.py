"""Fixtures for the Label Studio tests: the fake servers of ``ls_fakes`` and Settings for them."""

from __future__ import annotations

import pytest
from ls_fakes import LEGACY_TOKEN, FakeLS, Server, png_bytes

from ml_backend.config import Settings

__all__ = ["LEGACY_TOKEN", "FakeLS", "Server", "png_bytes"]  # tests/benchmarks import FakeLS here


@pytest.fixture
def fake():
    servers = FakeLS()
    yield servers
    servers.close()


@pytest.fixture
def settings(fake, tmp_path):
    return Settings(
        label_studio_url=fake.ls.url,
        label_studio_api_key=LEGACY_TOKEN,
        model_dir=tmp_path / "models",
        image_size=32,
        image_fetch_workers=4,
        image_fetch_timeout=0.5,
    )
