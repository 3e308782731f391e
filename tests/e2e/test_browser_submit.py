"""A labeler's clicks are never lost while the backend publishes new versions.

In the real labeling UI an annotation made from a pre-annotation refers to that prediction
(``parent_prediction``); if the prediction is gone when the labeler clicks, Label Studio answers
"Annotation is not saved" and the work is lost. Each test here opens a task in headless Chromium
as a labeler does, lets the backend publish at least ``KEEP_VERSIONS + 1`` new versions while the
page stays open (annotations by a teammate through the API), then clicks and reads the result
back from Label Studio's API: submit, skip, postpone and come back later, update an earlier
annotation, and two labelers in two browsers at once. Screenshots are kept under ``artifacts/``.

The backend here runs with ``KEEP_VERSIONS=1`` and tiny training settings so versions change
every few seconds, and with training on every annotation (Label Studio then sends both
``ANNOTATION_CREATED`` and ``START_TRAINING`` per submit, as in the demo).
"""

from __future__ import annotations

import time
import uuid

import pytest
from browser_support import Labeler, chromium
from e2e_support import backend_env, new_project, running_stack, wait_for

from ml_backend.devtools.local_services import RedisProcess

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

KEEP_VERSIONS = 1
CHURN = KEEP_VERSIONS + 1  # new versions published while a page stays open
N_TASKS = 120
FAST = {
    "KEEP_VERSIONS": str(KEEP_VERSIONS),
    "EPOCHS": "3",
    "IMAGE_SIZE": "32",
    "PRETRAIN_BUDGET_S": "5",
    "QUEUE_BATCH": "5",
    "BATCH_SIZE": "16",
}
# Unique per run: a reused Label Studio (E2E_LABEL_STUDIO) keeps the users of earlier runs.
SECOND_USER = (f"annotator-{uuid.uuid4().hex[:8]}@example.com", "annotator2-password")


@pytest.fixture(scope="module")
def churn_stack(label_studio, ls_api, e2e_dir):
    """A backend of its own (own Redis, queue and model folder) that publishes fast."""
    redis = RedisProcess(e2e_dir / "redis-churn").start()
    env = {**backend_env(label_studio, redis.url, e2e_dir / "models-churn", label_studio.token)}
    env.update(FAST)
    try:
        with running_stack(
            label_studio, ls_api, env, e2e_dir / "backend-churn-logs", "the churn backend"
        ) as stack:
            yield stack
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def churn_project(churn_stack):
    """``(project, truth, labeled)``: a project whose cold-start order is live."""
    project, truth = new_project(churn_stack, "ui churn", n=N_TASKS, uploads=0)
    wait_for(  # connecting names the backend's title first; the cold-start job then switches
        lambda: live_version(churn_stack, project).startswith("coldstart-"),
        "the cold-start version to go live",
        180,
        churn_stack.logs,
    )
    # ...and its pretraining job has ended, so its "backbone ready" job is not among the jobs
    # the tests count after a submit.
    churn_stack.wait_idle_version(project, "the cold start on the project's backbone", set())
    return project, truth, set()


@pytest.fixture(scope="module")
def admin(playwright, label_studio):
    with chromium(playwright, "admin") as context:
        yield Labeler(context.new_page(), label_studio.url, "admin").login(
            label_studio.username, label_studio.password
        )


def live_version(stack, project: int) -> str:
    return stack.api.project(project)["model_version"]


def publish_new_versions(stack, project, truth, labeled: set, busy: set, n: int) -> list[str]:
    """A teammate annotates through the API until ``n`` new versions went live; returns them.

    Never touches the tasks in ``busy`` (open in a browser) or already labeled ones.
    """
    versions = [live_version(stack, project)]
    by_class: dict[str, list[int]] = {}
    for task, label in sorted(truth.items()):
        if task not in busy and task not in labeled:
            by_class.setdefault(label, []).append(task)
    rotation = [tasks for tasks in by_class.values() if tasks]
    i = len(labeled)
    while len(versions) <= n:
        tasks = rotation[i % len(rotation)]
        i += 1
        if not tasks:
            continue
        task = tasks.pop(0)
        stack.api.annotate(task, truth[task])
        labeled.add(task)
        version = wait_for(
            lambda: (v := live_version(stack, project)) != versions[-1] and v,
            f"a new version after annotating task {task}",
            180,
            stack.logs,
        )
        versions.append(version)
    return versions[1:]


def saved_annotations(stack, task: int, submitted_only: bool = False) -> list[dict]:
    """The task's annotations; ``submitted_only`` leaves out skips (a skip earlier in the module
    leaves a cancelled one, and Label Studio may serve a skipped task again)."""
    annotations = stack.api.call("GET", f"/api/tasks/{task}/")["annotations"]
    return [a for a in annotations if not (submitted_only and a.get("was_cancelled"))]


