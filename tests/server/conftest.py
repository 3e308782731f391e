"""An app on the test Redis, and its test client."""

from __future__ import annotations

import pytest

from ml_backend.server import create_app


@pytest.fixture
def app(settings, redis_conn):
    return create_app(settings)


@pytest.fixture
def client(app):
    return app.test_client()
