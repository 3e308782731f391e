"""Coalescing, leases and the reconciler, against a real Redis and a real RQ SimpleWorker."""

from __future__ import annotations

import threading
import time

from rq import Queue, SimpleWorker
from rq.job import Job
from rq.registry import FailedJobRegistry

from ml_backend.jobs import queue as q
from ml_backend.jobs.lease import Reconciler
from ml_backend.jobs.markers import LEASE_PREFIX, Keys, Markers
from ml_backend.jobs.state import StatusStore
from tests.jobs import fixtures

RECORD = fixtures.record


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
    assert q.live_status(redis_conn, 7)["state"] == "waiting"


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
    status = q.live_status(redis_conn, 5)
    assert status["state"] == "idle"
    assert status["progress"] == {}, "progress is shown only while a job runs"
    assert status["model_version"] == "resnet18-v3"
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
    assert not redis_conn.keys(f"{LEASE_PREFIX}*"), "the lease is released"
    # Idle again: the next webhook enqueues a new job.
    assert q.request_training(redis_conn, settings, 5, "ANNOTATION_CREATED", RECORD) == "enqueued"


def test_webhooks_before_the_labels_are_read_need_no_follow_up(redis_conn, settings):
    target = fixtures.webhooks_during_run
    assert q.request_training(redis_conn, settings, 9, "ANNOTATION_CREATED", target) == "enqueued"
    work(redis_conn, settings.with_overrides(job_settle_s=0.0))
    during = [o.decode() for o in redis_conn.lrange("test:during", 0, -1)]
    # Before the job reads the labels it will see them ("covered"); after, exactly one follow-up.
    assert during == ["covered"] * 25 + ["marked_dirty"] * 25
    assert [r["reason"] for r in fixtures.ran(redis_conn)] == ["ANNOTATION_CREATED", "follow-up"]
    history = StatusStore(redis_conn).history(9, 10)
    assert [h["reason"] for h in history] == ["follow-up", "ANNOTATION_CREATED"]
    assert queued(redis_conn, settings) == []


def test_the_job_reads_labels_only_once_webhooks_settle(redis_conn, settings):
    """ANNOTATION_CREATED and START_TRAINING of one submit arrive ms apart: one job reads both."""
    markers = Markers(redis_conn)
    q.request_training(redis_conn, settings, 4, "ANNOTATION_CREATED", RECORD)
    job = q.queue_state(redis_conn, 4)["waiting_job"]
    assert markers.start(4, job, settings.rq_queue, 30)[0] == "started"
    snapshot = q._Snapshot(markers, 4, job, settle_s=0.6)
    done = threading.Event()
    threading.Thread(target=lambda: (snapshot(), done.set()), daemon=True).start()
    time.sleep(0.3)
    assert q.request_training(redis_conn, settings, 4, "START_TRAINING", RECORD) == "covered"
    assert not done.wait(0.4), "a webhook 0.3 s ago: the job keeps waiting"
    assert done.wait(2.0)
    assert q.request_training(redis_conn, settings, 4, "ANNOTATION_UPDATED", RECORD) == (
        "marked_dirty"
    )


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
    q.request_training(redis_conn, settings, 4, "START_TRAINING", fixtures.fail)
    work(redis_conn, settings)
    registry = FailedJobRegistry(settings.rq_queue, connection=redis_conn)
    assert len(registry.get_job_ids()) == 1
    status = q.live_status(redis_conn, 4)
    assert status["state"] == "idle"
    assert status["last_job"]["outcome"] == "failed"
    assert "RuntimeError" in status["last_job"]["error"]
    assert "abcdef0123456789" not in status["last_job"]["error"]
    # A failure does not wedge the project.
    assert q.request_training(redis_conn, settings, 4, "START_TRAINING", RECORD) == "enqueued"


