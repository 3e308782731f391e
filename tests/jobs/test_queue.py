"""Coalescing per project, against a real Redis and a real RQ SimpleWorker in burst mode."""

from __future__ import annotations

import threading

from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry

from ml_backend.jobs import queue as q
from ml_backend.jobs.state import StatusStore
from tests.jobs import fixtures

RECORD = "tests.jobs.fixtures:record"


def work(redis, settings) -> None:
    """Run every queued job with a real SimpleWorker, in this process, then return."""
    q.use_settings(settings)
    SimpleWorker([Queue(settings.rq_queue, connection=redis)], connection=redis).work(burst=True)


def queued(redis, settings) -> list[Job]:
    return Queue(settings.rq_queue, connection=redis).get_jobs()


def test_first_request_enqueues_and_later_ones_coalesce(redis_conn, settings):
    assert q.request_training(redis_conn, settings, 7, "ANNOTATION_CREATED", RECORD) == "enqueued"
    for _ in range(20):
        assert q.request_training(redis_conn, settings, 7, "ANNOTATION_UPDATED", RECORD) == (
            "already_waiting"
        )
    jobs = queued(redis_conn, settings)
    assert len(jobs) == 1
    assert jobs[0].args == (7, "ANNOTATION_CREATED", RECORD)
    assert jobs[0].timeout == settings.job_timeout
    assert StatusStore(redis_conn).project_status(7)["state"] == "waiting"


