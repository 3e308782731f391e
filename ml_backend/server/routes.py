"""The routes Label Studio calls (/health, /setup, /predict, /webhook, /train) and ours
(/status, /metrics). Shapes follow label-studio-ml 2.x so its users feel at home."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ml_backend.errors import BadRequest, ModelNotReady, QueueUnavailable
from ml_backend.jobs.queue import live_status, request_training
from ml_backend.jobs.state import StatusStore
from ml_backend.server.payloads import (
    FULL_LISTING_ACTIONS,
    KNOWN_ACTIONS,
    TRAINING_ACTIONS,
    json_body,
    parse_extra_params,
    parse_project_id,
    webhook_project_id,
)

log = logging.getLogger(__name__)
bp = Blueprint("api", __name__)

MODEL_CLASS = "ResNet18ActiveLearner"
# What /setup reports before the first retrain published a version.
UNTRAINED_VERSION = "untrained"
HISTORY_IN_STATUS = 10
HISTORY_MAX = 50  # what the status store keeps (?history=N asks for up to this many)


def _ext() -> dict:
    return current_app.extensions["ml_backend"]


def _redis():
    redis = _ext()["redis"]
    if redis is None:
        raise QueueUnavailable("REDIS_URL is not set, so there is no job queue or status store")
    return redis


@bp.get("/health")
def health():
    """Always 200 while the process is up, so Label Studio can connect; ``redis`` says if the queue
    works (monitor that field)."""
    redis = _ext()["redis"]
    settings = _ext()["settings"]
    loaded = None
    if redis is None:
        redis_state = "not configured (REDIS_URL is not set)"
    else:
        try:
            redis.ping()
            redis_state = "ok"
            loaded = StatusStore(redis).pretrained()
        except Exception as exc:  # any Redis failure is reported, never raised
            redis_state = f"unavailable: {type(exc).__name__}"
    return jsonify(
        {
            "status": "UP",
            "model_class": MODEL_CLASS,
            "redis": redis_state,
            "pretrained": {"setting": _pretrained_setting(settings.pretrained), "loaded": loaded},
            # The last background check (never waited for here): ok, unreachable, unauthorized,
            # not configured (or checking, before the first result).
            "label_studio": _ext()["label_studio"].current().state,
        }
    )


def _pretrained_setting(value: str) -> str:
    # A state_dict path may reveal a directory layout; the file name is enough.
    return value if value in ("imagenet", "none") else "file"


@bp.post("/setup")
def setup():
    """Cheap and idempotent: store the project's knobs if they changed, report the model version.

    The first call for a project never seen before also enqueues its first job (cold-start
    ordering or a first retrain), so connecting the backend is enough to get an ordered queue.

    The access token in the body is neither stored nor logged (the worker uses
    LABEL_STUDIO_API_KEY)."""
    body = json_body(request)
    project = parse_project_id(body.get("project"))
    status = StatusStore(_redis())
    if "extra_params" in body:
        params = parse_extra_params(body.get("extra_params"))
        if params != status.project_params(project):
            status.set_project_params(project, params)
            log.info("project %s: params set to %s", project, params)
    if not status.has_status(project):
        # First contact (the backend was just connected): order the queue now, by diversity or by
        # a first model if labels exist, instead of waiting for the next annotation or import.
        outcome = request_training(_redis(), _ext()["settings"], project, "setup")
        log.info("project %s: connected; first job %s", project, outcome)
    return jsonify({"model_version": status.model_version(project) or UNTRAINED_VERSION})


@bp.post("/predict")
def predict():
    """Predictions for the tasks Label Studio asks about, from the latest model version.

    With no trained model yet the reply is ``{"results": []}`` (200), as label-studio-ml 2.x does:
    Label Studio then stores no prediction and asks again later.
    """
    body = json_body(request)
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise BadRequest('"tasks" must be a list of task objects')
    raw_project = body.get("project")
    if raw_project is None and tasks:
        raw_project = tasks[0].get("project")
    project = parse_project_id(raw_project)
    try:
        results = _predictor().predict(project, tasks, body.get("label_config"))
    except ModelNotReady as exc:
        log.info("project %s: /predict before any model: %s", project, exc)
        results = []
    return jsonify({"results": results})


def _predictor():
    ext = _ext()
    with ext["predictor_lock"]:
        if ext["predictor"] is None:
            # torch only when predictions are asked
            from ml_backend.pipeline.serving import Predictor

            # With the status store, the predictor serves the version the last job published.
            status = StatusStore(ext["redis"]) if ext["redis"] is not None else None
            ext["predictor"] = Predictor(ext["settings"], status=status)
        return ext["predictor"]


@bp.post("/webhook")
def webhook():
    """201 with the coalescing outcome for training actions; 200 ``ignored`` for the others."""
    body = json_body(request)
    action = body.get("action")
    if not isinstance(action, str) or not action:
        raise BadRequest('webhook payload has no "action" string')
    metric_action = action if action in KNOWN_ACTIONS else "other"
    counter = _ext()["metrics"].webhooks
    if action not in TRAINING_ACTIONS:
        counter.labels(metric_action, "ignored").inc()
        return jsonify({"status": "ignored", "action": action}), 200
    try:
        project = webhook_project_id(body)
    except BadRequest:
        counter.labels(metric_action, "bad_request").inc()
        raise
    return _train(project, action, metric_action)


@bp.post("/train")
def train():
    """Legacy: the same as a START_TRAINING webhook. Body ``{"project": 7}`` or ``"7.<ts>"``;
    with ``"all_tasks": true`` that job pre-annotates every unlabeled task (once)."""
    body = json_body(request)
    project = parse_project_id(body.get("project"))
    all_tasks = body.get("all_tasks", False)
    if not isinstance(all_tasks, bool):
        raise BadRequest(f"all_tasks must be true or false, got {type(all_tasks).__name__}")
    if all_tasks:
        StatusStore(_redis()).request_predict_all(project)
    return _train(project, "START_TRAINING", "START_TRAINING")


def _train(project: int, action: str, metric_action: str):
    counter = _ext()["metrics"].webhooks
    try:
        if action in FULL_LISTING_ACTIONS:
            StatusStore(_redis()).request_full_listing(project)
        outcome = request_training(_redis(), _ext()["settings"], project, action)
    except Exception:
        counter.labels(metric_action, "unavailable").inc()
        raise
    counter.labels(metric_action, outcome).inc()
    return jsonify({"status": outcome, "project": project, "action": action}), 201


@bp.get("/status")
def status_all():
    """Every known project's status with its recent history (``?history=N``, default 10, at
    most 50) and the Label Studio connection check (``label_studio``)."""
    n = _history_length()
    redis = _redis()
    store = StatusStore(redis)
    projects = {str(p): _with_extras(store, redis, p, n) for p in store.projects()}
    connection = _ext()["label_studio"].current().as_dict()
    return jsonify({"projects": projects, "label_studio": connection})


@bp.get("/status/<project>")
def status_one(project: str):
    """One project's status with its recent history (``?history=N``); 404 when nothing was ever
    recorded."""
    project_id = parse_project_id(project)
    n = _history_length()
    redis = _redis()
    store = StatusStore(redis)
    if project_id not in store.projects():
        return jsonify(
            {
                "error": f"no job or setting recorded for project {project_id} yet; "
                "connect the backend in Label Studio or POST /train"
            }
        ), 404
    return jsonify(_with_extras(store, redis, project_id, n))


def _history_length() -> int:
    """``?history=N`` (1 to HISTORY_MAX), else HISTORY_IN_STATUS."""
    raw = request.args.get("history")
    if raw is None:
        return HISTORY_IN_STATUS
    if not raw.isdigit() or not 1 <= int(raw) <= HISTORY_MAX:
        raise BadRequest(f"history must be a whole number from 1 to {HISTORY_MAX}, got {raw!r}")
    return int(raw)


def _with_extras(store: StatusStore, redis, project: int, history: int) -> dict:
    return {
        **live_status(redis, project),
        "queue_top": store.read_queue_top(project),
        "history": store.history(project, history),
    }


@bp.get("/metrics")
def metrics():
    """Prometheus text format."""
    return Response(generate_latest(_ext()["metrics"].registry), content_type=CONTENT_TYPE_LATEST)
