"""The dashboard page and its thumbnail route, on a real Redis, with a real HTTP server playing
Label Studio for the thumbnails. The page in a real browser during a real retrain is in
``tests/e2e/test_dashboard_browser.py``."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from ml_backend.jobs.state import StatusStore
from ml_backend.server import create_app
from ml_backend.server.charts import Point, line_chart
from ml_backend.server.dashboard import acceptance_of, progress_text, version_points

TOKEN = "c" * 40


def _trained(store, project, job, version, labels, acc, **metrics):
    store.job_started(project, job, "ANNOTATION_CREATED")
    store.job_finished(
        project, job, "trained", {"labels_used": labels, "val_accuracy": acc, **metrics}, version
    )


def _queue_top(store, project, ids):
    store.queue_top(
        project,
        [
            {"task_id": t, "rank": i + 1, "reason": "uncertain_far", "predicted": "Cloudy",
             "confidence": 0.41, "why": f"the model is unsure about task {t} <script>x</script>"}
            for i, t in enumerate(ids)
        ],
    )  # fmt: skip


def test_version_points_attribute_acceptance_to_the_version_labelers_saw():
    history = [  # newest first, as the status store returns it
        {"job_id": "j4", "model_version": "resnet18-v3", "metrics": {"labels_used": 60,
         "val_accuracy": 0.9, "acceptance": {"rate": 0.75, "n": 20}}},
        {"job_id": "j3", "error": "boom", "model_version": None, "metrics": {}},
        {"job_id": "j2", "model_version": "resnet18-v2", "metrics": {"labels_used": 40,
         "val_accuracy": 0.8, "acceptance": 0.5}},
        {"job_id": "j1", "model_version": "resnet18-v1", "metrics": {"labels_used": 20,
         "val_accuracy": 0.6}},
        {"job_id": "j0", "model_version": "coldstart-x", "metrics": {"labels_used": 0}},
    ]  # fmt: skip
    accuracy, acceptance = version_points(history)
    assert sorted((p.x, p.y, p.label) for p in accuracy) == [
        (20, 0.6, "resnet18-v1"), (40, 0.8, "resnet18-v2"), (60, 0.9, "resnet18-v3"),
    ]  # fmt: skip
    # j2 measured what v1 pre-filled, j4 what v2 pre-filled (the failed j3 served nothing)
    assert sorted((p.x, p.y, p.label) for p in acceptance) == [
        (20, 0.5, "resnet18-v1"), (40, 0.75, "resnet18-v2 of 20 tasks"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (0.8, (0.8, None, None)),
        ({"kept": 3, "total": 4}, (0.75, 4, None)),
        ({"share": 0.5, "count": 10, "version": "resnet18-v4"}, (0.5, 10, "resnet18-v4")),
        (True, (None, None, None)),
        (1.5, (None, None, None)),
        ("high", (None, None, None)),
    ],
)
def test_acceptance_shapes(raw, expected):
    assert acceptance_of({"acceptance": raw}) == expected


def test_progress_words():
    running = {"state": "running", "progress": {"stage": "training", "epoch": 3, "epochs": 12,
               "loss": 0.5123, "val_accuracy": 0.66}}  # fmt: skip
    assert progress_text(running) == (
        "training: epoch 3 of 12, loss 0.512, validation accuracy 66%",
        0.25,
    )
    running["progress"]["fine_tune"] = True  # the slow step, after the head version
    assert progress_text(running)[0] == (
        "fine-tuning the whole network (the head version is live meanwhile): epoch 3 of 12, "
        "loss 0.512, validation accuracy 66%"
    )
    predicting = {"state": "running", "progress": {"stage": "predicting", "done": 50, "total": 200}}
    assert progress_text(predicting) == ("predicting every task: 50 of 200 tasks", 0.25)
    assert progress_text({"state": "idle", "progress": {"stage": "pushing"}}) == ("", None)
    pretraining = {"state": "running", "progress": {"stage": "pretraining", "epoch": 4,
                   "seconds_left": 30.2, "budget_s": 120}}  # fmt: skip
    assert progress_text(pretraining) == (
        "learning from the project's unlabeled images (self-supervised): epoch 4, 30 s left",
        0.7483333333333333,
    )


def test_chart_escapes_and_draws_every_point():
    svg = line_chart(
        [Point(10, 0.5, "v<1>"), Point(30, 0.9, "v2")], x_label="labels", y_label="acc"
    )
    assert svg.count("<circle") == 2
    assert "v&lt;1&gt;: 50.0% at 10 labels" in svg and "<1>" not in svg
    assert "no data yet" in line_chart([], x_label="x", y_label="y")


def test_dashboard_shows_state_progress_history_and_queue(client, redis_conn):
    store = StatusStore(redis_conn)
    _trained(store, 3, "j1", "resnet18-v1", 20, 0.61)
    store.job_started(3, "j2", "ANNOTATION_CREATED")
    store.job_failed(3, "j2", "LabelStudioUnavailable: Label Studio at http://ls is unavailable")
    _trained(store, 3, "j3", "resnet18-v2", 40, 0.83)
    _queue_top(store, 3, [11, 12])
    store.job_started(3, "j4", "START_TRAINING")
    store.progress(3, stage="training", epoch=2, epochs=8)
    redis_conn.hset("mlb:status:3", "state", "idle")  # no live lease: the page must say idle

    page = client.get("/dashboard")
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    html = page.get_data(as_text=True)
    assert 'id="project-3"' in html and "resnet18-v2" in html
    assert 'data-field="state">idle<' in html  # state from the live markers, not the record
    assert "epoch 2 of 8" not in html  # progress only while a job runs
    assert html.count('class="point"') == 2  # accuracy: two versions; acceptance: none
    assert "not measured yet" in html
    assert "LabelStudioUnavailable: Label Studio at http://ls is unavailable" in html
    assert '<tr class="failed">' in html
    assert "/dashboard/thumbnail/3/11" in html and "/dashboard/thumbnail/3/12" in html
    assert "the model is unsure about task 11 &lt;script&gt;x&lt;/script&gt;" in html
    assert "<script>x</script>" not in html
    signature = re.search(r'data-signature="([^"]*)"', html).group(1)
    assert signature == "idle|resnet18-v2|j3|11,12|"  # what dashboard.js recomputes


def test_dashboard_shows_a_running_job_live(client, redis_conn, settings):
    from ml_backend.jobs.markers import Markers

    store = StatusStore(redis_conn)
    store.job_started(5, "job-5", "ANNOTATION_CREATED")
    store.progress(5, stage="training", epoch=2, epochs=8)
    started, _ = Markers(redis_conn).start(5, "job-5", settings.rq_queue, 30)
    assert started != "busy"
    html = client.get("/dashboard").get_data(as_text=True)
    assert 'data-field="state">running<' in html
    assert "training: epoch 2 of 8" in html and 'value="0.250"' in html
    body = client.get("/status?history=1").get_json()
    assert body["projects"]["5"]["progress"]["epoch"] == 2
    assert body["label_studio"]["state"] == "not configured"


def test_dashboard_and_status_show_the_pretraining_job(client, redis_conn, settings):
    from ml_backend.jobs.pretraining import PretrainMarker, redis_now

    store, marker = StatusStore(redis_conn), PretrainMarker(redis_conn)
    store.job_finished(6, "job-6", "cold start (no labels yet)", {}, "coldstart-1")
    assert marker.start(6, "pretrain-6-a", 30) == "started"
    store.pretraining_update(6, state="running", job_id="pretrain-6-a", reason="no backbone",
                             started_at=redis_now(redis_conn))  # fmt: skip
    store.pretraining_progress(6, epoch=3, loss=4.1, seconds_left=42.4)
    html = client.get("/dashboard").get_data(as_text=True)
    assert (
        "Pretraining the project&#39;s own backbone (self-supervised): epoch 3, 42 s left" in html
    )
    status = client.get("/status/6").get_json()
    assert status["state"] == "idle"  # no training job: labels are trained on at once
    assert status["pretraining"]["state"] == "running"
    assert status["pretraining"]["progress"]["epoch"] == 3
    # Its worker killed: the lease runs out and /status says so until the reconciler acts.
    redis_conn.set(marker.key(6), '{"job": "pretrain-6-a", "state": "running", "until": 1}')
    stopped = client.get("/status/6").get_json()["pretraining"]
    assert stopped["state"] == "stopped" and "reconciler" in stopped["error"]
    assert "Last pretraining failed" in client.get("/dashboard").get_data(as_text=True)
    # Between two slices: the next slice's job waits behind the retrains (its progress stays).
    redis_conn.set(marker.key(6), json.dumps({"job": "pretrain-6-b", "state": "waiting",
                                              "at": redis_now(redis_conn)}))  # fmt: skip
    store.pretraining_update(6, state="waiting", job_id="pretrain-6-b", slices=2, error=None,
                             progress={"epoch": 5, "seconds_left": 61.0})  # fmt: skip
    assert client.get("/status/6").get_json()["pretraining"]["slices"] == 2
    assert ("paused after slice 2 (epoch 5, 61 s left) while waiting retrains run"
            in client.get("/dashboard").get_data(as_text=True))  # fmt: skip
    marker.finish(6, "pretrain-6-b")
    store.pretraining_update(6, state="done", backbone="b1", images=500, epochs=12, seconds=118.0,
                             progress={})  # fmt: skip
    html = client.get("/dashboard").get_data(as_text=True)
    assert "Backbone b1 pretrained on 500 images (12 epochs, 118 s)." in html


def test_dashboard_without_projects_and_status_history_bounds(client):
    assert "No project yet" in client.get("/dashboard").get_data(as_text=True)
    assert client.get("/status?history=51").status_code == 400
    assert client.get("/status?history=x").status_code == 400


def test_dashboard_needs_the_api_credentials(settings, redis_conn):
    app = create_app(settings.with_overrides(basic_auth_user="u", basic_auth_pass="p"))
    client = app.test_client()
    assert client.get("/dashboard").status_code == 401
    assert client.get("/dashboard/thumbnail/1/2").status_code == 401
    assert client.get("/dashboard/static/dashboard.js").status_code == 401
    auth = {"Authorization": "Basic " + base64.b64encode(b"u:p").decode()}
    assert client.get("/dashboard", headers=auth).status_code == 200


# -- thumbnails: a real HTTP server plays Label Studio -------------------------------------------


class _LabelStudio:
    """Tasks (task id -> project, image URL), the project's config, and image files."""

    def __init__(self):
        self.tasks: dict[int, tuple[int, str]] = {}
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append((self.path, self.headers.get("Authorization")))
                if self.headers.get("Authorization") != f"Token {TOKEN}":
                    return self._send(401, {"detail": "no"})
                found = re.fullmatch(r"/api/(tasks|projects)/(\d+)/?", self.path.split("?")[0])
                if found and found.group(1) == "tasks" and int(found.group(2)) in outer.tasks:
                    project, url = outer.tasks[int(found.group(2))]
                    return self._send(200, {"id": int(found.group(2)), "project": project,
                                            "data": {"image": url}})  # fmt: skip
                if found and found.group(1) == "projects":
                    config = ('<View><Image name="image" value="$image"/><Choices name="c" '
                              'toName="image"><Choice value="A"/><Choice value="B"/></Choices>'
                              "</View>")  # fmt: skip
                    return self._send(200, {"id": int(found.group(2)), "label_config": config})
                if self.path in outer.files:
                    return self._send(200, outer.files[self.path], "image/png")
                return self._send(404, {"detail": "Not found."})

            def _send(self, status, body, ctype="application/json"):
                data = json.dumps(body).encode() if isinstance(body, dict) else body
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def ls():
    server = _LabelStudio()
    yield server
    server.close()


