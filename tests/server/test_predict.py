"""/predict with a real saved model version: the live answer Label Studio gets for its tasks."""

from __future__ import annotations

import base64
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from ml_backend.devtools.synthetic import LABELS, make_dataset
from ml_backend.jobs.state import StatusStore
from ml_backend.model.network import build_model
from ml_backend.model.storage import ModelStore
from ml_backend.server import create_app

CONFIG = (Path(__file__).parents[2] / "label_config.xml").read_text()


def data_uri(img) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def served(settings, redis_conn):
    """A published version resnet18-v1 of project 4 and an app serving it."""
    torch.set_num_threads(1)
    settings = settings.with_overrides(label_studio_api_key="0" * 40)
    model, _ = build_model(len(LABELS), "none", seed=0)
    ModelStore(settings.model_dir).save(4, "resnet18-v1", model, list(LABELS), {}, {})
    StatusStore(redis_conn).job_finished(4, "job-1", "trained", {}, "resnet18-v1")
    return create_app(settings).test_client()


def test_predict_answers_every_task_with_the_published_version(served):
    images, _ = make_dataset(3, seed=1, size=32)
    tasks = [{"id": 20 + i, "data": {"image": data_uri(img)}} for i, img in enumerate(images)]
    tasks.append({"id": 99, "data": {"text": "no image here"}})
    response = served.post(
        "/predict", json={"tasks": tasks, "project": "4.1718000000", "label_config": CONFIG}
    )

    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(results) == 4  # one entry per task, in order
    for result in results[:3]:
        assert result["model_version"] == "resnet18-v1"
        (choice,) = result["result"]
        assert choice["from_name"] == "choice" and choice["to_name"] == "image"
        assert choice["value"]["choices"][0] in LABELS
        assert 1 / len(LABELS) <= result["score"] <= 1.0  # confidence of the predicted class
    assert results[3]["result"] == []  # a task without an image gets an empty answer, not an error


def test_predict_follows_the_version_the_worker_published(served, settings, redis_conn):
    model, _ = build_model(len(LABELS), "none", seed=1)
    ModelStore(settings.model_dir).save(4, "resnet18-v2", model, list(LABELS), {}, {})
    (img,), _ = make_dataset(1, seed=2, size=32)
    body = {
        "tasks": [{"id": 1, "data": {"image": data_uri(img)}}],
        "project": "4.1",
        "label_config": CONFIG,
    }
    # v2 is on disk but not published yet: v1 keeps serving
    assert (
        served.post("/predict", json=body).get_json()["results"][0]["model_version"]
        == "resnet18-v1"
    )
    StatusStore(redis_conn).job_finished(4, "job-2", "trained", {}, "resnet18-v2")
    assert (
        served.post("/predict", json=body).get_json()["results"][0]["model_version"]
        == "resnet18-v2"
    )


@pytest.fixture
def image_server():
    """A real HTTP server on 127.0.0.1 that serves one PNG and records every request path."""
    (img,), _ = make_dataset(1, seed=3, size=32)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    body, seen = buffer.getvalue(), []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()
    httpd.server_close()


def test_predict_does_not_fetch_internal_urls(served, image_server):
    """Blind SSRF: a /predict body naming an internal address gets an empty answer, and the
    internal service never sees a request."""
    url, seen = image_server
    tasks = [
        {"id": 1, "data": {"image": f"{url}/internal.png"}},
        {"id": 2, "data": {"image": "http://169.254.169.254/latest/meta-data/"}},
        {"id": 3, "data": {"image": "http://[::1]:6379/"}},
    ]
    response = served.post("/predict", json={"tasks": tasks, "project": 4, "label_config": CONFIG})
    assert response.status_code == 200
    assert [r["result"] for r in response.get_json()["results"]] == [[], [], []]
    assert seen == []


def test_predict_fetches_hosts_listed_in_image_hosts(settings, redis_conn, image_server):
    url, seen = image_server
    settings = settings.with_overrides(label_studio_api_key="0" * 40, image_hosts=("127.0.0.1",))
    model, _ = build_model(len(LABELS), "none", seed=0)
    ModelStore(settings.model_dir).save(4, "resnet18-v1", model, list(LABELS), {}, {})
    StatusStore(redis_conn).job_finished(4, "job-1", "trained", {}, "resnet18-v1")
    client = create_app(settings).test_client()
    tasks = [{"id": 1, "data": {"image": f"{url}/listed.png"}}]
    response = client.post("/predict", json={"tasks": tasks, "project": 4, "label_config": CONFIG})
    (result,) = response.get_json()["results"]
    assert result["result"][0]["value"]["choices"][0] in LABELS and seen == ["/listed.png"]
