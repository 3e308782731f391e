"""The retraining job end to end on CPU: real training, storage, ranking and status store.

Label Studio itself is stood in for by ``FakeLabelStudio`` (our client wrapper's interface,
recording calls) so the push/switch order and failure handling can be asserted exactly; the
real server is exercised by tests/e2e.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from ml_backend.config import Settings
from ml_backend.devtools.synthetic import LABELS, make_dataset
from ml_backend.errors import LabelStudioUnavailable
from ml_backend.jobs.state import StatusStore
from ml_backend.labelstudio.images import CachedImages, to_array
from ml_backend.labelstudio.labels import parse_config
from ml_backend.model.storage import ModelStore
from ml_backend.pipeline.training import train_project

CONFIG = (Path(__file__).parents[2] / "label_config.xml").read_text()
SIZE = 32


def choice(label, cancelled=False, ann_id=1):
    return {
        "id": ann_id,
        "was_cancelled": cancelled,
        "created_at": f"2026-01-01T00:00:0{ann_id}Z",
        "result": [
            {
                "from_name": "choice",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": [label]},
            }
        ],
    }


class FakeLabelStudio:
    """Our LabelStudioClient's interface over in-memory tasks; records what the job did."""

    def __init__(self, tasks):
        self.tasks = tasks
        self.calls = []
        self.predictions = {}
        self.meta = {}
        self.data = {}
        self.fail_import = False
        self.fail_view = False
        self.shown = None

    def label_spec(self, pid):
        return parse_config(CONFIG)

    def iter_tasks(self, pid):
        yield from self.tasks

    def import_predictions(self, pid, items):
        if self.fail_import:
            raise LabelStudioUnavailable("Label Studio at http://ls is down")
        self.calls.append(("import", items[0]["model_version"], len(items)))
        for item in items:
            self.predictions[(item["task"], item["model_version"])] = item
        return len(items)

    def activate_version(self, pid, version):
        self.calls.append(("activate", version))
        self.shown = version

    def project(self, pid, fields=None):
        return {"id": pid, "model_version": self.shown}

    def stored_task(self, task_id):
        task = next((t for t in self.tasks if t["id"] == task_id), None)
        return None if task is None else {**task, "meta": self.meta.get(task_id, {})}

    def update_task(self, task_id, *, data=None, meta=None):
        if meta is not None:
            self.meta[task_id] = meta
        if data is not None:
            self.data[task_id] = data

    def ensure_queue_view(self, pid):
        if self.fail_view:
            raise LabelStudioUnavailable("Label Studio at http://ls is down")
        self.calls.append(("view",))

    def model_versions(self, pid):
        versions = {}
        for _, version in self.predictions:
            versions[version] = versions.get(version, 0) + 1
        return versions

    def backend_urls(self, pid, user):
        self.calls.append(("backends", user))
        return ["http://backend:9090"]

    def ensure_webhook_auth(self, pid, url, header):
        self.calls.append(("webhook auth", url, header))
        return "set"

    def delete_version(self, pid, version):
        self.calls.append(("delete", version))
        self.predictions = {k: v for k, v in self.predictions.items() if k[1] != version}


class FakeImageCache:
    """Images by URL; ``fetch_lazy`` hands out ``CachedImages`` as the real cache does, and
    ``rows_read`` counts the rows the job asked for."""

    size = SIZE

    def __init__(self, arrays):
        self.arrays = arrays
        self.rows_read = 0

    def fetch_lazy(self, items):
        _, ok, failures = self.fetch_arrays(items)
        kept = [(t, u) for t, u in items if t not in failures]
        return CachedImages(self, kept), ok, failures

    def read_rows(self, items, out=None):
        out = np.empty((len(items), SIZE, SIZE, 3), np.uint8) if out is None else out
        for i, (_, url) in enumerate(items):
            out[i] = self.arrays[url]
        self.rows_read += len(items)
        return out

    def fetch_arrays(self, items):
        ok = [(t, u) for t, u in items if u in self.arrays]
        failures = {t: "corrupt image" for t, u in items if u not in self.arrays}
        stack = (
            np.stack([self.arrays[u] for _, u in ok])
            if ok
            else np.zeros((0, SIZE, SIZE, 3), np.uint8)
        )
        return stack, [t for t, _ in ok], failures


@pytest.fixture
def world():
    torch.set_num_threads(1)
    images, labels = make_dataset(150, seed=3, size=SIZE)
    arrays = {f"/data/upload/1/{i}.png": to_array(img, SIZE) for i, img in enumerate(images)}
    tasks = [
        {"id": 100 + i, "data": {"image": f"/data/upload/1/{i}.png"}, "annotations": []}
        for i in range(len(images))
    ]
    return tasks, labels, FakeImageCache(arrays)


