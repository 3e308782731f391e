"""Every LabelStudioClient method and ImageCache against a real Label Studio 1.23.2.

Starts one throw-away server (own data dir, free port) for the module. Skipped when the
Label Studio venv (.cache/ls-venv) is not installed.
"""

from __future__ import annotations

import io
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from ml_backend.config import Settings
from ml_backend.labelstudio.client import QUEUE_VIEW_TITLE, LabelStudioClient
from ml_backend.labelstudio.images import ImageCache
from ml_backend.labelstudio.labels import choice_result, task_label

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]
LS_BIN = ROOT / ".cache" / "ls-venv" / "bin" / "label-studio"
COLORS = [(250, 200, 0), (90, 90, 90), (20, 20, 20), (200, 10, 10), (10, 200, 10)]


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, format="PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def live_ls(tmp_path_factory, missing_real_part):
    if not LS_BIN.exists():
        missing_real_part(
            f"Label Studio 1.23.2 is not installed at {LS_BIN.relative_to(ROOT)} (the e2e installer puts it there)"
        )
    base = tmp_path_factory.mktemp("ls")
    files = base / "files"
    (files / "dataset").mkdir(parents=True)  # LS refuses a storage at the document root itself
    for i, color in enumerate(COLORS):
        (files / "dataset" / f"img{i}.png").write_bytes(_png(color))
    token, port = secrets.token_hex(20), _free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(base / "data"),
        "LABEL_STUDIO_USERNAME": "admin@example.com",
        "LABEL_STUDIO_PASSWORD": secrets.token_hex(8),
        "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files),
    }
    log = open(base / "ls.log", "wb")  # noqa: SIM115 (closed in teardown)
    proc = subprocess.Popen(
        [str(LS_BIN), "start", "--no-browser", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).json().get("status") == "UP":
                    break
            except (requests.RequestException, ValueError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (base / "ls.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"Label Studio did not come up at {url}:\n{tail}")
            time.sleep(1)
        yield {"url": url, "token": token, "files": files}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
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

    client.update_task_meta(ids[2], {"why": "uncertain"})
    client.update_task_meta(ids[2], {"rank": 1})
    assert client.sdk.tasks.get(id=str(ids[2])).meta == {"why": "uncertain", "rank": 1}
    assert np.asarray(arrays).dtype == np.uint8
