"""The Label Studio protocol routes through the Flask test client, with a real Redis."""

from __future__ import annotations

import pytest
from rq import Queue

from ml_backend.config import BOUNDS, PARAM_RULES
from ml_backend.jobs.markers import Markers
from ml_backend.jobs.state import StatusStore


def annotation_webhook(project=3, action="ANNOTATION_CREATED") -> dict:
    return {
        "action": action,
        "annotation": {
            "id": 1,
            "task": 10,
            "project": project,
            "result": [],
            "was_cancelled": False,
        },
        "task": {"id": 10, "data": {"image": "/data/upload/3/a.png"}, "is_labeled": True},
        "project": {"id": project, "label_config": "<View/>", "model_version": ""},
    }


def queued_jobs(redis_conn, settings):
    return Queue(settings.rq_queue, connection=redis_conn).get_jobs()


def test_health(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_json() == {
        "status": "UP",
        "model_class": "ResNet18ActiveLearner",
        "redis": "ok",
        "pretrained": {"setting": "none", "loaded": None},
        "label_studio": "not configured",
    }


def test_health_reports_weights_the_worker_loaded(client, redis_conn):
    StatusStore(redis_conn).set_pretrained("random init (ImageNet weights unavailable: offline)")
    body = client.get("/health").get_json()
    assert body["pretrained"]["loaded"].startswith("random init")


def test_setup_reports_untrained_then_the_published_version(client, redis_conn):
    body = {
        "project": "3.1718000000",
        "schema": "<View/>",
        "hostname": "http://localhost:8080",
        "access_token": "0123456789abcdef0123456789abcdef01234567",
        "extra_params": None,
    }
    response = client.post("/setup", json=body)
    assert response.status_code == 200
    assert response.get_json() == {"model_version": "untrained"}
    StatusStore(redis_conn).job_finished(3, "j1", "trained", {}, "resnet18-v2")
    assert client.post("/setup", json=body).get_json() == {"model_version": "resnet18-v2"}
    # The access token is neither stored in Redis nor anywhere else we keep.
    for key in redis_conn.keys("*"):
        dumped = str(redis_conn.dump(key))
        assert "0123456789abcdef" not in dumped


def test_setup_stores_extra_params_json_and_lines(client, redis_conn):
    store = StatusStore(redis_conn)
    client.post(
        "/setup",
        json={"project": "5.1", "extra_params": {"strategy": "coreset", "queue_batch": "10"}},
    )
    assert store.project_params(5) == {"strategy": "coreset", "queue_batch": 10}
    client.post(
        "/setup",
        json={"project": "5.1", "extra_params": "uncertainty = margin\nepochs=3\n# note\n"},
    )
    assert store.project_params(5) == {"uncertainty": "margin", "epochs": 3}
    # Cleared in Label Studio -> cleared here; absent -> unchanged.
    client.post("/setup", json={"project": "5.1", "extra_params": ""})
    assert store.project_params(5) == {}
    client.post("/setup", json={"project": "5.1", "extra_params": '{"shortlist_factor": 4}'})
    client.post("/setup", json={"project": "5.1"})
    assert store.project_params(5) == {"shortlist_factor": 4}


def test_setup_rejects_bad_extra_params(client, redis_conn):
    cases = {
        "strategy=best": "extra param strategy must be one of diversified",
        "queue_batch=0": "extra param queue_batch must be a whole number from 1 to 1000",
        "epochs=1.5": "extra param epochs must be",
        "colour=red": "unknown extra param 'colour'; allowed: strategy, uncertainty",
        "just words": "line 1 must look like key=value",
        "{not json": "does not parse",
    }
    for raw, message in cases.items():
        response = client.post("/setup", json={"project": "5.1", "extra_params": raw})
        assert response.status_code == 400, raw
        assert message in response.get_json()["error"], raw
    assert StatusStore(redis_conn).project_params(5) == {}


@pytest.mark.parametrize(
    ("raw", "limit"),
    [
        ("queue_batch=100000000", "from 1 to 1000 (the limit of QUEUE_BATCH)"),
        ({"queue_batch": 1001}, "from 1 to 1000 (the limit of QUEUE_BATCH)"),
        ("shortlist_factor=101", "from 1 to 100 (the limit of SHORTLIST_FACTOR)"),
        ("epochs=1000000", "from 0 to 200, 0 = automatic (the limit of EPOCHS)"),
        ({"epochs": 201.0}, "from 0 to 200"),
    ],
)
def test_setup_refuses_knobs_over_their_limit(client, redis_conn, raw, limit):
    response = client.post("/setup", json={"project": "5.1", "extra_params": raw})
    assert response.status_code == 400
    assert limit in response.get_json()["error"]
    assert StatusStore(redis_conn).project_params(5) == {}


def test_every_knob_has_both_bounds_and_the_limits_are_accepted(client, redis_conn):
    named = ("strategy", "uncertainty", "probcover_radius")
    whole = {k: v for k, v in PARAM_RULES.items() if k not in named}
    assert set(whole) == {"queue_batch", "shortlist_factor", "epochs"}
    highest = {name: BOUNDS[name.upper()][1] for name in whole}
    response = client.post("/setup", json={"project": "5.1", "extra_params": highest})
    assert response.status_code == 200, response.get_json()
    assert StatusStore(redis_conn).project_params(5) == highest
    # the radius: a number in [0.05, 2] or "purity"; outside, a 400 that names the limit
    response = client.post(
        "/setup", json={"project": "5.1", "extra_params": {"probcover_radius": 2}}
    )
    assert response.status_code == 200, response.get_json()
    response = client.post("/setup", json={"project": "5.1", "extra_params": "probcover_radius=3"})
    assert response.status_code == 400
    assert "0.05 to 2 or purity" in response.get_json()["error"]


def test_webhook_training_actions_enqueue_and_coalesce(client, redis_conn, settings):
    response = client.post("/webhook", json=annotation_webhook(3))
    assert response.status_code == 201
    assert response.get_json() == {
        "status": "enqueued",
        "project": 3,
        "action": "ANNOTATION_CREATED",
    }
    for action in ("ANNOTATION_UPDATED", "START_TRAINING", "TASKS_CREATED"):
        response = client.post("/webhook", json={"action": action, "project": {"id": "3"}})
        assert response.status_code == 201
        assert response.get_json()["status"] == "already_waiting"
    store = StatusStore(redis_conn)
    assert not store.take_full_listing(3)
    deleted = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}], "project": {"id": 3}}
    assert client.post("/webhook", json=deleted).get_json()["status"] == "already_waiting"
    jobs = queued_jobs(redis_conn, settings)
    assert len(jobs) == 1
    assert jobs[0].args[:2] == (3, "ANNOTATION_CREATED")
    # The waiting job keeps its reason, but it will list every task (a bulk deletion may not
    # have bumped the tasks' updated_at yet); the request is taken once.
    assert store.take_full_listing(3) and not store.take_full_listing(3)


