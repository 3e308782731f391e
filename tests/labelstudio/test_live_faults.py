"""Faults that involve Label Studio, reproduced against the real 1.23.2 (``live_ls``).

- a server with TASK_API_PAGE_SIZE_MAX=100 below our 1000 per page, and 250 tasks;
- a ``<Choices>`` renamed after annotating (what Label Studio accepts and what it refuses);
- the webhook Label Studio creates without headers for a backend that requires basic auth,
  with the real web app on 127.0.0.1 and a real Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import requests
from ls_fakes import LIVE_PAGE_SIZE_MAX
from werkzeug.serving import make_server

from ml_backend.config import Settings
from ml_backend.devtools.local_services import free_port
from ml_backend.labelstudio.client import LabelStudioClient, basic_auth_header
from ml_backend.labelstudio.labels import LabelTally, task_label
from ml_backend.server import create_app

pytestmark = pytest.mark.e2e
CONFIG = (Path(__file__).parents[2] / "label_config.xml").read_text()
LABELS = ("Sunny", "Cloudy", "Very Cloudy")


def _choice(label: str, name: str = "choice") -> list[dict]:
    return [
        {"from_name": name, "to_name": "image", "type": "choices", "value": {"choices": [label]}}
    ]


@pytest.fixture
def ls(live_ls):
    return LabelStudioClient(
        Settings(label_studio_url=live_ls["url"], label_studio_api_key=live_ls["token"]),
        attempts=2,
        backoff=0.1,
    )


def _project(ls: LabelStudioClient, title: str, tasks: list[dict]) -> int:
    project = ls.sdk.projects.create(title=title, label_config=CONFIG)
    if tasks:
        ls.sdk.projects.import_tasks(id=project.id, request=tasks)
    return project.id


def test_capped_page_size_still_reads_every_task_and_annotation(ls, caplog):
    tasks = [
        {"data": {"image": f"/data/upload/1/{i}.png"}, "annotations": [{"result": _choice(LABELS[i % 3])}]}
        for i in range(250)
    ]  # fmt: skip
    pid = _project(ls, "capped pages", tasks)
    raw = requests.get(
        f"{ls.url}/api/tasks/",
        params={"project": pid, "page_size": 1000},
        headers=ls.auth_header(),
        timeout=30,
    ).json()
    assert len(raw["tasks"]) == LIVE_PAGE_SIZE_MAX and raw["total"] == 250  # the cap is real

    with caplog.at_level(logging.WARNING):
        got = list(ls.iter_tasks(pid))  # asks for 1000 per page
    assert len(got) == 250 and len({t["id"] for t in got}) == 250
    spec = ls.label_spec(pid)
    labels = [task_label(t, spec)[0] for t in sorted(got, key=lambda t: t["id"])]
    assert labels == [LABELS[i % 3] for i in range(250)]  # every annotation came with its task
    assert f"returned {LIVE_PAGE_SIZE_MAX} tasks per page where 1000 were asked" in caplog.text


def test_renamed_choices_keep_their_labels(ls):
    """Label Studio refuses the rename when annotations were made in the project (its summary
    counts them), but accepts it when they came in with imported tasks; then they keep
    from_name="choice" under a config that says "weather"."""
    annotated = _project(ls, "rename refused", [{"image": "/data/upload/1/a.png"}])
    (task,) = ls.sdk.tasks.list(project=annotated)
    ls.sdk.annotations.create(id=task.id, result=_choice("Sunny"))
    renamed = CONFIG.replace('name="choice"', 'name="weather"')
    refused = requests.patch(
        f"{ls.url}/api/projects/{annotated}/",
        json={"label_config": renamed},
        headers=ls.auth_header(),
        timeout=30,
    )
    assert refused.status_code == 400 and "incompatible" in refused.text

    imported = [
        {"data": {"image": f"/data/upload/1/{i}.png"}, "annotations": [{"result": _choice(LABELS[i % 3])}]}
        for i in range(6)
    ]  # fmt: skip
    pid = _project(ls, "rename accepted", imported)
    ls.sdk.projects.update(id=pid, label_config=renamed)
    spec = ls.label_spec(pid)
    assert spec.from_name == "weather"
    tasks = sorted(ls.iter_tasks(pid), key=lambda t: t["id"])
    ls.sdk.annotations.create(id=tasks[0]["id"], result=_choice("Very Cloudy", name="weather"))
    tasks = sorted(ls.iter_tasks(pid), key=lambda t: t["id"])
    assert tasks[0]["annotations"][0]["result"][0]["from_name"] == "choice"  # kept the old name

    tally = LabelTally(spec)
    labels = [task_label(t, spec, tally)[0] for t in tasks]
    assert labels[1:] == [LABELS[i % 3] for i in range(1, 6)]
    assert labels[0] == "Very Cloudy"  # one old vote, one new: the newest wins the tie
    assert tally.recovered == {"choice": 6} and not tally.dropped
    assert '"choice" (6)' in tally.summary()


@pytest.fixture
def secured_backend(live_ls, redis_url, redis_conn, tmp_path):
    """The real web app with basic auth on 127.0.0.1 and a real Redis, recording every call as
    (path, status, whether it carried an Authorization header)."""
    settings = Settings(
        label_studio_url=live_ls["url"],
        label_studio_api_key=live_ls["token"],
        redis_url=redis_url,
        model_dir=tmp_path / "models",
        rq_queue="ml-backend-live-test",
        basic_auth_user="ls-user",
        basic_auth_pass="pw-9f2c",
    )
    app = create_app(settings)
    seen: list[tuple[str, int, bool]] = []
    inner = app.wsgi_app

    def recording(environ, start_response):
        def start(status, headers, *rest):
            seen.append(
                (environ["PATH_INFO"], int(status.split()[0]), "HTTP_AUTHORIZATION" in environ)
            )
            return start_response(status, headers, *rest)

        return inner(environ, start)

    app.wsgi_app = recording
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", settings, seen
    finally:
        server.shutdown()


def _wait_for(seen, path, count, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [entry for entry in seen if entry[0] == path]
        if len(hits) >= count:
            return hits
        time.sleep(0.05)
    raise AssertionError(f"{path} was called {len(hits)} times, expected {count}: {seen}")


def test_webhook_carries_basic_auth_once_the_backend_sets_it(ls, secured_backend):
    url, settings, seen = secured_backend
    pid = _project(ls, "secured webhook", [{"image": f"/data/upload/1/{i}.png"} for i in range(3)])
    backend = ls.sdk.ml.create(
        project=pid,
        url=url,
        title="active learning",
        auth_method="BASIC_AUTH",
        basic_auth_user=settings.basic_auth_user,
        basic_auth_pass=settings.basic_auth_pass,
    )
    # Label Studio logs in to /health and /setup with the connection's basic auth fields.
    assert {(p, s, a) for p, s, a in seen} >= {("/health", 200, True), ("/setup", 200, True)}
    (hook,) = ls.sdk.webhooks.list(project=str(pid))
    assert hook.url == f"{url}/webhook" and not hook.headers  # created without credentials

    ids = sorted(t.id for t in ls.sdk.tasks.list(project=pid))
    ls.sdk.annotations.create(id=ids[0], result=_choice("Sunny"))
    assert _wait_for(seen, "/webhook", 1) == [("/webhook", 401, False)]  # refused: no retrain

    assert ls.backend_urls(pid, settings.basic_auth_user) == [url]
    assert ls.backend_urls(pid, "someone-else") == []
    header = basic_auth_header(settings.basic_auth_user, settings.basic_auth_pass)
    assert ls.ensure_webhook_auth(pid, url, header) == "set"
    assert ls.ensure_webhook_auth(pid, f"{url}/webhook", header) == "unchanged"
    (hook,) = ls.sdk.webhooks.list(project=str(pid))
    assert hook.headers == {"Authorization": header} and hook.send_for_all_actions

    ls.sdk.annotations.create(id=ids[1], result=_choice("Cloudy"))
    assert _wait_for(seen, "/webhook", 2)[1] == ("/webhook", 201, True)

    # Live predictions and "Start Training" carry the connection's basic auth too.
    requests.post(
        f"{ls.url}/api/dm/actions",
        params={"id": "retrieve_tasks_predictions", "project": pid},
        json={"selectedItems": {"all": True, "excluded": []}},
        headers=ls.auth_header(),
        timeout=60,
    ).raise_for_status()
    assert ("/predict", 200, True) in seen
    ls.sdk.ml.train(id=backend.id)
    assert _wait_for(seen, "/webhook", 3)[2] == ("/webhook", 201, True)
    assert all(auth for path, _s, auth in seen if path != "/webhook")