@pytest.fixture
def thumb_client(settings, redis_conn, ls):
    app = create_app(settings.with_overrides(label_studio_url=ls.url, label_studio_api_key=TOKEN))
    return app.test_client()


def _png(color) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (300, 200), color).save(out, format="PNG")
    return out.getvalue()


def test_thumbnail_of_a_queue_top_task(thumb_client, redis_conn, ls):
    ls.tasks[11] = (3, "/data/upload/3/a.png")
    ls.files["/data/upload/3/a.png"] = _png((200, 30, 30))
    _queue_top(StatusStore(redis_conn), 3, [11])
    reply = thumb_client.get("/dashboard/thumbnail/3/11")
    assert reply.status_code == 200 and reply.mimetype == "image/jpeg"
    image = Image.open(io.BytesIO(reply.data))
    assert max(image.size) <= 160
    red, green, _ = image.convert("RGB").getpixel((5, 5))
    assert red > 150 and green < 80
    assert ("/data/upload/3/a.png", f"Token {TOKEN}") in ls.requests
    assert thumb_client.get("/dashboard/thumbnail/3/11").status_code == 200  # from memory
    assert sum(1 for path, _ in ls.requests if path == "/data/upload/3/a.png") == 1


def test_thumbnail_refuses_tasks_outside_the_queue_top(thumb_client, redis_conn, ls):
    ls.tasks[11] = (3, "/data/upload/3/a.png")
    ls.tasks[99] = (3, "/data/upload/3/b.png")
    ls.tasks[12] = (4, "/data/upload/4/c.png")  # another project's task
    _queue_top(StatusStore(redis_conn), 3, [11, 12])
    assert thumb_client.get("/dashboard/thumbnail/3/99").status_code == 404
    assert not [p for p, _ in ls.requests if "99" in p]  # Label Studio not even asked
    reply = thumb_client.get("/dashboard/thumbnail/3/12")
    assert reply.status_code == 404 and "not in project 3" in reply.get_json()["error"]
    assert not [p for p, _ in ls.requests if p.startswith("/data/upload/4/")]


def test_thumbnail_follows_the_image_host_policy(thumb_client, redis_conn, ls):
    """A task whose image URL points at a private address is not fetched (no SSRF through
    the dashboard): the same rule as training."""
    ls.tasks[11] = (3, "http://169.254.169.254/latest/meta-data/")
    _queue_top(StatusStore(redis_conn), 3, [11])
    reply = thumb_client.get("/dashboard/thumbnail/3/11")
    assert reply.status_code == 422
    assert "169.254.169.254" in reply.get_json()["error"]


def test_the_dashboard_does_not_load_torch(tmp_path, redis_url):
    """The web process stays light: the page, /status and a thumbnail request import no torch."""
    import subprocess
    import sys

    code = f"""
import sys
from ml_backend.config import Settings
from ml_backend.server import create_app
app = create_app(Settings(redis_url={redis_url!r}, model_dir={str(tmp_path)!r}))
client = app.test_client()
assert client.get("/dashboard").status_code == 200
assert client.get("/status").status_code == 200
client.get("/dashboard/thumbnail/1/2")
print("torch" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
