"""'Why this task' notes in task data and the queue tab's columns, against a real HTTP server
playing Label Studio's task API (the real one, in a browser: tests/e2e/test_why_this_task.py)."""

from __future__ import annotations

import json

from ls_fakes import LEGACY_TOKEN

from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.queue_view import (
    QUEUE_COLUMNS,
    queue_view_data,
    queue_view_hidden_columns,
)
from ml_backend.labelstudio.why import WHY_FIELD, why_text, write_task_notes

# What GET /api/dm/columns/?project=N answers in Label Studio 1.23.2 (abridged).
COLUMNS = [
    {"id": "image", "parent": "data", "visibility_defaults": {"explore": True, "labeling": True}},
    {"id": WHY_FIELD, "parent": "data", "visibility_defaults": {"explore": True, "labeling": False}},
    {"id": "id", "visibility_defaults": {"explore": True, "labeling": False}},
    {"id": "inner_id", "visibility_defaults": {"explore": False, "labeling": False}},
    {"id": "predictions_score", "visibility_defaults": {"explore": False, "labeling": False}},
    {"id": "predictions_model_versions",
     "visibility_defaults": {"explore": False, "labeling": False}},
    {"id": "predictions_results", "visibility_defaults": {"explore": False, "labeling": False}},
    {"id": "data", "title": "data"},
]  # fmt: skip


def test_why_text_names_rank_version_and_reason():
    entry = {"task_id": 4, "rank": 2, "reason": "uncertain", "why": "the model is unsure"}
    assert why_text(entry, "resnet18-v4") == (
        "Why this task (#2 in the queue of resnet18-v4): the model is unsure"
    )
    assert why_text({"rank": 1, "reason": "typical"}, "coldstart-x", cold_start=True) == (
        "Why this task (#1 in the queue before the first model): typical"
    )


def test_hidden_columns_show_the_queue_columns_and_keep_the_other_defaults():
    hidden = queue_view_hidden_columns(COLUMNS)
    for column in QUEUE_COLUMNS:
        assert f"tasks:{column}" not in hidden["explore"]
    assert hidden["explore"] == ["tasks:inner_id"]
    assert "tasks:predictions_results" in hidden["labeling"]
    assert "tasks:data.image" not in hidden["labeling"]
    fallback = queue_view_hidden_columns(None)  # columns unreadable: 1.23.2's defaults
    assert "tasks:predictions_model_versions" not in fallback["explore"]
    assert "tasks:inner_id" in fallback["explore"]


def test_view_data_keeps_columns_someone_chose():
    base = {"title": "Active learning queue", "ordering": ["tasks:predictions_score"]}
    chosen = {"explore": ["tasks:id"], "labeling": []}
    assert queue_view_data(base, {"hiddenColumns": chosen}, COLUMNS)["hiddenColumns"] == chosen
    fresh = queue_view_data(base, {"title": "old, saved without hiddenColumns"}, COLUMNS)
    assert fresh["title"] == base["title"] and fresh["hiddenColumns"]["explore"] == [
        "tasks:inner_id"
    ]


def test_notes_keep_storage_urls_and_other_fields(fake, settings):
    tasks = {
        5: {"id": 5, "data": {"image": "s3://bucket/a.png", "site": "north"},
            "meta": {"source": "import"}},
        6: {"id": 6, "data": {"image": "s3://bucket/b.png", WHY_FIELD: "old reason"}, "meta": {}},
    }  # fmt: skip
    patches, reads = [], []

    def task_route(task_id):
        def handle(h):
            if h.command == "GET":
                reads.append(h.query)
                return h.send(200, tasks[task_id])
            body = json.loads(h.body)
            patches.append((task_id, body))
            tasks[task_id] = {**tasks[task_id], **body}
            return h.send(200, tasks[task_id])

        return handle

    for task_id in tasks:
        for method in ("GET", "PATCH"):
            fake.routes[(method, f"/api/tasks/{task_id}/")] = task_route(task_id)
    client = LabelStudioClient(settings)
    top = [{"task_id": 5, "rank": 1, "reason": "uncertain", "why": "the model is unsure"}]
    written = write_task_notes(client, top, "resnet18-v3", previous_top=[{"task_id": 6}])
    assert written == 2
    assert all(q.get("resolve_uri") == ["false"] for q in reads)  # raw URIs, not proxy links
    (first_id, first), (second_id, second) = sorted(patches, key=lambda p: p[0])  # concurrent
    assert first_id == 5 and first["data"] == {
        "image": "s3://bucket/a.png",
        "site": "north",
        WHY_FIELD: "Why this task (#1 in the queue of resnet18-v3): the model is unsure",
    }
    assert first["meta"] == {
        "source": "import",
        "active_learning": {"model_version": "resnet18-v3", "rank": 1, "reason": "uncertain",
                            "why": "the model is unsure"},
    }  # fmt: skip
    assert second_id == 6 and second == {"data": {"image": "s3://bucket/b.png", WHY_FIELD: ""}}
    # Once clear, a task is not written again.
    assert write_task_notes(client, [], "resnet18-v4", previous_top=[{"task_id": 6}]) == 0
    assert all(h[3] == f"Token {LEGACY_TOKEN}" for h in fake.requests_to("ls"))
