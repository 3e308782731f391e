"""End-to-end helpers: a real Label Studio 1.23.2, a real Redis, the backend as users start it.

The fixtures in conftest.py use them: one Label Studio per session (its first start migrates a database: ~60-90 s). The backend runs
as two processes, ``python -m ml_backend serve`` and ``python -m ml_backend worker``, with small
CPU settings so a retrain takes seconds. Every wait fails with the backend's and Label Studio's
log tails, so a red test says what the processes were doing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from ml_backend.devtools.demo_project import LabelStudioAPI, image_name, import_images
from ml_backend.devtools.local_services import (
    BackendProcesses,
    LabelStudioServer,
    pretraining_busy,
    tail,
)

N_IMAGES = 300
N_UPLOADS = 30  # the rest are local files
BACKEND_SETTINGS = {
    "PRETRAINED": "none",  # no downloads in tests
    "DEVICE": "cpu",
    # IMAGE_SIZE auto: the 64 px images are used at 64 px.
    # Self-supervised pretraining: short on 2 CPU cores, and bounded by epochs rather than by
    # the clock, so the backbone (and the model the tests check) is the same however loaded
    # the machine is.
    "PRETRAIN_BUDGET_S": "60",
    "PRETRAIN_EPOCHS": "5",
    "EPOCHS": "15",
    "BATCH_SIZE": "16",
    "INFERENCE_BATCH_SIZE": "128",
    "QUEUE_BATCH": "10",
    "LOG_LEVEL": "INFO",
    "IMAGE_FETCH_WORKERS": "4",
}


def wait_for(check: Callable[[], object], what: str, timeout_s: float, logs: Callable[[], str]):
    """Poll ``check`` until it returns something truthy; fail with ``logs()`` on timeout."""
    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (requests.RequestException, KeyError, RuntimeError) as exc:
            last_error = exc
        time.sleep(1.0)
    pytest.fail(
        f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last_error})\n{logs()}"
    )


class Stack:
    """Label Studio + Redis + one backend (web + worker) and helpers to read their state."""

    def __init__(self, ls: LabelStudioServer, api: LabelStudioAPI, backend: BackendProcesses):
        self.ls, self.api, self.backend = ls, api, backend

    def logs(self) -> str:
        return f"{self.backend.logs()}\n----- label-studio.log -----\n{tail(self.ls.log_path, 30)}"

    def status(self, project: int) -> dict | None:
        reply = requests.get(f"{self.backend.url}/status/{project}", timeout=10)
        return reply.json() if reply.status_code == 200 else None

    def finished_jobs(self, project: int, allow_failures: bool = False) -> list[dict]:
        """Finished history entries, newest first (failed ones fail the test with the log,
        unless the test causes them)."""
        status = self.status(project) or {}
        history = status.get("history", [])
        failed = [h for h in history if h.get("error")]
        if failed and not allow_failures:
            pytest.fail(f"a job failed: {failed[0]['error']}\n{self.logs()}")
        return [h for h in history if h.get("finished_at")]

    def wait_idle_version(
        self,
        project: int,
        what: str,
        newer_than: set[str],
        labels: int | None = None,
        timeout_s=300,
        allow_failures: bool = False,
    ) -> dict:
        """Wait until the project is idle (no training or pretraining job runs or waits) and
        serves a version not in ``newer_than``.

        With ``labels``, the served version must also have been trained on that many labels
        (jobs started while annotations were still arriving saw fewer).
        """

        def check():
            assert self.backend.alive(), f"a backend process died\n{self.logs()}"
            status = self.status(project)
            if not status or status.get("state") != "idle" or status["queue"].get("waiting_job"):
                return None
            if pretraining_busy(status):  # a training job on the new backbone follows it
                return None
            jobs = self.finished_jobs(project, allow_failures)
            version = status.get("model_version")
            if not version or version in newer_than:
                return None
            if labels is not None:
                served = [j for j in jobs if j.get("model_version") == version]
                if not served or (served[0].get("metrics") or {}).get("labels_used") != labels:
                    return None
            return status

        return wait_for(check, what, timeout_s, self.logs)


@contextlib.contextmanager
def running_stack(label_studio, api, env: dict, log_dir: Path, what: str) -> Iterator[Stack]:
    """``serve`` + ``worker`` started as a user would, as a Stack; stopped on exit.

    A backend that does not start fails the test with its logs.
    """
    backend = BackendProcesses(env, log_dir)
    try:
        backend.start()
    except Exception as exc:
        backend.stop()
        pytest.fail(f"{what} did not start: {exc}\n{backend.logs()}")
    try:
        yield Stack(label_studio, api, backend)
    finally:
        backend.stop()


def backend_env(label_studio, redis_url: str, model_dir: Path, api_key: str) -> dict:
    """The backend's settings, as a user would export them."""
    return {
        **BACKEND_SETTINGS,
        "REDIS_URL": redis_url,
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": api_key,
        "MODEL_DIR": str(model_dir),
        "BASIC_AUTH_USER": None,
        "BASIC_AUTH_PASS": None,
    }


