"""The dashboard: ``/dashboard``, one page a team keeps open while it labels.

Server-rendered HTML (Jinja, escaped) with inline SVG charts, plus a little vanilla JavaScript
(``static/dashboard.js``) that polls the JSON ``/status`` every two seconds, updates the live
parts (state, progress, the Label Studio connection) in place, and reloads the page's content
when a job finished or the queue changed. No torch, no front-end build, no plotting library.

Per project: the state and live progress of the current job; validation accuracy against labels
used, one point per version; how often annotators kept the pre-filled choice per version (the
job's ``acceptance`` metric, "not measured yet" without it); the job history with failures and
their reasons; the queue top as thumbnails (``/dashboard/thumbnail/<project>/<task>``, see
``thumbnails.py``) with the reason for each in words. The same basic auth as the API applies
(the app's ``before_request`` hook covers every route but ``/health``).
"""

from __future__ import annotations

import datetime as dt
import logging

from flask import Blueprint, Response, current_app, render_template
from redis.exceptions import RedisError

from ml_backend.errors import BackendError, QueueUnavailable
from ml_backend.jobs.queue import live_status
from ml_backend.jobs.state import StatusStore
from ml_backend.server.charts import Point, line_chart
from ml_backend.server.thumbnails import Thumbnails

log = logging.getLogger(__name__)
dashboard_bp = Blueprint(
    "dashboard",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/dashboard/static",
)

# Scripts, styles and images from this app only; no inline script; the page cannot be framed.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
HISTORY_SHOWN = 50
QUEUE_TOP_SHOWN = 24
TRAINED_PREFIX = "resnet18-v"
STAGES = {
    "fetching": "reading tasks and images from Label Studio",
    "pretraining": "learning from the project's unlabeled images (self-supervised)",
    "training": "training",
    "predicting": "predicting every task",
    "pushing": "pushing predictions to Label Studio",
}
FINE_TUNING = "fine-tuning the whole network (the head version is live meanwhile)"


def _ext() -> dict:
    return current_app.extensions["ml_backend"]