@pytest.fixture
def job_settings(tmp_path):
    return Settings(
        model_dir=tmp_path / "models",
        pretrained="none",
        device="cpu",
        image_size=SIZE,
        pretrain_budget_s=2,
        epochs=6,
        batch_size=16,
        queue_batch=5,
        seed=0,
        label_studio_api_key="x",
    )


def run(job_settings, client, cache, status, reason="ANNOTATION_CREATED"):
    return train_project(
        1, reason, settings=job_settings, status=status, client=client, image_cache=cache
    )


def test_cold_start_orders_the_pool_without_preannotations(world, job_settings, redis_conn):
    tasks, _, cache = world
    client, status = FakeLabelStudio(tasks), StatusStore(redis_conn)
    out = run(job_settings, client, cache, status, reason="TASKS_CREATED")
    assert out["outcome"] == "cold start (no labels yet)"
    version = out["model_version"]
    assert version.startswith("coldstart-")
    assert client.calls[:2] == [("import", version, 100), ("activate", version)]
    # Nothing changed since: the next job publishes nothing.
    again = run(job_settings, client, cache, status, reason="START_TRAINING")
    assert again["outcome"].startswith("unchanged") and again["model_version"] is None
    assert [c for c in client.calls if c[0] == "import"] == [("import", version, 100)]
    preds = [p for (t, v), p in client.predictions.items() if v == version]
    assert all(p["result"] == [] for p in preds)
    first = min(preds, key=lambda p: p["score"])
    assert out["metrics"]["queue_top"][0]["task_id"] == first["task"]
    # Typical images first (not k-center's outliers), and the labeler is told why.
    assert out["metrics"]["strategy"].startswith("typicality")
    top = out["metrics"]["queue_top"][0]
    assert top["reason"] == "typical" and top["why"].startswith("typical of a group of")
    assert client.meta[first["task"]]["active_learning"]["why"] == top["why"]
    assert status.read_queue_top(1)[0]["task_id"] == first["task"]
    assert status.pretrained() == "none"
    assert ModelStore(job_settings.model_dir).latest(1) is None  # nothing trained


def test_one_class_labeled_is_not_trained_and_says_why(world, job_settings, redis_conn):
    tasks, _, cache = world
    tasks[0]["annotations"] = [choice("Sunny")]
    tasks[1]["annotations"] = [choice("Sunny")]
    out = run(job_settings, FakeLabelStudio(tasks), cache, StatusStore(redis_conn))
    assert "only one class labeled (Sunny)" in out["outcome"]


def test_training_pushes_a_version_that_beats_chance_and_ranks_the_queue(
    world, job_settings, redis_conn
):
    tasks, labels, cache = world
    for i in range(60):
        tasks[i]["annotations"] = [choice(labels[i])]
    tasks[60]["annotations"] = [choice("Foggy")]  # outside the config: reported, ignored
    tasks[61]["annotations"] = [choice(labels[61], cancelled=True)]  # skipped task: not a label
    client = FakeLabelStudio(tasks)
    out = run(job_settings, client, cache, StatusStore(redis_conn))

    assert out["outcome"] == "trained" and out["model_version"] == "resnet18-v1"
    assert out["metrics"]["labels_used"] == 60 and out["metrics"]["ignored_annotations"] == 1
    # A head on the self-supervised backbone's embeddings, chosen by cross-validation and
    # refit on every label before it is served.
    metrics = out["metrics"]
    assert metrics["served"].startswith("head") and metrics["why"]
    assert metrics["train_size"] == 60 and metrics["val_accuracy"] is not None
    assert metrics["backbone"] == "b1" and metrics["image_size"] == SIZE
    assert [c[0] for c in client.calls[:3]] == ["import", "activate", "view"]
    preds = {t: p for (t, v), p in client.predictions.items() if v == "resnet18-v1"}
    unlabeled = [100 + i for i in range(60, 150)]
    assert sorted(preds) == unlabeled  # one prediction on every unlabeled task, none on labeled
    correct = np.mean(
        [preds[t]["result"][0]["value"]["choices"][0] == labels[t - 100] for t in unlabeled]
    )
    assert correct > 0.6, f"accuracy on unlabeled tasks {correct:.2f} is not above chance (0.33)"
    queue = sorted(unlabeled, key=lambda t: preds[t]["score"])
    assert queue[0] == out["metrics"]["queue_top"][0]["task_id"]
    explained = client.meta[queue[0]]["active_learning"]  # the "why" is visible in Label Studio too
    assert explained["rank"] == 1 and explained["model_version"] == "resnet18-v1"
    # 60 labels over 3 classes: 20 per class, past auto's switch: herding picked the top
    assert out["metrics"]["queue_decision"].startswith("20.0 labels per class")
    assert out["metrics"]["strategy"] == "herding (auto)"
    assert explained["reason"] == "covers_unsure" and explained["why"].startswith("the model is ")
    assert 0 <= explained["uncertainty"] <= 1 and explained["distance"] is None  # no k-center
    assert sorted(p["score"] for p in preds.values()) == [round((i + 1) / 91, 8) for i in range(90)]
    info = ModelStore(job_settings.model_dir).latest(1)
    assert info.version == "resnet18-v1" and info.labels == list(LABELS)
    assert {"fetch_s", "train_s", "predict_s", "push_s"} <= set(out["metrics"]["timings"])


