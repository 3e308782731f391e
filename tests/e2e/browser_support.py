"""Driving Label Studio's labeling UI in headless Chromium, as a labeler does.

Debian's ``chromium`` (no Playwright browser download) driven by Playwright's sync API. Every
helper clicks what a person clicks (Label All Tasks, a choice, Submit, Skip, the arrow that
postpones, Update) and waits for what a person would see: the next task, or Label Studio's red
"Annotation is not saved" message, which fails the test with a screenshot. Screenshots go to
``artifacts/`` (gitignored) for a human to look at.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import time
from pathlib import Path

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
NOT_SAVED = "Annotation is not saved"
_CHOICE = "label.lsf-choice__checkbox"  # a <Choice> of the labeling interface
# The footer's task id: the first text of this element (a child holds "1 of 1" in the stream).
_TASK_ID_JS = """() => {
  const el = document.querySelector('.lsf-current-task__task-id');
  return el && el.firstChild ? el.firstChild.textContent : null;
}"""


class SubmitFailed(AssertionError):
    """Label Studio showed its "not saved" message after a click."""


@contextlib.contextmanager
def chromium(playwright, name: str):
    """A fresh Chromium profile (no cookies) as a context; closed on exit."""
    with tempfile.TemporaryDirectory(prefix=f"chromium-{name}-") as profile:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800},
        )
        context.set_default_timeout(60_000)
        try:
            yield context
        finally:
            context.close()


class Labeler:
    """One person in one browser: logs in, labels, and reports what the page shows.

    Args:
        page: a Playwright page of its own browser context.
        ls_url: Label Studio's base URL.
        name: used in screenshot file names.
    """

    def __init__(self, page, ls_url: str, name: str):
        self.page, self.url, self.name = page, ls_url.rstrip("/"), name

    # -- session ---------------------------------------------------------------------------
    def login(self, email: str, password: str) -> Labeler:
        page = self.page
        page.goto(f"{self.url}/user/login/")
        page.fill("input[name=email]", email)
        page.fill("input[name=password]", password)
        page.click("button[type=submit]")
        page.wait_for_url(lambda url: "/user/login" not in url)
        return self

    def sign_up(self, invite_path: str, email: str, password: str) -> Labeler:
        """Join the organisation through its invite link, as a new teammate does."""
        page = self.page
        page.goto(f"{self.url}{invite_path}")
        page.fill("input[name=email]", email)
        page.fill("input[name=password]", password)
        page.click("button[type=submit]")
        page.wait_for_url(lambda url: "/user/signup" not in url)
        return self

    def screenshot(self, what: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"e2e-{self.name}-{what}.png"
        self.page.screenshot(path=str(path))
        return path

    # -- what the page shows ---------------------------------------------------------------
    def shown_task(self) -> int | None:
        """The id of the task on the labeling page (the footer's ``#<id>``)."""
        text = self.page.evaluate(_TASK_ID_JS)
        found = re.fullmatch(r"#?\s*(\d+)", (text or "").strip())
        return int(found.group(1)) if found else None

    def selected_choice(self) -> str | None:
        checked = self.page.locator(f"{_CHOICE}:has(input:checked)")
        if checked.count() == 0:
            return None
        return re.sub(r"\[\d+\]$", "", checked.first.inner_text().strip()).strip()

    def not_saved(self) -> bool:
        return NOT_SAVED in self.page.inner_text("body")

    # -- actions ---------------------------------------------------------------------------
    def open_label_stream(self, project: int) -> int:
        """Data Manager > "Label All Tasks"; returns the id of the task it serves."""
        self.page.goto(f"{self.url}/projects/{project}/data")
        self.page.get_by_text("Label All Tasks").click()
        return self._wait_for_task(None, "the first task of the label stream")

    def open_task(self, project: int, task: int) -> None:
        """A task from the Data Manager (``?task=<id>``), as clicking its row does."""
        self.page.goto(f"{self.url}/projects/{project}/data?task={task}")
        self._wait_for_task(None, f"task {task} to open", expect=task)

    def choose(self, label: str) -> None:
        self.page.locator("label").filter(
            has_text=re.compile(rf"^{re.escape(label)}")
        ).first.click()
        deadline = time.monotonic() + 10
        while self.selected_choice() != label:
            if time.monotonic() > deadline:
                self.screenshot(f"choose-{_slug(label)}-failed")
                raise AssertionError(f"{self.name}: clicking {label!r} did not select it")
            self.page.wait_for_timeout(100)

    def submit(self) -> int:
        """Click Submit in the label stream; returns the next task's id. Fails if not saved."""
        before = self.shown_task()
        self.page.get_by_test_id("bottombar-submit-button").click()
        return self._wait_for_task(before, "Submit to save and move on")

    def skip(self) -> int:
        """Click Skip; returns the next task's id. Fails if not saved."""
        before = self.shown_task()
        self.page.get_by_role("button", name="Skip").click()
        return self._wait_for_task(before, "Skip to save and move on")

    def postpone(self) -> int:
        """The footer's "next" arrow on an unfinished task: Label Studio keeps a draft of it
        for later and serves the next task. Returns the next task's id."""
        before = self.shown_task()
        self.page.get_by_test_id("next-task").click()
        return self._wait_for_task(before, "postpone to move on")

    def update(self) -> None:
        """Click Update on an annotation opened from the Data Manager. Fails if not saved."""
        self._click_and_settle("bottombar-update-button", "Update")

    def submit_here(self) -> None:
        """Click Submit on a task opened from the Data Manager (no next task follows)."""
        self._click_and_settle("bottombar-submit-button", "Submit")

    def _click_and_settle(self, test_id: str, what: str, settle_s: float = 3.0) -> None:
        self.page.get_by_test_id(test_id).click()
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:  # the red message shows within a second when it fails
            if self.not_saved():
                self.screenshot(f"not-saved-{_slug(what)}")
                raise SubmitFailed(f"{self.name}: {what}: Label Studio says {NOT_SAVED!r}")
            self.page.wait_for_timeout(250)

    def _wait_for_task(self, before: int | None, what: str, expect: int | None = None) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.not_saved():
                self.screenshot(f"not-saved-{_slug(what)}")
                raise SubmitFailed(f"{self.name}: {what}: Label Studio says {NOT_SAVED!r}")
            shown = self.shown_task()
            if shown is not None and shown != before and (expect is None or shown == expect):
                self.page.wait_for_timeout(500)  # let the image and the choices draw
                return shown
            self.page.wait_for_timeout(250)
        self.screenshot(f"stuck-{_slug(what)}")
        raise AssertionError(f"{self.name}: timed out waiting for {what}")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]