def test_burst_of_500_webhooks_leaves_one_job(client, redis_conn, settings):
    statuses = [
        client.post("/webhook", json=annotation_webhook(11)).status_code for _ in range(500)
    ]
    assert statuses == [201] * 500
    assert len(queued_jobs(redis_conn, settings)) == 1


def test_other_actions_are_ignored_with_200(client, redis_conn, settings):
    for action in ("PROJECT_UPDATED", "TASKS_DELETED", "SOMETHING_NEW"):
        response = client.post("/webhook", json={"action": action, "project": {"id": 3}})
        assert response.status_code == 200
        assert response.get_json() == {"status": "ignored", "action": action}
    # Ignored actions need no project at all.
    assert client.post("/webhook", json={"action": "PROJECT_DELETED"}).status_code == 200
    assert queued_jobs(redis_conn, settings) == []


def test_train_is_start_training(client, redis_conn, settings):
    response = client.post("/train", json={"project": "12.1718000000"})
    assert response.status_code == 201
    assert response.get_json() == {"status": "enqueued", "project": 12, "action": "START_TRAINING"}
    assert client.post("/train", json={"project": 12}).get_json()["status"] == "already_waiting"
    assert queued_jobs(redis_conn, settings)[0].args[:2] == (12, "START_TRAINING")
    # "all_tasks": the job (here the one already waiting) pre-annotates every unlabeled task
    store = StatusStore(redis_conn)
    assert not store.predict_all_requested(12)
    response = client.post("/train", json={"project": 12, "all_tasks": True})
    assert response.status_code == 201 and store.predict_all_requested(12)
    bad = client.post("/train", json={"project": 12, "all_tasks": "yes"})
    assert bad.status_code == 400 and "all_tasks must be true or false" in bad.get_json()["error"]


