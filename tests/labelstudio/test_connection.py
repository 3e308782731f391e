"""The Label Studio connection check (``labelstudio.connection``) against real HTTP servers.

A real Label Studio is in ``tests/e2e/test_connection_live.py`` (token accepted, a wrong legacy
token, a tampered personal access token, the commands' messages); here the answers Label
Studio cannot be made to give on demand: a closed port, a host that does not resolve, another
web server at the URL, an answer that never comes.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time

from ls_fakes import LEGACY_TOKEN

from ml_backend.config import Settings
from ml_backend.labelstudio.connection import (
    CHECKING,
    NOT_CONFIGURED,
    OK,
    UNAUTHORIZED,
    UNREACHABLE,
    Connection,
    ConnectionMonitor,
    check_connection,
)


def _settings(url: str, key: str | None = LEGACY_TOKEN) -> Settings:
    return Settings(label_studio_url=url, label_studio_api_key=key)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_no_token_is_not_configured_without_asking_anyone():
    result = check_connection(_settings("http://127.0.0.1:9", key=None))
    assert result.state == NOT_CONFIGURED
    assert "LABEL_STUDIO_API_KEY is not set" in result.message
    assert "Account & Settings" in result.message


def test_ok_names_the_user(fake):
    fake.routes[("GET", "/api/current-user/whoami")] = lambda h: h.send(
        200, {"id": 3, "email": "ann@example.com", "username": "ann"}
    )
    result = check_connection(_settings(fake.ls.url))
    assert (result.state, result.user) == (OK, "ann@example.com")
    assert fake.requests_to("ls")[0][3] == f"Token {LEGACY_TOKEN}"


def test_refused_token_is_unauthorized_and_says_what_to_do(fake):
    result = check_connection(_settings(fake.ls.url, key="f" * 40))  # FakeLS answers 401
    assert result.state == UNAUTHORIZED
    assert "refused LABEL_STUDIO_API_KEY (HTTP 401)" in result.message
    assert "f" * 40 not in result.message


def test_expired_personal_access_token_is_unauthorized_before_any_request():
    claims = {"token_type": "refresh", "exp": int(time.time()) - 60}
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    pat = f"eyJhbGciOiJIUzI1NiJ9.{payload}.c2ln"
    result = check_connection(_settings(f"http://127.0.0.1:{_closed_port()}", key=pat))
    assert result.state == UNAUTHORIZED
    assert "expired personal access token" in result.message


def test_closed_port_is_unreachable():
    url = f"http://127.0.0.1:{_closed_port()}"
    result = check_connection(_settings(url))
    assert result.state == UNREACHABLE
    assert f"cannot reach Label Studio at {url} (connection refused)" in result.message
    assert "LABEL_STUDIO_URL" in result.message


def test_unresolvable_host_is_unreachable():
    result = check_connection(_settings("http://no-such-host.invalid:8080"))
    assert result.state == UNREACHABLE
    assert "no-such-host.invalid" in result.message


def test_another_web_server_at_the_url_is_unreachable_and_named(fake):
    fake.routes[("GET", "/api/current-user/whoami")] = lambda h: h.send(404, b"<html>nope</html>")
    result = check_connection(_settings(fake.ls.url))
    assert result.state == UNREACHABLE
    assert "does not look like Label Studio" in result.message


def test_html_instead_of_json_is_unreachable(fake):
    fake.routes[("GET", "/api/current-user/whoami")] = lambda h: h.send(
        200, b"<html>proxy login</html>", "text/html"
    )
    result = check_connection(_settings(fake.ls.url))
    assert result.state == UNREACHABLE
    assert "not Label Studio's JSON" in result.message


def test_server_error_is_unreachable(fake):
    fake.routes[("GET", "/api/current-user/whoami")] = [(502, b"bad gateway")]
    assert check_connection(_settings(fake.ls.url)).state == UNREACHABLE


def test_a_server_that_never_answers_times_out():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections (kernel backlog), never answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        result = check_connection(_settings(url), timeout=0.5)
        assert time.monotonic() - started < 5
        assert result.state == UNREACHABLE
        assert "no answer within 0.5 s" in result.message
    finally:
        listener.close()


def test_monitor_never_waits_for_a_slow_check():
    release = threading.Event()

    def slow(settings):
        release.wait(10)
        return Connection(OK, "fine", settings.label_studio_url, "ann", time.time())

    monitor = ConnectionMonitor(_settings("http://ls:8080"), check=slow)
    try:
        started = time.monotonic()
        assert monitor.current().state == CHECKING
        assert time.monotonic() - started < 0.5
        release.set()
        deadline = time.monotonic() + 5
        while monitor.current().state != OK and time.monotonic() < deadline:
            time.sleep(0.02)
        assert monitor.current().user == "ann"
    finally:
        monitor.stop()


def test_monitor_rechecks_and_reports_changes():
    answers = [UNREACHABLE, UNREACHABLE, OK]
    seen = []

    def check(settings):
        state = answers.pop(0) if answers else OK
        return Connection(state, state, settings.label_studio_url, None, time.time())

    monitor = ConnectionMonitor(
        _settings("http://ls:8080"),
        on_change=lambda r: seen.append(r.state),
        check=check,
        recheck_ok_s=0.05,
        recheck_failing_s=0.05,
    ).start()
    try:
        deadline = time.monotonic() + 5
        while seen != [UNREACHABLE, OK] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen == [UNREACHABLE, OK]  # one call per change, none for the repeat
    finally:
        monitor.stop()
