"""The command line, run as a user runs it: ``python -m ml_backend ...`` in a subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from rq import Queue

from tests.conftest import free_port


def cli_env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL",)}
    env.update(MODEL_DIR=str(tmp_path / "models"), PRETRAINED="none", LOG_LEVEL="INFO", **extra)
    return env


def cli(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ml_backend", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_config_error_is_one_line_and_exit_2(tmp_path):
    result = cli("worker", env=cli_env(tmp_path, IMAGE_SIZE="big"))
    assert result.returncode == 2
    assert (
        result.stderr.strip() == "configuration error: IMAGE_SIZE must be a whole number, got 'big'"
    )


@pytest.mark.parametrize("command", ["serve", "worker", "refresh --project 3"])
def test_redis_url_required(tmp_path, command):
    result = cli(*command.split(), env=cli_env(tmp_path))
    assert result.returncode == 2
    assert "REDIS_URL is required" in result.stderr
    assert "Traceback" not in result.stderr


def test_refresh_enqueues_then_coalesces(tmp_path, redis_conn, redis_url):
    env = cli_env(tmp_path, REDIS_URL=redis_url, RQ_QUEUE="cli-test")
    first = cli("refresh", "--project", "42", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "project 42: enqueued"
    assert cli("refresh", "--project", "42", env=env).stdout.strip() == (
        "project 42: already_waiting"
    )
    jobs = Queue("cli-test", connection=redis_conn).get_jobs()
    assert [job.args[:2] for job in jobs] == [(42, "refresh")]


def test_help_lists_commands(tmp_path):
    result = cli("--help", env=cli_env(tmp_path))
    assert result.returncode == 0
    for command in ("run", "serve", "worker", "refresh", "simulate", "demo"):
        assert command in result.stdout


def _get_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


def test_run_starts_everything_and_sigterm_stops_all_children(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ml_backend", "run", "--host", "127.0.0.1", "--port", str(port)],
        env=cli_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = [process.stdout.readline() for _ in range(3)]
        text = "".join(lines)
        assert "embedded redis-server" in text and "unix://" in text, text
        assert f"listening on http://127.0.0.1:{port}" in text, text
        pids = [int(p) for p in re.findall(r"pid (\d+)", text)]
        assert len(pids) == 3, text
        health = None
        for _ in range(150):
            health = _get_json(f"http://127.0.0.1:{port}/health")
            if health:
                break
            time.sleep(0.2)
        assert health == {
            "status": "UP",
            "model_class": "ResNet18ActiveLearner",
            "redis": "ok",
            "pretrained": {"setting": "none", "loaded": None},
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/webhook",
            method="POST",
            data=json.dumps({"action": "PROJECT_UPDATED", "project": {"id": 1}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=40) == 0
        rest = process.stdout.read()
        assert "stopped" in rest
        for pid in pids:
            assert not _alive(pid), f"pid {pid} survived SIGTERM"
        assert (tmp_path / "models" / "redis" / "queue.rdb").exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("command", ["simulate", "demo"])
def test_delegated_commands_show_their_help_or_say_they_are_missing(tmp_path, command):
    result = cli(command, "--help", env=cli_env(tmp_path))
    assert "Traceback" not in result.stderr
    if result.returncode == 0:
        assert f"python -m ml_backend {command}" in result.stdout
    else:
        assert result.returncode == 2
        assert f"`{command}` is not available" in result.stderr


def _serve_until_listening(args: list[str], env: dict) -> tuple[str, str]:
    """Start ``serve``, wait for gunicorn's "Listening at", stop it; returns (address, stderr)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "ml_backend", "serve", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"Listening at: http://(\S+)", line)
            if found:
                return found.group(1), "".join(lines)
        raise AssertionError("serve did not start listening:\n" + "".join(lines))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.parametrize(
    ("extra_env", "args", "address", "said"),
    [
        ({}, [], "127.0.0.1", "listening on 127.0.0.1 only: BASIC_AUTH_USER and BASIC_AUTH_PASS"),
        ({}, ["--host", "0.0.0.0"], "0.0.0.0", "WARNING"),
        ({"BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw-1"}, [], "0.0.0.0", None),
        ({"BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw-1"}, ["--host", "127.0.0.1"], "127.0.0.1", None),
    ],
)  # fmt: skip
def test_serve_listens_on_loopback_unless_credentials_are_set(
    tmp_path, redis_url, extra_env, args, address, said
):
    port = free_port()
    env = cli_env(tmp_path, REDIS_URL=redis_url, **extra_env)
    bound, stderr = _serve_until_listening([*args, "--port", str(port)], env)
    assert bound == f"{address}:{port}"
    if said is None:
        assert "BASIC_AUTH" not in stderr, stderr
    else:
        assert said in stderr, stderr
    if said == "WARNING":
        assert "without BASIC_AUTH_USER/BASIC_AUTH_PASS: anyone who reaches this port" in stderr
    assert "pw-1" not in stderr


def test_run_says_it_listens_on_loopback_only_without_credentials(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ml_backend", "run", "--port", str(port)],
        env=cli_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        text = "".join(process.stdout.readline() for _ in range(3))
        assert (
            f"listening on http://127.0.0.1:{port} (127.0.0.1 only: BASIC_AUTH_USER/BASIC_AUTH_PASS "
            "not set)" in text
        ), text
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
