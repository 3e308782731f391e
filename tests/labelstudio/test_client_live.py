"""Every LabelStudioClient method and ImageCache against a real Label Studio 1.23.2.

Uses the session's throw-away server (``live_ls`` in conftest.py: own data dir, free port,
TASK_API_PAGE_SIZE_MAX=100). Skipped when the Label Studio venv (.cache/ls-venv) is not
installed (failed under CI).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import requests
from ls_fakes import LIVE_COLORS as COLORS
from ls_fakes import png_bytes

from ml_backend.config import Settings
from ml_backend.labelstudio.client import QUEUE_VIEW_TITLE, LabelStudioClient
from ml_backend.labelstudio.images import ImageCache
from ml_backend.labelstudio.labels import choice_result, task_label

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]


def _png(color) -> bytes:
    return png_bytes(color, size=(24, 24))


@pytest.fixture(scope="session")
def pat(live_ls):
    """A personal access token made through the SDK (POST /api/token/)."""
    legacy = LabelStudioClient(
        Settings(label_studio_url=live_ls["url"], label_studio_api_key=live_ls["token"])
    )
    return legacy.sdk.tokens.create().token


@pytest.fixture(params=["legacy", "pat"])
def client(request, live_ls, pat, tmp_path):
    key = live_ls["token"] if request.param == "legacy" else pat
    settings = Settings(
        label_studio_url=live_ls["url"], label_studio_api_key=key, model_dir=tmp_path, image_size=16
    )
    return LabelStudioClient(settings, attempts=2, backoff=0.1, page_size=2), settings


def _make_project(client: LabelStudioClient, files: Path) -> tuple[int, list[int]]:
    sdk = client.sdk
    project = sdk.projects.create(
        title="live client test", label_config=(ROOT / "label_config.xml").read_text()
    )
    # LS 1.23 serves /data/local-files/ only under a local storage connected to the project.
    sdk.import_storage.local.create(project=project.id, path=str(files / "dataset"), title="local")
    tasks = [{"image": f"/data/local-files/?d=dataset/img{i}.png"} for i in range(4)]
    sdk.projects.import_tasks(id=project.id, request=tasks)
    # One uploaded file too: /data/upload/... needs the auth header.
    upload = requests.post(
        f"{client.url}/api/projects/{project.id}/import",
        files={"file": ("up.png", _png(COLORS[4]), "image/png")},
        headers=client.auth_header(), timeout=30,
    )  # fmt: skip
    upload.raise_for_status()
    ids = sorted(t.id for t in sdk.tasks.list(project=project.id))
    choice = {"from_name": "choice", "to_name": "image", "type": "choices"}
    sdk.annotations.create(id=ids[0], result=[{**choice, "value": {"choices": ["Sunny"]}}])
    sdk.annotations.create(id=ids[1], result=[{**choice, "value": {"choices": ["Cloudy"]}}])
    sdk.annotations.create(
        id=ids[1], result=[{**choice, "value": {"choices": ["Sunny"]}}], was_cancelled=True
    )
    return project.id, ids


def test_every_method_against_real_label_studio(client, live_ls):
    client, settings = client
    pid, ids = _make_project(client, live_ls["files"])
    assert client.project(pid)["title"] == "live client test"
    # ``fields``: Label Studio 1.23.2 answers only those (and counts nothing else)
    assert client.project(pid, fields=("task_number", "model_version")) == {
        "task_number": len(ids), "model_version": client.project(pid)["model_version"]}  # fmt: skip
    spec = client.label_spec(pid)
    assert spec.labels == ("Sunny", "Cloudy", "Very Cloudy") and spec.value_key == "image"

    tasks = list(client.iter_tasks(pid))  # page_size 2: three pages
    assert sorted(t["id"] for t in tasks) == ids
    labels = {t["id"]: task_label(t, spec)[0] for t in tasks}
    assert labels[ids[0]] == "Sunny" and labels[ids[1]] == "Cloudy" and labels[ids[2]] is None
    urls = {t["id"]: t["data"]["image"] for t in tasks}
    assert urls[ids[4]].startswith("/data/upload/")

    arrays, ok, failures = ImageCache(settings, client).fetch_arrays(sorted(urls.items()))
    assert failures == {} and ok == ids
    assert [tuple(a[8, 8]) for a in arrays] == COLORS

    predictions = [
        {
            "task": t,
            "result": choice_result(spec, "Cloudy"),
            "score": 1.0 - 0.1 * k,
            "model_version": "v2",
        }
        for k, t in enumerate(ids)
    ]
    old = [
        {
            "task": ids[0],
            "result": choice_result(spec, "Sunny"),
            "score": 0.5,
            "model_version": "v1",
        }
    ]
    bad = [
        {
            "task": ids[0],
            "result": [{**choice_result(spec, "Sunny")[0], "from_name": "nope"}],
            "model_version": "v2",
        }
    ]
    stale = [{"task": 10**8, "result": choice_result(spec, "Sunny"), "model_version": "v2"}]
    assert client.import_predictions(pid, old) == 1
    assert client.import_predictions(pid, predictions + bad + stale, chunk=3) == len(ids)
    assert client.model_versions(pid) == {"v1": 1, "v2": len(ids)}

    client.activate_version(pid, "v2")
    project = client.project(pid)
    assert project["model_version"] == "v2" and project["show_collab_predictions"] is True
    assert project["sampling"] == "Uncertainty sampling"
    client.delete_version(pid, "v1")
    assert client.model_versions(pid) == {"v2": len(ids)}

    view = client.ensure_queue_view(pid)
    assert client.ensure_queue_view(pid) == view  # idempotent
    titles = [v.data.get("title") for v in client.sdk.views.list(project=pid)]
    assert titles.count(QUEUE_VIEW_TITLE) == 1
    queue = requests.get(
        f"{client.url}/api/tasks/",
        params={"view": view, "page_size": 100},
        headers=client.auth_header(),
        timeout=30,
    ).json()["tasks"]
    assert [t["id"] for t in queue] == sorted(
        ids[2:], reverse=True
    )  # unlabeled, lowest score first

    task = client.stored_task(ids[2])
    client.update_task(ids[2], meta={**task["meta"], "why": "uncertain"})
    client.update_task(ids[2], data={**task["data"], "note": "x"})
    stored = client.stored_task(ids[2])
    assert stored["meta"] == {"why": "uncertain"} and stored["data"]["note"] == "x"
    assert stored["data"]["image"] == task["data"]["image"]
    assert client.stored_task(10**9) is None  # a task deleted meanwhile
    assert np.asarray(arrays).dtype == np.uint8