def test_concurrent_burst_enqueues_exactly_one_job(redis_conn, settings):
    outcomes: list[str] = []
    lock = threading.Lock()

    def fire():
        for _ in range(125):
            result = q.request_training(redis_conn, settings, 3, "ANNOTATION_CREATED", RECORD)
            with lock:
                outcomes.append(result)

    threads = [threading.Thread(target=fire) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == 500
    assert outcomes.count("enqueued") == 1
    assert outcomes.count("already_waiting") == 499
    assert len(queued(redis_conn, settings)) == 1
    work(redis_conn, settings)
    assert fixtures.ran(redis_conn) == [{"project": 3, "reason": "ANNOTATION_CREATED"}]


def test_worker_runs_job_and_records_outcome(redis_conn, settings):
    q.request_training(redis_conn, settings, 5, "START_TRAINING", RECORD)
    work(redis_conn, settings)
    assert fixtures.ran(redis_conn) == [{"project": 5, "reason": "START_TRAINING"}]
    status = StatusStore(redis_conn).project_status(5)
    assert status["state"] == "idle"
    assert status["model_version"] == "resnet18-v3"
    assert status["progress"]["epoch"] == 1
    last = status["last_job"]
    assert last["outcome"] == "trained"
    assert last["metrics"] == {
        "val_accuracy": 0.75,
        "train_size": 8,
        "val_size": 2,
        "nan_metric": None,
    }
    assert last["reason"] == "START_TRAINING"
    assert last["duration_s"] >= 0
    assert q.queue_state(redis_conn, 5) == {
        "waiting_job": None,
        "running_job": None,
        "follow_up_requested": False,
    }
    # Idle again: the next webhook enqueues a new job.
    assert q.request_training(redis_conn, settings, 5, "ANNOTATION_CREATED", RECORD) == "enqueued"


def test_webhooks_during_a_run_cause_exactly_one_follow_up(redis_conn, settings):
    target = "tests.jobs.fixtures:webhooks_during_run"
    assert q.request_training(redis_conn, settings, 9, "ANNOTATION_CREATED", target) == "enqueued"
    work(redis_conn, settings)
    during = [o.decode() for o in redis_conn.lrange("test:during", 0, -1)]
    # The first webhook during the run marks the project dirty and so do the rest (idempotent).
    assert during == ["marked_dirty"] * 50
    assert [r["reason"] for r in fixtures.ran(redis_conn)] == ["ANNOTATION_CREATED", "follow-up"]
    history = StatusStore(redis_conn).history(9, 10)
    assert [h["reason"] for h in history] == ["follow-up", "ANNOTATION_CREATED"]
    assert queued(redis_conn, settings) == []


def test_projects_are_independent(redis_conn, settings):
    for project in (1, 2, 3):
        assert q.request_training(redis_conn, settings, project, "TASKS_CREATED", RECORD) == (
            "enqueued"
        )
        assert q.request_training(redis_conn, settings, project, "TASKS_CREATED", RECORD) == (
            "already_waiting"
        )
    work(redis_conn, settings)
    assert sorted(r["project"] for r in fixtures.ran(redis_conn)) == [1, 2, 3]


def test_failed_job_is_kept_by_rq_and_recorded(redis_conn, settings):
    q.request_training(redis_conn, settings, 4, "START_TRAINING", "tests.jobs.fixtures:fail")
    work(redis_conn, settings)
    registry = FailedJobRegistry(settings.rq_queue, connection=redis_conn)
    assert len(registry.get_job_ids()) == 1
    status = StatusStore(redis_conn).project_status(4)
    assert status["state"] == "idle"
    assert status["last_job"]["outcome"] == "failed"
    assert "RuntimeError" in status["last_job"]["error"]
    assert "abcdef0123456789" not in status["last_job"]["error"]
    # A failure does not wedge the project.
    assert q.request_training(redis_conn, settings, 4, "START_TRAINING", RECORD) == "enqueued"


def test_target_returning_none_is_outcome_done(redis_conn, settings):
    q.request_training(redis_conn, settings, 6, "refresh", "tests.jobs.fixtures:returns_nothing")
    work(redis_conn, settings)
    assert StatusStore(redis_conn).project_status(6)["last_job"]["outcome"] == "done"


def _fake_marker(redis_conn, project: int, which: str, job_id: str, since: int = 0) -> None:
    waiting, running, _ = q._keys(project)
    redis_conn.set(waiting if which == "waiting" else running, f"{job_id}|{since}")


def test_running_marker_of_a_dead_job_does_not_wedge(redis_conn, settings):
    # The worker died: the marker names a job RQ does not have (or has failed/stopped).
    StatusStore(redis_conn).job_started(8, "train-8-gone", "ANNOTATION_CREATED")
    _fake_marker(redis_conn, 8, "running", "train-8-gone")
    assert q.request_training(redis_conn, settings, 8, "ANNOTATION_CREATED", RECORD) == "enqueued"
    status = StatusStore(redis_conn).project_status(8)
    assert status["state"] == "waiting"
    assert status["last_job"]["job_id"] == "train-8-gone"
    assert status["last_job"]["outcome"] == "failed"
    assert "stopped without finishing" in status["last_job"]["error"]

    redis_conn.flushdb()
    job = Queue(settings.rq_queue, connection=redis_conn).enqueue(fixtures.record, 8, "x")
    job.set_status(JobStatus.STOPPED)
    _fake_marker(redis_conn, 8, "running", job.id)
    assert q.request_training(redis_conn, settings, 8, "ANNOTATION_CREATED", RECORD) == "enqueued"


def test_started_job_whose_worker_is_gone_counts_as_not_running(redis_conn, settings):
    job = Queue(settings.rq_queue, connection=redis_conn).enqueue(fixtures.record, 8, "x")
    redis_conn.hset(job.key, mapping={"status": "started", "worker_name": "killed-worker"})
    _fake_marker(redis_conn, 8, "running", job.id)
    assert q.request_training(redis_conn, settings, 8, "ANNOTATION_CREATED", RECORD) == "enqueued"
    # ...while a live worker keeps it running: the next request only marks it dirty.
    redis_conn.flushdb()
    job = Queue(settings.rq_queue, connection=redis_conn).enqueue(fixtures.record, 8, "x")
    redis_conn.hset(job.key, mapping={"status": "started", "worker_name": "alive"})
    redis_conn.set("rq:worker:alive", "1")
    _fake_marker(redis_conn, 8, "running", job.id)
    assert q.request_training(redis_conn, settings, 8, "ANNOTATION_CREATED", RECORD) == (
        "marked_dirty"
    )


def test_waiting_marker_without_job_counts_only_within_grace(redis_conn, settings):
    import time

    # Just written, the enqueue may still be on its way: treated as waiting.
    _fake_marker(redis_conn, 2, "waiting", "train-2-inflight", since=int(time.time()))
    assert q.request_training(redis_conn, settings, 2, "ANNOTATION_CREATED", RECORD) == (
        "already_waiting"
    )
    # Old and still no job: the web process died between the two steps; start over.
    _fake_marker(redis_conn, 2, "waiting", "train-2-lost", since=0)
    assert q.request_training(redis_conn, settings, 2, "ANNOTATION_CREATED", RECORD) == "enqueued"
