"""End-to-end fixtures (session-scoped): Label Studio, Redis, the backend, projects.

Helpers and settings live in ``e2e_support.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from browser_support import CHROMIUM
from e2e_support import backend_env, new_project, running_stack, spread_labels

from ml_backend.devtools.demo_project import LabelStudioAPI
from ml_backend.devtools.local_services import LabelStudioServer, RedisProcess, tail

# The loop tests read the project as each step leaves it (cold start, then trained): run them
# first, in file order; the browser and PAT tests after them.
MODULE_ORDER = (
    "test_loop.py",
    "test_browser.py",
    "test_pat.py",
    "test_browser_submit.py",
    "test_faults.py",
    "test_dashboard_browser.py",
    "test_why_this_task.py",
    "test_connection_live.py",
)


def pytest_collection_modifyitems(config, items):
    def key(item):
        name = item.path.name
        if item.path.parent != Path(__file__).parent or name not in MODULE_ORDER:
            return -1  # everything outside tests/e2e keeps its place, before the e2e tests
        return MODULE_ORDER.index(name)

    items.sort(key=key)  # stable: order inside a module is kept


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def label_studio(e2e_dir):
    """A fresh Label Studio, or the running one ``E2E_LABEL_STUDIO`` names (for quick reruns).

    ``E2E_LABEL_STUDIO=<base dir>:<port>:<legacy token>:<admin password>`` reuses a server
    started with ``LabelStudioServer(<base dir>, port, password=..., token=...)``.
    """
    reuse = os.environ.get("E2E_LABEL_STUDIO")
    if reuse:
        base, port, token, password = reuse.rsplit(":", 3)
        yield LabelStudioServer(Path(base), port=int(port), password=password, token=token)
        return
    server = LabelStudioServer(e2e_dir / "label-studio")
    try:
        server.start()
    except Exception as exc:
        server.stop()
        pytest.fail(f"Label Studio did not start: {exc}\n{tail(server.log_path)}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ls_api(label_studio) -> LabelStudioAPI:
    return LabelStudioAPI(label_studio.url, label_studio.token)


@pytest.fixture(scope="session")
def e2e_redis(e2e_dir):
    server = RedisProcess(e2e_dir / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stack(label_studio, ls_api, e2e_redis, e2e_dir):
    """The backend with the admin's legacy token."""
    env = backend_env(label_studio, e2e_redis.url, e2e_dir / "models", label_studio.token)
    with running_stack(
        label_studio, ls_api, env, e2e_dir / "backend-logs", "the backend"
    ) as running:
        yield running
    print(f"\nbackend logs in {running.backend.log_dir}; Label Studio log {label_studio.log_path}")


@pytest.fixture(scope="session")
def cold_project(stack):
    """``(project, truth, cold status)`` once the cold-start ordering is live."""
    project, truth = new_project(stack, "e2e weather")
    status = stack.wait_idle_version(project, "the cold-start job", newer_than=set())
    return project, truth, status


@pytest.fixture(scope="session")
def trained_project(stack, cold_project):
    """``(project, truth, labeled task ids, status)`` after 30 annotations and the retrain."""
    project, truth, cold = cold_project
    # The cold-start test asked /next/, which locked its task to us: label it first, as the
    # annotator would, then 29 more spread over the classes.
    first = cold["queue_top"][0]["task_id"]
    labeled = [(first, truth[first]), *spread_labels(truth, 29, skip={first})]
    for task, label in labeled:
        stack.api.annotate(task, label)
    status = stack.wait_idle_version(
        project, "the retrain on 30 annotations", {cold["model_version"]}, labels=len(labeled)
    )
    return project, truth, {t for t, _ in labeled}, status


@pytest.fixture(scope="module")
def playwright(missing_real_part):
    """Playwright for the browser tests, driving Debian's Chromium (one per module)."""
    if not CHROMIUM.exists():
        missing_real_part("Debian's chromium is not installed (bash scripts/install_chromium.sh)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        yield pw
