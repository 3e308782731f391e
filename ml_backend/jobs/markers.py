"""The per-project coalescing markers in Redis, and every transition on them as one Lua script.

Keys of project ``p`` (``mlb:queue:<p>:*``):

- ``waiting``     ``<job id>|<since>|<rq queue>``: the job that will run next (at most one)
- ``running``     same format: the job running now (at most one)
- ``dirty``       a webhook arrived after the running job read the labels: one follow-up is due
- ``snapshot``    the running job's id once it has started reading labels from Label Studio
- ``last_event``  when the last training webhook arrived
- ``retry``       ``<due>|<attempt>``: a job failed because Label Studio was unreachable; the
                  reconciler runs the project again once ``due`` has passed

and ``mlb:lease:<job id>``, a key with a short TTL that the running job's heartbeat renews. A
running job is alive exactly while its lease exists: a worker killed with SIGKILL stops renewing
and its job is dead ``JOB_LEASE_S`` later, whatever RQ still believes. A waiting job is alive while
RQ holds it queued (or, for ``ENQUEUE_GRACE_S`` after the marker was written, before RQ stored it).

Every time is Redis ``TIME``, never a host clock, so web hosts and workers with skewed clocks agree.
Every transition is one script, so any number of web threads, web processes and workers agree.
"""

from __future__ import annotations

import dataclasses

from rq.job import Job

from ml_backend.jobs.state import project_key

PREFIX = "mlb:queue:"
LEASE_PREFIX = "mlb:lease:"
# A waiting marker may briefly name a job RQ has not stored yet (the enqueue follows the script).
ENQUEUE_GRACE_S = 30

_COMMON = """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function field(marker, n)
  local start = 1
  for _ = 1, n do
    local bar = string.find(marker, '|', start, true)
    if not bar then return nil end
    start = bar + 1
  end
  local bar = string.find(marker, '|', start, true)
  return string.sub(marker, start, bar and bar - 1 or -1)
end
local function id(marker) return marker and field(marker, 0) or nil end
local function leased(marker)
  return marker and redis.call('EXISTS', ARGV[3] .. id(marker)) == 1
end
local function queued(marker, grace)
  if not marker then return false end
  local status = redis.call('HGET', ARGV[1] .. id(marker), 'status')
  if not status then return (now() - tonumber(field(marker, 1))) < grace end
  return status == 'queued' or status == 'deferred' or status == 'scheduled'
    or status == 'created' or status == 'started'
end
local function marker(job_id, queue)
  return job_id .. '|' .. string.format('%.3f', now()) .. '|' .. queue
end
"""

# KEYS waiting running dirty snapshot last_event
# ARGV job_prefix grace lease_prefix new_job_id queue
_REQUEST = (
    _COMMON
    + """
redis.call('SET', KEYS[5], string.format('%.3f', now()))
local waiting = redis.call('GET', KEYS[1])
if queued(waiting, tonumber(ARGV[2])) then return {'already_waiting', waiting, ''} end
local running = redis.call('GET', KEYS[2])
if leased(running) then
  if redis.call('GET', KEYS[4]) == id(running) then
    redis.call('SET', KEYS[3], '1')
    return {'marked_dirty', running, ''}
  end
  return {'covered', running, ''}
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
local mine = marker(ARGV[4], ARGV[5])
redis.call('SET', KEYS[1], mine)
return {'enqueued', mine, running or ''}
"""
)

# KEYS waiting running dirty snapshot
# ARGV job_prefix grace lease_prefix my_id queue lease_ttl
_START = (
    _COMMON
    + """
local waiting = redis.call('GET', KEYS[1])
local running = redis.call('GET', KEYS[2])
if waiting and id(waiting) == ARGV[4] then redis.call('DEL', KEYS[1]) end
if running and id(running) ~= ARGV[4] and leased(running) then
  redis.call('SET', KEYS[3], '1')
  return {'busy', running}
end
redis.call('DEL', KEYS[3], KEYS[4])
local mine = marker(ARGV[4], ARGV[5])
redis.call('SET', KEYS[2], mine)
redis.call('SET', ARGV[3] .. ARGV[4], '1', 'EX', tonumber(ARGV[6]))
return {'started', running or ''}
"""
)

# KEYS running snapshot ; ARGV job_prefix grace lease_prefix my_id
_SNAPSHOT = (
    _COMMON
    + """
local running = redis.call('GET', KEYS[1])
if not running or id(running) ~= ARGV[4] then return {'lost', '0'} end
redis.call('SET', KEYS[2], ARGV[4])
return {'ok', string.format('%.3f', now())}
"""
)

# KEYS last_event ; ARGV: (none) -> seconds since the last training webhook (or a large number)
_QUIET_FOR = (
    _COMMON
    + """
local last = redis.call('GET', KEYS[1])
if not last then return '1e9' end
return string.format('%.3f', now() - tonumber(last))
"""
)

