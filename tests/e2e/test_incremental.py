"""The task index against a real Label Studio 1.23.2: a job reads only the tasks that changed,
and still sees every change a person makes: a label changed, a task deleted, a task added."""

from __future__ import annotations

import pytest
from e2e_support import new_project, spread_labels

pytestmark = pytest.mark.e2e


def served_job(stack, project: int, version: str) -> dict:
    return next(j for j in stack.finished_jobs(project) if j.get("model_version") == version)


def current_predictions(stack, project: int, version: str) -> set[int]:
    return {t["id"] for t in stack.api.tasks(project)
            if any(p["model_version"] == version for p in t["predictions"])}  # fmt: skip


def test_changed_deleted_and_added_tasks_reach_the_next_job(stack):
    api = stack.api
    project, truth = new_project(stack, "incremental tasks", n=60, uploads=0)
    cold = stack.wait_idle_version(project, "the cold start", set())
    labeled = spread_labels(truth, 9)
    for task, label in labeled:
        api.annotate(task, label)
    first = stack.wait_idle_version(project, "the first retrain", {cold["model_version"]}, 9)
    metrics = served_job(stack, project, first["model_version"])["metrics"]
    # The cold start listed every task; this job asked only for the ones changed since (all
    # of them here: the import was the last change before the cold start read the tasks).
    assert metrics["task_listing"]["listing"] == "changed", metrics["task_listing"]
    counts = metrics["class_counts"]

    # A label changed in Label Studio is in the next model.
    task, label = labeled[0]
    other = next(c for c in counts if c != label)
    (annotation,) = api.call("GET", f"/api/tasks/{task}/annotations/")
    result = [{**annotation["result"][0], "value": {"choices": [other]}}]
    api.call("PATCH", f"/api/annotations/{annotation['id']}/", json={"result": result})
    second = stack.wait_idle_version(project, "the label change", {first["model_version"]}, 9)
    metrics = served_job(stack, project, second["model_version"])["metrics"]
    assert metrics["task_listing"]["listing"] == "changed"
    # Not every task. The backend's own writes after the last listing come back as changes: the
    # "why this task" notes on the new queue top (QUEUE_BATCH = 20) and the cleared notes of
    # tasks that left the top (up to 20 more), besides the relabeled task and whatever changed in
    # the 5 s overlap before the last listing (the 9 labels at most). 33 of these 60 tasks were
    # read once auto switched to diversified at 3 labels per class: the relabeled task, 20 new
    # notes, and most likely 12 tasks that had left the top (their text cleared; not checked
    # task by task).
    assert metrics["task_listing"]["read"] < len(truth) - len(labeled), metrics["task_listing"]
    assert metrics["class_counts"][label] == counts[label] - 1
    assert metrics["class_counts"][other] == counts[other] + 1

    # A deleted task leaves the pool and the queue (the next label starts the job).
    top = second["queue_top"][0]["task_id"]
    api.call("DELETE", f"/api/tasks/{top}/")
    extra = next(t for t in sorted(truth) if t != top and t not in dict(labeled))
    api.annotate(extra, truth[extra])
    third = stack.wait_idle_version(
        project, "the job after a deletion", {second["model_version"]}, 10
    )
    metrics = served_job(stack, project, third["model_version"])["metrics"]
    assert metrics["task_listing"]["listing"] == "full"
    assert "deleted tasks" in metrics["task_listing"]["why"]
    assert metrics["pool_size"] == len(truth) - 1
    assert top not in [entry["task_id"] for entry in third["queue_top"]]

    # A task added later is ranked: it gets a prediction of the next version.
    image = next(t["data"]["image"] for t in api.tasks(project) if t["id"] == extra)
    api.call("POST", f"/api/projects/{project}/import", json=[{"image": image}])
    fourth = stack.wait_idle_version(
        project, "the job after an import", {third["model_version"]}, 10
    )
    metrics = served_job(stack, project, fourth["model_version"])["metrics"]
    assert metrics["pool_size"] == len(truth) and metrics["task_listing"]["listing"] == "changed"
    newest = max(t["id"] for t in api.tasks(project))
    assert newest not in truth and newest in current_predictions(
        stack, project, fourth["model_version"]
    )
