"""/predict with a real saved model version: the live answer Label Studio gets for its tasks."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
import torch

from ml_backend.jobs.state import StatusStore
from ml_backend.model.network import build_model
from ml_backend.model.storage import ModelStore
from ml_backend.server import create_app
from ml_backend.synthetic import LABELS, make_dataset

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
