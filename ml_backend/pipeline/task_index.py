"""The project's tasks as the last job read them, so that the next job reads only what changed.

Label Studio bumps a task's ``updated_at`` whenever an annotation of it is saved or deleted or
the task itself changes (predictions imported in bulk, as the backend pushes them, do not); a
new task starts with its creation time. A job therefore asks Label Studio only for the tasks
updated since the newest ``updated_at`` it has seen, less ``OVERLAP_S`` (tasks at the same
instant, or whose write was still committing, are read twice rather than missed), and writes
them into the index.

The index is one SQLite file per project, ``MODEL_DIR/<project>/tasks.sqlite`` (one row per
task: id, ``updated_at`` and the task as Label Studio sent it, JSON); a job writes only the rows
that changed, in one transaction, so a job killed half way leaves the previous index intact.
At 100,000 tasks a job's write is a few rows instead of rewriting ~50 MB, and the read is one
query (~0.5 s). The file is in WAL mode: the pretraining job reads it while a training job
writes.

Deleted tasks do not show up in that query. A job compares the index's size with the project's
task count (one cheap call) and lists every task when they differ; a full listing also runs
every ``TASK_RESYNC_S`` seconds, on ``refresh``, after ``ANNOTATIONS_DELETED`` (the job passes
``full``) and when the index is missing or unreadable (a damaged file is deleted and rebuilt).
``TASK_RESYNC_S=0`` lists every task in every job (the behaviour before the index).

A worker is one process for every job (an RQ ``SimpleWorker``), so it also keeps the tasks it
last read in memory (``MEMO_TASKS``), with the index's identity (a random ``instance`` written
with each full listing) and ``generation`` (counted up by every write). A job whose index still
has the generation the memo was taken at applies the rows it just read to the memo instead of
parsing every task again (at 100,000 tasks, about 1 s of JSON per label); any other writer (a
second worker, a full listing, a rebuilt file) changes one of the two, and the job reads the
whole index as before.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import sqlite3
import threading
import time
import uuid
from bisect import bisect_left
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT = 2  # 1: one JSON file, rewritten whole by every job (tasks.json, deleted on sight)
OVERLAP_S = 5.0
FILE = "tasks.sqlite"
LEGACY_FILE = "tasks.json"
SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (id INTEGER PRIMARY KEY, updated_at TEXT, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT);
"""
# The tasks this process last read per index file, while there are at most this many (a parsed
# task with its annotations is about 1-2 KB of Python objects: 100,000 tasks about 150 MB).
MEMO_TASKS = 500_000
_memo: dict[str, tuple[tuple, list[dict], list[int]]] = {}  # path -> (version, tasks, their ids)
_memo_lock = threading.Lock()


def _parse(stamp: str) -> dt.datetime | None:
    try:
        parsed = dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def _high_water(tasks: Iterable[dict], newest: dt.datetime | None = None) -> str | None:
    """The newest ``updated_at`` among ``tasks`` and ``newest`` (None when a task lacks one)."""
    for task in tasks:
        stamp = _parse(task.get("updated_at") or "")
        if stamp is None:
            return None
        newest = stamp if newest is None or stamp > newest else newest
    return None if newest is None else newest.isoformat()


def _rows(tasks: Iterable[dict]):
    for task in tasks:  # default=str: datetimes of the SDK
        yield (int(task["id"]), task.get("updated_at"),
               json.dumps(task, separators=(",", ":"), default=str))  # fmt: skip


def _version(state: dict) -> tuple:
    """``(instance, generation)`` of an index (``instance`` None: written before they existed)."""
    return state.get("instance"), int(state.get("generation") or 0)


