"""The retraining job: Label Studio annotations in, a new version and a reordered queue out.

Orchestration only; the work lives in ``labelstudio`` (tasks, images), ``model`` (train,
predict, store) and ``selection`` (ranking). One run:

1. read every task of the project and the label set from Label Studio; fetch images (cached);
2. with at least two labeled classes: fine-tune ResNet18 (warm start from the previous version
   when the label set is unchanged; no retrain when the labeled set is unchanged since it);
   otherwise: cold start, ordering the pool by k-center over backbone embeddings;
3. predict the whole pool (probabilities + embeddings), rank the unlabeled tasks;
4. write the version atomically, push one prediction per task, switch the project to it,
   delete old versions' predictions. A failure anywhere leaves the previous version serving.
"""

from __future__ import annotations

import logging
import shutil
import time

import numpy as np

from ml_backend.config import Settings
from ml_backend.jobs.pool import Pool, build_pool
from ml_backend.jobs.publish import (
    COLD_START_PREFIX,
    build_predictions,
    explain_in_tasks,
    publish,
    queue_scores,
)
from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.images import ImageCache
from ml_backend.model.inference import predict
from ml_backend.model.network import build_model, resolve_device
from ml_backend.model.storage import ModelStore
from ml_backend.model.train import default_epochs, fit
from ml_backend.selection import rank

log = logging.getLogger(__name__)

# Per-project knobs (from /setup extra_params) that may override the deployment's settings.
PROJECT_KNOBS = ("strategy", "uncertainty", "queue_batch", "shortlist_factor", "epochs")
# Reasons that ask for a retrain even when the labeled set has not changed.
FORCE_REASONS = ("START_TRAINING", "train", "refresh")


def effective_settings(settings: Settings, params: dict | None) -> Settings:
    """The deployment's settings with the project's own knobs applied."""
    overrides = {k: v for k, v in (params or {}).items() if k in PROJECT_KNOBS}
    return settings.with_overrides(**overrides) if overrides else settings


class _Stopwatch:
    def __init__(self):
        self.timings: dict[str, float] = {}

    def lap(self, name: str, started: float) -> None:
        self.timings[f"{name}_s"] = round(time.monotonic() - started, 3)