def test_target_returning_none_is_outcome_done(redis_conn, settings):
    q.request_training(redis_conn, settings, 6, "refresh", fixtures.returns_nothing)
    work(redis_conn, settings)
    assert StatusStore(redis_conn).project_status(6)["last_job"]["outcome"] == "done"


def _running(redis_conn, project: int, job_id: str, lease: bool, queue: str) -> None:
    """A running marker as a started job leaves it, with or without its lease."""
    redis_conn.set(Keys.of(project).running, f"{job_id}|0|{queue}")
    if lease:
        redis_conn.set(f"{LEASE_PREFIX}{job_id}", "1", ex=30)


def test_a_running_job_without_lease_is_dead(redis_conn, settings):
    # The worker was killed: its lease ran out, whatever RQ still says about the job.
    StatusStore(redis_conn).job_started(8, "train-8-gone", "ANNOTATION_CREATED")
    _running(redis_conn, 8, "train-8-gone", lease=False, queue=settings.rq_queue)
    assert q.request_training(redis_conn, settings, 8, "ANNOTATION_CREATED", RECORD) == "enqueued"
    status = q.live_status(redis_conn, 8)
    assert status["state"] == "waiting"
    assert status["last_job"]["job_id"] == "train-8-gone"
    assert status["last_job"]["outcome"] == "failed"
    assert "stopped before it finished" in status["last_job"]["error"]
    # While the lease holds, the same marker is a live job.
    redis_conn.flushdb()
    _running(redis_conn, 8, "train-8-alive", lease=True, queue=settings.rq_queue)
    assert q.live_status(redis_conn, 8)["state"] == "running"


def test_a_second_job_of_a_project_does_not_run_beside_a_live_one(redis_conn, settings):
    _running(redis_conn, 2, "train-2-live", lease=True, queue=settings.rq_queue)
    Queue(settings.rq_queue, connection=redis_conn).enqueue(
        q.run_training_job, 2, "refresh", RECORD, job_id="train-2-second"
    )
    work(redis_conn, settings)
    assert fixtures.ran(redis_conn) == [], "refused: the project's other job still holds its lease"
    assert q.queue_state(redis_conn, 2)["follow_up_requested"], "it runs after the live one"


def test_waiting_marker_without_job_counts_only_within_grace(redis_conn, settings):
    waiting = Keys.of(2).waiting
    # Just written, the enqueue may still be on its way: treated as waiting.
    redis_conn.set(waiting, f"train-2-inflight|{time.time():.3f}|{settings.rq_queue}")
    assert q.request_training(redis_conn, settings, 2, "ANNOTATION_CREATED", RECORD) == (
        "already_waiting"
    )
    # Old and still no job: the web process died between the two steps; start over.
    redis_conn.set(waiting, f"train-2-lost|0|{settings.rq_queue}")
    assert q.request_training(redis_conn, settings, 2, "ANNOTATION_CREATED", RECORD) == "enqueued"


