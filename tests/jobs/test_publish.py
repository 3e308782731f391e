"""Score encoding, stale-version choice and the push -> switch -> prune order."""

import numpy as np
import pytest

from ml_backend.jobs.publish import build_predictions, publish, queue_scores, stale_versions
from ml_backend.labelstudio.labels import parse_config

CONFIG = """<View><Image name="image" value="$image"/>
<Choices name="choice" toName="image"><Choice value="A"/><Choice value="B"/></Choices></View>"""


def test_queue_scores_follow_rank_and_labeled_rows_go_last():
    labeled = np.array([False, True, False, False])
    scores = queue_scores(np.array([3, 0, 2]), 4, labeled)
    # ranked first -> 1/4, second -> 2/4, third -> 3/4; the labeled row is out of the queue (1.0)
    assert scores.tolist() == [0.5, 1.0, 0.75, 0.25]
    assert np.argsort(scores[~labeled]).tolist() == [2, 0, 1]  # rows 3, 0, 2: the ranking order


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


def test_stale_versions_keeps_current_and_newest_trained_only():
    existing = {
        "resnet18-v1": 5,
        "resnet18-v2": 5,
        "resnet18-v10": 5,
        "resnet18-v9": 5,
        "coldstart-20260101-000000": 5,
        "someone-else": 3,
    }
    assert stale_versions(existing, "resnet18-v10", keep=2) == [
        "coldstart-20260101-000000",
        "resnet18-v1",
        "resnet18-v2",
    ]
    # the current cold-start ordering is never deleted; nor are other people's versions
    assert stale_versions({"coldstart-a": 1, "x": 1}, "coldstart-a", keep=1) == []


class RecordingClient:
    def __init__(self, created=None):
        self.calls = []
        self.created = created

    def import_predictions(self, pid, items):
        self.calls.append(("import", len(items)))
        return len(items) if self.created is None else self.created

    def activate_version(self, pid, version):
        self.calls.append(("activate", version))

    def ensure_queue_view(self, pid):
        self.calls.append(("view",))

    def model_versions(self, pid):
        return {"resnet18-v1": 2, "resnet18-v2": 2}

    def delete_version(self, pid, version):
        self.calls.append(("delete", version))


def test_publish_pushes_everything_before_switching_then_prunes():
    client = RecordingClient()
    counts = publish(client, 1, [{"task": 1}, {"task": 2}], "resnet18-v2", keep=1)
    assert client.calls == [
        ("import", 2),
        ("activate", "resnet18-v2"),
        ("view",),
        ("delete", "resnet18-v1"),
    ]
    assert counts["predictions_pushed"] == 2 and counts["versions_deleted"] == ["resnet18-v1"]


def test_publish_never_switches_when_nothing_was_created():
    client = RecordingClient(created=0)
    with pytest.raises(RuntimeError, match="none of the 2 predictions"):
        publish(client, 1, [{"task": 1}, {"task": 2}], "resnet18-v2", keep=1)
    assert ("activate", "resnet18-v2") not in client.calls