def _when(epoch) -> str:
    if not isinstance(epoch, (int, float)):
        return ""
    return dt.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def _share(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and 0 <= value <= 1 else None


def acceptance_of(metrics: dict) -> tuple[float | None, int | None, str | None]:
    """``(share kept, tasks counted, version measured)`` from a job's ``acceptance`` metric.

    Accepts a number (the share) or a dict with the share under ``rate``, ``share`` or
    ``value`` (or ``kept`` / ``total`` counts), the count under ``n``/``total``/``count`` and the
    version measured under ``version``/``model_version``. Anything else counts as not measured.
    """
    raw = (metrics or {}).get("acceptance")
    if isinstance(raw, bool):
        return None, None, None
    if isinstance(raw, (int, float)):
        return _share(raw), None, None
    if not isinstance(raw, dict):
        return None, None, None
    share = next((_share(raw[k]) for k in ("rate", "share", "value") if k in raw), None)
    count = next((raw[k] for k in ("n", "total", "count") if isinstance(raw.get(k), int)), None)
    if share is None and isinstance(raw.get("kept"), int) and count:
        share = raw["kept"] / count
    version = raw.get("version") or raw.get("model_version")
    return share, count, version if isinstance(version, str) else None


def version_points(history: list[dict]) -> tuple[list[Point], list[Point]]:
    """Validation accuracy and acceptance per trained version, x = labels the version used.

    ``history`` is newest first. Acceptance measured by a job is about the version annotators
    saw while labeling, i.e. the one served before that job (unless the metric names it).
    """
    labels_of: dict[str, float] = {}
    accuracy: dict[str, Point] = {}
    acceptance: dict[str, Point] = {}
    served_before: dict[str, str | None] = {}
    previous = None
    for entry in reversed(history):  # oldest first
        version, metrics = entry.get("model_version"), entry.get("metrics") or {}
        if entry.get("error") or not version:
            continue
        served_before[entry.get("job_id")] = previous
        previous = version
        used = metrics.get("labels_used")
        if version.startswith(TRAINED_PREFIX) and isinstance(used, (int, float)):
            labels_of[version] = float(used)
            val = _share(metrics.get("val_accuracy"))
            if val is not None:
                accuracy[version] = Point(float(used), val, version)
    for entry in history:
        share, count, measured = acceptance_of(entry.get("metrics") or {})
        measured = measured or served_before.get(entry.get("job_id"))
        if share is None or measured not in labels_of or measured in acceptance:
            continue
        note = f" of {count} tasks" if count else ""
        acceptance[measured] = Point(labels_of[measured], share, f"{measured}{note}")
    return list(accuracy.values()), list(acceptance.values())


def progress_text(status: dict) -> tuple[str, float | None]:
    """What the running job is doing, in words, and how far (0 to 1) when known."""
    progress = status.get("progress") or {}
    stage = progress.get("stage")
    if status.get("state") != "running":
        return "", None
    words = STAGES.get(stage, stage or "starting")
    if stage == "training" and progress.get("fine_tune"):
        words = FINE_TUNING
    fraction = None
    if stage == "training" and progress.get("epochs"):
        epoch = progress.get("epoch") or 0
        words += f": epoch {epoch} of {progress['epochs']}"
        if progress.get("loss") is not None:
            words += f", loss {progress['loss']:.3f}"
        if progress.get("val_accuracy") is not None:
            words += f", validation accuracy {progress['val_accuracy']:.0%}"
        fraction = epoch / progress["epochs"]
    elif stage == "pretraining" and progress.get("epoch"):
        words += f": epoch {progress['epoch']}, {progress.get('seconds_left', 0):.0f} s left"
        budget = progress.get("budget_s")
        if budget:
            fraction = max(0.0, 1 - (progress.get("seconds_left") or 0) / budget)
    elif stage == "predicting" and progress.get("total"):
        done = progress.get("done") or 0
        words += f": {done} of {progress['total']} tasks"
        fraction = done / progress["total"]
    elif stage == "pushing" and progress.get("total"):
        words += f": {progress['total']} predictions"
    return words, None if fraction is None else max(0.0, min(1.0, fraction))


def pretraining_text(status: dict) -> str:
    """The project's pretraining job in words (``jobs.pretraining``), or ``""`` before any."""
    pre = status.get("pretraining") or {}
    state = pre.get("state")
    if state == "running":
        words = "Pretraining the project's own backbone (self-supervised)"
        progress = pre.get("progress") or {}
        if progress.get("epoch"):
            words += f": epoch {progress['epoch']}, {progress.get('seconds_left') or 0:.0f} s left"
        return words + "; jobs use the backbone they have meanwhile."
    if state == "waiting" and pre.get("slices"):
        progress = pre.get("progress") or {}
        return (f"Pretraining the project's own backbone: paused after slice {pre['slices']} "
                f"(epoch {progress.get('epoch') or 0}, {progress.get('seconds_left') or 0:.0f} s "
                "left) while waiting retrains run; it goes on after them.")  # fmt: skip
    if state == "waiting":
        return f"A pretraining of the project's backbone is waiting ({pre.get('reason')})."
    if state in ("failed", "stopped"):
        return f"Last pretraining failed: {pre.get('error')}"
    if state == "done" and pre.get("backbone"):
        return (f"Backbone {pre['backbone']} pretrained on {pre.get('images')} images "
                f"({pre.get('epochs')} epochs, {pre.get('seconds') or 0:.0f} s).")  # fmt: skip
    return pre.get("outcome") or ""


def history_rows(history: list[dict]) -> list[dict]:
    """The job history as table rows (newest first)."""
    rows = []
    for entry in history:
        metrics = entry.get("metrics") or {}
        val = _share(metrics.get("val_accuracy"))
        share, _, _ = acceptance_of(metrics)
        took = entry.get("duration_s")
        rows.append(
            {
                "finished": _when(entry.get("finished_at")),
                "reason": entry.get("reason") or "",
                "outcome": entry.get("outcome") or "",
                "version": entry.get("model_version") or "",
                "labels": metrics.get("labels_used", ""),
                "accuracy": "" if val is None else f"{val:.1%}",
                "acceptance": "" if share is None else f"{share:.0%}",
                "duration": "" if took is None else f"{took:.1f} s",
                "error": entry.get("error") or "",
                "warnings": metrics.get("publish_warnings") or [],
                "failed": bool(entry.get("error")),
            }
        )
    return rows


def project_view(store: StatusStore, redis, project: int, ls_url: str) -> dict:
    """Everything the template shows for one project."""
    status = live_status(redis, project)
    history = store.history(project, HISTORY_SHOWN)
    accuracy, acceptance = version_points(history)
    words, fraction = progress_text(status)
    top = store.read_queue_top(project)
    last = status.get("last_job") or {}
    last_id = history[0].get("job_id") if history else None
    ids = ",".join(str(e.get("task_id")) for e in top)
    pre = status.get("pretraining") or {}
    return {
        "id": project,
        # What the page's script compares with /status to know when to reload the content.
        "signature": f"{status['state']}|{status.get('model_version') or ''}|{last_id or ''}|{ids}"
        f"|{pre.get('state') or ''}{(pre.get('progress') or {}).get('epoch') or ''}",
        "state": status["state"],
        "model_version": status.get("model_version") or "none yet",
        "progress": words,
        "fraction": fraction,
        "started": _when(status.get("started_at")) if status["state"] == "running" else "",
        "reason": status.get("reason") if status["state"] == "running" else "",
        "waiting": status.get("waiting"),
        "pretraining": pretraining_text(status),
        "last_outcome": last.get("outcome") or "",
        "last_error": last.get("error") or "",
        "accuracy_chart": line_chart(
            accuracy, x_label="labels used", y_label="validation accuracy", css_class="accuracy"
        ),
        "acceptance_chart": line_chart(
            acceptance,
            x_label="labels used",
            y_label="pre-filled choice kept",
            css_class="acceptance",
        )
        if acceptance
        else None,
        "history": history_rows(history),
        "queue_top": top[:QUEUE_TOP_SHOWN],
        "queue_more": max(0, len(top) - QUEUE_TOP_SHOWN),
        "ls_project_url": f"{ls_url}/projects/{project}/data",
    }


@dashboard_bp.get("/dashboard")
def dashboard():
    """The dashboard page (every known project)."""
    ext = _ext()
    settings = ext["settings"]
    connection = ext["label_studio"].current()
    ls_url = settings.label_studio_url.rstrip("/")
    projects, problem = [], None
    redis = ext["redis"]
    if redis is None:
        problem = "REDIS_URL is not set, so there is no job status to show"
    else:
        try:
            store = StatusStore(redis)
            projects = [project_view(store, redis, p, ls_url) for p in store.projects()]
        except RedisError as exc:
            problem = f"Redis is unavailable ({type(exc).__name__}); retrying"
    page = render_template(
        "dashboard.html",
        projects=projects,
        problem=problem,
        connection=connection,
        ls_url=ls_url,
        now=_when(dt.datetime.now().timestamp()),
    )
    response = Response(page, mimetype="text/html")
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-store"
    return response


@dashboard_bp.get("/dashboard/thumbnail/<int:project>/<int:task>")
def thumbnail(project: int, task: int):
    """A queue-top task's image as a small JPEG (404 for any other task)."""
    ext = _ext()
    if ext["redis"] is None:
        raise QueueUnavailable("REDIS_URL is not set, so there is no queue to show")
    thumbs = ext.get("thumbnails") or ext.setdefault("thumbnails", Thumbnails(ext["settings"]))
    try:
        data = thumbs.jpeg(StatusStore(ext["redis"]), project, task)
    except BackendError as exc:
        log.info("thumbnail of task %s (project %s) not shown: %s", task, project, exc)
        raise
    response = Response(data, mimetype="image/jpeg")
    response.headers["Cache-Control"] = "private, max-age=300"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