def ranked_after_30_labels(world, job_settings, redis_conn, **overrides):
    """``(settings, client, out, queue_top)`` of a job over 30 labels with these settings."""
    tasks, labels, cache = world
    for i in range(30):
        tasks[i]["annotations"] = [choice(labels[i])]
    settings = job_settings.with_overrides(**overrides)
    client = FakeLabelStudio(tasks)
    out = run(settings, client, cache, StatusStore(redis_conn))
    assert out["outcome"] == "trained"
    top = out["metrics"]["queue_top"]
    assert client.meta[top[0]["task_id"]]["active_learning"]["why"] == top[0]["why"]
    return settings, client, out, top


# bounded by epochs, not seconds: on a loaded machine a 2 s budget gives another backbone, and
# at radius 0.5 a weaker one can leave nothing uncovered after 30 labels
BY_EPOCHS = {"pretrain_budget_s": 600, "pretrain_epochs": 2}


def test_badge_orders_the_queue_and_says_why(world, job_settings, redis_conn):
    settings, _, out, top = ranked_after_30_labels(
        world, job_settings, redis_conn, strategy="badge"
    )
    assert out["metrics"]["strategy"] == "badge"
    assert [t["reason"] for t in top] == ["uncertain_varied"] * settings.queue_batch
    assert top[0]["why"].endswith(", in a way unlike the other tasks picked with it")
    assert top[0]["distance"] is None  # badge measures no embedding distance


def test_probcover_orders_the_queue_and_says_why(world, job_settings, redis_conn):
    _, _, out, top = ranked_after_30_labels(
        world, job_settings, redis_conn, strategy="probcover", **BY_EPOCHS
    )
    assert out["metrics"]["strategy"] == "probcover"
    # the job passes the label config's class count; each reason says what the pick covers
    assert top[0]["reason"] == "covers"
    assert "that no labeled or queued image is close to yet" in top[0]["why"]
    assert {t["reason"] for t in top} <= {"covers", "covered"}


def test_herding_orders_the_queue_by_unsure_coverage_and_says_why(world, job_settings, redis_conn):
    settings, _, out, top = ranked_after_30_labels(
        world, job_settings, redis_conn, strategy="herding", **BY_EPOCHS
    )
    assert out["metrics"]["strategy"] == "herding"
    # a model exists: the batch covers images the model is unsure of, and says both
    assert [t["reason"] for t in top] == ["covers_unsure"] * settings.queue_batch
    assert top[0]["why"].startswith("the model is ")
    assert "that no labeled or queued image is close to yet" in top[0]["why"]


def test_probcover_radius_setting_reaches_the_queue(world, job_settings, redis_conn):
    # at the largest radius one labeled image covers every other: nothing is left to cover
    _, _, out, top = ranked_after_30_labels(
        world, job_settings, redis_conn, strategy="probcover", probcover_radius=2.0
    )
    assert {t["reason"] for t in top} == {"covered"}


