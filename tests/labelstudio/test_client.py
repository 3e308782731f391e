"""LabelStudioClient against a local HTTP server: retries, error mapping, tokens, paging."""

import base64
import json
import logging
import time
from pathlib import Path

import pytest
from ls_fakes import LEGACY_TOKEN, FakeLS

from ml_backend.errors import ConfigError, LabelStudioUnavailable, ProjectNotFound
from ml_backend.labelstudio.client import LabelStudioClient, basic_auth_header

PROJECT = {
    "id": 7,
    "title": "weather",
    "label_config": (Path(__file__).parents[2] / "label_config.xml").read_text(),
    "model_version": "",
}


def fake_jwt(token_type: str, exp: float) -> str:
    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part({'token_type': token_type, 'exp': int(exp)})}.c2ln"


def client_for(settings, **kw):
    return LabelStudioClient(settings, attempts=3, backoff=0.01, max_backoff=0.02, timeout=5, **kw)


def api_calls(fake, path):
    return [e for e in fake.log if e[0] == "ls" and e[2].split("?")[0] == path]


def test_retries_5xx_then_succeeds(fake, settings, caplog):
    fake.routes[("GET", "/api/projects/7/")] = [
        (500, {"detail": "boom"}),
        (502, b"<html>"),
        (200, PROJECT),
    ]
    with caplog.at_level(logging.WARNING):
        project = client_for(settings).project(7)
    assert project["title"] == "weather" and project["label_config"].startswith("<View>")
    assert len(api_calls(fake, "/api/projects/7/")) == 3
    assert "retry 1/2" in caplog.text and LEGACY_TOKEN not in caplog.text
    assert all(e[3] == f"Token {LEGACY_TOKEN}" for e in fake.log)


def test_gives_up_after_bounded_tries(fake, settings):
    fake.routes[("GET", "/api/projects/7/")] = [(503, {"detail": "down"})]
    with pytest.raises(LabelStudioUnavailable) as err:
        client_for(settings).project(7)
    assert fake.ls.url in str(err.value) and "3 tries" in str(err.value)
    assert len(api_calls(fake, "/api/projects/7/")) == 3


def test_unreachable_server(settings):
    client = client_for(settings.with_overrides(label_studio_url="http://127.0.0.1:9"))
    with pytest.raises(LabelStudioUnavailable, match="127.0.0.1:9.*LABEL_STUDIO_URL"):
        client.project(1)


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_credentials_name_the_setting(fake, settings, status):
    fake.routes[("GET", "/api/projects/7/")] = [(status, {"detail": "Invalid token."})]
    with pytest.raises(LabelStudioUnavailable, match="LABEL_STUDIO_API_KEY") as err:
        client_for(settings).project(7)
    assert LEGACY_TOKEN not in str(err.value)
    assert len(api_calls(fake, "/api/projects/7/")) == 1  # no retry on a wrong token


def test_missing_project(fake, settings):
    with pytest.raises(ProjectNotFound, match="project 7"):
        client_for(settings).project(7)
    with pytest.raises(ProjectNotFound):
        list(client_for(settings).iter_tasks(7))


def test_missing_or_expired_key(settings):
    with pytest.raises(ConfigError, match="LABEL_STUDIO_API_KEY"):
        LabelStudioClient(settings.with_overrides(label_studio_api_key=None))
    expired = fake_jwt("refresh", time.time() - 60)
    with pytest.raises(LabelStudioUnavailable, match="expired"):
        LabelStudioClient(settings.with_overrides(label_studio_api_key=expired))


