"""Per-project status in Redis: what the job is doing, how the last one went, project knobs.

Written by the queue and the training job, read by ``/status``, ``/metrics``, ``/setup`` and
``/health``. Everything is JSON under the ``mlb:`` prefix, so several processes (web, any number
of workers) see the same picture:

- ``mlb:projects``            set of project ids ever seen
- ``mlb:status:<project>``    hash: state, job_id, reason, times, progress, last outcome/metrics
- ``mlb:history:<project>``   list of finished/failed jobs, newest first, capped
- ``mlb:params:<project>``    JSON object of per-project knobs from Label Studio's extra_params
- ``mlb:queue_top:<project>`` JSON list explaining the top of the labeling queue
- ``mlb:versions:<project>``  hash: Label Studio prediction version -> when it stopped being
                              current (the grace clock of its predictions)
- ``mlb:pretrained``          where the worker's initial weights came from
- ``mlb:pretrain:<project>``  the waiting or running pretraining job (``jobs.pretraining``)
"""

from __future__ import annotations

import json
import time
from typing import Any

PREFIX = "mlb:"
HISTORY_LENGTH = 50
STATES = ("idle", "waiting", "running")


def project_key(project: int | str) -> str:
    """Normalise a project id (``7``, ``"7"``) to the string used in keys."""
    return str(int(project))


def _dumps(value: Any) -> str:
    # default=str: numpy scalars and paths in metrics must not make a finished job fail to record.
    return json.dumps(value, default=str, allow_nan=False) if value is not None else "null"


def _loads(raw: bytes | str | None, default: Any = None) -> Any:
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        return default


