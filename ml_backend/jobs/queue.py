"""Training requests with per-project coalescing on RQ.

Rules (per project): at most one training job runs and at most one waits.

- No job waiting or running: enqueue one (``"enqueued"``).
- One waiting: do nothing; it reads every label when it starts (``"already_waiting"``).
- One running, none waiting: mark the project dirty (``"marked_dirty"``); when the running job
  ends, exactly one follow-up is enqueued.

The markers live in Redis and every transition is one Lua script, so any number of web threads,
web processes and workers agree. A marker whose RQ job is gone, failed, stopped or canceled, or
whose worker no longer exists (killed), counts as absent, so a crashed worker never wedges a
project. The running marker also expires ``job_timeout + 120`` s after it was set.
"""

from __future__ import annotations

import importlib
import logging
import time
import uuid

from rq import Queue, get_current_job
from rq.job import Job
from rq.worker import Worker

from ml_backend.config import Settings
from ml_backend.jobs.state import StatusStore, project_key
from ml_backend.logs import redact

log = logging.getLogger(__name__)

DEFAULT_TARGET = "ml_backend.jobs.training:train_project"
MARKER_PREFIX = "mlb:queue:"
# A waiting marker may briefly name a job RQ has not stored yet (the enqueue follows the script).
ENQUEUE_GRACE_S = 30

# Shared by both scripts: is the job a marker names still alive?
_ALIVE = """
local function alive(marker, live_states)
  if not marker then return false end
  local sep = string.find(marker, '|', 1, true)
  local job_id = string.sub(marker, 1, sep - 1)
  local since = tonumber(string.sub(marker, sep + 1))
  local job_key = ARGV[1] .. job_id
  local status = redis.call('HGET', job_key, 'status')
  if not status then
    local now = redis.call('TIME')
    return (tonumber(now[1]) - since) < tonumber(ARGV[2])
  end
  if not live_states[status] then return false end
  local worker = redis.call('HGET', job_key, 'worker_name')
  if status == 'started' and worker and worker ~= '' then
    return redis.call('EXISTS', ARGV[3] .. worker) == 1
  end
  return true
end
"""

# KEYS: waiting, running, dirty. ARGV: job prefix, grace, worker prefix, new marker.
_REQUEST = (
    _ALIVE
    + """
local waiting = redis.call('GET', KEYS[1])
if alive(waiting, {queued=true, created=true, deferred=true, scheduled=true, started=true}) then
  return {'already_waiting', waiting}
end
redis.call('DEL', KEYS[1])
local running = redis.call('GET', KEYS[2])
if alive(running, {started=true, queued=true, created=true}) then
  redis.call('SET', KEYS[3], '1')
  return {'marked_dirty', running}
end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('SET', KEYS[1], ARGV[4])
return {'enqueued', ARGV[4], running or ''}
"""
)

# KEYS: waiting, running. ARGV: job prefix, grace, worker prefix, my marker, ttl, my job id.
_START = """
local waiting = redis.call('GET', KEYS[1])
if waiting and string.sub(waiting, 1, string.len(ARGV[6]) + 1) == ARGV[6] .. '|' then
  redis.call('DEL', KEYS[1])
end
redis.call('SET', KEYS[2], ARGV[4], 'EX', tonumber(ARGV[5]))
return 1
"""

# KEYS: waiting, running, dirty. ARGV: job prefix, grace, worker prefix, follow-up marker, my id.
_FINISH = (
    _ALIVE
    + """
local running = redis.call('GET', KEYS[2])
if running and string.sub(running, 1, string.len(ARGV[5]) + 1) == ARGV[5] .. '|' then
  redis.call('DEL', KEYS[2])
end
if redis.call('DEL', KEYS[3]) == 0 then return 'idle' end
local waiting = redis.call('GET', KEYS[1])
if alive(waiting, {queued=true, created=true, deferred=true, scheduled=true, started=true}) then
  return 'already_waiting'
end
redis.call('SET', KEYS[1], ARGV[4])
return 'follow_up'
"""
)


def _keys(project_id) -> tuple[str, str, str]:
    base = f"{MARKER_PREFIX}{project_key(project_id)}"
    return f"{base}:waiting", f"{base}:running", f"{base}:dirty"


def _common_args() -> list:
    return [Job.redis_job_namespace_prefix, ENQUEUE_GRACE_S, Worker.redis_worker_namespace_prefix]


def _marker(job_id: str) -> str:
    return f"{job_id}|{int(time.time())}"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def rq_queue(redis, settings: Settings) -> Queue:
    """The RQ queue training jobs go to (``settings.rq_queue``)."""
    return Queue(settings.rq_queue, connection=redis)


