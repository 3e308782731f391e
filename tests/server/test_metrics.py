"""/metrics: Prometheus text with webhook counters, latency and gauges from the status store."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from ml_backend.jobs.markers import Markers
from ml_backend.jobs.state import StatusStore


def samples(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_webhook_counters_latency_and_job_gauges(client, redis_conn):
    hook = {"action": "ANNOTATION_CREATED", "project": {"id": 3}}
    client.post("/webhook", json=hook)
    client.post("/webhook", json=hook)
    client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 3}})
    client.post("/webhook", json={"action": "WEIRD_ACTION"})
    store = StatusStore(redis_conn)
    store.job_started(4, "j1", "START_TRAINING")
    store.job_finished(
        4, "j1", "trained", {"val_accuracy": 0.8, "train_size": 16, "val_size": 4}, "resnet18-v7"
    )
    store.record_pushed(4, "resnet18-v6", {40: "Sunny", 41: "Cloudy", 42: "Sunny", 43: "Sunny"})
    store.score_acceptance(4, {40: "Sunny", 41: "Sunny", 42: "Sunny", 43: "Sunny"})
    store.job_started(5, "j2", "START_TRAINING")
    Markers(redis_conn).start(5, "j2", "ml-backend-test", 30)  # running: it holds its lease

    found = samples(client)
    counter = "mlb_webhooks_total"
    assert found[(counter, (("action", "ANNOTATION_CREATED"), ("outcome", "enqueued")))] == 1
    assert found[(counter, (("action", "ANNOTATION_CREATED"), ("outcome", "already_waiting")))] == 1
    assert found[(counter, (("action", "PROJECT_UPDATED"), ("outcome", "ignored")))] == 1
    assert found[(counter, (("action", "other"), ("outcome", "ignored")))] == 1
    latency = (
        "mlb_request_duration_seconds_count",
        (("endpoint", "/webhook"), ("method", "POST"), ("status", "201")),
    )
    assert found[latency] == 2
    assert found[("mlb_last_val_accuracy", (("project", "4"),))] == 0.8
    assert found[("mlb_labels_used", (("project", "4"),))] == 20
    assert found[("mlb_model_version_number", (("project", "4"),))] == 7
    assert ("mlb_last_job_duration_seconds", (("project", "4"),)) in found
    kept = (("project", "4"), ("version", "resnet18-v6"))
    assert found[("mlb_preannotation_kept_ratio", kept)] == 0.75
    assert found[("mlb_preannotation_scored", kept)] == 4
    assert found[("mlb_jobs", (("state", "running"),))] == 1
    assert found[("mlb_jobs", (("state", "waiting"),))] == 1  # project 3
    assert found[("mlb_redis_up", ())] == 1
