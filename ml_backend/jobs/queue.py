"""Training requests with per-project coalescing on RQ, and the RQ job that wraps a training run.

Rules (per project): at most one training job runs and at most one waits.

- No job waiting or running: enqueue one (``"enqueued"``).
- One waiting: do nothing; it reads every label when it starts (``"already_waiting"``).
- One running that has not started reading labels yet: nothing to do, it will see this label
  (``"covered"``). A job waits ``JOB_SETTLE_S`` after the last webhook before it reads, so the
  ``ANNOTATION_CREATED`` and ``START_TRAINING`` of one submit make one retrain.
- One running that already read the labels: mark the project dirty (``"marked_dirty"``); when it
  ends, exactly one follow-up is enqueued.

A running job holds a lease its heartbeat renews (``ml_backend.jobs.lease``); a job whose worker
was killed loses it within ``JOB_LEASE_S`` and counts as gone: the next webhook, or the reconciler
every worker runs, records it as failed and enqueues its follow-up. The markers and their scripts
live in ``ml_backend.jobs.markers``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from rq import Queue, get_current_job

from ml_backend.config import Settings
from ml_backend.errors import LabelStudioUnavailable
from ml_backend.jobs.lease import Heartbeat
from ml_backend.jobs.markers import Markers, job_of
from ml_backend.jobs.state import StatusStore
from ml_backend.logs import redact

log = logging.getLogger(__name__)

# A job waits at most this long for webhooks to settle before it reads the labels anyway.
MAX_SETTLE_WAIT_S = 10.0
KILLED = "the worker running this job stopped before it finished (killed, crashed or lost)"
# A job that failed because Label Studio was unreachable runs again after JOB_RETRY_S, doubling
# per consecutive failure up to this.
MAX_RETRY_S = 900.0
LOST = "this queued job was lost before it ran (the enqueue failed or the queue was flushed)"


def new_job_id(project_id: int) -> str:
    return f"train-{int(project_id)}-{uuid.uuid4().hex[:12]}"


def rq_queue(redis, settings: Settings) -> Queue:
    """The RQ queue training jobs go to (``settings.rq_queue``)."""
    return Queue(settings.rq_queue, connection=redis)


def put_on_rq(queue: Queue, function, settings: Settings, project_id: int, reason: str,
              job_id: str, target, what: str) -> None:  # fmt: skip
    """Enqueue ``function(project_id, reason, target)`` as ``job_id``: ``JOB_TIMEOUT``, the
    result kept a day, a failure (with its traceback) 30 days."""
    queue.enqueue(
        function,
        project_id,
        reason,
        target,
        job_id=job_id,
        job_timeout=settings.job_timeout,
        description=f"{what} project {project_id} ({reason})",
        result_ttl=24 * 3600,
        failure_ttl=30 * 24 * 3600,
    )


def enqueue(
    redis, settings: Settings, project_id: int, reason: str, job_id: str, target=None
) -> None:
    """Put the job a marker already names on RQ (``target`` None: the training job)."""
    put_on_rq(rq_queue(redis, settings), run_training_job, settings, project_id, reason, job_id,
              target, "train")  # fmt: skip
    StatusStore(redis).job_queued(project_id, job_id, reason)


def request_training(
    redis, settings: Settings, project_id: int, reason: str, target: Callable | None = None
) -> str:
    """Ask for a training job for ``project_id``, coalescing with the ones already there.

    Args:
        redis: a ``redis.Redis`` connection.
        settings: the backend settings (queue name, job timeout).
        project_id: Label Studio project id.
        reason: why (a webhook action, ``"refresh"``, ...); recorded with the job.
        target: the function the job runs (tests); None runs ``pipeline.training.train_project``.

    Returns:
        ``"enqueued"``, ``"already_waiting"``, ``"covered"`` or ``"marked_dirty"``.

    Raises:
        redis.exceptions.RedisError: Redis is unreachable (the web layer answers 503).
    """
    project_id = int(project_id)
    job_id = new_job_id(project_id)
    outcome, _, dead = Markers(redis).request(project_id, job_id, settings.rq_queue)
    if dead:
        record_dead_job(redis, project_id, job_of(dead), KILLED)
    if outcome == "enqueued":
        enqueue(redis, settings, project_id, reason, job_id, target)
        log.info("project %s: training job %s enqueued (%s)", project_id, job_id, reason)
    else:
        log.debug("project %s: %s (%s)", project_id, outcome, reason)
    return outcome


def record_dead_job(redis, project_id: int, job_id: str, why: str) -> None:
    """Record a job that will never finish as failed, in ``/status`` and the log."""
    StatusStore(redis).job_failed(project_id, job_id, why)
    log.warning("project %s: job %s: %s; starting over", project_id, job_id, why)


def queue_state(redis, project_id: int) -> dict:
    """The live coalescing state of a project (for ``/status``): the running job (while its lease
    holds), the waiting job (while RQ holds it) and whether a follow-up is due."""
    return Markers(redis).read(project_id)


def live_status(redis, project_id: int) -> dict:
    """The project's status with its state taken from the live markers, never from a record a
    killed job left behind: ``running`` while a job holds its lease, ``waiting`` while one is
    queued, else ``idle``; progress is shown only while running. The same for the pretraining
    job: one whose worker died reads ``stopped`` until the reconciler replaces it."""
    status = StatusStore(redis).project_status(project_id)
    live = queue_state(redis, project_id)
    state = "running" if live["running_job"] else "waiting" if live["waiting_job"] else "idle"
    status.update(state=state, queue=live)
    if state != "running":
        status["progress"] = {}
    if not live["waiting_job"]:
        status["waiting"] = None
    pretraining = status["pretraining"]
    if pretraining.get("state") in ("waiting", "running"):
        from ml_backend.jobs.pretraining import PretrainMarker, redis_now

        marker = PretrainMarker(redis)
        if marker.live(marker.read(project_id), redis_now(redis), 30.0) is None:
            pretraining.update(state="stopped", progress={},
                               error="its worker stopped; the reconciler runs it again")  # fmt: skip
    return status


def _result_fields(result) -> tuple[str, dict, str | None]:
    """Read (outcome, metrics, model_version) from what the target returned (dict, object or None)."""
    if result is None:
        return "done", {}, None
    get = result.get if isinstance(result, dict) else lambda k, d=None: getattr(result, k, d)
    return str(get("outcome", "done")), dict(get("metrics", None) or {}), get("model_version", None)


_worker_settings: Settings | None = None


def use_settings(settings: Settings) -> None:
    """Make jobs in this process use ``settings`` (the worker calls it once at start)."""
    global _worker_settings
    _worker_settings = settings


def worker_settings() -> Settings:
    """The settings jobs in this process run with (``use_settings``, else the environment)."""
    return _worker_settings or Settings.from_env()


def _training_target():
    from ml_backend.pipeline.training import train_project  # torch: imported in the worker only

    return train_project


class _Snapshot:
    """Called by the target right before it reads labels: waits for webhooks to settle, then
    marks the moment, so webhooks after it (and only those) ask for a follow-up."""

    def __init__(self, markers: Markers, project_id: int, job_id: str, settle_s: float):
        self.markers, self.project_id, self.job_id, self.settle_s = (
            markers,
            project_id,
            job_id,
            settle_s,
        )

    def __call__(self) -> None:
        deadline = time.monotonic() + MAX_SETTLE_WAIT_S
        while time.monotonic() < deadline:
            wait = self.settle_s - self.markers.quiet_for(self.project_id)
            if wait <= 0:
                break
            time.sleep(min(wait, 0.5))
        if not self.markers.snapshot(self.project_id, self.job_id):
            log.warning(
                "project %s: job %s no longer holds the project", self.project_id, self.job_id
            )


def run_training_job(project_id: int, reason: str, target: Callable | None = None):
    """The RQ job: run the training target for the project, keeping the markers right.

    Takes the project (refusing to run beside another live job of it), holds a lease while it
    runs, calls ``target(project_id, reason, settings=, redis=, status=, snapshot=)``, records the
    outcome (``{"outcome", "metrics", "model_version"}`` or an object with those attributes, or
    ``None``), and finally releases the project, enqueueing exactly one follow-up when webhooks
    arrived after the labels were read. Exceptions are recorded and re-raised, so RQ keeps the
    failed job (and its traceback) in its FailedJobRegistry.
    """
    job = get_current_job()
    redis, project_id = job.connection, int(project_id)
    settings = worker_settings()
    status, markers = StatusStore(redis), Markers(redis)
    queue_name = job.origin or settings.rq_queue
    started, previous = markers.start(project_id, job.id, queue_name, settings.job_lease_s)
    if started == "busy":
        log.warning(
            "project %s: job %s not run: job %s of the project is still running; it will follow",
            project_id,
            job.id,
            job_of(previous),
        )
        return {"outcome": "deferred: another job of this project was running", "metrics": {}}
    if previous:
        record_dead_job(redis, project_id, job_of(previous), KILLED)
    status.job_started(project_id, job.id, reason)
    log.info("project %s: job %s started (%s)", project_id, job.id, reason)
    heartbeat = Heartbeat(markers, project_id, job.id, queue_name, settings.job_lease_s).start()
    try:
        result = (target or _training_target())(
            project_id,
            reason,
            settings=settings,
            redis=redis,
            status=status,
            snapshot=_Snapshot(markers, project_id, job.id, settings.job_settle_s),
        )
        outcome, metrics, version = _result_fields(result)
        status.job_finished(project_id, job.id, outcome, metrics, version)
        markers.clear_retry(project_id)
        log.info("project %s: job %s finished: %s", project_id, job.id, outcome)
        return {"outcome": outcome, "metrics": metrics, "model_version": version}
    except BaseException as exc:  # timeouts and shutdowns too: the status must not say "running"
        error = redact(f"{type(exc).__name__}: {exc}")[:500]
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):  # the worker's cold stop
            error = "interrupted: the worker was stopped while this job ran; it runs again"
            markers.want_follow_up(project_id)
        if isinstance(exc, LabelStudioUnavailable):  # it comes back: try again, with backoff
            delay = markers.retry_later(project_id, settings.job_retry_s, MAX_RETRY_S, queue_name)
            error += f" (retrying in {delay:.0f} s)"
        else:
            markers.clear_retry(project_id)
        status.job_failed(project_id, job.id, error)
        log.error("project %s: job %s failed: %s", project_id, job.id, error)
        raise
    finally:
        heartbeat.stop()
        follow_id = new_job_id(project_id)
        if markers.finish(project_id, job.id, queue_name, follow_id) == "follow_up":
            enqueue(redis, settings, project_id, "follow-up", follow_id, target)
            log.info("project %s: follow-up job %s enqueued", project_id, follow_id)
