"""The worker as a process (`python -m ml_backend worker`): runs jobs, stops cleanly on SIGTERM,
and a killed worker's job is recorded and retried by the next worker without any webhook."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from ml_backend.jobs import queue as q
from ml_backend.jobs.state import StatusStore
from tests.jobs import fixtures


def start_worker(redis_url: str, tmp_path, **extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(
        REDIS_URL=redis_url,
        RQ_QUEUE="worker-test",
        MODEL_DIR=str(tmp_path),
        PRETRAINED="none",
        JOB_TIMEOUT="60",
        JOB_SETTLE_S="0",
        **extra,
    )
    return subprocess.Popen(
        [sys.executable, "-m", "ml_backend", "worker"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_until(condition, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_worker_process_runs_a_job_and_finishes_it_before_stopping(
    redis_conn, redis_url, settings, tmp_path
):
    settings = settings.with_overrides(rq_queue="worker-test")
    worker = start_worker(redis_url, tmp_path)
    try:
        target = fixtures.wait_for_release
        assert q.request_training(redis_conn, settings, 21, "START_TRAINING", target) == "enqueued"
        wait_until(lambda: redis_conn.exists("test:holding"), "the job to start")
        assert StatusStore(redis_conn).project_status(21)["state"] == "running"
        # A webhook during the run marks the project dirty.
        assert q.request_training(redis_conn, settings, 21, "ANNOTATION_CREATED", target) == (
            "marked_dirty"
        )
        worker.send_signal(signal.SIGTERM)  # warm stop: the running job finishes first
        redis_conn.set("test:release", "1")
        assert worker.wait(timeout=30) == 0
        output = worker.stdout.read()
        assert "warm shut down requested" in output
        assert fixtures.ran(redis_conn) == [{"project": 21, "reason": "START_TRAINING"}]
        status = StatusStore(redis_conn).project_status(21)
        assert status["last_job"]["outcome"] == "trained"
        # The follow-up is queued for the next worker, not lost.
        assert status["state"] == "waiting"
        assert q.queue_state(redis_conn, 21)["waiting_job"] is not None
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_a_killed_worker_s_job_is_recorded_and_retried_without_a_webhook(
    redis_conn, redis_url, settings, tmp_path
):
    settings = settings.with_overrides(rq_queue="worker-test")
    fast = {"JOB_LEASE_S": "3", "RECONCILE_S": "1"}
    first = start_worker(redis_url, tmp_path, **fast)
    second = None
    try:
        target = fixtures.wait_for_release
        assert q.request_training(redis_conn, settings, 22, "ANNOTATION_CREATED", target) == (
            "enqueued"
        )
        wait_until(lambda: redis_conn.exists("test:holding"), "the job to start")
        killed = q.queue_state(redis_conn, 22)["running_job"]
        first.kill()  # SIGKILL mid-job: no handler runs, nothing is cleaned up
        first.wait(timeout=10)
        redis_conn.set("test:release", "1")
        second = start_worker(redis_url, tmp_path, **fast)
        # No webhook: the reconciler notices the lease ran out and enqueues the follow-up.
        wait_until(
            lambda: fixtures.ran(redis_conn) == [{"project": 22, "reason": "recovery"}],
            "the recovery job to run",
            seconds=30,
        )
        history = StatusStore(redis_conn).history(22, 10)
        failed = [h for h in history if h["job_id"] == killed]
        assert failed and failed[0]["outcome"] == "failed"
        assert "stopped before it finished" in failed[0]["error"]
        wait_until(lambda: q.live_status(redis_conn, 22)["state"] == "idle", "idle")
    finally:
        for worker in (first, second):
            if worker is not None and worker.poll() is None:
                worker.kill()
                worker.wait()
