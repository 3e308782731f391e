"""Why this task, in Label Studio's own UI, and the Data Manager's prediction columns.

A real Label Studio 1.23.2 and the backend as users start it; a small project made from the
shipped ``label_config.xml`` (which has ``<Header value="$why_this_task"/>``) is trained once.

- The labeling UI: the queue-top notes are written into task data (``write_task_notes``, what
  the job's publish step calls; idempotent if it already did), then "Label All Tasks" in
  Chromium serves the first task of the queue and the page shows why, in words, above the
  image (9 labels of 3 classes: ``auto`` has switched to herding, whose words these are).
  Screenshot: ``e2e-why-label-stream.png``.
- The Data Manager: the backend's "Active learning queue" tab, as the job saved it, and with
  explicit ``hiddenColumns`` (``queue_view_data``, what the job's ``ensure_queue_view`` must
  save): the "Prediction model versions" and "Prediction results" columns are blank without
  them and filled with them. Screenshots: ``e2e-why-dm-queue-tab-as-saved.png`` and
  ``e2e-why-dm-queue-tab-fixed.png``.
"""

from __future__ import annotations

import pytest
import requests
from browser_support import Labeler, chromium
from e2e_support import new_project, spread_labels

from ml_backend.config import Settings
from ml_backend.labelstudio.client import QUEUE_VIEW_TITLE, LabelStudioClient
from ml_backend.labelstudio.queue_view import queue_view_data
from ml_backend.labelstudio.why import WHY_FIELD, why_text, write_task_notes

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


@pytest.fixture(scope="module")
def trained(stack):
    """``(project, status)``: a project from label_config.xml with one trained version live."""
    project, truth = new_project(stack, "why this task", n=40, uploads=4)
    cold = stack.wait_idle_version(project, "the cold-start job", newer_than=set())
    labeled = spread_labels(truth, 9)
    for task, label in labeled:
        stack.api.annotate(task, label)
    status = stack.wait_idle_version(
        project, "the retrain", {cold["model_version"]}, labels=len(labeled)
    )
    return project, status


@pytest.fixture(scope="module")
def client(stack):
    return LabelStudioClient(
        Settings(label_studio_url=stack.ls.url, label_studio_api_key=stack.ls.token)
    )


@pytest.fixture(scope="module")
def admin(playwright, stack):
    with chromium(playwright, "why") as context:
        yield Labeler(context.new_page(), stack.ls.url, "why").login(
            stack.ls.username, stack.ls.password
        )


def test_the_labeling_page_says_why_the_task_was_served(stack, trained, client, admin):
    project, status = trained
    version, top = status["model_version"], status["queue_top"]
    assert stack.api.project(project)["model_version"] == version
    assert write_task_notes(client, top, version) >= 0
    first = top[0]
    expected = why_text(first, version)
    raw = stack.api.call("GET", f"/api/tasks/{first['task_id']}/?resolve_uri=false")
    assert raw["data"][WHY_FIELD] == expected
    assert raw["meta"]["active_learning"]["model_version"] == version

    admin.page.set_viewport_size({"width": 1280, "height": 1300})  # the choices in the shot
    served = admin.open_label_stream(project)
    assert served == first["task_id"], "Label All Tasks serves the queue's first task"
    header = admin.page.get_by_text(expected, exact=True)
    header.wait_for(timeout=30_000)
    admin.page.wait_for_timeout(500)
    admin.screenshot("label-stream")
    # 9 labels of 3 classes: auto is past its switch (3 per class), so herding picked the top:
    # the model's doubt, and how many unlabeled look-alikes it stands for (or that all of them
    # are closer to a labeled or queued image already)
    assert "): the model is " in expected and "labeled or queued" in expected, expected
    # The pre-filled choice is still there under the explanation.
    assert admin.selected_choice() == first["predicted"]


def _queue_view(stack, project: int) -> dict:
    views = stack.api.call("GET", f"/api/dm/views/?project={project}")
    return next(v for v in views if v["data"].get("title") == QUEUE_VIEW_TITLE)


def _columns_via_api(stack, view: dict, project: int) -> dict:
    """What the Data Manager's table gets for the tab's first task (its own request)."""
    tasks = stack.api.call("GET", f"/api/tasks/?view={view['id']}&project={project}")["tasks"]
    return {k: tasks[0].get(k) for k in ("predictions_model_versions", "predictions_results")}


def test_data_manager_prediction_columns(stack, trained, client, admin):
    project, status = trained
    version = status["model_version"]
    view = _queue_view(stack, project)
    page = admin.page

    def open_tab(name):
        page.goto(f"{stack.ls.url}/projects/{project}/data?tab={view['id']}")
        page.get_by_text(QUEUE_VIEW_TITLE).first.wait_for()
        page.wait_for_timeout(2500)
        admin.screenshot(name)
        return page.inner_text("body")

    as_saved = _columns_via_api(stack, view, project)
    text = open_tab("dm-queue-tab-as-saved")
    if not view["data"].get("hiddenColumns"):
        # The cause, seen: a tab saved without hiddenColumns gets those columns uncomputed.
        assert as_saved == {"predictions_model_versions": "", "predictions_results": ""}
        assert "choices: [" not in text

    columns = requests.get(
        f"{stack.ls.url}/api/dm/columns/?project={project}", headers=client.auth_header(),
        timeout=30,
    ).json()["columns"]  # fmt: skip
    data = queue_view_data(view["data"], view["data"], columns)
    stack.api.call("PATCH", f"/api/dm/views/{view['id']}/", json={"project": project, "data": data})
    fixed = _columns_via_api(stack, view, project)
    assert version in fixed["predictions_model_versions"].split(",")
    assert "choices: [" in fixed["predictions_results"]
    text = open_tab("dm-queue-tab-fixed")
    assert "choices: [" in text  # the Prediction results cells are filled in the table
