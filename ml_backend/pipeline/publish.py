"""Pushing a version's predictions to Label Studio, switching the queue to it, and pruning.

Publishing has two parts:

1. **Must succeed** (a failure here leaves the previous version serving; the job fails): import
   every prediction of the new version, then switch ``project.model_version`` to it, so "Label
   All Tasks" never sees a half-pushed version (tasks without a current-version prediction fall
   out of its uncertainty sampling).
2. **Best effort** (a failure is logged and listed in ``publish_warnings``, and never undoes the
   published version): the Data Manager queue tab, pruning old versions, and the "why this task"
   notes (``labelstudio.why``).

The pruning rule (why annotators never lose a submit): an annotation made in the labeling UI
refers to the prediction its task was opened with (``parent_prediction``), and Label Studio
refuses the submit, skip or update if that prediction no longer exists. A page can only have
loaded predictions of a version while it was current, and Label Studio keeps a served task
locked to its annotator for 24 hours (``TASK_LOCK_TTL``). So a version's predictions are deleted
only after it has been superseded for ``PREDICTION_GRACE`` seconds (default 24 h), and never the
version Label Studio currently shows. Each version holds predictions for at most
``QUEUE_DEPTH`` tasks (the unlabeled top of the queue), so the rows stay bounded by
``QUEUE_DEPTH x (versions published within PREDICTION_GRACE + 1)``, plus one version of every
unlabeled task for each ``refresh --all-tasks`` asked for in that time; and a version is
published only when the labels, the model or the set of tasks changed (or all tasks were
asked for).

What the prediction ``score`` means: the task's place in the active-learning queue, scaled to
(0, 1). Label Studio's uncertainty sampling serves the LOWEST score first, so the task ranked
first gets ``1 / (n + 1)``, the next ``2 / (n + 1)``, ... for the ``n`` tasks pushed. It is not the
model's confidence (that is in ``/status``, the task meta and ``/predict``).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ml_backend.labelstudio.client import FAST_IMPORT_FLAG
from ml_backend.labelstudio.labels import LabelSpec, choice_result
from ml_backend.labelstudio.why import write_task_notes
from ml_backend.model.storage import is_backend_version, is_cold_start
from ml_backend.selection import explain

log = logging.getLogger(__name__)

SLOW_IMPORT_S = 3.0
_hinted: set[int] = set()


def queue_rows(order: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows to push (the first ``depth`` of the queue order) and their scores in (0, 1)."""
    rows = np.asarray(order, dtype=np.int64)[: max(int(depth), 0)]
    n = len(rows)
    return rows, (np.arange(n, dtype=np.float64) + 1) / (n + 1)


def build_predictions(
    task_ids: np.ndarray,
    scores: np.ndarray,
    version: str,
    spec: LabelSpec,
    predicted: list[str] | None,
) -> list[dict]:
    """One prediction per task. ``predicted`` None (cold start) gives an empty result."""
    items = []
    for row, task_id in enumerate(np.asarray(task_ids).tolist()):
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


def prunable_versions(
    existing: dict[str, int],
    keep: set[str],
    superseded_since: dict[str, float],
    now: float,
    grace: float,
) -> list[str]:
    """Our versions whose predictions may go: superseded for at least ``grace`` seconds.

    Versions in ``keep`` (the new one, the one Label Studio shows) and versions named by others
    (another backend, manual imports) are never returned; a version without a recorded time is
    not old enough yet (its clock starts when it is first seen).
    """
    return sorted(
        name
        for name in existing
        if is_backend_version(name)
        and name not in keep
        and name in superseded_since
        and now - superseded_since[name] >= grace
    )


