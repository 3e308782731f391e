"""Job targets for the queue tests, with the real target's signature (RQ pickles them by name).

Each calls ``snapshot()`` where the real job starts reading labels from Label Studio.
"""

from __future__ import annotations

import json

from ml_backend.jobs.queue import request_training

RAN_KEY = "test:ran"


def record(project_id, reason, *, settings, redis, status, snapshot=None):
    """Record that it ran, report progress, and return an outcome like the real job does."""
    if snapshot is not None:
        snapshot()
    redis.rpush(RAN_KEY, json.dumps({"project": project_id, "reason": reason}))
    status.progress(project_id, stage="training", epoch=1, epochs=1)
    return {
        "outcome": "trained",
        "metrics": {
            "val_accuracy": 0.75,
            "train_size": 8,
            "val_size": 2,
            "nan_metric": float("nan"),
        },
        "model_version": "resnet18-v3",
    }


def webhooks_during_run(project_id, reason, *, settings, redis, status, snapshot=None):
    """Like ``record``; the first run also receives 25 webhooks before it reads the labels and
    25 after."""
    if reason != "follow-up":
        outcomes = [request_training(redis, settings, project_id, "ANNOTATION_CREATED", record)
                    for _ in range(25)]  # fmt: skip
        snapshot()
        outcomes += [request_training(redis, settings, project_id, "ANNOTATION_CREATED", record)
                     for _ in range(25)]  # fmt: skip
        redis.rpush("test:during", *outcomes)
    return record(project_id, reason, settings=settings, redis=redis, status=status)


def fail(project_id, reason, *, settings, redis, status, snapshot=None):
    """Fail the way a real job can, with a credential in the message (it must be redacted)."""
    raise RuntimeError("Label Studio said 401 for Authorization: Token abcdef0123456789")


def returns_nothing(project_id, reason, *, settings, redis, status, snapshot=None):
    """A target with no return value (outcome ``done``)."""
    redis.rpush(RAN_KEY, json.dumps({"project": project_id, "reason": reason}))


def ran(redis) -> list[dict]:
    """What ``record`` wrote, in order."""
    return [json.loads(r) for r in redis.lrange(RAN_KEY, 0, -1)]


def wait_for_release(project_id, reason, *, settings, redis, status, snapshot=None):
    """Read the labels, hold the job open until the test sets ``test:release`` (at most 30 s),
    then record."""
    import time

    if snapshot is not None:
        snapshot()
    redis.rpush("test:holding", reason)
    deadline = time.monotonic() + 30
    while not redis.exists("test:release") and time.monotonic() < deadline:
        time.sleep(0.05)
    return record(project_id, reason, settings=settings, redis=redis, status=status)


def label_studio_down(project_id, reason, *, settings, redis, status, snapshot=None):
    """Fail as a job does when Label Studio stays unreachable through every retry."""
    from ml_backend.errors import LabelStudioUnavailable

    redis.rpush(RAN_KEY, json.dumps({"project": project_id, "reason": reason}))
    raise LabelStudioUnavailable("Label Studio at http://ls is unavailable (ConnectionError)")


# -- pretraining targets: the signature of ``pipeline.pretraining.pretrain_project`` ----------
PRETRAINED_KEY = "test:pretrained"


def pretrain_record(project_id, reason, *, settings, status, progress):
    """Report an epoch and store a (pretend) backbone, as the real body does."""
    import redis as redis_lib

    progress(epoch=1, loss=4.2, seconds_left=0.0)
    redis_lib.Redis.from_url(settings.redis_url).rpush(
        PRETRAINED_KEY, json.dumps({"project": project_id, "reason": reason})
    )
    return {"outcome": "pretrained b1", "backbone": "b1", "epochs": 3, "seconds": 0.1}


def pretrain_not_needed(project_id, reason, *, settings, status, progress):
    return {"outcome": "not needed: the project's backbone is current"}


def pretrain_hold(project_id, reason, *, settings, status, progress):
    """Hold the pretraining open until the test sets ``test:release`` (at most 30 s)."""
    import time

    import redis as redis_lib

    redis = redis_lib.Redis.from_url(settings.redis_url)
    redis.rpush("test:holding", reason)
    deadline = time.monotonic() + 30
    while not redis.exists("test:release") and time.monotonic() < deadline:
        time.sleep(0.05)
    return pretrain_record(project_id, reason, settings=settings, status=status, progress=progress)


def pretrain_fail(project_id, reason, *, settings, status, progress):
    raise RuntimeError("pretraining broke: Authorization: Token abcdef0123456789")


def pretrain_label_studio_down(project_id, reason, *, settings, status, progress):
    from ml_backend.errors import LabelStudioUnavailable

    raise LabelStudioUnavailable("Label Studio at http://ls is unavailable (ConnectionError)")


def pretrained(redis) -> list[dict]:
    return [json.loads(r) for r in redis.lrange(PRETRAINED_KEY, 0, -1)]


ORDER_KEY = "test:order"


def record_order(project_id, reason, *, settings, redis, status, snapshot=None):
    """A training job that notes when it ran among the pretraining slices."""
    redis.rpush(ORDER_KEY, f"train-{project_id}")
    return {"outcome": "trained"}


def pretrain_in_slices(project_id, reason, *, settings, status, progress):
    """Three slices, as the real body runs them: the first two return ``continue``."""
    import redis as redis_lib

    redis = redis_lib.Redis.from_url(settings.redis_url)
    n = redis.incr("test:slices")
    redis.rpush(ORDER_KEY, f"slice-{n}")
    progress(epoch=n, loss=4.0, seconds_left=3.0 - n)
    if n < 3:
        return {"continue": True, "outcome": f"paused after {n} of 3 s", "seconds": float(n)}
    return {"outcome": "pretrained (pretend, nothing stored)", "seconds": 3.0}
