"""Job targets for the queue tests (RQ imports them by dotted path, like the real one)."""

from __future__ import annotations

import json

from ml_backend.jobs.queue import request_training

RAN_KEY = "test:ran"


def record(project_id, reason, *, settings, redis, status):
    """Record that it ran, report progress, and return an outcome like the real job does."""
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


def webhooks_during_run(project_id, reason, *, settings, redis, status):
    """Like ``record``; the first run also receives 50 webhooks while it runs."""
    if reason != "follow-up":
        outcomes = [
            request_training(redis, settings, project_id, "ANNOTATION_CREATED") for _ in range(50)
        ]
        redis.rpush("test:during", *outcomes)
    return record(project_id, reason, settings=settings, redis=redis, status=status)


def fail(project_id, reason, *, settings, redis, status):
    """Fail the way a real job can, with a credential in the message (it must be redacted)."""
    raise RuntimeError("Label Studio said 401 for Authorization: Token abcdef0123456789")


def returns_nothing(project_id, reason, *, settings, redis, status):
    """A target with no return value (outcome ``done``)."""
    redis.rpush(RAN_KEY, json.dumps({"project": project_id, "reason": reason}))


def ran(redis) -> list[dict]:
    """What ``record`` wrote, in order."""
    return [json.loads(r) for r in redis.lrange(RAN_KEY, 0, -1)]


def wait_for_release(project_id, reason, *, settings, redis, status):
    """Hold the job open until the test sets ``test:release`` (at most 30 s), then record."""
    import time

    redis.set("test:holding", "1")
    deadline = time.monotonic() + 30
    while not redis.exists("test:release") and time.monotonic() < deadline:
        time.sleep(0.05)
    return record(project_id, reason, settings=settings, redis=redis, status=status)