def test_a_version_only_when_labels_model_or_tasks_changed(world, job_settings, redis_conn):
    tasks, labels, cache = world
    for i in range(30):
        tasks[i]["annotations"] = [choice(labels[i])]
    client, status = FakeLabelStudio(tasks[:140]), StatusStore(redis_conn)
    assert run(job_settings, client, cache, status)["outcome"] == "trained"
    # The two webhooks of one submit, a skip, "Start Training" with nothing new: no new version.
    tasks[35]["annotations"] = [choice(labels[35], cancelled=True)]
    for reason in ("START_TRAINING", "ANNOTATION_CREATED", "follow-up"):
        same = run(job_settings, client, cache, status, reason=reason)
        assert same["outcome"].startswith("unchanged") and same["model_version"] is None
    assert sum(c[0] == "import" for c in client.calls) == 1
    # New tasks: re-ranked with the same model under a new version.
    client.tasks = tasks
    again = run(job_settings, client, cache, status, reason="TASKS_CREATED")
    assert again["outcome"] == "re-ranked (labels unchanged)"
    assert again["model_version"] == "resnet18-v2"
    # ...and then nothing to publish: the re-ranked version counts as the model it reuses.
    same = run(job_settings, client, cache, status, reason="START_TRAINING")
    assert same["outcome"].startswith("unchanged") and same["model_version"] is None
    # `refresh` forces a retrain; a new label retrains.
    forced = run(job_settings, client, cache, status, reason="refresh")
    assert forced["outcome"] == "trained" and forced["model_version"] == "resnet18-v3"
    # Same backbone (the pool grew by less than half): pretrained once, reused.
    assert forced["metrics"]["backbone"] == again["metrics"]["backbone"] == "b1"
    tasks[40]["annotations"] = [choice(labels[40])]
    assert run(job_settings, client, cache, status)["model_version"] == "resnet18-v4"


def test_old_versions_stay_for_the_grace_period(world, job_settings, redis_conn):
    tasks, labels, cache = world
    client, status = FakeLabelStudio(tasks), StatusStore(redis_conn)
    cold = run(job_settings, client, cache, status)["model_version"]
    for i in range(30):
        tasks[i]["annotations"] = [choice(labels[i])]
    run(job_settings, client, cache, status)
    tasks[40]["annotations"] = [choice(labels[40])]
    out = run(job_settings, client, cache, status)
    # A page opened with the cold-start order may still be open: nothing is deleted.
    assert not [c for c in client.calls if c[0] == "delete"]
    assert set(client.model_versions(1)) == {cold, "resnet18-v1", "resnet18-v2"}
    assert out["metrics"]["versions_in_label_studio"] == 3
    assert out["metrics"]["prediction_rows"] == 100 + 100 + 100  # QUEUE_DEPTH each
    # Superseded for longer than PREDICTION_GRACE: deleted at the next publish.
    tasks[41]["annotations"] = [choice(labels[41])]
    out = run(job_settings.with_overrides(prediction_grace=0.0), client, cache, status)
    assert out["metrics"]["versions_deleted"] == [cold, "resnet18-v1", "resnet18-v2"]
    assert set(client.model_versions(1)) == {"resnet18-v3"}


def test_a_failure_after_the_switch_keeps_the_new_version(world, job_settings, redis_conn):
    tasks, labels, cache = world
    for i in range(30):
        tasks[i]["annotations"] = [choice(labels[i])]
    client, status = FakeLabelStudio(tasks), StatusStore(redis_conn)
    client.fail_view = True
    out = run(job_settings, client, cache, status)
    assert out["model_version"] == "resnet18-v1" and client.shown == "resnet18-v1"
    assert out["metrics"]["publish_warnings"][0].startswith("queue view: LabelStudioUnavailable")
    assert ModelStore(job_settings.model_dir).latest(1).version == "resnet18-v1"
    assert status.published(1)["version"] == "resnet18-v1"


def test_failed_push_leaves_the_previous_version_serving(world, job_settings, redis_conn):
    tasks, labels, cache = world
    for i in range(30):
        tasks[i]["annotations"] = [choice(labels[i])]
    client, status = FakeLabelStudio(tasks), StatusStore(redis_conn)
    run(job_settings, client, cache, status)
    tasks[40]["annotations"] = [choice(labels[40])]
    client.fail_import = True
    with pytest.raises(LabelStudioUnavailable):
        run(job_settings, client, cache, status)
    store = ModelStore(job_settings.model_dir)
    assert [v.version for v in store.versions(1)] == ["resnet18-v1"]
    assert ("activate", "resnet18-v2") not in client.calls


def test_broken_images_are_skipped_not_fatal(world, job_settings, redis_conn):
    tasks, labels, cache = world
    for i in range(30):
        tasks[i]["annotations"] = [choice(labels[i])]
    tasks[100]["data"]["image"] = "/data/upload/1/corrupt.png"
    del tasks[101]["data"]["image"]
    client = FakeLabelStudio(tasks)
    out = run(job_settings, client, cache, StatusStore(redis_conn))
    assert out["outcome"] == "trained" and out["metrics"]["skipped_tasks"] == 2
    assert (200, "resnet18-v1") not in client.predictions