def the_choice(annotation: dict) -> str | None:
    for region in annotation.get("result") or []:
        if region.get("type") == "choices":
            return region["value"]["choices"][0]
    return None


def test_submit_after_cold_start_and_new_versions(churn_stack, churn_project, admin):
    project, truth, labeled = churn_project
    opened_with = live_version(churn_stack, project)
    assert opened_with.startswith("coldstart-")
    task = admin.open_label_stream(project)
    admin.screenshot("submit-opened")

    published = publish_new_versions(churn_stack, project, truth, labeled, {task}, CHURN)
    assert opened_with not in published and len(published) >= CHURN

    admin.choose(truth[task])
    admin.screenshot("submit-chosen")
    submitted_at = time.time()
    admin.submit()
    admin.screenshot("submit-saved")
    (annotation,) = saved_annotations(churn_stack, task)
    labeled.add(task)
    assert not annotation["was_cancelled"] and the_choice(annotation) == truth[task]

    # One submit, one job: ANNOTATION_CREATED and START_TRAINING coalesce into one retrain.
    status = churn_stack.wait_idle_version(
        project, "the retrain after the UI submit", set(published)
    )
    after = [j for j in status["history"] if (j.get("started_at") or 0) >= submitted_at]
    assert len(after) == 1, [(j["reason"], j["outcome"]) for j in after]
    assert after[0]["metrics"]["labels_used"] == len(labeled)


def test_skip_after_new_versions(churn_stack, churn_project, admin):
    project, truth, labeled = churn_project
    task = admin.open_label_stream(project)
    assert admin.selected_choice() is not None, "a trained version pre-fills a choice"
    publish_new_versions(churn_stack, project, truth, labeled, {task}, CHURN)
    admin.skip()
    admin.screenshot("skip-saved")
    (annotation,) = saved_annotations(churn_stack, task)
    assert annotation["was_cancelled"] is True


def test_postpone_and_come_back_later(churn_stack, churn_project, admin):
    project, truth, labeled = churn_project
    task = admin.open_label_stream(project)
    admin.choose(truth[task])
    admin.postpone()
    publish_new_versions(churn_stack, project, truth, labeled, {task}, CHURN)
    admin.open_task(project, task)  # back to it later, from the Data Manager
    admin.choose(truth[task])
    admin.submit_here()
    admin.screenshot("postponed-then-saved")
    annotations = wait_for(
        lambda: saved_annotations(churn_stack, task), "the annotation", 30, churn_stack.logs
    )
    labeled.add(task)
    assert [the_choice(a) for a in annotations] == [truth[task]]


def test_update_an_earlier_annotation_after_new_versions(churn_stack, churn_project, admin):
    project, truth, labeled = churn_project
    task = next(iter(sorted(labeled_by_admin_in_ui(churn_stack, project))))
    (before,) = saved_annotations(churn_stack, task)
    admin.open_task(project, task)
    publish_new_versions(churn_stack, project, truth, labeled, {task}, CHURN)
    other = next(c for c in ("Sunny", "Cloudy", "Very Cloudy") if c != the_choice(before))
    admin.choose(other)
    admin.update()
    admin.screenshot("update-saved")
    wait_for(
        lambda: the_choice(saved_annotations(churn_stack, task)[0]) == other,
        "the updated label",
        30,
        churn_stack.logs,
    )


def labeled_by_admin_in_ui(stack, project: int) -> set[int]:
    """Tasks whose annotation came from the labeling UI (it names the prediction it started from)."""
    return {
        t["id"]
        for t in stack.api.tasks(project)
        for a in t["annotations"]
        if a.get("parent_prediction") and not a["was_cancelled"]
    }


def test_two_labelers_at_once(churn_stack, churn_project, admin, playwright, label_studio):
    project, truth, labeled = churn_project
    invite = churn_stack.api.call("GET", "/api/invite")["invite_url"]
    with chromium(playwright, "annotator2") as context:
        second = Labeler(context.new_page(), label_studio.url, "annotator2")
        second.sign_up(invite, *SECOND_USER)
        mine, theirs = admin.open_label_stream(project), second.open_label_stream(project)
        assert mine != theirs, "Label Studio locks a served task to one labeler"
        publish_new_versions(churn_stack, project, truth, labeled, {mine, theirs}, CHURN)
        admin.choose(truth[mine])
        second.choose(truth[theirs])
        admin.submit()
        second.submit()
        second.screenshot("two-labelers-saved")
    admin.screenshot("two-labelers-saved")
    for task in (mine, theirs):
        (annotation,) = saved_annotations(churn_stack, task, submitted_only=True)
        assert the_choice(annotation) == truth[task]
        labeled.add(task)
