"""Self-supervised pretraining as its own RQ job, beside the training jobs.

A training job that finds no self-supervised backbone for its project (or one pretrained on a
pool half the size) asks for one here and goes on at once with the backbone it has: the previous
one, or the PRETRAINED weights. So the first queue, and the retrain after every label, go live in
seconds while the pretraining runs; when it has stored the new backbone, it asks for a training
job (reason ``backbone ready``) whose heads and order use it.

Rules (per project): at most one pretraining job waits or runs. It goes to the RQ queue
``<RQ_QUEUE>-pretrain``; every worker listens on it and on the training queue. A pretraining
runs in slices of ``PRETRAIN_SLICE_S``: each job trains one slice, saves a checkpoint and hands
the project's marker to the next slice's job, which it enqueues. Workers take the queues in turn
(RQ's round-robin dequeue), so with one worker (what ``run`` starts on a CPU) a waiting retrain
runs between two slices, and a slice yields to a waiting retrain after a third of its length
(``pipeline.pretraining.yield_to_training``): retrains wait about 10 s, and continuous labeling
does not hold the pretraining up. With two (``RUN_WORKERS``; ``run``'s default with a GPU) one pretrains while
the other trains. ``PRETRAIN_SLICE_S=0``: one job runs the whole budget, and workers take
waiting training jobs first (the pretraining runs in the first pause of labeling).

Faults, as for training jobs: a running pretraining holds a lease its heartbeat renews
(``JOB_LEASE_S``). A killed one stops renewing; the next request (any training job of the project)
or the reconciler finds the lapsed lease, records the failure and enqueues a new one (after
``MAX_KILLS`` in a row it is held back instead). One that
fails with an error is recorded and not asked for again for ``RETRY_AFTER_FAILURE_S`` (a broken
pretraining does not loop; its project keeps training heads on the backbone it has), unless it
failed because Label Studio was unreachable. The job after a killed, interrupted or
Label-Studio-down slice goes on from the last checkpoint; one after an error starts over.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable

from redis.exceptions import RedisError, WatchError
from rq import Queue, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job

from ml_backend.config import Settings
from ml_backend.errors import LabelStudioUnavailable
from ml_backend.jobs import queue
from ml_backend.jobs.lease import Heartbeat
from ml_backend.jobs.state import PREFIX, StatusStore, project_key
from ml_backend.logs import redact

log = logging.getLogger(__name__)

# A pretraining that failed with an error (not Label Studio being down) is not asked for again
# for this long.
RETRY_AFTER_FAILURE_S = 600.0
KILLED = "the worker running this pretraining stopped before it finished (killed, crashed or lost)"
LOST = "this queued pretraining job was lost before it ran (the enqueue failed or the queue was flushed)"
# A pretraining that killed its worker this many times in a row (out of memory, say) is held
# back like one that failed with an error: a worker that also runs the retrains is not killed
# again and again.
MAX_KILLS = 3
# RQ statuses of a job that has not run yet.
NOT_STARTED = ("queued", "scheduled", "deferred")


def queue_name(settings: Settings) -> str:
    """The RQ queue pretraining jobs go to."""
    return f"{settings.rq_queue}-pretrain"


def new_job_id(project_id: int) -> str:
    return f"pretrain-{int(project_id)}-{uuid.uuid4().hex[:12]}"


def redis_now(redis) -> float:
    seconds, micros = redis.time()  # one clock for every machine on this Redis
    return seconds + micros / 1e6


class PretrainMarker:
    """``mlb:pretrain:<project>``: the project's waiting or running pretraining job, as JSON
    ``{"job", "state": "waiting" | "running", "at", "until"}`` (``until``: the lease's end)."""

    def __init__(self, redis):
        self.redis = redis

    def key(self, project_id) -> str:
        return f"{PREFIX}pretrain:{project_key(project_id)}"

    def read(self, project_id) -> dict | None:
        raw = self.redis.get(self.key(project_id))
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    def _update(self, project_id, change: Callable[[dict | None, float], tuple[dict | None, str]]):
        """Apply ``change(current, now) -> (new value or None to delete, answer)`` atomically."""
        key = self.key(project_id)
        while True:
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    try:
                        current = json.loads(raw) if raw else None
                    except ValueError:
                        current = None
                    new, answer = change(current, redis_now(self.redis))
                    pipe.multi()
                    if new is None:
                        pipe.delete(key)
                    else:
                        pipe.set(key, json.dumps(new))
                    pipe.execute()
                    return answer, current
                except WatchError:
                    continue

    def live(self, current: dict | None, now: float, lease_s: float) -> str | None:
        """``"waiting"`` or ``"running"`` when ``current`` is a job that will still run or
        finish, else None (no job, a lapsed lease, or a waiting job RQ no longer holds)."""
        if not current:
            return None
        if current.get("state") == "running":
            return "running" if float(current.get("until") or 0) > now else None
        # Named a moment ago: its enqueue may not have reached RQ yet, or RQ started it and our
        # wrapper is about to mark it running. Older than a lease, only RQ's word counts.
        young = now - float(current.get("at") or 0) < lease_s
        try:
            rq_status = Job.fetch(current["job"], connection=self.redis).get_status()
        except (NoSuchJobError, KeyError, ValueError):
            rq_status = None
        if rq_status in NOT_STARTED or (rq_status is None and young):
            return "waiting"
        return "running" if rq_status == "started" and young else None

    def request(self, project_id, job_id: str, lease_s: float):
        """Name ``job_id`` the project's pretraining unless a live one is there.

        Returns ``(answer, previous)``: answer ``"enqueued"`` (enqueue ``job_id`` now),
        ``"waiting"`` or ``"running"``; ``previous`` the marker it replaced (a dead job) or None.
        """

        def change(current, now):
            state = self.live(current, now, lease_s)
            if state:
                return current, state
            return {"job": job_id, "state": "waiting", "at": now}, "enqueued"

        answer, previous = self._update(project_id, change)
        return answer, previous if answer == "enqueued" else None

    def start(self, project_id, job_id: str, lease_s: float) -> str:
        """Mark ``job_id`` running (``"started"``), unless another job of the project is running
        with a live lease (``"busy"``)."""

        def change(current, now):
            other = current and current.get("job") != job_id
            if other and current.get("state") == "running" and float(current["until"]) > now:
                return current, "busy"
            return {"job": job_id, "state": "running", "at": now, "until": now + lease_s}, (
                "started"
            )

        return self._update(project_id, change)[0]

    def heartbeat(self, project_id, job_id: str, _queue: str, lease_s: float) -> str:
        """Renew ``job_id``'s lease (``"ok"``); ``"lost"`` when the marker names another job."""

        def change(current, now):
            if current and current.get("job") != job_id:
                return current, "lost"
            return {"job": job_id, "state": "running", "at": (current or {}).get("at", now),
                    "until": now + lease_s}, "ok"  # fmt: skip

        return self._update(project_id, change)[0]

    def hand_over(self, project_id, job_id: str, next_id: str) -> bool:
        """Name ``next_id`` (the next slice, waiting) in place of running ``job_id``, or in an
        empty marker (Redis lost it: restarted without persistence); False when the marker
        names another job (this one's lease was taken over)."""

        def change(current, now):
            if current is not None and current.get("job") != job_id:
                return current, False
            return {"job": next_id, "state": "waiting", "at": now}, True

        return self._update(project_id, change)[0]

    def finish(self, project_id, job_id: str) -> None:
        """Clear the marker if it still names ``job_id``."""
        self._update(
            project_id,
            lambda current, now: (
                (None, "") if (current or {}).get("job") == job_id else (current, "")
            ),
        )


def training_waiting(redis, settings: Settings) -> bool:
    """Whether a training job waits on the RQ queue (a running slice then yields early); False
    when Redis does not answer (the slice just runs its length)."""
    try:
        return queue.rq_queue(redis, settings).count > 0
    except RedisError:
        return False


def enqueue(redis, settings: Settings, project_id: int, reason: str, job_id: str, target=None):
    queue.put_on_rq(Queue(queue_name(settings), connection=redis), run_pretraining_job, settings,
                    project_id, reason, job_id, target, "pretrain")  # fmt: skip
    StatusStore(redis).pretraining_update(
        project_id, state="waiting", job_id=job_id, reason=reason, queued_at=redis_now(redis)
    )


def request_pretraining(
    redis, settings: Settings, project_id: int, reason: str, target: Callable | None = None
) -> tuple[str, str | None]:
    """Ask for a pretraining job for ``project_id`` unless one waits or runs.

    Returns:
        ``(answer, job_id)``: ``"enqueued"``, ``"waiting"`` or ``"running"`` with the job's id, or
        ``"held back"`` with None when the last one failed less than ``RETRY_AFTER_FAILURE_S`` ago.

    Raises:
        redis.exceptions.RedisError: Redis is unreachable.
    """
    project_id = int(project_id)
    status = StatusStore(redis)
    last = status.pretraining(project_id)
    since = redis_now(redis) - float(last.get("finished_at") or 0)
    if last.get("state") == "failed" and not last.get("retry") and since < RETRY_AFTER_FAILURE_S:
        return "held back", None
    job_id = new_job_id(project_id)
    marker = PretrainMarker(redis)
    answer, dead = marker.request(project_id, job_id, settings.job_lease_s)
    kills = _record_dead(status, project_id, dead) if dead else 0
    if kills >= MAX_KILLS:
        marker.finish(project_id, job_id)  # not enqueued: the next request after the hold-back
        status.pretraining_update(
            project_id, retry=False,
            error=f"{KILLED}, {kills} times in a row; not run again for "
                  f"{RETRY_AFTER_FAILURE_S / 60:.0f} minutes (out of memory? a smaller "
                  "BATCH_SIZE or PRETRAIN_BUDGET_S=0)",
        )  # fmt: skip
        log.error("project %s: pretraining killed its worker %s times in a row; held back",
                  project_id, kills)  # fmt: skip
        return "held back", None
    if answer == "enqueued":
        enqueue(redis, settings, project_id, reason, job_id, target)
        log.info("project %s: pretraining job %s enqueued (%s)", project_id, job_id, reason)
        return answer, job_id
    return answer, (marker.read(project_id) or {}).get("job")


def _record_dead(status: StatusStore, project_id: int, dead: dict) -> int:
    """Record a dead pretraining job; returns how many in a row were killed while running."""
    killed = dead.get("state") == "running"
    kills = int(status.pretraining(project_id).get("kills") or 0) + 1 if killed else 0
    status.pretraining_update(
        project_id, state="failed", job_id=dead.get("job"), error=KILLED if killed else LOST,
        retry=True, finished_at=redis_now(status.redis), progress={}, kills=kills or None,
    )  # fmt: skip
    log.warning("project %s: pretraining job %s: %s; starting over", project_id, dead.get("job"),
                KILLED if killed else LOST)  # fmt: skip
    return kills


def reconcile(redis, settings: Settings, project_id: int) -> str | None:
    """The reconciler's pass over one project (every ``RECONCILE_S``): replace a dead
    pretraining job, or run again one that was interrupted or found Label Studio down, once
    ``JOB_RETRY_S`` has passed. Returns the new job's id or None."""
    from ml_backend.jobs.lease import _target_of

    marker = PretrainMarker(redis)
    current, now = marker.read(project_id), redis_now(redis)
    if current is not None:
        if marker.live(current, now, settings.job_lease_s):
            return None
        previous = current.get("job")
    else:
        last = StatusStore(redis).pretraining(project_id)
        due = float(last.get("finished_at") or 0) + settings.job_retry_s
        if not (last.get("state") == "failed" and last.get("retry") and now >= due):
            return None
        previous = last.get("job_id")
    answer, job_id = request_pretraining(
        redis,
        settings,
        project_id,
        "recovery" if current else "retry",
        _target_of(redis, previous) if previous else None,  # what the dead job ran
    )
    return job_id if answer == "enqueued" else None


def _next_slice(redis, settings, project_id, reason, job_id, target, result) -> None:
    """After a slice: name and enqueue the next one (it goes on from the checkpoint); a worker
    takes the waiting training jobs first (round robin). When Redis fails here, the marker
    names a job RQ never got, and the reconciler replaces it after a lease."""
    next_id = new_job_id(project_id)
    status = StatusStore(redis)
    slices = int(status.pretraining(project_id).get("slices") or 0) + 1
    status.pretraining_update(project_id, slices=slices, kills=None,
                              outcome=result.get("outcome"))  # fmt: skip
    if not PretrainMarker(redis).hand_over(project_id, job_id, next_id):
        log.warning("project %s: pretraining job %s lost its lease; no next slice from it",
                    project_id, job_id)  # fmt: skip
        return
    enqueue(redis, settings, project_id, reason, next_id, target)
    log.info("project %s: pretraining slice %d done (%s); next slice %s enqueued", project_id,
             slices, result.get("outcome"), next_id)  # fmt: skip


def _report(status: StatusStore, project_id: int, fields: dict) -> None:
    """Per-epoch progress, best effort: a Redis blip must not fail the pretraining."""
    try:
        status.pretraining_progress(project_id, **fields)
    except RedisError as exc:
        log.warning("project %s: pretraining progress not recorded (%s)", project_id,
                    type(exc).__name__)  # fmt: skip


def _pretrain_target():
    from ml_backend.pipeline.pretraining import pretrain_project  # torch: in the worker only

    return pretrain_project


def run_pretraining_job(project_id: int, reason: str, target: Callable | None = None):
    """The RQ job: pretrain the project's backbone (``pipeline.pretraining.pretrain_project``
    or ``target``), recorded under ``pretraining`` in the project's status; then ask for a
    training job that uses the new backbone."""
    job = get_current_job()
    redis, project_id = job.connection, int(project_id)
    settings = queue.worker_settings()
    status, marker = StatusStore(redis), PretrainMarker(redis)
    if marker.start(project_id, job.id, settings.job_lease_s) == "busy":
        log.warning("project %s: pretraining job %s not run: another one is running",
                    project_id, job.id)  # fmt: skip
        return {"outcome": "not run: another pretraining of this project was running"}
    going_on = status.pretraining(project_id).get("slices")  # the last slice's progress stays
    status.pretraining_update(project_id, state="running", job_id=job.id, reason=reason,
                              started_at=redis_now(redis), error=None, retry=None,
                              **({} if going_on else {"progress": {}}))  # fmt: skip
    log.info("project %s: pretraining job %s started (%s)", project_id, job.id, reason)
    heartbeat = Heartbeat(marker, project_id, job.id, queue_name(settings), settings.job_lease_s)
    heartbeat.start()
    try:
        result = (target or _pretrain_target())(
            project_id,
            reason,
            settings=settings,
            status=status,
            progress=lambda **fields: _report(status, project_id, fields),
        )
        result = dict(result or {"outcome": "done"})
        if result.pop("continue", False):
            try:
                _next_slice(redis, settings, project_id, reason, job.id, target, result)
            except RedisError as exc:  # the checkpoint is on disk: the next request goes on
                log.warning("project %s: next pretraining slice not enqueued (Redis: %s); the "
                            "next training job asks for it and it goes on from the checkpoint",
                            project_id, type(exc).__name__)  # fmt: skip
            return result
        if result.get("backbone"):  # before "done": the project never looks settled between
            try:
                queue.request_training(redis, settings, project_id, "backbone ready")
            except RedisError as exc:
                log.warning("project %s: training on the new backbone not asked for (Redis: %s); "
                            "the next label's job uses it", project_id, type(exc).__name__)  # fmt: skip
        status.pretraining_update(
            project_id, state="done", finished_at=redis_now(redis), progress={}, kills=None,
            slices=None, **result,
        )  # fmt: skip
        log.info("project %s: pretraining job %s finished: %s", project_id, job.id,
                 result.get("outcome"))  # fmt: skip
    except BaseException as exc:
        error = redact(f"{type(exc).__name__}: {exc}")[:500]
        interrupted = isinstance(exc, (SystemExit, KeyboardInterrupt))
        if interrupted:
            error = "interrupted: the worker was stopped during the pretraining; it runs again"
        retry = interrupted or isinstance(exc, LabelStudioUnavailable)
        status.pretraining_update(
            project_id, state="failed", finished_at=redis_now(redis), progress={}, error=error,
            retry=retry, **({} if retry else {"slices": None}),  # a retry goes on from its slice
        )  # fmt: skip
        log.error("project %s: pretraining job %s failed: %s", project_id, job.id, error)
        raise
    finally:
        heartbeat.stop()
        marker.finish(project_id, job.id)
    return result