def test_with_basic_auth_the_job_puts_it_on_the_webhook_once(world, job_settings, redis_conn):
    tasks, _, cache = world
    client, status = FakeLabelStudio(tasks), StatusStore(redis_conn)
    secured = job_settings.with_overrides(basic_auth_user="ls", basic_auth_pass="s3cret")
    run(secured, client, cache, status)
    run(secured, client, cache, status, reason="START_TRAINING")  # "unchanged": no check again
    (call,) = [c for c in client.calls if c[0] == "webhook auth"]
    assert call[1] == "http://backend:9090" and call[2].startswith("Basic ")
    run(job_settings, FakeLabelStudio(tasks), cache, StatusStore(redis_conn))  # no auth: no call


def test_acceptance_of_pre_annotations_is_measured_on_later_labels(world, job_settings, redis_conn):
    tasks, labels, cache = world
    for i in range(30):
        tasks[i]["annotations"] = [choice(labels[i])]
    client, status = FakeLabelStudio(tasks), StatusStore(redis_conn)
    first = run(job_settings, client, cache, status)
    assert first["metrics"]["acceptance"] is None  # nothing pre-annotated was labeled yet
    pushed = {t: p["result"][0]["value"]["choices"][0] for (t, v), p in client.predictions.items()}
    others = [lab for lab in LABELS if lab]
    for n, (task_id, predicted) in enumerate(sorted(pushed.items())[:10]):
        kept = n < 7  # the annotator keeps 7 pre-filled choices and changes 3
        label = predicted if kept else next(lab for lab in others if lab != predicted)
        tasks[task_id - 100]["annotations"] = [choice(label)]
    second = run(job_settings, client, cache, status)
    assert second["metrics"]["acceptance"] == {
        "version": "resnet18-v1",
        "kept": 7,
        "n": 10,
        "rate": 0.7,
    }
    assert status.acceptance(1)["resnet18-v1"]["rate"] == 0.7


def test_auto_image_size_comes_from_the_projects_images(job_settings, redis_conn):
    import base64
    import io

    images, labels = make_dataset(40, seed=5, size=28)
    tasks = []
    for i, img in enumerate(images):
        buf = io.BytesIO()
        img.save(buf, "PNG")
        uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        tasks.append({"id": 500 + i, "data": {"image": uri}, "annotations": []})
    settings = job_settings.with_overrides(image_size=0)
    status = StatusStore(redis_conn)
    out = train_project(1, "TASKS_CREATED", settings=settings, status=status,
                        client=FakeLabelStudio(tasks))  # fmt: skip
    assert out["metrics"]["image_size"] == 32 and status.image_size(1) == 32
    # Kept: a later job does not sample again, and an explicit IMAGE_SIZE wins.
    assert status.project_status(1)["image_size"] == 32
    fixed = train_project(1, "refresh", settings=settings.with_overrides(image_size=64),
                          status=status, client=FakeLabelStudio(tasks))  # fmt: skip
    assert fixed["metrics"]["image_size"] == 64


def test_each_image_is_embedded_once_per_backbone(world, job_settings, redis_conn):
    tasks, labels, cache = world
    for i in range(30):
        tasks[i]["annotations"] = [choice(labels[i])]
    client, status = FakeLabelStudio(tasks[:140]), StatusStore(redis_conn)
    first_metrics = run(job_settings, client, cache, status)["metrics"]
    first = first_metrics["embedded"]
    # The self-supervised backbone and the PRETRAINED one each embed the pool once; the served
    # head sits on one of them, so its predictions need no third pass, nor a second cache read.
    assert first == {"cached": 0, "computed": 280}
    # Ten new tasks and a new label: only the new images are embedded, and only under the
    # backbone that won the comparison (31 labels < 1.25 x 30: not compared again yet).
    client.tasks = tasks
    tasks[40]["annotations"] = [choice(labels[40])]
    second = run(job_settings, client, cache, status)
    assert second["outcome"] == "trained"
    assert second["metrics"]["embedded"] == {"cached": 140, "computed": 10}
    assert second["metrics"]["backbones_compared_at"] == 30
    assert second["metrics"]["served_backbone"] == first_metrics["served_backbone"]
    assert set(second["metrics"]["backbones_tried"]) == {"b1", "PRETRAINED weights"}
    # From 38 labels (1.25 x 30) both backbones are compared again: the other one embeds the
    # ten new images now.
    for i in range(41, 48):
        tasks[i]["annotations"] = [choice(labels[i])]
    compared = run(job_settings, client, cache, status)["metrics"]
    assert compared["backbones_compared_at"] == 38 and compared["embedded"]["computed"] == 10
    assert compared["backbone_choice"].endswith("by cross-validation over 38 labels")
    # One more label, no new image: every embedding is cached, so no pixel is read at all.
    tasks[48]["annotations"] = [choice(labels[48])]
    cache.rows_read = 0
    third = run(job_settings, client, cache, status)
    assert third["outcome"] == "trained" and third["metrics"]["embedded"]["computed"] == 0
    assert cache.rows_read == 0


