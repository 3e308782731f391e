"""Bad input gets a 4xx JSON error saying what was wrong; never a 500 or a traceback."""

from __future__ import annotations

import base64
import logging

import pytest

from ml_backend.errors import LabelConfigError
from ml_backend.server import create_app


@pytest.mark.parametrize(
    ("route", "data", "content_type", "message"),
    [
        ("/webhook", b"{not json", "application/json", "request body must be JSON"),
        ("/webhook", b"", "application/json", "request body must be JSON"),
        ("/webhook", b"[1, 2]", "application/json", "must be a JSON object, got list"),
        ("/webhook", b'{"project": {"id": 3}}', "application/json", 'no "action" string'),
        (
            "/webhook",
            b'{"action": "ANNOTATION_CREATED"}',
            "application/json",
            'no "project" object',
        ),
        (
            "/webhook",
            b'{"action": "START_TRAINING", "project": {}}',
            "application/json",
            "missing project.id",
        ),
        (
            "/webhook",
            b'{"action": "START_TRAINING", "project": {"id": "abc"}}',
            "text/plain",
            "project.id must be a project id number, got 'abc'",
        ),
        (
            "/webhook",
            b'{"action": "START_TRAINING", "project": {"id": true}}',
            "application/json",
            "project.id must be a project id number, got bool",
        ),
        (
            "/webhook",
            b'{"action": "START_TRAINING", "project": {"id": -4}}',
            "application/json",
            "must be a project id number",
        ),
        ("/train", b"{}", "application/json", "missing project"),
        ("/train", b'{"project": "x.1"}', "application/json", "must be a project id number"),
        ("/setup", b'{"schema": "<View/>"}', "application/json", "missing project"),
        (
            "/predict",
            b'{"tasks": "nope", "project": 1}',
            "application/json",
            '"tasks" must be a list',
        ),
        ("/predict", b'{"tasks": []}', "application/json", "missing project"),
    ],
)
def test_bad_bodies_are_400_with_a_reason(client, route, data, content_type, message):
    response = client.post(route, data=data, content_type=content_type)
    assert response.status_code == 400, response.get_data(as_text=True)
    assert message in response.get_json()["error"]


def test_unknown_route_and_method_are_json(client):
    response = client.get("/nope")
    assert response.status_code == 404
    assert "error" in response.get_json()
    response = client.get("/webhook")
    assert response.status_code == 405
    assert "error" in response.get_json()


def test_oversized_body_is_413(settings, redis_conn):
    app = create_app(settings.with_overrides(max_request_bytes=2048))
    response = app.test_client().post("/webhook", data=b"x" * 4096, content_type="application/json")
    assert response.status_code == 413
    assert "MAX_REQUEST_BYTES" in response.get_json()["error"]


def _auth(user: str, password: str) -> dict:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_basic_auth_guards_everything_but_health(settings, redis_conn):
    app = create_app(settings.with_overrides(basic_auth_user="ls", basic_auth_pass="s3cret"))
    client = app.test_client()
    assert client.get("/health").status_code == 200
    for headers in (
        {},
        _auth("ls", "wrong"),
        _auth("other", "s3cret"),
        {"Authorization": "Basic !!!"},
        {"Authorization": "Bearer s3cret"},
    ):
        response = client.post("/train", json={"project": 1}, headers=headers)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Basic realm=")
        assert "basic auth" in response.get_json()["error"]
        assert client.get("/status", headers=headers).status_code == 401
        assert client.get("/metrics", headers=headers).status_code == 401
    response = client.post("/train", json={"project": 1}, headers=_auth("ls", "s3cret"))
    assert response.status_code == 201


def test_control_routes_refuse_unauthenticated_calls_and_change_nothing(settings, redis_conn):
    """With credentials set, a webhook without them (what Label Studio sends until the project's
    webhook carries the header) and every other control route are refused before anything is
    read or enqueued."""
    app = create_app(settings.with_overrides(basic_auth_user="ls", basic_auth_pass="s3cret"))
    client = app.test_client()
    webhook = {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"id": 1}}
    calls = [
        ("/webhook", webhook),
        ("/setup", {"project": "3.1", "extra_params": {"queue_batch": 5}}),
        ("/predict", {"tasks": [{"id": 1, "data": {"image": "http://10.0.0.1/a.png"}}], "project": 3}),
        ("/train", {"project": 3}),
    ]  # fmt: skip
    for path, body in calls:
        response = client.post(path, json=body)
        assert response.status_code == 401, path
    assert redis_conn.keys("*") == []  # no job, no marker, no params, no status
    metrics = client.get("/metrics", headers=_auth("ls", "s3cret")).get_data(as_text=True)
    assert "mlb_webhooks_total{" not in metrics
    response = client.post("/webhook", json=webhook, headers=_auth("ls", "s3cret"))
    assert response.status_code == 201 and response.get_json()["status"] == "enqueued"


def test_listen_host_defaults_to_loopback_without_credentials(settings):
    from ml_backend.server.serve import is_loopback, listen_host

    assert (
        listen_host(settings, None)[0] == "127.0.0.1"
        and "127.0.0.1 only" in listen_host(settings, None)[1]
    )
    host, note = listen_host(settings, "0.0.0.0")
    assert host == "0.0.0.0" and note.startswith("WARNING")
    assert listen_host(settings, "::1") == ("::1", None)
    secured = settings.with_overrides(basic_auth_user="ls", basic_auth_pass="s3cret")
    assert listen_host(secured, None) == ("0.0.0.0", None)
    assert listen_host(secured, "10.1.2.3") == ("10.1.2.3", None)
    assert [is_loopback(h) for h in ("localhost", "127.0.0.2", "[::1]", "0.0.0.0", "web")] == [
        True, True, True, False, False,
    ]  # fmt: skip


def test_backend_errors_map_to_their_status_and_crashes_to_500(settings, redis_conn, caplog):
    app = create_app(settings)

    @app.get("/boom-config")
    def boom_config():
        raise LabelConfigError("the project's config has no Choices tag")

    @app.get("/boom")
    def boom():
        raise KeyError("secret detail")

    client = app.test_client()
    response = client.get("/boom-config")
    assert response.status_code == 422
    assert response.get_json() == {"error": "the project's config has no Choices tag"}
    with caplog.at_level(logging.ERROR):
        response = client.get("/boom")
    assert response.status_code == 500
    assert response.get_json() == {"error": "internal error"}
    assert "secret detail" not in response.get_data(as_text=True)
    assert "Traceback" in caplog.text or any(r.exc_info for r in caplog.records)