# KEYS running dirty snapshot ; ARGV job_prefix grace lease_prefix my_id queue lease_ttl
_HEARTBEAT = (
    _COMMON
    + """
local running = redis.call('GET', KEYS[1])
if not running then
  -- Redis lost its data (restart without persistence): this job is still the one running. Its
  -- snapshot mark went too, and a webhook may have failed while Redis was down (Label Studio
  -- does not resend it), so the job may not have every label: one follow-up is due.
  redis.call('SET', KEYS[1], marker(ARGV[4], ARGV[5]))
  redis.call('SET', KEYS[3], ARGV[4])
  redis.call('SET', KEYS[2], '1')
elseif id(running) ~= ARGV[4] then
  return 'lost'
end
redis.call('SET', ARGV[3] .. ARGV[4], '1', 'EX', tonumber(ARGV[6]))
return 'ok'
"""
)

# KEYS waiting running dirty snapshot ; ARGV job_prefix grace lease_prefix my_id queue follow_id
_FINISH = (
    _COMMON
    + """
redis.call('DEL', ARGV[3] .. ARGV[4])
local running = redis.call('GET', KEYS[2])
if running and id(running) ~= ARGV[4] then return 'not_mine' end
redis.call('DEL', KEYS[2], KEYS[4])
if redis.call('DEL', KEYS[3]) == 0 then return 'idle' end
if queued(redis.call('GET', KEYS[1]), tonumber(ARGV[2])) then return 'already_waiting' end
redis.call('SET', KEYS[1], marker(ARGV[6], ARGV[5]))
return 'follow_up'
"""
)

# KEYS waiting running dirty snapshot retry ; ARGV job_prefix grace lease_prefix queue follow_id
# -> {outcome, dead running marker, lost waiting marker}; 'requeue' / 'retry': enqueue follow_id
_RECONCILE = (
    _COMMON
    + """
local function ours(m) return m and field(m, 2) == ARGV[4] end
local running = redis.call('GET', KEYS[2])
local waiting = redis.call('GET', KEYS[1])
local dead, lost = '', ''
if ours(running) and not leased(running) then
  dead = running
  redis.call('DEL', KEYS[2], KEYS[4])
  running = nil
end
if ours(waiting) and not queued(waiting, tonumber(ARGV[2])) then
  lost = waiting
  redis.call('DEL', KEYS[1])
  waiting = nil
end
if (dead ~= '' or lost ~= '') and not waiting and not leased(running) then
  redis.call('DEL', KEYS[3])
  redis.call('SET', KEYS[1], marker(ARGV[5], ARGV[4]))
  return {'requeue', dead, lost}
end
local retry = redis.call('GET', KEYS[5])
if retry and field(retry, 2) == ARGV[4] and tonumber(field(retry, 0)) <= now()
    and not queued(waiting, tonumber(ARGV[2])) and not leased(running) then
  redis.call('SET', KEYS[1], marker(ARGV[5], ARGV[4]))
  return {'retry', dead, lost}
end
return {'ok', dead, lost}
"""
)

# KEYS retry ; ARGV delay_base max_delay queue -> the delay chosen (seconds)
_RETRY_LATER = (
    _COMMON
    + """
local attempt = 0
local old = redis.call('GET', KEYS[1])
if old then attempt = tonumber(field(old, 1)) + 1 end
local delay = math.min(tonumber(ARGV[1]) * (2 ^ attempt), tonumber(ARGV[2]))
redis.call('SET', KEYS[1], string.format('%.3f', now() + delay) .. '|' .. attempt .. '|' .. ARGV[3])
return string.format('%.3f', delay)
"""
)

# KEYS waiting running dirty ; ARGV job_prefix grace lease_prefix
_READ = (
    _COMMON
    + """
local waiting = redis.call('GET', KEYS[1])
local running = redis.call('GET', KEYS[2])
return {
  leased(running) and running or '',
  queued(waiting, tonumber(ARGV[2])) and waiting or '',
  redis.call('EXISTS', KEYS[3]),
}
"""
)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def job_of(marker: str) -> str:
    """The job id a marker names ('' for none)."""
    return marker.split("|", 1)[0] if marker else ""


@dataclasses.dataclass(frozen=True)
class Keys:
    """The marker keys of one project."""

    waiting: str
    running: str
    dirty: str
    snapshot: str
    last_event: str

    @property
    def retry(self) -> str:
        return self.waiting.rsplit(":", 1)[0] + ":retry"

    @classmethod
    def of(cls, project_id) -> Keys:
        base = f"{PREFIX}{project_key(project_id)}"
        return cls(*(f"{base}:{name}" for name in ("waiting", "running", "dirty", "snapshot",
                                                     "last_event")))  # fmt: skip