def test_personal_access_token_is_refreshed_and_cached(settings):
    pat = fake_jwt("refresh", time.time() + 86400)
    access = fake_jwt("access", time.time() + 300)
    fake = FakeLS(token_header=f"Bearer {access}")
    try:
        refreshes = []

        def refresh(h):
            refreshes.append(json.loads(h.body)["refresh"])
            return h.send(200, {"access": access})

        fake.routes[("POST", "/api/token/refresh/")] = refresh
        fake.routes[("GET", "/api/projects/7/")] = lambda h: h.send(
            200 if h.headers.get("Authorization") == f"Bearer {access}" else 401, PROJECT
        )
        client = client_for(
            settings.with_overrides(label_studio_url=fake.ls.url, label_studio_api_key=pat)
        )
        assert client.project(7)["id"] == 7  # the SDK refreshes for its own calls
        assert client.access_token() == access and client.access_token() == access
        assert client.auth_header() == {"Authorization": f"Bearer {access}"}
        assert set(refreshes) == {pat} and len(refreshes) == 2  # one by the SDK, one cached by us
        assert all(pat not in (e[3] or "") for e in fake.log)  # the PAT itself is never a header
    finally:
        fake.close()


def test_legacy_token_is_its_own_access_token(settings):
    client = client_for(settings)
    assert client.access_token() == LEGACY_TOKEN
    assert client.auth_header() == {"Authorization": f"Token {LEGACY_TOKEN}"}


def _task_pages(tasks, cap=None, report_total=True, asked=None):
    """A /api/tasks/ handler paging like Label Studio (DRF): ``page_size`` capped at ``cap``
    (TASK_API_PAGE_SIZE_MAX), 404 "Invalid page" past the end, ``total`` in every page."""

    def page(h):
        number, size = int(h.query["page"][0]), int(h.query["page_size"][0])
        size = min(size, cap) if cap else size
        if asked is not None:
            asked.append((number, int(h.query["page_size"][0])))
        assert h.query["fields"] == ["all"] and h.query["expand"] == ["annotations"]
        chunk = tasks[(number - 1) * size : number * size]
        if not chunk and number > 1:
            return h.send(404, {"detail": "Invalid page."})
        body = {"tasks": chunk, "total_annotations": 0, "total_predictions": 0}
        if report_total:
            body["total"] = len(tasks)
        return h.send(200, body)

    return page


def _tasks(n):
    return [
        {"id": i, "data": {"image": f"/data/upload/1/{i}.png"}, "annotations": []}
        for i in range(1, n + 1)
    ]


def test_iter_tasks_pages_until_the_end(fake, settings):
    tasks, asked = _tasks(5), []
    fake.routes[("GET", "/api/tasks/")] = _task_pages(tasks, asked=asked)
    got = list(client_for(settings, page_size=2).iter_tasks(1))
    assert [t["id"] for t in got] == [1, 2, 3, 4, 5] and [p for p, _ in asked] == [1, 2, 3]
    assert got[0]["data"] == {"image": "/data/upload/1/1.png"}
    asked.clear()
    assert len(list(client_for(settings, page_size=5).iter_tasks(1))) == 5 and asked == [(1, 5)]


def test_iter_tasks_survives_a_capped_page_size(fake, settings, caplog):
    """TASK_API_PAGE_SIZE_MAX below our page size: short pages are not the end."""
    tasks, asked = _tasks(25), []
    fake.routes[("GET", "/api/tasks/")] = _task_pages(tasks, cap=10, asked=asked)
    with caplog.at_level(logging.WARNING):
        got = list(client_for(settings, page_size=100).iter_tasks(1))
    assert [t["id"] for t in got] == list(range(1, 26))
    assert asked == [(1, 100), (2, 100), (3, 100)]  # stopped at the total, not at page 4's 404
    assert caplog.text.count("TASK_API_PAGE_SIZE_MAX") == 1  # said once, not per page


def test_iter_tasks_without_a_total_stops_at_an_empty_page_or_404(fake, settings):
    tasks, asked = _tasks(25), []
    fake.routes[("GET", "/api/tasks/")] = _task_pages(
        tasks, cap=10, report_total=False, asked=asked
    )
    got = list(client_for(settings, page_size=100).iter_tasks(1))
    assert [t["id"] for t in got] == list(range(1, 26)) and [p for p, _ in asked] == [1, 2, 3, 4]
    fake.routes[("GET", "/api/tasks/")] = lambda h: h.send(200, {"tasks": []})
    assert list(client_for(settings, page_size=100).iter_tasks(1)) == []