def publish(
    client,
    project_id: int,
    items: list[dict],
    version: str,
    *,
    ledger=None,
    grace: float = 86400.0,
    explain: list[dict] | None = None,
) -> dict:
    """Import predictions and switch the project to ``version``; then the best-effort steps.

    Args:
        client: the LabelStudioClient.
        project_id: the project.
        items: the predictions (``build_predictions``).
        version: their version name.
        ledger: the StatusStore, which keeps when each version was superseded (None: never prune).
        grace: PREDICTION_GRACE in seconds.
        explain: queue-top entries to write into the tasks (``queue_top``): ``data.why_this_task``
            (shown by the config's ``<Header>``) and ``meta.active_learning``; the text of the
            previous top (read from ``ledger``) is cleared.

    Returns:
        counts for the status/metrics (pushed, deleted, rows left, warnings).

    Raises:
        RuntimeError / BackendError: the must-succeed part failed; the project was not switched.
    """
    started = time.monotonic()
    created = client.import_predictions(project_id, items)
    _hint_if_slow(project_id, len(items), time.monotonic() - started)
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
    _switch(client, project_id, version)
    if ledger is not None:
        previous = ledger.published(project_id).get("version")
        if previous and previous != version:
            ledger.mark_superseded(project_id, [previous], ledger.now())
    counts: dict = {"predictions_pushed": created, "predictions_sent": len(items)}
    previous_top = ledger.read_queue_top(project_id) if ledger is not None else []
    warnings: list[str] = []
    seconds: dict[str, float] = {}
    for step, run in (
        ("queue view", lambda: client.ensure_queue_view(project_id)),
        ("pruning", lambda: counts.update(prune(client, project_id, version, ledger, grace))),
        (
            "task notes",
            lambda: counts.update(
                explained_tasks=write_task_notes(
                    client, explain or [], version, previous_top, cold_start=is_cold_start(version)
                )
            ),
        ),
    ):
        started = time.monotonic()
        try:
            run()
        except Exception as exc:  # the version is live: report, never undo
            log.warning(
                "project %s: %s failed after publishing %s: %s", project_id, step, version, exc
            )
            warnings.append(f"{step}: {type(exc).__name__}: {str(exc)[:200]}")
        seconds[step] = time.monotonic() - started
    log.info(
        "project %s: after the switch: %s",
        project_id,
        ", ".join(f"{step} {s:.1f} s" for step, s in seconds.items()),
    )
    counts["publish_warnings"] = warnings
    return counts


def _hint_if_slow(project_id: int, n: int, seconds: float) -> None:
    """Say once per project and process how to speed up an import of few predictions that took
    seconds: Label Studio 1.23.2's default import recounts every task of the project (6 s at
    100,000 tasks for 100 predictions); its batched import behind a feature flag does not."""
    if seconds < SLOW_IMPORT_S or n > 1000 or project_id in _hinted:
        return
    _hinted.add(project_id)
    log.warning(
        "project %s: Label Studio took %.1f s to import %d predictions; on large projects start "
        "Label Studio with %s=true (its batched import: only the imported tasks are recounted; "
        "docs/scale.md)",
        project_id,
        seconds,
        n,
        FAST_IMPORT_FLAG,
    )


def _switch(client, project_id: int, version: str) -> None:
    """Switch the project to ``version``; a lost reply is checked against what LS now shows."""
    try:
        client.activate_version(project_id, version)
    except Exception:
        try:
            shown = client.project(project_id, fields=("model_version",)).get("model_version")
        except Exception:
            shown = None
        if shown != version:
            raise
        log.info("project %s: the switch to %s went through despite the error", project_id, version)
    log.info("project %s: switched model_version to %s (uncertainty sampling)", project_id, version)


def prune(client, project_id: int, current: str, ledger, grace: float) -> dict:
    """Delete our versions superseded for ``grace`` seconds; report what is left."""
    existing = client.model_versions(project_id)
    ours = [name for name in existing if is_backend_version(name)]
    if ledger is None:
        return {"versions_in_label_studio": len(ours), "versions_deleted": []}
    shown = client.project(project_id, fields=("model_version",)).get("model_version")
    keep = {current, shown}
    now = ledger.now()
    ledger.mark_superseded(project_id, [n for n in ours if n not in keep], now)
    doomed = prunable_versions(existing, keep, ledger.superseded_since(project_id), now, grace)
    for name in doomed:
        client.delete_version(project_id, name)
    ledger.forget_versions(project_id, [*doomed, current])
    if doomed:
        log.info("project %s: deleted old prediction versions %s", project_id, ", ".join(doomed))
    return {
        "versions_deleted": doomed,
        "versions_in_label_studio": len(ours) - len(doomed),
        "prediction_rows": sum(existing[n] for n in ours if n not in doomed),
    }


def queue_top(
    ranking, task_ids: np.ndarray, probs, predicted, n: int, class_names=None
) -> list[dict]:
    """Why the top ``n`` of the queue are there: rank, the rule that picked it (``reason`` code
    and ``why`` in words), uncertainty, distance to the nearest labeled image (None where not
    defined, e.g. the first cold-start pick), and with a model the predicted label and its
    confidence."""
    top = []
    for position, row in enumerate(ranking.order[:n].tolist()):
        entry = {
            "task_id": int(task_ids[row]),
            "rank": position + 1,
            "reason": str(ranking.reason[row]),
            "why": explain(ranking, row, class_names=class_names, probs=probs),
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