def new_project(stack: Stack, title: str, n: int = N_IMAGES, uploads: int = N_UPLOADS):
    """A project from label_config.xml with generated images, connected to the backend.

    The backend is connected before the import, so the TASKS_CREATED webhook starts the
    cold-start job; ``start_training_on_annotation_update`` makes Label Studio also send
    START_TRAINING on submits. Returns ``(project id, {task id: true label})``.
    """
    api = stack.api
    project = api.create_project(title)
    api.connect_backend(project, stack.backend.url)
    api.update_project(project, start_training_on_annotation_update=True)
    truth = import_images(api, project, stack.ls.document_root, n, uploads=uploads, seed=project)
    return project, truth


def pixels_of(stack: Stack, project: int) -> dict[int, np.ndarray]:
    """``{task id: the task's image as raw float pixels}``, read from the generated files
    (uploads too: the generator wrote every image under the project's folder first)."""
    folder = stack.ls.document_root / f"project-{project}"
    out = {}
    for task in stack.api.tasks(project):
        name = image_name(task["data"].get("image", ""))
        if name:
            with Image.open(folder / name) as img:
                out[task["id"]] = np.asarray(img.convert("RGB"), dtype=np.float32).ravel()
    return out


def nearest_neighbour_guesses(
    pixels: dict[int, np.ndarray], labeled: dict[int, str], tasks
) -> dict[int, str]:
    """1-nearest-neighbour on raw pixels fitted on ``labeled``: its label for each of ``tasks``
    (the simplest baseline a user could run)."""
    from sklearn.neighbors import KNeighborsClassifier

    ids = sorted(labeled)
    knn = KNeighborsClassifier(n_neighbors=1).fit(
        [pixels[t] for t in ids], [labeled[t] for t in ids]
    )
    tasks = sorted(tasks)
    return dict(zip(tasks, knn.predict([pixels[t] for t in tasks]), strict=True))


def worse_than_baseline_p(ours: dict[int, str], baseline: dict[int, str], truth) -> float:
    """One-sided exact sign test (McNemar) on the tasks where exactly one of the two is right:
    the chance of the baseline winning at least this many of them if both were equally good.
    Small (< 0.05): ours is worse than the baseline beyond chance."""
    from math import comb

    b = sum(baseline[t] == truth[t] and ours[t] != truth[t] for t in ours)
    c = sum(ours[t] == truth[t] and baseline[t] != truth[t] for t in ours)
    n = b + c
    return sum(comb(n, k) for k in range(b, n + 1)) / 2**n if n else 1.0


def spread_labels(
    truth: dict[int, str], n: int, skip: set[int] = frozenset()
) -> list[tuple[int, str]]:
    """``n`` (task, label) pairs spread evenly over the classes."""
    by_class: dict[str, list[int]] = {}
    for task, label in sorted(truth.items()):
        if task not in skip:
            by_class.setdefault(label, []).append(task)
    picked, i = [], 0
    while len(picked) < n:
        for tasks in by_class.values():
            if i < len(tasks) and len(picked) < n:
                picked.append((tasks[i], truth[tasks[i]]))
        i += 1
    return picked