def _enqueue(
    redis, settings: Settings, project_id: int, reason: str, job_id: str, target: str
) -> None:
    rq_queue(redis, settings).enqueue(
        run_training_job,
        project_id,
        reason,
        target,
        job_id=job_id,
        job_timeout=settings.job_timeout,
        description=f"train project {project_id} ({reason})",
        result_ttl=24 * 3600,
        failure_ttl=30 * 24 * 3600,
    )
    StatusStore(redis).job_queued(project_id, job_id, reason)


def request_training(
    redis, settings: Settings, project_id: int, reason: str, target: str = DEFAULT_TARGET
) -> str:
    """Ask for a training job for ``project_id``, coalescing with the ones already there.

    Args:
        redis: a ``redis.Redis`` connection.
        settings: the backend settings (queue name, job timeout).
        project_id: Label Studio project id.
        reason: why (a webhook action, ``"refresh"``, ...); recorded with the job.
        target: dotted path ``module:function`` of the training function.

    Returns:
        ``"enqueued"``, ``"already_waiting"`` or ``"marked_dirty"``.

    Raises:
        redis.exceptions.RedisError: Redis is unreachable (the web layer answers 503).
    """
    project_id = int(project_id)
    job_id = f"train-{project_id}-{uuid.uuid4().hex[:12]}"
    script = redis.register_script(_REQUEST)
    outcome, _, *stale = script(keys=_keys(project_id), args=[*_common_args(), _marker(job_id)])
    outcome = _text(outcome)
    if stale and _text(stale[0]):
        # A job that was running died with its worker (killed, machine lost): say so.
        dead_job = _text(stale[0]).split("|")[0]
        StatusStore(redis).job_failed(
            project_id,
            dead_job,
            "the worker stopped without finishing this job (killed or crashed)",
        )
        log.warning("project %s: job %s was interrupted; starting over", project_id, dead_job)
    if outcome == "enqueued":
        _enqueue(redis, settings, project_id, reason, job_id, target)
        log.info("project %s: training job %s enqueued (%s)", project_id, job_id, reason)
    else:
        log.debug("project %s: %s (%s)", project_id, outcome, reason)
    return outcome


def queue_state(redis, project_id: int) -> dict:
    """The raw coalescing markers of a project (for ``/status``): job ids and the dirty flag."""
    waiting, running, dirty = redis.mget(_keys(project_id))
    return {
        "waiting_job": _text(waiting).split("|")[0] if waiting else None,
        "running_job": _text(running).split("|")[0] if running else None,
        "follow_up_requested": bool(dirty),
    }


def _import_target(target: str):
    module_name, _, attr = target.partition(":")
    if not attr:
        raise ValueError(f"target must look like 'package.module:function', got {target!r}")
    return getattr(importlib.import_module(module_name), attr)


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


def run_training_job(project_id: int, reason: str, target: str = DEFAULT_TARGET):
    """The RQ job: run ``target`` for the project, keeping the coalescing markers right.

    Moves the project waiting -> running, calls
    ``target(project_id, reason, settings=..., redis=..., status=StatusStore)``, records the outcome
    (the target returns ``{"outcome", "metrics", "model_version"}`` or an object with those
    attributes, or ``None``), and finally marks the project idle and enqueues exactly one follow-up
    when webhooks arrived during the run. Exceptions are recorded and re-raised, so RQ keeps the
    failed job (and its traceback) in its FailedJobRegistry.
    """
    job = get_current_job()
    redis = job.connection
    settings = _worker_settings or Settings.from_env()
    status = StatusStore(redis)
    waiting_key, running_key, dirty_key = _keys(project_id)
    ttl = int(settings.job_timeout) + 120
    redis.register_script(_START)(
        keys=[waiting_key, running_key],
        args=[*_common_args(), _marker(job.id), ttl, job.id],
    )
    status.job_started(project_id, job.id, reason)
    log.info("project %s: job %s started (%s)", project_id, job.id, reason)
    try:
        result = _import_target(target)(
            project_id, reason, settings=settings, redis=redis, status=status
        )
        outcome, metrics, version = _result_fields(result)
        status.job_finished(project_id, job.id, outcome, metrics, version)
        log.info("project %s: job %s finished: %s", project_id, job.id, outcome)
        return {"outcome": outcome, "metrics": metrics, "model_version": version}
    except BaseException as exc:  # timeouts and shutdowns too: the status must not say "running"
        status.job_failed(project_id, job.id, redact(f"{type(exc).__name__}: {exc}")[:500])
        log.error("project %s: job %s failed: %s", project_id, job.id, type(exc).__name__)
        raise
    finally:
        follow_id = f"train-{int(project_id)}-{uuid.uuid4().hex[:12]}"
        outcome = _text(
            redis.register_script(_FINISH)(
                keys=[waiting_key, running_key, dirty_key],
                args=[*_common_args(), _marker(follow_id), job.id],
            )
        )
        if outcome == "follow_up":
            _enqueue(redis, settings, int(project_id), "follow-up", follow_id, target)
            log.info("project %s: follow-up job %s enqueued", project_id, follow_id)
