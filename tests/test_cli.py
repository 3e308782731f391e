"""The command line, run as a user runs it: ``python -m ml_backend ...`` in a subprocess."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from rq import Queue

from ml_backend.jobs.state import StatusStore
from ml_backend.labelstudio.connection import RECHECK_FAILING_S
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
        result.stderr.strip()
        == "configuration error: IMAGE_SIZE must be auto or a whole number, got 'big'"
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
    # --all-tasks: a flag the waiting job picks up (no second job)
    store = StatusStore(redis_conn)
    assert not store.predict_all_requested(42)
    third = cli("refresh", "--project", "42", "--all-tasks", env=env)
    assert third.stdout.strip() == "project 42: already_waiting (every unlabeled task)"
    assert store.predict_all_requested(42) and len(Queue("cli-test", connection=redis_conn)) == 1


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
            "label_studio": "not configured",
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


# -- the Label Studio check at start (real Label Studio: tests/e2e/test_connection_live.py) ----------


def _closed_port() -> int:
    return free_port()  # nobody listens there


def _read_until(stream, needle: str, timeout_s: float = 60) -> str:
    """Lines from ``stream`` until one contains ``needle``; fails with what was read."""
    lines = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return "".join(lines)
    raise AssertionError(f"{needle!r} not seen; got:\n" + "".join(lines))


def _stop(process: subprocess.Popen, timeout: float = 30) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _health(port: int, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = _get_json(f"http://127.0.0.1:{port}/health")
        if health:
            return health
        time.sleep(0.2)
    raise AssertionError(f"no /health on port {port}")


def test_serve_without_token_says_so_and_serves(tmp_path, redis_url):
    port = free_port()
    env = cli_env(tmp_path, REDIS_URL=redis_url)
    env.pop("LABEL_STUDIO_API_KEY", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "ml_backend", "serve", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        text = _read_until(process.stderr, "Listening at")
        assert "Label Studio: NOT CONFIGURED: LABEL_STUDIO_API_KEY is not set" in text, text
        assert "Account & Settings" in text and "Traceback" not in text
        assert _health(port)["label_studio"] == "not configured"
    finally:
        _stop(process)


def test_worker_with_unreachable_label_studio_says_so_and_keeps_running(tmp_path, redis_url):
    url = f"http://127.0.0.1:{_closed_port()}"
    env = cli_env(
        tmp_path, REDIS_URL=redis_url, LABEL_STUDIO_URL=url, LABEL_STUDIO_API_KEY="a" * 40
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "ml_backend", "worker"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        text = _read_until(process.stderr, "Listening on")
        assert (
            f"Label Studio: UNREACHABLE: cannot reach Label Studio at {url} (connection refused)"
            in text
        )
        assert "LABEL_STUDIO_URL" in text and "Traceback" not in text and "a" * 40 not in text
        time.sleep(1)
        assert process.poll() is None, "the worker must keep running"
    finally:
        _stop(process)


class _WhoAmI(http.server.BaseHTTPRequestHandler):
    """Label Studio's whoami, for a token the test decides (401 otherwise)."""

    token = "b" * 40

    def log_message(self, *args):
        pass

    def do_GET(self):
        ok = self.headers.get("Authorization") == f"Token {self.token}"
        body = json.dumps({"id": 1, "email": "ann@example.com"} if ok else {"detail": "no"})
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())


def test_serve_rechecks_and_health_follows_label_studio(tmp_path, redis_url):
    """Unreachable at start, then Label Studio comes up: /health says ok without a restart
    (re-checked every RECHECK_FAILING_S while failing)."""
    ls_port, port = free_port(), free_port()
    env = cli_env(
        tmp_path, REDIS_URL=redis_url, LABEL_STUDIO_URL=f"http://127.0.0.1:{ls_port}",
        LABEL_STUDIO_API_KEY=_WhoAmI.token,
    )  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "ml_backend", "serve", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    server = None
    try:
        assert "Label Studio: UNREACHABLE" in _read_until(process.stderr, "Listening at")
        assert _health(port)["label_studio"] == "unreachable"
        server = http.server.ThreadingHTTPServer(("127.0.0.1", ls_port), _WhoAmI)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        deadline = time.monotonic() + RECHECK_FAILING_S + 15
        while _health(port)["label_studio"] != "ok":
            assert time.monotonic() < deadline, "the web app did not re-check Label Studio"
            time.sleep(0.5)
        assert "Label Studio is now ok" in _read_until(process.stderr, "Label Studio is now")
    finally:
        _stop(process)
        if server is not None:
            server.shutdown()
            server.server_close()


