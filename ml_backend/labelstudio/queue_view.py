"""Which columns the "Active learning queue" tab shows, so Label Studio fills them in.

Found with Label Studio 1.23.2 (``data_manager/managers.py``, ``get_fields_for_evaluation``):
the task list computes a column such as ``predictions_model_versions`` or
``predictions_results`` only when the tab's stored ``hiddenColumns`` leave it visible (or it is
filtered or ordered on). A tab saved without ``hiddenColumns`` (as the backend's view was,
through ``POST /api/dm/views/`` with title, ordering and filters only) is drawn by the front end
with every column, while the server computes none of those: "Prediction model version" and
"Prediction results" are blank although ``/api/predictions`` has them. "Prediction score" shows
only because the tab orders by it.

``queue_view_hidden_columns`` gives the tab explicit ``hiddenColumns``: Label Studio's own
defaults for a new tab (each column's ``visibility_defaults``) with the queue's columns shown
(prediction score, model version and results, and the backend's "why this task" field). A
tab whose ``hiddenColumns`` someone already set (the Columns menu saves them) keeps them.
"""

from __future__ import annotations

from ml_backend.labelstudio.why import WHY_FIELD

PREFIX = "tasks:"
# Shown in the queue tab whatever Label Studio's defaults say.
QUEUE_COLUMNS = (
    "predictions_score",
    "predictions_model_versions",
    "predictions_results",
    f"data.{WHY_FIELD}",
)
# Label Studio 1.23.2's defaults (GET /api/dm/columns/), for when the columns cannot be read.
DEFAULT_HIDDEN = (
    "inner_id", "annotations_results", "annotations_ids", "predictions_score",
    "predictions_model_versions", "predictions_results", "file_upload", "storage_filename",
    "created_at", "updated_at", "updated_by", "avg_lead_time", "draft_exists",
)  # fmt: skip
DEFAULT_HIDDEN_LABELING = (
    "id", "completed_at", "cancelled_annotations", "total_predictions", "annotators",
)  # fmt: skip


def _key(column: dict) -> str:
    child = "data." if column.get("parent") == "data" else ""
    return f"{PREFIX}{child}{column['id']}"


def queue_view_hidden_columns(columns: list[dict] | None) -> dict[str, list[str]]:
    """``hiddenColumns`` for the queue tab from ``GET /api/dm/columns/``'s ``columns``.

    Every column hidden by default in a mode stays hidden there, except ``QUEUE_COLUMNS``, which
    are shown in the task table ("explore"); the side list while labeling keeps its defaults.
    Without ``columns``, Label Studio 1.23.2's defaults are used.
    """
    shown = {PREFIX + c for c in QUEUE_COLUMNS}
    if not columns:
        explore = [PREFIX + c for c in DEFAULT_HIDDEN]
        labeling = explore + [PREFIX + c for c in DEFAULT_HIDDEN_LABELING]
        return {"explore": [c for c in explore if c not in shown], "labeling": labeling}
    hidden: dict[str, list[str]] = {"explore": [], "labeling": []}
    for column in columns:
        defaults = column.get("visibility_defaults")
        if not isinstance(defaults, dict) or "id" not in column:
            continue  # the "data" group itself
        key = _key(column)
        for mode in hidden:
            if not defaults.get(mode, True) and not (mode == "explore" and key in shown):
                hidden[mode].append(key)
    return hidden


def queue_view_data(data: dict, existing: dict | None, columns: list[dict] | None) -> dict:
    """The queue tab's ``data``: ``data`` (title, ordering, filters) plus ``hiddenColumns``
    (the existing tab's when it has them, else ``queue_view_hidden_columns(columns)``)."""
    kept = (existing or {}).get("hiddenColumns")
    hidden = kept if isinstance(kept, dict) and kept else queue_view_hidden_columns(columns)
    return {**data, "hiddenColumns": hidden}
