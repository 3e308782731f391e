"""Pushing a version's predictions to Label Studio and switching the queue to it.

Order matters: every prediction of the new version is imported first, and only when they are
all in is ``project.model_version`` switched, so "Label All Tasks" never sees a half-pushed
version (tasks without a current-version prediction fall out of its uncertainty sampling).

What the prediction ``score`` means: the task's place in the active-learning queue, scaled to
(0, 1]. Label Studio's uncertainty sampling serves the LOWEST score first, so the task ranked
first gets ``1 / (n + 1)``, the next ``2 / (n + 1)``, ...; labeled tasks get 1.0. It is not the
model's confidence (that is in ``/status`` and ``/predict``).
"""

from __future__ import annotations

import logging
import re

import numpy as np

from ml_backend.errors import BackendError
from ml_backend.labelstudio.labels import LabelSpec, choice_result

log = logging.getLogger(__name__)

COLD_START_PREFIX = "coldstart-"
_TRAINED = re.compile(r"^resnet18-v(\d+)$")


def queue_scores(order: np.ndarray, n_rows: int, labeled_mask: np.ndarray) -> np.ndarray:
    """Per-row score: rank position in (0, 1) for ranked rows, 1.0 for labeled/unranked rows."""
    scores = np.ones(n_rows, dtype=np.float64)
    n = len(order)
    scores[np.asarray(order, dtype=np.int64)] = (np.arange(n) + 1) / (n + 1)
    scores[labeled_mask] = 1.0
    return scores


def build_predictions(
    task_ids: np.ndarray,
    scores: np.ndarray,
    version: str,
    spec: LabelSpec,
    predicted: list[str] | None,
) -> list[dict]:
    """One prediction per task. ``predicted`` None (cold start) gives an empty result."""
    items = []
    for row, task_id in enumerate(task_ids.tolist()):
        result = [] if predicted is None else choice_result(spec, predicted[row])
        items.append(
            {
                "task": int(task_id),
                "result": result,
                "score": round(float(scores[row]), 8),
                "model_version": version,
            }
        )
    return items


def stale_versions(existing: dict[str, int] | list[str], current: str, keep: int) -> list[str]:
    """Our versions to delete from Label Studio: all but the current and the ``keep`` newest.

    Cold-start orderings other than the current one are always stale. Versions named by others
    (a different backend, manual imports) are never touched.
    """
    trained = sorted((int(m.group(1)), name) for name in existing if (m := _TRAINED.match(name)))
    keep_trained = {name for _, name in trained[-keep:]}
    stale = []
    for name in existing:
        if name == current:
            continue
        if name.startswith(COLD_START_PREFIX) or (
            _TRAINED.match(name) and name not in keep_trained
        ):
            stale.append(name)
    return sorted(stale)


def publish(client, project_id: int, items: list[dict], version: str, keep: int) -> dict:
    """Import predictions, switch the project to ``version``, then prune old versions.

    Returns counts for the status/metrics. Raises if Label Studio created none of them (the
    switch would then empty the queue).
    """
    created = client.import_predictions(project_id, items)
    if created < len(items):
        log.warning(
            "project %s: Label Studio created %d of %d predictions of %s (it skips invalid items)",
            project_id,
            created,
            len(items),
            version,
        )
    if items and created == 0:
        raise RuntimeError(
            f"Label Studio created none of the {len(items)} predictions of {version}; "
            "the project was not switched to it"
        )
    log.info("project %s: pushed %d predictions of %s", project_id, created, version)
    client.activate_version(project_id, version)
    log.info("project %s: switched model_version to %s (uncertainty sampling)", project_id, version)
    client.ensure_queue_view(project_id)
    deleted = []
    for name in stale_versions(client.model_versions(project_id), version, keep):
        client.delete_version(project_id, name)
        deleted.append(name)
    if deleted:
        log.info("project %s: deleted old prediction versions %s", project_id, ", ".join(deleted))
    return {
        "predictions_pushed": created,
        "predictions_sent": len(items),
        "versions_deleted": deleted,
    }


META_KEY = "active_learning"


def explain_in_tasks(client, version: str, top: list[dict]) -> int:
    """Write why each top-of-queue task is there into its ``meta`` (visible in Label Studio).

    The entry names the version, so a task that has since dropped out of the top is recognisable.
    Best effort: the queue is already live, so a failure here is logged, never raised.
    """
    written = 0
    for entry in top:
        meta = {
            META_KEY: {
                "model_version": version,
                **{k: v for k, v in entry.items() if k != "task_id"},
            }
        }
        try:
            client.update_task_meta(entry["task_id"], meta)
        except BackendError as exc:
            log.warning(
                "could not write the queue explanation into task %s: %s", entry["task_id"], exc
            )
            break
        written += 1
    return written


def queue_top(ranking, task_ids: np.ndarray, probs, predicted, n: int) -> list[dict]:
    """Why the top ``n`` of the queue are there: rank, uncertainty, distance to the nearest
    labeled image (None where not defined, e.g. the first cold-start pick), and with a model the
    predicted label and its confidence."""
    top = []
    for position, row in enumerate(ranking.order[:n].tolist()):
        entry = {
            "task_id": int(task_ids[row]),
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
