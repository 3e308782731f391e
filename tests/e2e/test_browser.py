"""A real browser on Label Studio's labeling page sees the backend's pre-annotation.

Headless Chromium from Debian's ``chromium`` package (no Playwright browser download), driven by
Playwright: log in, open "Label All Tasks" on the trained project, and check that the choice the
model predicted for the served task is shown selected. The screenshot is kept under
``artifacts/`` (gitignored) for a human to look at.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser_page(tmp_path, missing_real_part):
    if not CHROMIUM.exists():
        missing_real_part("Debian's chromium is not installed (bash scripts/install_chromium.sh)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "user-data"),  # new, empty profile
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 720},
        )
        context.set_default_timeout(60_000)
        try:
            yield context.new_page()
        finally:
            context.close()


def test_label_all_tasks_shows_the_predicted_choice_selected(stack, trained_project, browser_page):
    project = trained_project[0]
    version = stack.api.project(project)["model_version"]
    page, ls = browser_page, stack.ls

    page.goto(f"{ls.url}/user/login/")
    page.fill("input[name=email]", ls.username)
    page.fill("input[name=password]", ls.password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/user/login" not in url)

    page.goto(f"{ls.url}/projects/{project}/data")
    checked = page.locator("label:has(input[type=radio]:checked)")
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        page.get_by_text("Label All Tasks").click()
        checked.first.wait_for(state="visible")
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "e2e-label-all-tasks-failed.png"))
        raise
    page.wait_for_timeout(1000)  # let the image finish drawing for the screenshot
    page.screenshot(path=str(ARTIFACTS / "e2e-label-all-tasks.png"))

    # The task the page shows (its id is in the footer, above "1 of 1"), read back via the API.
    text = page.inner_text("body")
    shown_id = re.search(r"#?\s*(\d+)\s*\n\s*\d+ of \d+", text)
    assert shown_id, f"no task id on the labeling page: {text[-300:]!r}"
    task = stack.api.call("GET", f"/api/tasks/{shown_id.group(1)}/")
    assert not task["annotations"], "Label All Tasks served an annotated task"
    predictions = [p for p in task["predictions"] if p["model_version"] == version]
    assert predictions, f"task {task['id']} has no prediction of {version}"
    predicted = predictions[0]["result"][0]["value"]["choices"][0]
    assert checked.count() == 1
    shown = re.sub(r"\[\d+\]$", "", checked.first.inner_text().strip()).strip()
    assert shown == predicted, f"page shows {shown!r} selected, the model predicted {predicted!r}"
