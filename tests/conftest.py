"""Shared fixtures: a real redis-server for the session, flushed around each test, and Settings.

Set REDIS_URL in the environment to use an existing Redis instead (tests flush its database, so
point it at a throw-away one).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import redis as redis_lib

from ml_backend.config import Settings
from ml_backend.devtools.local_services import redis_server_args, wait_for_redis


@pytest.fixture(scope="session")
def missing_real_part():
    """``missing_real_part(reason)``: skip when Label Studio or Chromium is missing; fail under CI.

    CI installs every real part (`make test`), so a missing one there is a broken install, and a
    skipped end-to-end test must not let it pass.
    """

    def missing(reason: str) -> None:
        if os.environ.get("CI"):
            pytest.fail(f"CI: {reason}")
        pytest.skip(reason)

    return missing


def free_port() -> int:
    """A TCP port nobody listens on right now (127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A throw-away ``redis-server`` on 127.0.0.1 (no persistence); can be stopped and restarted."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.process = subprocess.Popen(
            redis_server_args(binary, self.port),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_redis(self.url)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture(scope="session")
def redis_server():
    """The session's redis-server (or None when REDIS_URL points at an existing one)."""
    if os.environ.get("REDIS_URL"):
        yield None
        return
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    """URL of a real Redis, flushed by ``redis_conn`` around each test that uses it."""
    return os.environ["REDIS_URL"] if redis_server is None else redis_server.url


@pytest.fixture
def redis_conn(redis_url):
    """A client on the test Redis, with the database flushed before and after the test."""
    client = redis_lib.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def settings(redis_url, tmp_path: Path) -> Settings:
    """Settings for tests: the test Redis, a temporary MODEL_DIR, tiny CPU-friendly sizes."""
    return Settings(
        redis_url=redis_url,
        model_dir=tmp_path / "models",
        pretrained="none",
        device="cpu",
        image_size=32,
        batch_size=8,
        inference_batch_size=16,
        epochs=1,
        job_timeout=60,
        rq_queue="ml-backend-test",
    )