def train_project(
    project_id: int,
    reason: str,
    *,
    settings: Settings,
    redis=None,
    status=None,
    client=None,
    image_cache=None,
) -> dict:
    """The RQ job body: retrain (or cold-start rank) one project and push the new queue.

    Args:
        project_id: the Label Studio project id.
        reason: what triggered the job (webhook action, ``train``, ``refresh``).
        settings: the deployment's settings (per-project knobs from the status store apply on top).
        redis: unused here; the queue passes it for symmetry with other targets.
        status: the StatusStore for progress and the queue explanation, or None.
        client, image_cache: injected in tests; built from ``settings`` otherwise.

    Returns:
        ``{"outcome", "model_version", "metrics"}``; the queue records it in the status store.
    """
    started = time.monotonic()
    clock = _Stopwatch()
    params = status.project_params(project_id) if status is not None else {}
    settings = effective_settings(settings, params)
    device = resolve_device(settings.device)
    client = client or LabelStudioClient(settings)

    _progress(status, project_id, stage="fetching")
    t0 = time.monotonic()
    spec = client.label_spec(project_id)
    pool = build_pool(
        client.iter_tasks(project_id), spec, image_cache or ImageCache(settings, client)
    )
    clock.lap("fetch", t0)
    log.info(
        "project %s: job started (%s): %d tasks with images, %d labeled %s, device %s",
        project_id,
        reason,
        len(pool.task_ids),
        pool.n_labeled,
        pool.class_counts(),
        device,
    )
    if len(pool.task_ids) == 0:
        return _finish(
            status,
            project_id,
            "nothing to do: no task has a usable image",
            None,
            {},
            clock,
            started,
        )

    store = ModelStore(settings.model_dir)
    why_not = pool.trainable_reason(settings.min_labels)
    if why_not:
        log.info(
            "project %s: not training (%s); ordering the queue by diversity (cold start)",
            project_id,
            why_not,
        )
        return _cold_start(
            project_id, why_not, pool, spec, client, settings, device, status, clock, started
        )

    previous = store.latest(project_id)
    retrain = not (
        previous is not None
        and previous.labels == pool.label_names
        and previous.metrics.get("fingerprint") == pool.fingerprint()
        and reason not in FORCE_REASONS
    )
    if previous is not None and previous.labels == pool.label_names:
        model, _ = store.load(project_id, previous.version, device="cpu")
        source = f"warm start from {previous.version}"
    else:
        model, source = build_model(len(pool.label_names), settings.pretrained, log=log)
        _record_weights(status, source)
    metrics: dict = {
        "weights": source,
        "labels_used": pool.n_labeled,
        "class_counts": pool.class_counts(),
    }

    t0 = time.monotonic()
    if retrain:
        labeled = pool.labeled_mask
        epochs = settings.epochs or default_epochs(pool.n_labeled)
        _progress(status, project_id, stage="training", epochs=epochs)
        result = fit(
            model,
            pool.images[labeled],
            pool.labels[labeled],
            epochs=epochs,
            batch_size=settings.batch_size,
            lr=settings.learning_rate,
            val_fraction=settings.val_fraction,
            seed=settings.seed,
            device=device,
            log=log,
            progress=lambda info: _progress(status, project_id, stage="training", **info),
        )
        metrics.update(_fit_metrics(result))
    else:
        log.info(
            "project %s: labeled set unchanged since %s; re-ranking without retraining",
            project_id,
            previous.version,
        )
        metrics.update(
            {k: previous.metrics.get(k) for k in ("val_accuracy", "val_size", "train_size")}
        )
        metrics["retrained"] = False
    clock.lap("train", t0)

    probs, embeddings = _predict_pool(model, pool, settings, device, status, project_id, clock)
    t0 = time.monotonic()
    ranking = _rank(settings, pool, probs, embeddings, device)
    clock.lap("rank", t0)
    predicted = [pool.label_names[i] for i in probs.argmax(axis=1)]
    version = store.next_version(project_id)
    metrics.update(
        fingerprint=pool.fingerprint(),
        strategy=ranking.strategy,
        pool_size=len(pool.task_ids),
        skipped_tasks=len(pool.skipped),
        ignored_annotations=len(pool.label_problems),
        device=str(device),
        queue_top=_queue_top(ranking, pool, probs, predicted, settings.queue_batch),
    )
    path = store.save(
        project_id,
        version,
        model,
        pool.label_names,
        metrics,
        clock.timings,
        extra={"image_size": settings.image_size},
    )
    items = build_predictions(
        pool.task_ids,
        queue_scores(ranking.order, len(pool.task_ids), pool.labeled_mask),
        version,
        spec,
        predicted,
    )
    _push(client, project_id, items, version, settings, path, status, clock, metrics)
    store.prune(project_id, settings.keep_versions)
    outcome = "trained" if retrain else "re-ranked (labels unchanged)"
    return _finish(status, project_id, outcome, version, metrics, clock, started)


def _cold_start(
    project_id, why_not, pool: Pool, spec, client, settings, device, status, clock, started
):
    model, source = build_model(len(pool.label_names), settings.pretrained, log=log)
    _record_weights(status, source)
    if source not in ("imagenet",) and not source.startswith("file:"):
        log.warning(
            "project %s: cold-start embeddings come from %s; the diversity order is rough",
            project_id,
            source,
        )
    _, embeddings = _predict_pool(model, pool, settings, device, status, project_id, clock)
    t0 = time.monotonic()
    ranking = _rank(settings, pool, None, embeddings, device, strategy="coreset")
    clock.lap("rank", t0)
    version = f"{COLD_START_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    items = build_predictions(
        pool.task_ids,
        queue_scores(ranking.order, len(pool.task_ids), pool.labeled_mask),
        version,
        spec,
        None,
    )
    metrics = {
        "weights": source,
        "labels_used": pool.n_labeled,
        "class_counts": pool.class_counts(),
        "not_trained_because": why_not,
        "strategy": ranking.strategy,
        "pool_size": len(pool.task_ids),
        "skipped_tasks": len(pool.skipped),
        "device": str(device),
        "queue_top": _queue_top(ranking, pool, None, None, settings.queue_batch),
    }
    _push(client, project_id, items, version, settings, None, status, clock, metrics)
    return _finish(status, project_id, f"cold start ({why_not})", version, metrics, clock, started)