def test_the_fine_tune_comes_after_a_live_head_version_and_only_when_due(
    world, job_settings, redis_conn, monkeypatch
):
    from ml_backend.model import recipe
    from ml_backend.model.backbones import BackboneStore

    settings = job_settings.with_overrides(finetune_min_labels=40, epochs=1)
    tasks, labels, cache = world
    for i in range(60):
        tasks[i]["annotations"] = [choice(labels[i])]
    client, status = FakeLabelStudio(tasks), StatusStore(redis_conn)
    tries = BackboneStore(settings.model_dir, kind="finetuned")
    # The fine-tune loses on the hash split: only the head version is published.
    monkeypatch.setattr(recipe, "_try_finetune", lambda *a, **k: (0.4, 0.8, 12))
    out = run(settings, client, cache, status)
    assert [c[1] for c in client.calls if c[0] == "activate"] == ["resnet18-v1"]
    assert out["metrics"]["served"].startswith("head") and "finetune_s" in out["metrics"]["timings"]
    assert tries.last_try(1)["labels"] == 60 and tries.names(1) == []
    # 1.5x the labels: tried again, and this time it wins. The head version goes live first;
    # the fine-tuned network, refit on every label, follows as a second version.
    for i in range(60, 90):
        tasks[i]["annotations"] = [choice(labels[i])]
    monkeypatch.setattr(recipe, "_try_finetune", lambda *a, **k: (0.95, 0.8, 18))
    out = run(settings, client, cache, status)
    activated = [c[1] for c in client.calls if c[0] == "activate"]
    assert activated == ["resnet18-v1", "resnet18-v2", "resnet18-v3"]
    assert out["model_version"] == "resnet18-v3" and out["metrics"]["served"] == "finetune"
    assert out["metrics"]["labels_used"] == 90 and tries.names(1) == ["f1"]
    # A few more labels: not due (90 x 1.5 = 135), so heads only, now also on the fine-tuned
    # network, which counts with its held-out accuracy (0.95, not a cross-validation).
    for i in range(90, 95):
        tasks[i]["annotations"] = [choice(labels[i])]
    monkeypatch.setattr(recipe, "_try_finetune", lambda *a, **k: pytest.fail("not due"))
    out = run(settings, client, cache, status)
    assert out["model_version"] == "resnet18-v4" and "finetune_s" not in out["metrics"]["timings"]
    tried = out["metrics"]["backbones_tried"]
    assert tried["f1"] == 0.95 and set(tried) == {"b1", "PRETRAINED weights", "f1"}
    best = max(tried.values())
    assert tried[out["metrics"]["served_backbone"]] == best == out["metrics"]["val_accuracy"]
    assert out["metrics"]["labels_used"] == 95


def test_predict_all_writes_every_unlabeled_task_once_then_back_to_the_queue_depth(
    world, job_settings, redis_conn
):
    """``refresh --all-tasks`` (a flag in Redis, so a coalesced job cannot lose it): the next
    job publishes a prediction for every unlabeled task, even with nothing changed; the job
    after it is back to QUEUE_DEPTH (here nothing changed, so nothing is published)."""
    tasks, labels, cache = world
    for i in range(30):
        tasks[i]["annotations"] = [choice(labels[i])]
    settings = job_settings.with_overrides(queue_depth=40)
    client, status = FakeLabelStudio(tasks), StatusStore(redis_conn)
    first = run(settings, client, cache, status)
    assert sum(v == first["model_version"] for _, v in client.predictions) == 40
    status.request_predict_all(1)
    every = run(settings, client, cache, status, reason="START_TRAINING")  # nothing changed
    version = every["model_version"]
    assert version not in (None, first["model_version"]) and client.shown == version
    unlabeled = {t["id"] for t in tasks if not t["annotations"]}
    assert {t for t, v in client.predictions if v == version} == unlabeled
    pushed = [p for (t, v), p in client.predictions.items() if v == version]
    assert all(p["result"] for p in pushed)  # a pre-annotation on each, not only a queue place
    assert every["metrics"]["predictions_pushed"] == len(unlabeled) == 120
    assert every["metrics"]["all_tasks"] is True
    again = run(settings, client, cache, status)
    assert again["outcome"].startswith("unchanged") and again["model_version"] is None