def test_iter_tasks_refuses_a_server_that_ignores_the_page_number(fake, settings):
    tasks = _tasks(3)
    fake.routes[("GET", "/api/tasks/")] = lambda h: h.send(200, {"tasks": tasks[:2], "total": 3})
    with pytest.raises(LabelStudioUnavailable, match="same page"):
        list(client_for(settings, page_size=2).iter_tasks(1))


def test_import_predictions_counts_and_isolates_rejected_items(fake, settings, caplog):
    def importer(h):
        items = json.loads(h.body)
        if any(item["task"] == 999 for item in items):  # LS rejects a chunk naming an unknown task
            return h.send(400, {"detail": "Validation error"})
        return h.send(
            201, {"created": sum(1 for item in items if item["result"])}
        )  # skips bad results

    fake.routes[("POST", "/api/projects/1/import/predictions")] = importer
    items = [
        {"task": i, "result": [{"x": 1}], "score": 0.1, "model_version": "v1"} for i in range(10)
    ]
    items[3]["task"] = 999
    items[6]["result"] = []
    with caplog.at_level(logging.WARNING):
        created = client_for(settings).import_predictions(1, items, chunk=4)
    assert created == 8
    assert "created 8 of 10" in caplog.text and "task 999" in caplog.text


def test_ensure_webhook_auth_sets_the_header_once_and_keeps_the_rest(fake, settings, caplog):
    header = basic_auth_header("ls", "s3cret")
    hooks = [
        {"id": 5, "project": 7, "url": "HTTP://Web:80/webhook/", "headers": {"X-Team": "a"},
         "actions": ["ANNOTATION_CREATED"], "send_for_all_actions": False},
        {"id": 6, "project": 7, "url": "http://other-backend:9090/webhook", "headers": {}},
        {"id": 7, "project": None, "url": "http://web/webhook", "headers": {}},  # organization's
    ]  # fmt: skip
    patches = []

    def listing(h):
        assert h.query["project"] == ["7"]
        return h.send(200, hooks)

    def patch(h):
        body = json.loads(h.body)
        patches.append(body)
        hooks[0].update(body)
        return h.send(200, hooks[0])

    fake.routes[("GET", "/api/webhooks/")] = listing
    fake.routes[("PATCH", "/api/webhooks/5/")] = patch
    client = client_for(settings)
    with caplog.at_level(logging.DEBUG):
        assert client.ensure_webhook_auth(7, "http://web", header) == "set"
        assert client.ensure_webhook_auth(7, "http://web:80/webhook", header) == "unchanged"
    assert patches == [
        {"headers": {"X-Team": "a", "Authorization": header}, "actions": ["ANNOTATION_CREATED"]}
    ]
    assert header.split()[1] not in caplog.text and "s3cret" not in caplog.text
    assert "webhook 5" in caplog.text
    hooks[0]["headers"] = {"authorization": "Basic stale"}  # another password before: replaced
    assert client.ensure_webhook_auth(7, "http://web/", header) == "set"
    assert patches[-1]["headers"] == {"Authorization": header}
    with caplog.at_level(logging.WARNING):
        assert client.ensure_webhook_auth(7, "http://nowhere:9090", header) == "missing"
    assert "no webhook to http://nowhere:9090/webhook" in caplog.text
    assert len(patches) == 2


def test_backend_urls_are_those_that_log_in_as_our_user(fake, settings):
    fake.routes[("GET", "/api/ml/")] = [
        (200, [
            {"id": 1, "url": "http://web:9090", "auth_method": "BASIC_AUTH", "basic_auth_user": "ls"},
            {"id": 2, "url": "http://open:9090", "auth_method": "NONE", "basic_auth_user": "ls"},
            {"id": 3, "url": "http://theirs:9090", "auth_method": "BASIC_AUTH", "basic_auth_user": "x"},
        ])
    ]  # fmt: skip
    assert client_for(settings).backend_urls(7, "ls") == ["http://web:9090"]
    assert api_calls(fake, "/api/ml/")[0][2].endswith("project=7")