def _safe_float(value: Any) -> Any:
    """NaN/inf are not JSON; store them as null."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    return value


def _clean(metrics: dict | None) -> dict:
    return {str(k): _safe_float(v) for k, v in (metrics or {}).items()}


class StatusStore:
    """Project status, job history and per-project knobs, stored in Redis.

    Args:
        redis: a ``redis.Redis`` connection (bytes or str responses both work).
        history_length: how many finished jobs to keep per project.
    """

    def __init__(self, redis, history_length: int = HISTORY_LENGTH):
        self.redis = redis
        self.history_length = history_length

    # -- keys ------------------------------------------------------------------------------
    def _status_key(self, project) -> str:
        return f"{PREFIX}status:{project_key(project)}"

    def _history_key(self, project) -> str:
        return f"{PREFIX}history:{project_key(project)}"

    def _params_key(self, project) -> str:
        return f"{PREFIX}params:{project_key(project)}"

    def _queue_top_key(self, project) -> str:
        return f"{PREFIX}queue_top:{project_key(project)}"

    def _touch(self, pipe, project) -> None:
        pipe.sadd(f"{PREFIX}projects", project_key(project))

    # -- job lifecycle ---------------------------------------------------------------------
    def job_queued(self, project: int | str, job_id: str, reason: str) -> None:
        """Record that a job was enqueued for ``project`` (state ``waiting`` unless one runs)."""
        key = self._status_key(project)
        pipe = self.redis.pipeline()
        self._touch(pipe, project)
        pipe.hset(
            key,
            mapping={
                "waiting_job_id": job_id,
                "waiting_reason": reason,
                "queued_at": _dumps(time.time()),
            },
        )
        pipe.execute()

    def job_started(self, project: int | str, job_id: str, reason: str) -> None:
        """Record that ``job_id`` started running for ``project``; clears the last progress."""
        key = self._status_key(project)
        pipe = self.redis.pipeline()
        self._touch(pipe, project)
        pipe.hset(
            key,
            mapping={
                "state": "running",
                "job_id": job_id,
                "reason": reason,
                "started_at": _dumps(time.time()),
                "progress": "{}",
            },
        )
        pipe.hdel(key, "waiting_job_id", "waiting_reason", "queued_at")
        pipe.execute()

    def progress(self, project: int | str, **fields: Any) -> None:
        """Merge small progress fields (``stage="train", epoch=3, epochs=10``) into the status."""
        key = self._status_key(project)
        current = _loads(self.redis.hget(key, "progress"), {}) or {}
        current.update({k: _safe_float(v) for k, v in fields.items()})
        current["updated_at"] = time.time()
        self.redis.hset(key, "progress", _dumps(current))

    def job_finished(
        self,
        project: int | str,
        job_id: str,
        outcome: str,
        metrics: dict,
        model_version: str | None,
    ) -> None:
        """Record a job that ended normally. ``outcome`` is data, e.g. ``"trained"``,
        ``"not_enough_labels"``, ``"cold_start_ordered"``; ``model_version`` is the version now
        served (``None`` keeps the previous one)."""
        self._finish(
            project,
            job_id,
            {
                "outcome": outcome,
                "metrics": _clean(metrics),
                "model_version": model_version,
                "error": None,
            },
            model_version,
        )

    def job_failed(self, project: int | str, job_id: str, error: str) -> None:
        """Record a job that raised; ``error`` is a one-line message (no traceback, no secrets)."""
        self._finish(
            project,
            job_id,
            {"outcome": "failed", "metrics": {}, "model_version": None, "error": error},
            None,
        )

    def _finish(self, project, job_id: str, entry: dict, model_version: str | None) -> None:
        key = self._status_key(project)
        started = _loads(self.redis.hget(key, "started_at"))
        now = time.time()
        entry = {
            "job_id": job_id,
            "reason": _text(self.redis.hget(key, "reason")),
            "started_at": started,
            "finished_at": now,
            "duration_s": round(now - started, 3) if isinstance(started, (int, float)) else None,
            **entry,
        }
        mapping = {"state": "idle", "last_job": _dumps(entry)}
        if model_version:
            mapping["model_version"] = model_version
        pipe = self.redis.pipeline()
        self._touch(pipe, project)
        pipe.hset(key, mapping=mapping)
        pipe.lpush(self._history_key(project), _dumps(entry))
        pipe.ltrim(self._history_key(project), 0, self.history_length - 1)
        pipe.execute()

    # -- reads -----------------------------------------------------------------------------
    def project_status(self, project: int | str) -> dict:
        """The status of one project (an empty-ish ``idle`` status when nothing is known)."""
        raw = {_text(k): v for k, v in self.redis.hgetall(self._status_key(project)).items()}
        state = _text(raw.get("state")) or "idle"
        waiting = _text(raw.get("waiting_job_id"))
        if state == "idle" and waiting:
            state = "waiting"
        return {
            "project": int(project_key(project)),
            "state": state,
            "model_version": _text(raw.get("model_version")),
            "job_id": _text(raw.get("job_id")),
            "reason": _text(raw.get("reason")),
            "started_at": _loads(raw.get("started_at")),
            "progress": _loads(raw.get("progress"), {}) or {},
            "waiting": {
                "job_id": waiting,
                "reason": _text(raw.get("waiting_reason")),
                "queued_at": _loads(raw.get("queued_at")),
            }
            if waiting
            else None,
            "last_job": _loads(raw.get("last_job")),
            "params": self.project_params(project),
            "image_size": int(_text(raw["image_size"])) if raw.get("image_size") else None,
            "acceptance": self.acceptance(project),
            "pretraining": self.pretraining(project),
        }

    def has_status(self, project: int | str) -> bool:
        """Whether any job was ever queued, run or recorded for ``project``."""
        return bool(self.redis.exists(self._status_key(project)))

    def projects(self) -> list[int]:
        """Ids of every project with any recorded status or params, ascending."""
        return sorted(int(_text(p)) for p in self.redis.smembers(f"{PREFIX}projects"))

    def history(self, project: int | str, n: int = 10) -> list[dict]:
        """The last ``n`` finished or failed jobs of ``project``, newest first."""
        rows = self.redis.lrange(self._history_key(project), 0, max(n, 1) - 1)
        return [_loads(r) for r in rows]

    def model_version(self, project: int | str) -> str | None:
        """The model version the last successful job published, or ``None``."""
        return _text(self.redis.hget(self._status_key(project), "model_version"))

    # -- per-project knobs and queue explanation ---------------------------------------------
    def set_project_params(self, project: int | str, params: dict) -> None:
        """Replace the project's knobs (already validated by the caller)."""
        pipe = self.redis.pipeline()
        self._touch(pipe, project)
        pipe.set(self._params_key(project), _dumps(dict(params)))
        pipe.execute()

    def project_params(self, project: int | str) -> dict:
        """The project's knobs (``{}`` when none were set)."""
        return _loads(self.redis.get(self._params_key(project)), {}) or {}

    def queue_top(self, project: int | str, items: list[dict]) -> None:
        """Store why the top of the queue is what it is: dicts with ``task_id, rank,
        uncertainty, distance`` (NaN stored as null)."""
        rows = [{k: _safe_float(v) for k, v in item.items()} for item in items]
        self.redis.set(self._queue_top_key(project), _dumps(rows))

    def read_queue_top(self, project: int | str) -> list[dict]:
        """The list stored by ``queue_top`` (``[]`` when none)."""
        return _loads(self.redis.get(self._queue_top_key(project)), []) or []

    # -- what is published in Label Studio ------------------------------------------------------
    def now(self) -> float:
        """Redis's clock (seconds): the one every host agrees on."""
        sec, usec = self.redis.time()
        return sec + usec / 1e6

    def set_published(self, project: int | str, published: dict) -> None:
        """Record what the project serves now: ``version``, ``queue_key``, ``model_key``, ``at``."""
        self.redis.hset(self._status_key(project), "published", _dumps(published))

    def published(self, project: int | str) -> dict:
        """What ``set_published`` recorded last (``{}`` before the first publish)."""
        return _loads(self.redis.hget(self._status_key(project), "published"), {}) or {}

    def _versions_key(self, project) -> str:
        return f"{PREFIX}versions:{project_key(project)}"

    def superseded_since(self, project: int | str) -> dict[str, float]:
        """``{version: when it stopped being current}`` for the project's older versions."""
        raw = self.redis.hgetall(self._versions_key(project))
        return {_text(k): float(_text(v)) for k, v in raw.items()}

    def mark_superseded(self, project: int | str, versions, at: float) -> None:
        """Start the grace clock of ``versions`` at ``at`` (a clock already running is kept)."""
        key = self._versions_key(project)
        pipe = self.redis.pipeline()
        for version in versions:
            pipe.hsetnx(key, version, repr(float(at)))
        pipe.execute()

    def forget_versions(self, project: int | str, versions) -> None:
        """Drop the clocks of versions that are current again or deleted."""
        versions = list(versions)
        if versions:
            self.redis.hdel(self._versions_key(project), *versions)

    # -- image size and pre-annotation acceptance ---------------------------------------------
    def image_size(self, project: int | str) -> int | None:
        """The size chosen for the project under ``IMAGE_SIZE=auto`` (None before the first)."""
        raw = _text(self.redis.hget(self._status_key(project), "image_size"))
        return int(raw) if raw else None

    def set_image_size(self, project: int | str, size: int) -> None:
        self.redis.hset(self._status_key(project), "image_size", int(size))

    # -- one-shot requests for the next job ------------------------------------------------
    def _flag_key(self, what: str, project) -> str:
        return f"{PREFIX}{what}:{project_key(project)}"

    def request_full_listing(self, project: int | str) -> None:
        """The next job lists every task (a bulk deletion in Label Studio may not bump the
        tasks' ``updated_at`` before its webhook arrives)."""
        self.redis.set(self._flag_key("full_listing", project), "1")

    def take_full_listing(self, project: int | str) -> bool:
        """Whether a full listing was requested; clears the request."""
        return self.redis.getdel(self._flag_key("full_listing", project)) is not None

    def request_predict_all(self, project: int | str) -> None:
        """The next job writes a pre-annotation for every unlabeled task, not only the top
        ``QUEUE_DEPTH`` (``refresh --all-tasks``, ``POST /train`` with ``all_tasks``). A flag,
        not a job reason: a job already waiting takes it too."""
        self.redis.set(self._flag_key("predict_all", project), "1")

    def predict_all_requested(self, project: int | str) -> bool:
        """Whether every task's pre-annotation was requested (the request stays until
        ``clear_predict_all``, so a job that fails before publishing leaves it for the next)."""
        return self.redis.exists(self._flag_key("predict_all", project)) > 0

    def clear_predict_all(self, project: int | str) -> None:
        self.redis.delete(self._flag_key("predict_all", project))

    # -- the pretraining job (``jobs.pretraining``) ----------------------------------------
    def pretraining(self, project: int | str) -> dict:
        """The project's self-supervised pretraining job as last recorded: ``state`` (waiting,
        running, done, failed), ``job_id``, ``reason``, times, ``progress`` while it runs, and
        ``outcome``, ``backbone``, ``epochs``, ``seconds`` or ``error`` once it ended; ``{}``
        before the first."""
        return _loads(self.redis.hget(self._status_key(project), "pretraining"), {}) or {}

    def pretraining_update(self, project: int | str, **fields: Any) -> None:
        """Merge ``fields`` into the pretraining record (None removes a field)."""
        current = self.pretraining(project)
        current.update({k: _safe_float(v) for k, v in fields.items()})
        current = {k: v for k, v in current.items() if v is not None}
        pipe = self.redis.pipeline()
        self._touch(pipe, project)
        pipe.hset(self._status_key(project), "pretraining", _dumps(current))
        pipe.execute()

    def pretraining_progress(self, project: int | str, **fields: Any) -> None:
        """Merge per-epoch progress (``epoch``, ``loss``, ``seconds_left``) into the record."""
        current = self.pretraining(project)
        progress = dict(current.get("progress") or {})
        progress.update({k: _safe_float(v) for k, v in fields.items()})
        progress["updated_at"] = time.time()
        self.pretraining_update(project, progress=progress)

    def _pushed_key(self, project) -> str:
        return f"{PREFIX}pushed:{project_key(project)}"

    def _acceptance_key(self, project) -> str:
        return f"{PREFIX}acceptance:{project_key(project)}"

    def record_pushed(self, project: int | str, version: str, labels: dict[int, str]) -> None:
        """Remember the pre-annotation each unlabeled task got (``{task_id: label}``) from
        ``version``: when its label arrives, ``score_acceptance`` compares the two."""
        if labels:
            self.redis.hset(
                self._pushed_key(project),
                mapping={str(t): _dumps([version, label]) for t, label in labels.items()},
            )

    def score_acceptance(self, project: int | str, labeled: dict[int, str]) -> dict:
        """Count, per version, how many newly labeled tasks kept their pre-annotation.

        ``labeled``: every labeled task of the project (``{task_id: label}``); each task with a
        remembered pre-annotation is counted once and then forgotten. Returns the new counts of
        this call, ``{version: {"kept", "n"}}``; the totals are in ``acceptance``.
        """
        key = self._pushed_key(project)
        ids = [str(t) for t in labeled]
        if not ids:
            return {}
        found = {}
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            for task_id, raw in zip(chunk, self.redis.hmget(key, chunk), strict=True):
                if raw is not None:
                    found[task_id] = _loads(raw)
        new: dict[str, dict] = {}
        for task_id, (version, label) in found.items():
            entry = new.setdefault(version, {"kept": 0, "n": 0})
            entry["n"] += 1
            entry["kept"] += int(labeled[int(task_id)] == label)
        if found:
            pipe = self.redis.pipeline()
            pipe.hdel(key, *found)
            for version, counts in new.items():
                pipe.hincrby(self._acceptance_key(project), f"{version}:kept", counts["kept"])
                pipe.hincrby(self._acceptance_key(project), f"{version}:n", counts["n"])
            pipe.execute()
        return new

    def acceptance(self, project: int | str) -> dict[str, dict]:
        """``{version: {"kept", "n", "rate"}}``: how often annotators kept each version's
        pre-filled choice, over all labels submitted on its pre-annotated tasks."""
        raw = {
            _text(k): int(v) for k, v in self.redis.hgetall(self._acceptance_key(project)).items()
        }
        out: dict[str, dict] = {}
        for field, value in raw.items():
            version, _, part = field.rpartition(":")
            out.setdefault(version, {"kept": 0, "n": 0})[part] = value
        for counts in out.values():
            counts["rate"] = round(counts["kept"] / counts["n"], 4) if counts["n"] else None
        return out

    def set_pretrained(self, source: str) -> None:
        """Record where the worker's initial weights came from (``build_model``'s string)."""
        self.redis.set(f"{PREFIX}pretrained", source)

    def pretrained(self) -> str | None:
        """What ``set_pretrained`` stored last, or ``None`` before any job built a model."""
        return _text(self.redis.get(f"{PREFIX}pretrained"))


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value
