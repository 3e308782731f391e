"""The project's tasks as the last job read them, so that the next job reads only what changed.

Label Studio bumps a task's ``updated_at`` whenever an annotation of it is saved or deleted or
the task itself changes (predictions imported in bulk, as the backend pushes them, do not); a
new task starts with its creation time. A job therefore asks Label Studio only for the tasks updated since the newest
``updated_at`` it has seen, less ``OVERLAP_S`` (tasks at the same instant, or whose write was
still committing, are read twice rather than missed), and merges them into the index, kept in
``MODEL_DIR/<project>/tasks.json`` (written atomically).

Deleted tasks do not show up in that query. A job compares the index's size with the project's
task count (one cheap call) and lists every task when they differ; a full listing also runs
every ``TASK_RESYNC_S`` seconds, on ``refresh``, after ``ANNOTATIONS_DELETED`` (the job passes
``full``) and when the index is missing or unreadable.
``TASK_RESYNC_S=0`` lists every task in every job (the behaviour before the index).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT = 1
OVERLAP_S = 5.0
FILE = "tasks.json"


def _parse(stamp: str) -> dt.datetime | None:
    try:
        parsed = dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def _high_water(tasks) -> str | None:
    """The newest ``updated_at`` among ``tasks`` (None when any task lacks one)."""
    newest = None
    for task in tasks:
        stamp = _parse(task.get("updated_at") or "")
        if stamp is None:
            return None
        newest = stamp if newest is None or stamp > newest else newest
    return None if newest is None else newest.isoformat()


class TaskIndex:
    """The task index of one project under ``model_dir``."""

    def __init__(self, model_dir: str | Path, project_id: int):
        self.path = Path(model_dir) / str(int(project_id)) / FILE

    def load(self) -> dict | None:
        """``{"tasks": [...], "full_at": unix time, "high_water": iso}`` or None."""
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("task index %s unreadable (%s); listing every task", self.path, exc)
            return None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            return None
        return state

    def save(self, tasks: list[dict], full_at: float, unlisted: int = 0) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {"format": FORMAT, "full_at": full_at, "high_water": _high_water(tasks),
                 "unlisted": unlisted, "tasks": tasks}  # fmt: skip
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tasks-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(state, f, separators=(",", ":"), default=str)  # datetimes of the SDK
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

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
        state = None if full or resync_s <= 0 else self.load()
        why = (
            (full if isinstance(full, str) else "refresh")
            if full
            else "TASK_RESYNC_S=0"
            if resync_s <= 0
            else "no index yet"
        )
        if state is not None:
            why = self._stale(state, resync_s)
        if state is not None and why is None:
            since = _parse(state["high_water"]) - dt.timedelta(seconds=OVERLAP_S)
            # Label Studio's own format: its filter answers HTTP 500 to "+00:00"
            after = since.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            changed = list(client.iter_tasks(project_id, updated_after=after))
            merged = {int(t["id"]): t for t in state["tasks"]}
            merged.update({int(t["id"]): t for t in changed})
            # The project's task count against the index (less what a full listing did not
            # return, e.g. tasks Label Studio does not list): a difference means deleted tasks.
            expected = client.project(project_id).get("task_number")
            unlisted = int(state.get("unlisted") or 0)
            if expected is None or len(merged) + unlisted == int(expected):
                tasks = [merged[k] for k in sorted(merged)]
                self.save(tasks, state["full_at"], unlisted)
                return tasks, {"listing": "changed", "read": len(changed), "why": None}
            why = f"the index has {len(merged)} tasks, Label Studio {expected} (deleted tasks)"
        started = time.time()
        tasks = sorted(client.iter_tasks(project_id), key=lambda t: int(t["id"]))
        expected = None if resync_s <= 0 else client.project(project_id).get("task_number")
        unlisted = 0 if expected is None else max(0, int(expected) - len(tasks))
        self.save(tasks, started, unlisted)
        return tasks, {"listing": "full", "read": len(tasks), "why": why}

    @staticmethod
    def _stale(state: dict, resync_s: float) -> str | None:
        """Why the index cannot be brought up to date by a query of changed tasks, or None."""
        if not state.get("high_water") or _parse(state["high_water"]) is None:
            return "the tasks carry no updated_at"
        age = time.time() - float(state.get("full_at") or 0)
        if age >= resync_s:
            return f"the last full listing is {age:.0f} s old (TASK_RESYNC_S={resync_s:g})"
        return None
