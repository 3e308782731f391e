"""The pretraining job beside the training jobs, against a real Redis and a real RQ worker:
one per project at a time, recorded under ``pretraining`` in the status, a training job asked
for when a backbone is ready, and faults (killed, failing, Label Studio down) that never leave a
project stuck or looping."""

from __future__ import annotations

import json
import threading
import time

from rq import Queue, SimpleWorker

from ml_backend.jobs import pretraining as p
from ml_backend.jobs import queue as q
from ml_backend.jobs.lease import Reconciler
from ml_backend.jobs.state import StatusStore
from tests.jobs import fixtures
from tests.jobs.test_worker import start_worker, wait_until


def work_pretraining(redis, settings) -> None:
    """Run every queued pretraining job with a real SimpleWorker, in this process."""
    q.use_settings(settings)
    SimpleWorker([Queue(p.queue_name(settings), connection=redis)], connection=redis).work(
        burst=True
    )


def pretrain_jobs(redis, settings):
    return Queue(p.queue_name(settings), connection=redis).get_jobs()


def training_reasons(redis, settings) -> list[str]:
    return [job.args[1] for job in Queue(settings.rq_queue, connection=redis).get_jobs()]


def test_one_pretraining_per_project_waits_or_runs(redis_conn, settings):
    first, job_id = p.request_pretraining(
        redis_conn, settings, 5, "no backbone", fixtures.pretrain_record
    )
    assert first == "enqueued" and job_id.startswith("pretrain-5-")
    for _ in range(5):
        assert p.request_pretraining(redis_conn, settings, 5, "no backbone") == ("waiting", job_id)
    assert [j.id for j in pretrain_jobs(redis_conn, settings)] == [job_id]
    assert StatusStore(redis_conn).pretraining(5)["state"] == "waiting"
    # Another project is independent.
    assert p.request_pretraining(redis_conn, settings, 6, "no backbone")[0] == "enqueued"


def test_a_pretraining_job_records_its_progress_and_asks_for_a_training_job(redis_conn, settings):
    p.request_pretraining(redis_conn, settings, 5, "no backbone", fixtures.pretrain_record)
    work_pretraining(redis_conn, settings)
    assert fixtures.pretrained(redis_conn) == [{"project": 5, "reason": "no backbone"}]
    record = StatusStore(redis_conn).project_status(5)["pretraining"]
    assert record["state"] == "done" and record["backbone"] == "b1" and record["epochs"] == 3
    assert record["progress"] == {} and record["finished_at"] >= record["started_at"]
    assert p.PretrainMarker(redis_conn).read(5) is None  # the project is free again
    # The new backbone takes over: a training job is waiting.
    assert training_reasons(redis_conn, settings) == ["backbone ready"]
    # Nothing new stored (already current): no training job asked for.
    Queue(settings.rq_queue, connection=redis_conn).empty()
    p.request_pretraining(redis_conn, settings, 5, "again", fixtures.pretrain_not_needed)
    work_pretraining(redis_conn, settings)
    assert StatusStore(redis_conn).pretraining(5)["outcome"].startswith("not needed")
    assert training_reasons(redis_conn, settings) == []


def test_a_running_pretraining_holds_its_lease_and_is_not_doubled(redis_conn, settings, tmp_path):
    settings = settings.with_overrides(rq_queue="worker-test")
    worker = start_worker(settings.redis_url, tmp_path, JOB_LEASE_S="3", RECONCILE_S="1")
    try:
        _, job_id = p.request_pretraining(
            redis_conn, settings, 8, "no backbone", fixtures.pretrain_hold
        )
        wait_until(lambda: redis_conn.exists("test:holding"), "the pretraining to start")
        time.sleep(4)  # longer than the lease: the heartbeat renews it
        assert p.request_pretraining(redis_conn, settings, 8, "grown") == ("running", job_id)
        assert q.live_status(redis_conn, 8)["pretraining"]["state"] == "running"
        redis_conn.set("test:release", "1")
        wait_until(lambda: StatusStore(redis_conn).pretraining(8).get("state") == "done", "done")
        assert len(fixtures.pretrained(redis_conn)) == 1
    finally:
        worker.kill()
        worker.wait()