class TaskIndex:
    """The task index of one project under ``model_dir``."""

    def __init__(self, model_dir: str | Path, project_id: int):
        self.path = Path(model_dir) / str(int(project_id)) / FILE

    @contextlib.contextmanager
    def _db(self, create: bool):
        """A connection (closed after), or None when there is no index and ``create`` is off."""
        if not create and not self.path.exists():
            yield None
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        (self.path.parent / LEGACY_FILE).unlink(missing_ok=True)
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            yield db
        finally:
            db.close()

    def _state(self, db) -> dict:
        state = dict(db.execute("SELECT key, value FROM state"))
        return {k: json.loads(v) for k, v in state.items()}

    @staticmethod
    def _tasks(db) -> list[dict]:
        """Every task, sorted by id: one JSON document built by SQLite, parsed once."""
        (text,) = db.execute("SELECT '[' || coalesce(group_concat(body, ','), '') || ']' "
                             "FROM (SELECT body FROM tasks ORDER BY id)").fetchone()  # fmt: skip
        return json.loads(text)

    def load(self) -> dict | None:
        """``{"tasks": [...], "full_at": unix time, "high_water": iso, "unlisted": n}`` or
        None (no index, another format, or unreadable: then the file is deleted)."""
        try:
            with self._db(create=False) as db:
                if db is None:
                    return None
                state = self._state(db)
                if state.get("format") != FORMAT:
                    return None
                return {**state, "tasks": self._tasks(db)}
        except (sqlite3.Error, ValueError) as exc:
            self._discard(exc)
            return None

    def _discard(self, exc: Exception) -> None:
        log.warning("task index %s unreadable (%s); listing every task", self.path, exc)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def save(self, tasks: list[dict], full_at: float, unlisted: int = 0) -> None:
        """Replace the whole index with ``tasks`` (a full listing), in one transaction."""
        try:
            self._replace(tasks, full_at, unlisted)
        except (sqlite3.DatabaseError, ValueError) as exc:  # a damaged file: start over
            self._discard(exc)
            self._replace(tasks, full_at, unlisted)

    def _replace(self, tasks: list[dict], full_at: float, unlisted: int) -> None:
        with self._db(create=True) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM tasks")
                db.executemany("INSERT OR REPLACE INTO tasks VALUES (?, ?, ?)", _rows(tasks))
                self._set_state(db, full_at=full_at, high_water=_high_water(tasks),
                                unlisted=unlisted, instance=uuid.uuid4().hex, generation=0)  # fmt: skip
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        with _memo_lock:
            _memo.pop(str(self.path), None)  # read back from the file by the next job

    @staticmethod
    def _set_state(db, **values) -> None:
        db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)",
                       [(k, json.dumps(v)) for k, v in {"format": FORMAT, **values}.items()])  # fmt: skip

    def read(self, client, project_id: int, resync_s: float, full: bool | str = False):
        """Every task of the project, sorted by id, and how they were read.

        Args:
            client: the LabelStudioClient (``iter_tasks``, ``project``).
            project_id: the project.
            resync_s: list every task when the last full listing is older than this (0: always).
            full: list every task now (True: ``refresh``; or a string that says why).

        Returns:
            ``(tasks, info)``; ``info`` has ``listing`` (``"full"`` or ``"changed"``), ``read``
            (tasks read from Label Studio) and ``why`` (the reason for a full listing).
        """
        why = (
            (full if isinstance(full, str) else "refresh")
            if full
            else "TASK_RESYNC_S=0"
            if resync_s <= 0
            else "no index yet"
        )
        if not full and resync_s > 0:
            try:
                done, why = self._changed(client, project_id, resync_s)
            except (sqlite3.Error, ValueError) as exc:
                self._discard(exc)
                done, why = None, "no index yet"
            if done is not None:
                return done
        started = time.time()
        tasks = sorted(client.iter_tasks(project_id), key=lambda t: int(t["id"]))
        expected = (
            None
            if resync_s <= 0
            else client.project(project_id, fields=("task_number",)).get("task_number")
        )
        unlisted = 0 if expected is None else max(0, int(expected) - len(tasks))
        self.save(tasks, started, unlisted)
        return tasks, {"listing": "full", "read": len(tasks), "why": why}

    def _changed(self, client, project_id: int, resync_s: float):
        """``((tasks, info), None)`` when the changed tasks brought the index up to date, or
        ``(None, why)`` when every task must be listed."""
        with self._db(create=False) as db:
            state = None if db is None else self._state(db)
            if not state or state.get("format") != FORMAT:
                return None, "no index yet"
            why = self._stale(state, resync_s)
            if why is not None:
                return None, why
            since = _parse(state["high_water"]) - dt.timedelta(seconds=OVERLAP_S)
            # Label Studio's own format: its filter answers HTTP 500 to "+00:00"
            after = since.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            changed = list(client.iter_tasks(project_id, updated_after=after))
            # The project's task count against the index (less what a full listing did not
            # return, e.g. tasks Label Studio does not list): a difference means deleted tasks.
            expected = client.project(project_id, fields=("task_number",)).get("task_number")
            unlisted = int(state.get("unlisted") or 0)
            rows = list(_rows(changed))
            db.execute("BEGIN IMMEDIATE")
            try:
                # Read again inside the write lock: another process may have written since.
                state = self._state(db)
                db.executemany("INSERT OR REPLACE INTO tasks VALUES (?, ?, ?)", rows)
                (count,) = db.execute("SELECT count(*) FROM tasks").fetchone()
                if expected is not None and count + unlisted != int(expected):
                    db.execute("ROLLBACK")
                    return None, (
                        f"the index has {count} tasks, Label Studio {expected} (deleted tasks)"
                    )
                before = _version(state)  # an index older than the memo gets an identity now
                after = (before[0] or uuid.uuid4().hex, before[1] + 1)
                self._set_state(db, full_at=state["full_at"], unlisted=unlisted,
                                high_water=_high_water(changed, _parse(state["high_water"])),
                                instance=after[0], generation=after[1])  # fmt: skip
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            tasks = self._updated_memo(before, after, rows)
            if tasks is None:
                tasks = self._tasks(db)
                self._remember(after, tasks)
        return (list(tasks), {"listing": "changed", "read": len(changed), "why": None}), None

    def _updated_memo(self, before: tuple, after: tuple, rows: list) -> list[dict] | None:
        """The memo with ``rows`` applied, when it was taken at ``before``; else None."""
        with _memo_lock:
            memo = _memo.pop(str(self.path), None)
        if memo is None or before[0] is None or memo[0] != before:
            return None
        _, tasks, ids = memo
        for task_id, _, body in rows:  # the index's own JSON, as a read of the file gives it
            at = bisect_left(ids, task_id)
            if at < len(ids) and ids[at] == task_id:
                tasks[at] = json.loads(body)
            else:
                ids.insert(at, task_id)
                tasks.insert(at, json.loads(body))
        self._remember(after, tasks, ids)
        return tasks

    def _remember(self, version: tuple, tasks: list[dict], ids: list[int] | None = None) -> None:
        if version[0] is None or len(tasks) > MEMO_TASKS:
            return
        ids = [int(t["id"]) for t in tasks] if ids is None else ids
        with _memo_lock:
            _memo[str(self.path)] = (version, tasks, ids)

    @staticmethod
    def _stale(state: dict, resync_s: float) -> str | None:
        """Why the index cannot be brought up to date by a query of changed tasks, or None."""
        if not state.get("high_water") or _parse(state["high_water"]) is None:
            return "the tasks carry no updated_at"
        age = time.time() - float(state.get("full_at") or 0)
        if age >= resync_s:
            return f"the last full listing is {age:.0f} s old (TASK_RESYNC_S={resync_s:g})"
        return None
