"""The dashboard in headless Chromium during and after a real retrain.

The backend as users start it (``serve`` + ``worker``) with a real Label Studio 1.23.2: a small
project is ordered by cold start and trained once; the dashboard is opened; more labels are
submitted; the open page must show the job running with its progress (no reload by hand), then
the new version with two points on the accuracy chart, the job history and the queue top as
thumbnails that really loaded, each with its reason in words. Screenshots in ``artifacts/``:
``e2e-dashboard-before.png``, ``-during.png``, ``-after.png``.
"""

from __future__ import annotations

import re

import pytest
from browser_support import ARTIFACTS, chromium
from e2e_support import new_project, spread_labels, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

N_TASKS = 48
STAGE_WORDS = r"(reading tasks|learning from|training|predicting every task|pushing)"


@pytest.fixture(scope="module")
def trained_once(stack):
    """``(project, truth, labeled, status)`` with one trained version live."""
    project, truth = new_project(stack, "dashboard", n=N_TASKS, uploads=8)
    cold = stack.wait_idle_version(project, "the cold-start job", newer_than=set())
    labeled = spread_labels(truth, 12)  # 10 or more: the job holds out a validation split
    for task, label in labeled:
        stack.api.annotate(task, label)
    status = stack.wait_idle_version(
        project, "the first retrain", {cold["model_version"]}, labels=len(labeled)
    )
    return project, truth, {t for t, _ in labeled}, status


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"e2e-dashboard-{name}.png"), full_page=True)


def _section_text(page, project: int) -> str:
    return page.locator(f"#project-{project}").inner_text()


def test_dashboard_follows_a_retrain_live(stack, trained_once, playwright):
    project, truth, labeled, before = trained_once
    first_version = before["model_version"]
    with chromium(playwright, "dashboard") as context:
        page = context.new_page()
        page.goto(f"{stack.backend.url}/dashboard")
        section = page.locator(f"#project-{project}")
        section.wait_for()
        assert "connection state-ok" in page.locator("#connection").get_attribute("class")
        assert first_version in _section_text(page, project)
        _shot(page, "before")

        more = spread_labels(truth, 12, skip=labeled)
        for task, label in more:
            stack.api.annotate(task, label)

        # The open page turns to "running" and follows the job's stages by itself (a head on
        # frozen embeddings trains in a second, so any stage of the job counts).
        def running():
            state = section.locator('[data-field="state"]').inner_text()
            words = section.locator('[data-field="progress"]').inner_text()
            return state == "running" and re.match(STAGE_WORDS, words) and words

        words = wait_for(running, "the page to show the job running", 180, stack.logs)
        page.wait_for_timeout(300)
        _shot(page, "during")
        if re.match(r"(predicting every task: \d+ of|training: epoch \d+ of)", words):
            assert section.locator('[data-field="fraction"]').get_attribute("value") is not None

        after = stack.wait_idle_version(
            project, "the second retrain", {first_version}, labels=len(labeled) + len(more)
        )
        second_version = after["model_version"]
        assert after["progress"] == {}, "an idle project shows no progress on /status"

        def shows_new_version():
            return (
                second_version in section.locator('[data-field="model_version"]').inner_text()
                and section.locator('[data-field="state"]').inner_text() == "idle"
                and section.locator("svg.accuracy circle.point").count() >= 2
            )

        try:
            wait_for(shows_new_version, "the page to show the new version", 60, stack.logs)
        finally:
            _shot(page, "after-wait")
        page.wait_for_function(  # every thumbnail in view has loaded a real image
            "() => [...document.querySelectorAll('.queue img')].slice(0, 4)"
            ".every(img => img.complete && img.naturalWidth > 0)",
            timeout=60_000,
        )
        page.wait_for_timeout(500)
        _shot(page, "after")

        text = _section_text(page, project)
        assert "not measured yet" in text or section.locator("svg.acceptance").count() == 1
        history = section.locator("table.history tbody tr")
        assert history.count() >= 3  # cold start and two retrains
        assert second_version in history.first.inner_text()
        top = after["queue_top"]
        assert top, "the job wrote no queue top"
        first_item = section.locator(".queue li").first
        assert f"task {top[0]['task_id']}" in first_item.inner_text()
        assert top[0]["why"] in first_item.inner_text()
        thumb = first_item.locator("img")
        thumb.wait_for()  # the page may have been refetched meanwhile: wait for its image
        page.wait_for_function(
            "() => { const img = document.querySelector('.queue li img');"
            " return img && img.complete && img.naturalWidth > 0; }",
            timeout=30_000,
        )


def test_thumbnails_only_for_the_queue_top(stack, trained_once):
    """The route fetches images with the backend's token: only for the project's queue top."""
    import requests

    project, truth, labeled, status = trained_once
    top = {e["task_id"] for e in stack.status(project)["queue_top"]}
    outside = next(t for t in sorted(truth) if t not in top)
    base = f"{stack.backend.url}/dashboard/thumbnail/{project}"
    ok = requests.get(f"{base}/{min(top)}", timeout=60)
    assert ok.status_code == 200 and ok.headers["Content-Type"] == "image/jpeg"
    refused = requests.get(f"{base}/{outside}", timeout=60)
    assert refused.status_code == 404
    assert "not at the top" in refused.json()["error"]
    other_project = requests.get(
        f"{stack.backend.url}/dashboard/thumbnail/{project + 1000}/{min(top)}", timeout=60
    )
    assert other_project.status_code == 404
