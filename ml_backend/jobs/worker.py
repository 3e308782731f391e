"""The worker process: an RQ ``SimpleWorker`` that runs training jobs in its own process.

``SimpleWorker`` does not fork per job: CUDA does not survive a fork, and running in-process keeps
the model and the CUDA context resident between jobs. SIGTERM/SIGINT ask for a warm stop (the
current job finishes first); a second signal stops at once (the job is recorded as failed).
Every worker also runs the reconciler (``jobs.lease``), which retries the jobs of killed workers.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from rq import Queue, SimpleWorker
from rq.worker import DequeueStrategy

from ml_backend.config import Settings
from ml_backend.errors import ConfigError
from ml_backend.jobs import fanout, pretraining, queue
from ml_backend.jobs.lease import Reconciler

log = logging.getLogger(__name__)


def dequeue_strategy(settings: Settings) -> str:
    """``round_robin`` when pretrainings run in slices (``PRETRAIN_SLICE_S``): a worker takes
    the training queue and the pretraining queue in turn, so a waiting retrain runs after at
    most one slice and a slice after at most one retrain. ``default`` otherwise: the first
    queue with a job, so a waiting training job (seconds) always runs before a whole
    pretraining (minutes)."""
    return "round_robin" if settings.pretrain_slice_s > 0 else "default"


def build_worker(settings: Settings, redis: Redis) -> SimpleWorker:
    """A ``SimpleWorker`` (no fork per job) listening on the embedding helpers' queue
    (``jobs.fanout``: chunks of a running job's pool, so they come first), on
    ``settings.rq_queue`` and on the pretraining queue (``jobs.pretraining``), in that order
    (see ``dequeue_strategy``)."""
    queue.use_settings(settings)
    name = f"ml-backend-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    queues = [
        Queue(fanout.queue_name(settings), connection=redis),
        queue.rq_queue(redis, settings),
        Queue(pretraining.queue_name(settings), connection=redis),
    ]
    return SimpleWorker(queues, connection=redis, name=name)


def run_worker(settings: Settings, burst: bool = False) -> bool:
    """Run the worker until SIGTERM/SIGINT (or, with ``burst``, until the queue is empty).

    Returns:
        whether any job ran.

    Raises:
        ConfigError: REDIS_URL is not set.
    """
    if not settings.redis_url:
        raise ConfigError("REDIS_URL is required for the worker (e.g. redis://localhost:6379/0)")
    redis = Redis.from_url(settings.redis_url)
    worker = build_worker(settings, redis)
    log.info("worker %s listening on queues %s (%s)", worker.name,
             ", ".join(worker.queue_names()), dequeue_strategy(settings))  # fmt: skip
    # Jobs of killed workers (here or on other machines) are recorded and retried from here.
    reconciler = Reconciler(redis, settings).start()
    try:
        while True:
            try:
                worked = worker.work(
                    burst=burst, logging_level=settings.log_level,
                    dequeue_strategy=DequeueStrategy(dequeue_strategy(settings)),
                )  # fmt: skip
                break
            except RedisConnectionError as exc:
                # RQ waits out Redis outages between jobs, but not while it records a job's
                # end: the process stays, and listens again once Redis answers.
                log.warning("worker %s: Redis went away while recording a job (%s); "
                            "listening again in 2 s", worker.name, type(exc).__name__)  # fmt: skip
                time.sleep(2)
                worker = build_worker(settings, redis)
    finally:
        reconciler.stop()
    log.info("worker %s stopped", worker.name)
    return worked
