"""Redis stops and comes back: /webhook answers 503 meanwhile, then works again; nothing crashes."""

from __future__ import annotations

import pytest

from ml_backend.server import create_app
from tests.conftest import RedisServer


@pytest.fixture
def own_redis():
    server = RedisServer().start()
    yield server
    server.stop()


def test_webhook_503_while_redis_is_down_then_recovers(settings, own_redis):
    app = create_app(settings.with_overrides(redis_url=own_redis.url))
    client = app.test_client()
    hook = {"action": "ANNOTATION_CREATED", "project": {"id": 3}}
    assert client.post("/webhook", json=hook).get_json()["status"] == "enqueued"

    own_redis.stop()
    response = client.post("/webhook", json=hook)
    assert response.status_code == 503
    error = response.get_json()["error"]
    assert "Redis is unavailable" in error and "REDIS_URL" in error
    health = client.get("/health")
    assert health.status_code == 200
    assert health.get_json()["redis"].startswith("unavailable: ")
    assert client.get("/status").status_code == 503
    assert client.post("/setup", json={"project": "3.1"}).status_code == 503
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert "mlb_redis_up 0.0" in metrics.get_data(as_text=True)

    own_redis.start()  # same port, empty data (no persistence)
    response = client.post("/webhook", json=hook)
    assert response.status_code == 201
    assert response.get_json()["status"] == "enqueued"
    assert client.get("/health").get_json()["redis"] == "ok"


def test_app_without_redis_url_answers_health_and_503(settings):
    client = create_app(settings.with_overrides(redis_url=None)).test_client()
    assert "not configured" in client.get("/health").get_json()["redis"]
    response = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert response.status_code == 503
    assert "REDIS_URL is not set" in response.get_json()["error"]