def test_with_a_queue_the_backbone_is_pretrained_by_a_job_of_its_own(
    world, job_settings, redis_conn
):
    """A training job never waits for the pretraining: it asks for the pretraining job and
    serves a head on the PRETRAINED weights; once that job has stored the backbone, the next
    training job uses it, and nothing more is asked for."""
    from rq import Queue

    from ml_backend.pipeline.pretraining import pretrain_project

    tasks, labels, cache = world
    for i in range(30):
        tasks[i]["annotations"] = [choice(labels[i])]
    client, status = FakeLabelStudio(tasks), StatusStore(redis_conn)
    pretrain_queue = Queue(f"{job_settings.rq_queue}-pretrain", connection=redis_conn)

    def train(reason="ANNOTATION_CREATED"):
        return train_project(1, reason, settings=job_settings, status=status, client=client,
                             image_cache=cache, redis=redis_conn)  # fmt: skip

    first = train()
    assert first["outcome"] == "trained" and first["metrics"]["backbone"].endswith(f"@{SIZE}")
    assert "pretrain_s" not in first["metrics"]["timings"]  # not pretrained in this job
    asked = [job.args[:2] for job in pretrain_queue.get_jobs()]
    assert asked == [(1, "the project has no self-supervised backbone yet")]
    assert status.project_status(1)["pretraining"]["state"] == "waiting"
    tasks[40]["annotations"] = [choice(labels[40])]
    assert train()["model_version"] == "resnet18-v2"
    assert len(pretrain_queue.get_jobs()) == 1  # one waiting is enough
    # The pretraining job's body: the pool from the task index the training job wrote.
    epochs = []
    done = pretrain_project(1, "no backbone", settings=job_settings, status=status,
                            progress=lambda **f: epochs.append(f), client=client,
                            image_cache=cache)  # fmt: skip
    assert done["backbone"] == "b1" and done["images"] == 150 and done["image_size"] == SIZE
    assert done["outcome"] == "pretrained b1" and any(f.get("epoch") for f in epochs)
    ready = train("backbone ready")
    assert ready["outcome"] == "trained" and ready["metrics"]["backbone"] == "b1"
    assert len(pretrain_queue.get_jobs()) == 1  # current now: not asked for again
    again = pretrain_project(1, "x", settings=job_settings, status=status, client=client,
                             image_cache=cache)  # fmt: skip
    assert again["outcome"].startswith("not needed")


def test_with_a_queue_a_large_embedding_is_fanned_out_in_chunks(
    world, job_settings, redis_conn, caplog
):
    """Past EMBED_CHUNK missing rows the job publishes chunks and asks for helpers; with no
    other worker it embeds every chunk itself, and the rows land in the cache in order."""
    import logging

    from rq import Queue

    from ml_backend.jobs import fanout
    from ml_backend.model.embeddings import EmbeddingCache, image_key

    tasks, labels, cache = world
    for i in range(30):
        tasks[i]["annotations"] = [choice(labels[i])]
    settings = job_settings.with_overrides(embed_chunk=40)
    client, status = FakeLabelStudio(tasks), StatusStore(redis_conn)
    with caplog.at_level(logging.INFO, logger="ml_backend.jobs.fanout"):
        done = train_project(1, "ANNOTATION_CREATED", settings=settings, status=status,
                             client=client, image_cache=cache, redis=redis_conn)  # fmt: skip
    assert done["outcome"] == "trained" and done["metrics"]["embedded"]["computed"] == 150
    assert "embedding 150 images in 4 chunks of 40, with up to 3 helper jobs" in caplog.text
    assert "4 chunks embedded here, 0 by helpers" in caplog.text
    helpers = Queue(fanout.queue_name(settings), connection=redis_conn).get_jobs()
    assert len(helpers) == 3 and not list(redis_conn.scan_iter("mlb:fanout:*"))
    assert fanout.embed_chunks(helpers[0].args[0], settings, redis_conn)["chunks"] == 0
    folders = list((EmbeddingCache(settings.model_dir, 1).dir).iterdir())
    assert len(folders) == 1  # one backbone (the PRETRAINED weights), all 150 rows stored
    keys = np.array([image_key(t["data"]["image"]) for t in tasks], dtype="S16")
    vectors, missing = EmbeddingCache(settings.model_dir, 1).lookup(folders[0].name, keys)
    assert len(missing) == 0 and np.abs(vectors).sum(axis=1).min() > 0


