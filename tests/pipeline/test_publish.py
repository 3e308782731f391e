"""Score encoding, the grace rule for old versions, and the must-succeed / best-effort split."""

import logging
import time

import numpy as np
import pytest

from ml_backend.jobs.state import StatusStore
from ml_backend.labelstudio.labels import parse_config
from ml_backend.pipeline.publish import build_predictions, prunable_versions, publish, queue_rows

CONFIG = """<View><Image name="image" value="$image"/>
<Choices name="choice" toName="image"><Choice value="A"/><Choice value="B"/></Choices></View>"""


def test_queue_rows_push_the_top_of_the_order_with_rising_scores():
    rows, scores = queue_rows(np.array([3, 0, 2, 5]), depth=3)
    assert rows.tolist() == [3, 0, 2]
    assert scores.tolist() == [0.25, 0.5, 0.75]  # Label Studio serves the lowest first
    rows, scores = queue_rows(np.array([4]), depth=10)
    assert rows.tolist() == [4] and scores.tolist() == [0.5]


def test_build_predictions_cold_start_has_empty_results():
    spec = parse_config(CONFIG)
    items = build_predictions(np.array([11, 12]), np.array([0.25, 0.5]), "coldstart-x", spec, None)
    assert items == [
        {"task": 11, "result": [], "score": 0.25, "model_version": "coldstart-x"},
        {"task": 12, "result": [], "score": 0.5, "model_version": "coldstart-x"},
    ]


def test_build_predictions_carry_the_choice():
    spec = parse_config(CONFIG)
    (item,) = build_predictions(np.array([5]), np.array([0.5]), "resnet18-v2", spec, ["B"])
    assert item["result"][0]["value"] == {"choices": ["B"]}
    assert item["result"][0]["from_name"] == "choice" and item["result"][0]["to_name"] == "image"


def test_only_our_versions_superseded_for_the_grace_period_go():
    existing = {
        "resnet18-v1": 5,
        "resnet18-v2": 5,
        "resnet18-v9": 5,
        "coldstart-20260101-000000": 5,
        "someone-else": 3,
    }
    since = {
        "resnet18-v1": 0.0,  # superseded long ago
        "resnet18-v2": 950.0,  # 50 s ago: a page opened with it may still be open
        "coldstart-20260101-000000": 10.0,
        "someone-else": 0.0,
    }
    keep = {"resnet18-v9"}
    assert prunable_versions(existing, keep, since, now=1000.0, grace=100.0) == [
        "coldstart-20260101-000000",
        "resnet18-v1",
    ]
    # Never what Label Studio shows, never a version without a clock (not old enough yet).
    assert prunable_versions(existing, keep | {"resnet18-v1"}, {}, now=1000.0, grace=0.0) == []


class RecordingClient:
    def __init__(self, created=None, versions=None):
        self.calls = []
        self.created = created
        self.versions = versions or {}
        self.shown = None
        self.fail_view = False
        self.lose_switch_reply = False

    def import_predictions(self, pid, items):
        self.calls.append(("import", len(items)))
        self.versions[items[0]["model_version"]] = len(items)
        return len(items) if self.created is None else self.created

    def activate_version(self, pid, version):
        self.calls.append(("activate", version))
        self.shown = version
        if self.lose_switch_reply:
            raise TimeoutError("read timed out")

    def project(self, pid, fields=None):
        return {"model_version": self.shown}

    def ensure_queue_view(self, pid):
        self.calls.append(("view",))
        if self.fail_view:
            raise ConnectionError("Label Studio went away")

    def model_versions(self, pid):
        return dict(self.versions)

    def delete_version(self, pid, version):
        self.calls.append(("delete", version))
        self.versions.pop(version)

    def stored_task(self, task_id):
        return {"id": task_id, "data": {"image": "x"}, "meta": {}}

    def update_task(self, task_id, *, data=None, meta=None):
        self.calls.append(("note", task_id))


def test_publish_pushes_everything_before_switching(redis_conn):
    client, ledger = RecordingClient(), StatusStore(redis_conn)
    counts = publish(client, 1, [{"task": 1, "model_version": "resnet18-v2"}], "resnet18-v2",
                     ledger=ledger, explain=[{"task_id": 1, "rank": 1}])  # fmt: skip
    assert client.calls == [("import", 1), ("activate", "resnet18-v2"), ("view",), ("note", 1)]
    assert counts["predictions_pushed"] == 1 and counts["publish_warnings"] == []