def _args(*extra) -> list:
    return [Job.redis_job_namespace_prefix, ENQUEUE_GRACE_S, LEASE_PREFIX, *extra]


class Markers:
    """The scripts bound to one Redis connection; each method is one atomic transition."""

    def __init__(self, redis):
        self.redis = redis
        self._scripts = {}

    def _run(self, source: str, keys: list, args: list):
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.redis.register_script(source)
        return script(keys=keys, args=args)

    def request(self, project_id, job_id: str, queue: str) -> tuple[str, str, str]:
        """A webhook: ``(outcome, marker, dead running marker)``; outcome is ``enqueued``,
        ``already_waiting``, ``covered`` (a running job has not read the labels yet) or
        ``marked_dirty``."""
        k = Keys.of(project_id)
        got = self._run(
            _REQUEST,
            [k.waiting, k.running, k.dirty, k.snapshot, k.last_event],
            _args(job_id, queue),
        )
        return tuple(_text(v) for v in got)  # type: ignore[return-value]

    def start(self, project_id, job_id: str, queue: str, lease_s: int) -> tuple[str, str]:
        """The job begins: ``("started", previous running marker)`` or ``("busy", live marker)``
        when another job of the project still holds its lease."""
        k = Keys.of(project_id)
        got = self._run(
            _START, [k.waiting, k.running, k.dirty, k.snapshot], _args(job_id, queue, lease_s)
        )
        return _text(got[0]), _text(got[1])

    def quiet_for(self, project_id) -> float:
        """Seconds since the project's last training webhook (Redis clock)."""
        return float(_text(self._run(_QUIET_FOR, [Keys.of(project_id).last_event], [])))

    def snapshot(self, project_id, job_id: str) -> bool:
        """Mark that the job starts reading labels now: later webhooks need a follow-up."""
        k = Keys.of(project_id)
        got = self._run(_SNAPSHOT, [k.running, k.snapshot], _args(job_id))
        return _text(got[0]) == "ok"

    def heartbeat(self, project_id, job_id: str, queue: str, lease_s: int) -> str:
        """Renew the lease: ``ok``, or ``lost`` when another job took the project over. When
        Redis lost the markers (a restart without persistence), restores them and asks for a
        follow-up, since labels may have arrived unseen meanwhile."""
        k = Keys.of(project_id)
        keys = [k.running, k.dirty, k.snapshot]
        return _text(self._run(_HEARTBEAT, keys, _args(job_id, queue, lease_s)))

    def finish(self, project_id, job_id: str, queue: str, follow_id: str) -> str:
        """The job ended: ``idle``, ``follow_up`` (enqueue ``follow_id``), ``already_waiting``
        or ``not_mine``."""
        k = Keys.of(project_id)
        return _text(
            self._run(
                _FINISH,
                [k.waiting, k.running, k.dirty, k.snapshot],
                _args(job_id, queue, follow_id),
            )
        )

    def reconcile(self, project_id, queue: str, follow_id: str) -> tuple[str, str, str]:
        """Clear a dead running job or a lost waiting one of ``queue``: ``(outcome, dead, lost)``;
        ``requeue`` means the caller must enqueue ``follow_id``."""
        k = Keys.of(project_id)
        got = self._run(
            _RECONCILE,
            [k.waiting, k.running, k.dirty, k.snapshot, k.retry],
            _args(queue, follow_id),
        )
        return tuple(_text(v) for v in got)  # type: ignore[return-value]

    def retry_later(self, project_id, base_s: float, max_s: float, queue: str) -> float:
        """Ask the reconciler to run the project again after ``base_s`` seconds, doubling per
        consecutive failure up to ``max_s``; returns the delay."""
        keys = [Keys.of(project_id).retry]
        return float(_text(self._run(_RETRY_LATER, keys, [base_s, max_s, queue])))

    def want_follow_up(self, project_id) -> None:
        """Make the running job's end enqueue a follow-up (it was interrupted)."""
        self.redis.set(Keys.of(project_id).dirty, "1")

    def clear_retry(self, project_id) -> None:
        """A job succeeded: no retry pending, and the next failure starts from ``base_s``."""
        self.redis.delete(Keys.of(project_id).retry)

    def read(self, project_id) -> dict:
        """The live state: ``{"running_job", "waiting_job", "follow_up_requested"}`` where a job
        counts only while it is alive (lease held / still queued)."""
        k = Keys.of(project_id)
        running, waiting, dirty = self._run(_READ, [k.waiting, k.running, k.dirty], _args())
        return {
            "running_job": job_of(_text(running)) or None,
            "waiting_job": job_of(_text(waiting)) or None,
            "follow_up_requested": bool(int(dirty)),
        }