def indexed_project(world, job_settings, redis_conn, **overrides):
    """Project 1 after one training job with a queue: its task index written, a pretraining job
    asked for (not run). Returns ``(settings, client, status, cache)``."""
    tasks, _, cache = world
    client, status = FakeLabelStudio(tasks), StatusStore(redis_conn)
    settings = job_settings.with_overrides(pretrain_epochs=1000, **overrides)
    train_project(1, "ANNOTATION_CREATED", settings=settings, status=status, client=client,
                  image_cache=cache, redis=redis_conn)  # fmt: skip
    return settings, client, status, cache


def down(*args, **kwargs):
    raise LabelStudioUnavailable("Label Studio at http://ls is unavailable (ConnectionError)")


def test_the_pretraining_job_runs_in_slices_from_its_checkpoint(
    world, job_settings, redis_conn, monkeypatch
):
    """Each call (one RQ job) trains one slice and saves the checkpoint the next goes on from;
    a call after a kill is just the next call. The budget counts every slice. A slice that
    fails with an error drops the checkpoint: the next run starts over."""
    from ml_backend.model.backbones import BackboneStore
    from ml_backend.pipeline import pretraining

    settings, client, status, cache = indexed_project(world, job_settings, redis_conn,
                                                      pretrain_budget_s=3, pretrain_slice_s=1)  # fmt: skip
    store = BackboneStore(settings.model_dir)
    checkpoint = store.folder(1) / "in-progress.pt"

    def one_slice():
        return pretraining.pretrain_project(1, "no backbone", settings=settings, status=status,
                                            client=client, image_cache=cache)  # fmt: skip

    first = one_slice()
    assert first["continue"] and first["outcome"].startswith("paused after")
    assert checkpoint.is_file() and store.names(1) == []
    real = pretraining.pretrain_backbone

    def diverges(*args, **kwargs):
        assert kwargs["resume"]["elapsed"] >= 1  # it was going on from the first slice
        raise FloatingPointError("pretraining diverged at epoch 2 (loss nan)")

    monkeypatch.setattr(pretraining, "pretrain_backbone", diverges)  # (undone below)
    with pytest.raises(FloatingPointError):
        one_slice()
    assert not checkpoint.exists()
    monkeypatch.setattr(pretraining, "pretrain_backbone", real)
    # Label Studio down: with no pretraining under way the job fails (and is retried) ...
    monkeypatch.setattr(client, "label_spec", down)
    with pytest.raises(LabelStudioUnavailable):
        one_slice()
    monkeypatch.undo()
    calls = [one_slice()]
    assert calls[0]["seconds"] < first["seconds"] + 1.5  # started over
    # ... while the next slices go on with the config the first one read.
    monkeypatch.setattr(client, "label_spec", down)
    while calls[-1].get("continue"):
        assert checkpoint.is_file()
        calls.append(one_slice())
    seconds = [c["seconds"] for c in calls]
    assert 2 <= len(calls) <= 4 and seconds == sorted(seconds) and 3 <= seconds[-1] < 3 + 5
    assert calls[-1]["backbone"] == "b1" and not checkpoint.exists()


def test_a_slice_ends_early_when_a_training_job_waits(world, job_settings, redis_conn):
    from rq import Queue

    from ml_backend.pipeline.pretraining import pretrain_project

    settings, client, status, cache = indexed_project(world, job_settings, redis_conn,
                                                      pretrain_budget_s=600, pretrain_slice_s=6)  # fmt: skip
    Queue(settings.rq_queue, connection=redis_conn).enqueue(print, "a waiting training job")
    out = pretrain_project(1, "no backbone", settings=settings, status=status, client=client,
                           image_cache=cache)  # fmt: skip
    assert out["continue"] and 2 <= out["seconds"] < 5, out  # a third of 6 s, not 6


def test_the_pretraining_job_without_a_task_index_or_with_ssl_off_does_nothing(
    world, job_settings, redis_conn
):
    from ml_backend.pipeline.pretraining import pretrain_project

    tasks, _, cache = world
    client, status = FakeLabelStudio(tasks), StatusStore(redis_conn)
    out = pretrain_project(1, "x", settings=job_settings, status=status, client=client,
                           image_cache=cache)  # fmt: skip
    assert out["outcome"].startswith("not run: no training job has read")
    off = job_settings.with_overrides(self_supervised=False)
    out = pretrain_project(1, "x", settings=off, status=status, client=client, image_cache=cache)
    assert out["outcome"].startswith("not run: SELF_SUPERVISED is off")