def test_status_shows_state_history_and_queue(client, redis_conn):
    store = StatusStore(redis_conn)
    client.post("/webhook", json=annotation_webhook(4))
    waiting = client.get("/status/4").get_json()
    assert waiting["state"] == "waiting"
    assert waiting["waiting"]["reason"] == "ANNOTATION_CREATED"
    assert waiting["queue"]["waiting_job"] == waiting["waiting"]["job_id"]
    job = waiting["waiting"]["job_id"]
    markers = Markers(redis_conn)
    markers.start(4, job, "ml-backend-test", 30)  # what the worker does when the job starts
    store.job_started(4, job, "ANNOTATION_CREATED")
    store.progress(4, stage="training", epoch=2, epochs=5)
    running = client.get("/status/4").get_json()
    assert running["state"] == "running" and running["queue"]["running_job"] == job
    assert running["progress"]["epoch"] == 2
    store.job_finished(4, job, "trained", {"val_accuracy": 0.9}, "resnet18-v1")
    markers.finish(4, job, "ml-backend-test", "unused")
    assert client.get("/status/4").get_json()["progress"] == {}, "no progress when idle"
    store.queue_top(4, [{"task_id": 10, "rank": 0, "uncertainty": 0.8, "distance": float("nan")}])
    done = client.get("/status/4").get_json()
    assert done["model_version"] == "resnet18-v1"
    assert done["last_job"]["metrics"] == {"val_accuracy": 0.9}
    assert done["history"][0]["outcome"] == "trained"
    assert done["queue_top"] == [{"task_id": 10, "rank": 0, "uncertainty": 0.8, "distance": None}]
    everything = client.get("/status").get_json()
    assert list(everything["projects"]) == ["4"]
    assert everything["projects"]["4"]["model_version"] == "resnet18-v1"


def test_status_of_unknown_project_is_404_json(client):
    response = client.get("/status/99")
    assert response.status_code == 404
    assert "no job or setting recorded for project 99" in response.get_json()["error"]
    assert client.get("/status/abc").status_code == 400


def test_predict_without_model_returns_empty_results(client, redis_conn):
    tasks = [{"id": 1, "data": {"image": "/data/upload/1/a.png"}, "project": 1}]
    response = client.post(
        "/predict", json={"tasks": tasks, "project": "1.1718000000", "label_config": "<View/>"}
    )
    assert response.status_code == 200
    assert response.get_json() == {"results": []}


def test_first_setup_of_a_project_enqueues_its_first_job_once(client, redis_conn, settings):
    body = {"project": "8.1718000000", "schema": "<View/>", "hostname": "http://ls"}
    for _ in range(3):  # Label Studio calls /setup on every list/detail view
        assert client.post("/setup", json=body).status_code == 200
    jobs = queued_jobs(redis_conn, settings)
    assert [job.args[:2] for job in jobs] == [(8, "setup")]
    # a project the backend already knows, with nothing waiting, is not queued by /setup
    StatusStore(redis_conn).job_finished(5, "job-0", "trained", {}, "resnet18-v1")
    client.post("/setup", json={"project": "5.1", "schema": "<View/>"})
    assert [job.args[0] for job in queued_jobs(redis_conn, settings)] == [8]