def _predict_pool(model, pool, settings, device, status, project_id, clock):
    t0 = time.monotonic()
    _progress(status, project_id, stage="predicting", total=len(pool.task_ids))
    probs, embeddings = predict(
        model,
        pool.images,
        device=device,
        batch_size=settings.inference_batch_size,
        progress=lambda done, total: _progress(
            status, project_id, stage="predicting", done=done, total=total
        ),
    )
    clock.lap("predict", t0)
    seconds = clock.timings["predict_s"]
    log.info(
        "project %s: predicted %d images in %.1f s (%.0f images/s)",
        project_id,
        len(pool.task_ids),
        seconds,
        len(pool.task_ids) / max(seconds, 1e-9),
    )
    return probs, embeddings


def _rank(settings, pool, probs, embeddings, device, strategy=None):
    return rank(
        strategy or settings.strategy,
        probs=probs,
        embeddings=embeddings,
        labeled_mask=pool.labeled_mask,
        batch=settings.queue_batch,
        shortlist_factor=settings.shortlist_factor,
        measure=settings.uncertainty,
        seed=settings.seed,
        device=device,
    )


def _push(client, project_id, items, version, settings, path, status, clock, metrics):
    t0 = time.monotonic()
    _progress(status, project_id, stage="pushing", total=len(items))
    try:
        metrics.update(publish(client, project_id, items, version, settings.keep_versions))
    except Exception:
        if path is not None:  # the version never went live: do not leave it to be served
            shutil.rmtree(path, ignore_errors=True)
        raise
    metrics["explained_tasks"] = explain_in_tasks(client, version, metrics.get("queue_top") or [])
    clock.lap("push", t0)


def _queue_top(ranking, pool: Pool, probs, predicted, n: int) -> list[dict]:
    """Why the top of the queue is there: rank, uncertainty, distance to the nearest labeled image."""
    top = []
    for position, row in enumerate(ranking.order[:n].tolist()):
        entry = {
            "task_id": int(pool.task_ids[row]),
            "rank": position + 1,
            "uncertainty": _finite(ranking.uncertainty[row]),
            "distance": _finite(ranking.distance[row]),
        }
        if probs is not None:
            entry.update(predicted=predicted[row], confidence=round(float(probs[row].max()), 4))
        top.append(entry)
    return top


def _finite(value) -> float | None:
    value = float(value)
    return round(value, 6) if np.isfinite(value) else None


def _fit_metrics(result) -> dict:
    last = result.history[-1] if result.history else {}
    return {
        "val_accuracy": result.val_accuracy,
        "val_size": result.val_size,
        "train_size": result.train_size,
        "epochs": len(result.history),
        "train_loss": last.get("loss"),
        "train_accuracy": last.get("train_accuracy"),
        "train_images_per_s": last.get("images_per_s"),
        "retrained": True,
    }


def _record_weights(status, source: str) -> None:
    if status is not None:  # /health shows whether ImageNet weights were available
        status.set_pretrained(source)


def _progress(status, project_id, **fields) -> None:
    if status is not None:
        status.progress(project_id, **fields)


def _finish(status, project_id, outcome, version, metrics, clock, started) -> dict:
    clock.timings["total_s"] = round(time.monotonic() - started, 3)
    if status is not None and metrics.get("queue_top") is not None:
        status.queue_top(project_id, metrics["queue_top"])
    metrics = {**metrics, "timings": clock.timings}
    log.info(
        "project %s: job done in %.1f s: %s%s; timings %s",
        project_id,
        clock.timings["total_s"],
        outcome,
        f", now serving {version}" if version else "",
        clock.timings,
    )
    return {"outcome": outcome, "model_version": version, "metrics": metrics}