def test_a_killed_pretraining_is_recorded_and_run_again_without_a_webhook(
    redis_conn, settings, tmp_path
):
    settings = settings.with_overrides(rq_queue="worker-test")
    fast = {"JOB_LEASE_S": "3", "RECONCILE_S": "1"}
    first = start_worker(settings.redis_url, tmp_path, **fast)
    second = None
    try:
        _, killed = p.request_pretraining(
            redis_conn, settings, 9, "no backbone", fixtures.pretrain_hold
        )
        wait_until(lambda: redis_conn.exists("test:holding"), "the pretraining to start")
        first.kill()  # SIGKILL mid-pretraining: nothing is cleaned up
        first.wait(timeout=10)
        redis_conn.set("test:release", "1")
        second = start_worker(settings.redis_url, tmp_path, **fast)
        # The reconciler finds the lapsed lease and enqueues a new pretraining (its target too).
        wait_until(lambda: fixtures.pretrained(redis_conn), "the recovery pretraining", 30)
        assert fixtures.pretrained(redis_conn) == [{"project": 9, "reason": "recovery"}]
        wait_until(lambda: StatusStore(redis_conn).pretraining(9).get("state") == "done", "done")
        assert StatusStore(redis_conn).pretraining(9)["job_id"] != killed
    finally:
        for worker in (first, second):
            if worker is not None and worker.poll() is None:
                worker.kill()
                worker.wait()


def test_a_dead_pretraining_is_replaced_by_the_next_request(redis_conn, settings):
    marker = p.PretrainMarker(redis_conn)
    now = p.redis_now(redis_conn)
    redis_conn.set(
        marker.key(4),
        '{"job": "pretrain-4-dead", "state": "running", "at": 0, "until": %f}' % (now - 1),
    )
    answer, job_id = p.request_pretraining(redis_conn, settings, 4, "no backbone")
    assert answer == "enqueued" and job_id != "pretrain-4-dead"
    record = StatusStore(redis_conn).pretraining(4)
    assert record["state"] == "waiting" and record["job_id"] == job_id
    # A waiting marker whose RQ job is gone (queue flushed) is replaced once it is older than
    # a lease (a younger one may be an enqueue still on its way).
    Queue(p.queue_name(settings), connection=redis_conn).empty()
    redis_conn.delete(f"rq:job:{job_id}")
    assert p.request_pretraining(redis_conn, settings, 4, "no backbone") == ("waiting", job_id)
    old = marker.read(4) | {"at": now - settings.job_lease_s - 1}
    redis_conn.set(marker.key(4), json.dumps(old))
    again, new_id = p.request_pretraining(redis_conn, settings, 4, "no backbone")
    assert again == "enqueued" and new_id != job_id


def test_a_failing_pretraining_is_recorded_redacted_and_held_back(redis_conn, settings):
    p.request_pretraining(redis_conn, settings, 3, "no backbone", fixtures.pretrain_fail)
    work_pretraining(redis_conn, settings)
    record = StatusStore(redis_conn).pretraining(3)
    assert record["state"] == "failed" and "pretraining broke" in record["error"]
    assert "abcdef0123456789" not in record["error"]
    assert p.PretrainMarker(redis_conn).read(3) is None
    # Not asked for again at once (it would fail again): jobs go on with the backbone they have.
    assert p.request_pretraining(redis_conn, settings, 3, "no backbone") == ("held back", None)
    assert training_reasons(redis_conn, settings) == []
    # The reconciler does not loop on it either.
    assert Reconciler(redis_conn, settings).run_once() == []
    # Once RETRY_AFTER_FAILURE_S has passed it may run again.
    StatusStore(redis_conn).pretraining_update(
        3, finished_at=p.redis_now(redis_conn) - p.RETRY_AFTER_FAILURE_S
    )
    assert p.request_pretraining(redis_conn, settings, 3, "no backbone")[0] == "enqueued"


