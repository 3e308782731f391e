"""The start-up check against a real Label Studio 1.23.2: what each token gives, and what the
commands say (the unit tests with closed ports and odd servers: tests/labelstudio/test_connection.py,
tests/test_cli.py)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import requests

from ml_backend.config import Settings
from ml_backend.devtools.local_services import RedisProcess, free_port
from ml_backend.labelstudio.connection import OK, UNAUTHORIZED, check_connection

pytestmark = pytest.mark.e2e

WRONG = "0" * 40


def _check(label_studio, key: str):
    return check_connection(Settings(label_studio_url=label_studio.url, label_studio_api_key=key))


@pytest.fixture(scope="module")
def pat(label_studio, ls_api):
    """The admin's personal access token (one per user: reused servers may already have one)."""
    reply = ls_api.session.post(f"{ls_api.url}/api/token/", timeout=30)
    if reply.status_code == 409:
        pytest.skip("the admin already has a personal access token on this reused Label Studio")
    assert reply.status_code in (200, 201), reply.text[:300]
    token = reply.json()["token"]
    yield token
    # Revoked again, so the admin can make the one the PAT end-to-end test needs.
    ls_api.session.post(f"{ls_api.url}/api/token/blacklist/", json={"refresh": token}, timeout=30)


def _revoke(ls_api, token: str) -> None:
    reply = ls_api.session.post(
        f"{ls_api.url}/api/token/blacklist/", json={"refresh": token}, timeout=30
    )
    assert reply.status_code == 204, reply.text[:300]


def test_legacy_token_is_accepted_and_names_the_user(label_studio):
    result = _check(label_studio, label_studio.token)
    assert (result.state, result.user) == (OK, label_studio.username)
    assert f"Label Studio at {label_studio.url} accepts the token" in result.message


def test_personal_access_token_is_accepted(label_studio, pat):
    assert _check(label_studio, pat).user == label_studio.username


def test_wrong_tampered_and_revoked_tokens_are_unauthorized(label_studio, ls_api, pat):
    wrong = _check(label_studio, WRONG)
    assert wrong.state == UNAUTHORIZED
    assert "refused LABEL_STUDIO_API_KEY (HTTP 401)" in wrong.message
    header, payload, signature = pat.split(".")
    tampered = f"{header}.{payload}.{signature[::-1]}"
    result = _check(label_studio, tampered)
    assert result.state == UNAUTHORIZED, result.message
    assert tampered not in result.message and signature not in result.message
    _revoke(ls_api, pat)
    revoked = _check(label_studio, pat)
    assert revoked.state == UNAUTHORIZED, revoked.message


def test_commands_say_the_token_is_wrong_and_keep_running(label_studio, tmp_path):
    redis = RedisProcess(tmp_path / "redis").start()  # its own: this worker must not touch others
    port = free_port()
    env = {
        "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": WRONG,
        "REDIS_URL": redis.url, "MODEL_DIR": str(tmp_path), "PRETRAINED": "none",
        "RQ_QUEUE": "connection-check", "PATH": "/usr/bin:/bin",
    }  # fmt: skip
    serve = subprocess.Popen(
        [sys.executable, "-m", "ml_backend", "serve", "--port", str(port)],
        env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    worker = subprocess.Popen(
        [sys.executable, "-m", "ml_backend", "worker"],
        env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        for process in (serve, worker):
            line = ""
            deadline = time.monotonic() + 60
            while "Label Studio:" not in line and time.monotonic() < deadline:
                line = process.stderr.readline()
            assert (
                f"Label Studio: UNAUTHORIZED: Label Studio at {label_studio.url} refused "
                "LABEL_STUDIO_API_KEY (HTTP 401)" in line
            ), line
            assert WRONG not in line
        deadline = time.monotonic() + 30
        health = None
        while time.monotonic() < deadline:
            try:
                health = requests.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except requests.RequestException:
                time.sleep(0.3)
        assert health and health["status"] == "UP" and health["label_studio"] == "unauthorized"
        assert worker.poll() is None and serve.poll() is None
    finally:
        for process in (serve, worker):
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        redis.stop()