def test_the_superseded_version_is_kept_then_pruned_after_the_grace(redis_conn):
    client, ledger = RecordingClient(), StatusStore(redis_conn)
    publish(client, 1, [{"task": 1, "model_version": "resnet18-v1"}], "resnet18-v1", ledger=ledger)
    ledger.set_published(1, {"version": "resnet18-v1"})
    counts = publish(client, 1, [{"task": 1, "model_version": "resnet18-v2"}], "resnet18-v2",
                     ledger=ledger, grace=3600)  # fmt: skip
    assert counts["versions_deleted"] == [] and "resnet18-v1" in client.versions
    assert "resnet18-v1" in ledger.superseded_since(1)
    ledger.set_published(1, {"version": "resnet18-v2"})
    counts = publish(client, 1, [{"task": 2, "model_version": "resnet18-v3"}], "resnet18-v3",
                     ledger=ledger, grace=0)  # fmt: skip
    assert counts["versions_deleted"] == ["resnet18-v1", "resnet18-v2"]
    assert set(client.versions) == {"resnet18-v3"} and ledger.superseded_since(1) == {}


def test_publish_never_switches_when_nothing_was_created(redis_conn):
    client = RecordingClient(created=0)
    with pytest.raises(RuntimeError, match="none of the 2 predictions"):
        publish(client, 1, [{"task": 1, "model_version": "v"}, {"task": 2, "model_version": "v"}],
                "resnet18-v2", ledger=StatusStore(redis_conn))  # fmt: skip
    assert ("activate", "resnet18-v2") not in client.calls


def test_best_effort_failures_are_reported_not_raised(redis_conn):
    client = RecordingClient()
    client.fail_view = True
    counts = publish(client, 1, [{"task": 1, "model_version": "resnet18-v1"}], "resnet18-v1",
                     ledger=StatusStore(redis_conn))  # fmt: skip
    assert client.shown == "resnet18-v1"
    assert counts["publish_warnings"] == ["queue view: ConnectionError: Label Studio went away"]


def test_a_lost_switch_reply_is_checked_against_label_studio(redis_conn):
    client = RecordingClient()
    client.lose_switch_reply = True  # the PATCH went through, its reply did not
    publish(client, 1, [{"task": 1, "model_version": "resnet18-v1"}], "resnet18-v1",
            ledger=StatusStore(redis_conn))  # fmt: skip
    client.shown = "resnet18-v0"  # ...and one that really failed still raises
    client.activate_version = lambda pid, version: (_ for _ in ()).throw(TimeoutError("x"))
    with pytest.raises(TimeoutError):
        publish(client, 1, [{"task": 1, "model_version": "resnet18-v2"}], "resnet18-v2")


def test_a_slow_import_of_few_predictions_names_the_flag_once_and_steps_are_timed(
    redis_conn, monkeypatch, caplog
):
    from ml_backend.pipeline import publish as module

    client, ledger = RecordingClient(), StatusStore(redis_conn)
    imported = client.import_predictions
    client.import_predictions = lambda pid, items: time.sleep(0.2) or imported(pid, items)
    monkeypatch.setattr(module, "SLOW_IMPORT_S", 0.1)
    monkeypatch.setattr(module, "_hinted", set())
    with caplog.at_level(logging.INFO, logger="ml_backend.pipeline.publish"):
        for version in ("resnet18-v1", "resnet18-v2"):
            publish(client, 4, [{"task": 1, "model_version": version}], version, ledger=ledger)
    hints = [r for r in caplog.records if module.FAST_IMPORT_FLAG in r.getMessage()]
    assert len(hints) == 1 and hints[0].levelname == "WARNING"
    assert "to import 1 predictions" in hints[0].getMessage()
    assert "after the switch: queue view" in caplog.text and "task notes" in caplog.text
    caplog.clear()
    client.import_predictions = imported  # fast: no hint for another project either
    with caplog.at_level(logging.INFO, logger="ml_backend.pipeline.publish"):
        publish(client, 5, [{"task": 1, "model_version": "resnet18-v3"}], "resnet18-v3")
    assert module.FAST_IMPORT_FLAG not in caplog.text