def test_label_studio_down_during_a_pretraining_is_retried_by_the_reconciler(redis_conn, settings):
    # 3 s: long enough that a loaded machine still asks before the retry is due
    settings = settings.with_overrides(job_retry_s=3.0)
    p.request_pretraining(
        redis_conn, settings, 2, "no backbone", fixtures.pretrain_label_studio_down
    )
    work_pretraining(redis_conn, settings)
    record = StatusStore(redis_conn).pretraining(2)
    assert record["state"] == "failed" and record["retry"] is True
    assert "LabelStudioUnavailable" in record["error"]
    assert Reconciler(redis_conn, settings).run_once() == []  # not before JOB_RETRY_S
    time.sleep(3.1)
    done = Reconciler(redis_conn, settings).run_once()
    assert [d for d in done if d.get("pretraining")], done
    assert StatusStore(redis_conn).pretraining(2)["reason"] == "retry"
    assert len(pretrain_jobs(redis_conn, settings)) == 1


def test_concurrent_requests_enqueue_exactly_one(redis_conn, settings):
    answers: list[str] = []

    def ask():
        answers.append(p.request_pretraining(redis_conn, settings, 11, "no backbone")[0])

    threads = [threading.Thread(target=ask) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers.count("enqueued") == 1 and len(pretrain_jobs(redis_conn, settings)) == 1


def test_a_pretraining_that_keeps_killing_its_worker_is_held_back(redis_conn, settings):
    marker, status = p.PretrainMarker(redis_conn), StatusStore(redis_conn)

    def killed_mid_run():
        now = p.redis_now(redis_conn)
        job = (marker.read(12) or {}).get("job", "pretrain-12-first")
        dead = {"job": job, "state": "running", "at": now - 60, "until": now - 1}
        redis_conn.set(marker.key(12), json.dumps(dead))
        return p.request_pretraining(redis_conn, settings, 12, "no backbone")

    assert killed_mid_run()[0] == "enqueued" and status.pretraining(12)["state"] == "waiting"
    assert killed_mid_run()[0] == "enqueued"
    assert killed_mid_run() == ("held back", None)  # the third kill in a row
    record = status.pretraining(12)
    assert record["state"] == "failed" and record["kills"] == 3 and record["retry"] is False
    assert "3 times in a row" in record["error"] and marker.read(12) is None
    assert p.request_pretraining(redis_conn, settings, 12, "no backbone") == ("held back", None)
    assert Reconciler(redis_conn, settings).run_once() == []  # no loop through the reconciler
    # A pretraining that completes resets the count.
    status.pretraining_update(12, finished_at=p.redis_now(redis_conn) - p.RETRY_AFTER_FAILURE_S)
    assert p.request_pretraining(redis_conn, settings, 12, "x", fixtures.pretrain_record)[0] == (
        "enqueued"
    )
    work_pretraining(redis_conn, settings)
    assert status.pretraining(12)["state"] == "done" and "kills" not in status.pretraining(12)


def test_slices_and_retrains_take_turns_on_one_worker(redis_conn, settings):
    """With one worker, a pretraining in slices gets a slice after each waiting retrain
    (round robin), instead of waiting until no retrain is left: labeling never stops it."""
    from ml_backend.jobs.worker import run_worker

    for project in (6, 7):
        q.request_training(redis_conn, settings, project, "ANNOTATION_CREATED",
                           fixtures.record_order)  # fmt: skip
    _, first = p.request_pretraining(redis_conn, settings, 5, "no backbone",
                                     fixtures.pretrain_in_slices)  # fmt: skip
    run_worker(settings, burst=True)
    order = [x.decode() for x in redis_conn.lrange(fixtures.ORDER_KEY, 0, -1)]
    assert order == ["train-6", "slice-1", "train-7", "slice-2", "slice-3"]
    record = StatusStore(redis_conn).pretraining(5)
    assert record["state"] == "done" and record["seconds"] == 3.0 and "slices" not in record
    assert record["job_id"] != first and p.PretrainMarker(redis_conn).read(5) is None


def test_without_slices_waiting_retrains_go_first(redis_conn, settings):
    from ml_backend.jobs.worker import run_worker

    settings = settings.with_overrides(pretrain_slice_s=0)
    p.request_pretraining(redis_conn, settings, 5, "no backbone", fixtures.pretrain_in_slices)
    for project in (6, 7):
        q.request_training(redis_conn, settings, project, "ANNOTATION_CREATED",
                           fixtures.record_order)  # fmt: skip
    run_worker(settings, burst=True)
    order = [x.decode() for x in redis_conn.lrange(fixtures.ORDER_KEY, 0, -1)]
    assert order == ["train-6", "train-7", "slice-1", "slice-2", "slice-3"]


def test_between_slices_the_next_one_waits_named_by_the_marker(redis_conn, settings):
    p.request_pretraining(redis_conn, settings, 5, "no backbone", fixtures.pretrain_in_slices)
    q.use_settings(settings)
    SimpleWorker([Queue(p.queue_name(settings), connection=redis_conn)],
                 connection=redis_conn).work(burst=True, max_jobs=1)  # fmt: skip
    record, marker = StatusStore(redis_conn).pretraining(5), p.PretrainMarker(redis_conn).read(5)
    assert record["state"] == "waiting" and record["slices"] == 1
    assert record["progress"]["epoch"] == 1  # what the dashboard shows while it waits
    assert marker["state"] == "waiting" and marker["job"] == record["job_id"]
    assert [j.id for j in pretrain_jobs(redis_conn, settings)] == [record["job_id"]]
    # A request meanwhile (a training job) finds it and enqueues nothing more.
    assert p.request_pretraining(redis_conn, settings, 5, "grown") == ("waiting", record["job_id"])
    # Hand-over rules: only from the job the marker names, or into an empty marker (Redis
    # restarted without persistence); never over another job.
    marker = p.PretrainMarker(redis_conn)
    assert marker.hand_over(5, "pretrain-5-other", "pretrain-5-x") is False
    assert marker.read(5)["job"] == record["job_id"]
    assert marker.hand_over(99, "pretrain-99-a", "pretrain-99-b") is True
    assert marker.read(99)["job"] == "pretrain-99-b" and marker.read(99)["state"] == "waiting"
    # The next slice starts with the slice count and progress it left.
    SimpleWorker([Queue(p.queue_name(settings), connection=redis_conn)],
                 connection=redis_conn).work(burst=True, max_jobs=1)  # fmt: skip
    assert StatusStore(redis_conn).pretraining(5)["slices"] == 2


def test_a_slice_yields_to_a_waiting_training_job_after_a_third_of_it(redis_conn, settings):
    from ml_backend.pipeline.pretraining import yield_to_training

    assert p.training_waiting(redis_conn, settings) is False
    q.request_training(redis_conn, settings, 6, "ANNOTATION_CREATED", fixtures.record_order)
    assert p.training_waiting(redis_conn, settings) is True
    calls = []

    def waiting():
        calls.append(1)
        return True

    pause = yield_to_training(waiting, slice_s=30)
    assert not pause(5.0) and not pause(9.9) and calls == []  # the first third is the slice's
    assert pause(10.0) and len(calls) == 1
    assert not pause(10.5) and len(calls) == 1  # Redis is asked once a second at most
    assert pause(11.0) and len(calls) == 2
    # Redis down: the slice runs its length.
    from redis import Redis

    assert p.training_waiting(Redis(port=1, socket_connect_timeout=0.2), settings) is False


def test_progress_is_best_effort_when_redis_is_away(caplog):
    """A Redis restart during an epoch's end must not fail the pretraining (the e2e Redis
    restart found it: the failed job then took its worker down with it)."""
    from redis import Redis

    p._report(StatusStore(Redis(port=1, socket_connect_timeout=0.2)), 5, {"epoch": 3})
    assert "pretraining progress not recorded" in caplog.text