def test_run_reports_the_check_once(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}"
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ml_backend", "run", "--port", str(port)],
        env=cli_env(tmp_path, LABEL_STUDIO_URL=url, LABEL_STUDIO_API_KEY="a" * 40),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        text = _read_until(process.stdout, "label studio:")
        assert f"label studio: UNREACHABLE: cannot reach Label Studio at {url}" in text, text
        assert _health(port)["label_studio"] in ("unreachable", "checking")
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=40)[0]
        assert "Label Studio: UNREACHABLE" not in text + rest  # the children stay quiet
    finally:
        _stop(process)


# -- stopping `run`: quickly, quietly, and nothing left behind ----------------------------------


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children of children too), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _start_run(tmp_path, port: int) -> tuple[subprocess.Popen, str, dict[str, int]]:
    """``run`` in a process group of its own; returns it, its banner and the printed pids."""
    process = subprocess.Popen(
        [sys.executable, "-m", "ml_backend", "run", "--port", str(port)],
        env=cli_env(tmp_path, RUN_WORKERS="2"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    banner = _read_until(process.stdout, "label studio:")
    pids = {
        name: int(pid)
        for name, pid in re.findall(r"^(redis|web|worker(?:-\d+)?): .*?pid (\d+)", banner, re.M)
    }
    # RUN_WORKERS=2: one worker can pretrain while the other trains; both die with run
    assert set(pids) == {"redis", "web", "worker", "worker-2"}, banner
    _health(port)
    return process, banner, pids


def _wait_gone(pids, timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    left = {p for p in pids if _alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = {p for p in left if _alive(p)}
    return left


@pytest.mark.parametrize("how", ["group", "run only"])
def test_nothing_outlives_a_killed_run(tmp_path, how):
    """SIGKILL to run's process group (or to run alone): the embedded redis-server, gunicorn
    and its worker process, and the RQ worker all go (the kernel signals them when run dies)."""
    process, banner, pids = _start_run(tmp_path, free_port())
    everything = _descendants(process.pid)
    assert set(pids.values()) <= everything, (pids, everything)
    try:
        if how == "group":
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
        process.wait(timeout=10)
        left = _wait_gone(everything, 15)
        assert not left, {p: Path(f"/proc/{p}/cmdline").read_bytes() for p in left}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        for pid in everything:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_stopping_run_while_a_job_runs_is_quick_and_quiet(tmp_path):
    """A job that would run two more minutes: SIGTERM stops everything within ~10 s; the job
    is recorded as failed (RQ's cold stop); the log has no alarming line."""
    import redis as redis_lib

    process, banner, pids = _start_run(tmp_path, free_port())
    everything = _descendants(process.pid)
    try:
        socket_path = re.search(r"at unix://(\S+)", banner).group(1)
        connection = redis_lib.Redis(unix_socket_path=socket_path)
        job = Queue("ml-backend", connection=connection).enqueue(time.sleep, 120)
        deadline = time.monotonic() + 30
        while job.get_status(refresh=True) != "started":
            assert time.monotonic() < deadline, "the worker did not start the job"
            time.sleep(0.1)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=30)[0]
        took = time.monotonic() - started
        assert process.returncode == 0
        assert took < 11, f"stopping took {took:.1f} s"
        assert not _wait_gone(everything, 5)
        log_text = banner + rest
        # RQ logs the interrupted job's traceback (it is also kept in its FailedJobRegistry);
        # nothing about Redis or killing may show up.
        for alarming in ("Redis shutdown failed", "sending sigterm", "forcefully killing"):
            assert alarming not in log_text, log_text
        assert rest.rstrip().endswith("stopped")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