def test_reconciler_requeues_a_dead_job_once_across_workers(redis_conn, settings):
    StatusStore(redis_conn).job_started(11, "train-11-dead", "ANNOTATION_CREATED")
    Queue(settings.rq_queue, connection=redis_conn).enqueue(
        q.run_training_job, 11, "ANNOTATION_CREATED", RECORD, job_id="train-11-dead"
    ).cancel()
    _running(redis_conn, 11, "train-11-dead", lease=False, queue=settings.rq_queue)
    results: list[list[dict]] = []
    reconcilers = [Reconciler(redis_conn, settings) for _ in range(4)]
    threads = [
        threading.Thread(target=lambda r=r: results.append(r.run_once())) for r in reconcilers
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(len(r) for r in results) == [0, 0, 0, 1], results
    (job,) = queued(redis_conn, settings)
    assert job.args == (11, "recovery", RECORD), "the follow-up runs what the dead job ran"
    status = q.live_status(redis_conn, 11)
    assert status["state"] == "waiting"
    assert status["last_job"]["outcome"] == "failed"
    work(redis_conn, settings)
    assert fixtures.ran(redis_conn) == [{"project": 11, "reason": "recovery"}]


def test_reconciler_replaces_a_lost_waiting_job(redis_conn, settings):
    StatusStore(redis_conn).job_queued(12, "train-12-lost", "ANNOTATION_CREATED")
    redis_conn.set(Keys.of(12).waiting, f"train-12-lost|0|{settings.rq_queue}")
    assert Reconciler(redis_conn, settings).run_once() == [
        {"project": 12, "dead": "", "lost": "train-12-lost"}
    ]
    (job,) = queued(redis_conn, settings)
    assert job.args[:2] == (12, "recovery")


def test_reconciler_leaves_other_queues_and_live_jobs_alone(redis_conn, settings):
    StatusStore(redis_conn).job_queued(13, "x", "y")
    StatusStore(redis_conn).job_queued(14, "x", "y")
    _running(redis_conn, 13, "train-13-other", lease=False, queue="another-deployment")
    _running(redis_conn, 14, "train-14-live", lease=True, queue=settings.rq_queue)
    assert Reconciler(redis_conn, settings).run_once() == []
    assert queued(redis_conn, settings) == []


def test_heartbeat_renews_the_lease_and_restores_a_lost_marker(redis_conn, settings):
    markers = Markers(redis_conn)
    assert markers.start(15, "train-15-a", settings.rq_queue, 3)[0] == "started"
    redis_conn.flushdb()  # Redis restarted without persistence while the job ran
    assert markers.heartbeat(15, "train-15-a", settings.rq_queue, 3) == "ok"
    state = q.queue_state(redis_conn, 15)
    assert state["running_job"] == "train-15-a"
    # A webhook may have been lost while Redis was down: the job's end runs the project again.
    assert state["follow_up_requested"]
    assert 0 < redis_conn.ttl(f"{LEASE_PREFIX}train-15-a") <= 3
    request = markers.request(15, "train-15-c", settings.rq_queue)
    assert request[0] == "marked_dirty", "a label now comes after the job read its labels"
    _running(redis_conn, 15, "train-15-b", lease=True, queue=settings.rq_queue)
    assert markers.heartbeat(15, "train-15-a", settings.rq_queue, 3) == "lost"


def test_a_job_that_found_label_studio_down_runs_again_with_backoff(redis_conn, settings):
    # 3 s, not 1: on a loaded machine the worker alone can take a second to finish the job.
    settings = settings.with_overrides(job_retry_s=3.0)
    q.request_training(redis_conn, settings, 16, "ANNOTATION_CREATED", fixtures.label_studio_down)
    work(redis_conn, settings)
    status = q.live_status(redis_conn, 16)
    assert status["last_job"]["outcome"] == "failed"
    assert "retrying in 3 s" in status["last_job"]["error"]
    reconciler = Reconciler(redis_conn, settings)
    assert reconciler.run_once() == [], "not before the delay"
    time.sleep(3.2)
    (done,) = reconciler.run_once()
    assert done["project"] == 16 and reconciler.run_once() == [], "enqueued once"
    (job,) = queued(redis_conn, settings)
    assert job.args == (16, "retry", None), "the retry runs the training job"
    # Label Studio is back: the retry succeeds (stand-in target) and nothing more is scheduled.
    job.delete()
    redis_conn.delete(Keys.of(16).waiting)
    q.request_training(redis_conn, settings, 16, "retry", RECORD)
    work(redis_conn, settings)
    assert not redis_conn.exists(Keys.of(16).retry)
    # A second failure in a row waits twice as long.
    q.request_training(redis_conn, settings, 16, "x", fixtures.label_studio_down)
    q.request_training(redis_conn, settings, 16, "x", fixtures.label_studio_down)
    work(redis_conn, settings)
    assert "retrying in 3 s" in q.live_status(redis_conn, 16)["last_job"]["error"]
