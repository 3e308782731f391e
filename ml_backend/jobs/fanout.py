"""Embedding a large pool in chunks that any worker runs, joined before ranking.

A job that has more than ``EMBED_CHUNK`` images to embed under one backbone (the first pass over
a large pool, or every image again after a new backbone) does not embed them alone. It splits
the rows into chunks of ``EMBED_CHUNK``, publishes them in Redis and enqueues helper jobs
(:func:`embed_chunks`) on ``<RQ_QUEUE>-embed``, which every worker serves before its other
queues. Then it takes chunks itself, like any helper: with one worker, or when every other
worker is busy, it simply embeds them all, and nothing waits on a helper that never comes. When
no chunk is left to take it collects the helpers' results and returns the rows in order; the
caller stores them in the embedding cache and ranks.

Everything a helper needs travels through Redis, so a worker on another machine with its own GPU
takes chunks as well as one beside the job: the backbone's weights (``torch.save`` bytes, about
45 MB for a ResNet18), each chunk's ``(task id, image URL)`` items, and the chunk's embeddings
back (``float32 [EMBED_CHUNK, 512]``, 20 MB at 10,000 rows; the job reads and deletes each as it
comes). Images come from the helper's own image cache, fetched from Label Studio (or the
storage's URL) where that worker has not cached them yet.

Redis holds a bounded slice of the pool whatever its size: at most ``AHEAD`` chunks are out at
a time (offered, being embedded, or with a result not read yet); a thread of the job reads
results and offers the next chunk as each comes in, also while the job embeds one itself.

Faults: a helper holds a claim on its chunk for ``JOB_LEASE_S`` and renews it while it works. A
chunk whose claim lapsed without a result (the helper was killed), or that its helper gave back
(an image it could not fetch, an error), is embedded by the job itself. Helpers wait for more
chunks while the job is alive (a key its thread renews); a killed job's lapses within
``JOB_LEASE_S`` and they end. Every key expires after ``JOB_TIMEOUT``; the job deletes them when
it is done, and a helper that starts after that finds nothing and ends. The helper's network must hash to the job's backbone key (``backbone_key``),
so a damaged transfer is refused, not embedded.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable

import numpy as np
import torch
from rq import Queue, get_current_job

from ml_backend.config import Settings
from ml_backend.jobs.state import PREFIX

log = logging.getLogger(__name__)

# At most this many helper jobs per fan-out (each takes chunks until none is left).
MAX_HELPERS = 16
# Seconds between two looks for helpers' results once no chunk is left to take.
POLL_S = 0.2
# Chunks out at a time (offered, being embedded, or with a result not yet read): bounds what a
# fan-out keeps in Redis (about 1 MB of items and up to 20 MB of embeddings per chunk of 10,000).
AHEAD = MAX_HELPERS + 2

# Pop a chunk and claim it in one step, so the job never sees a chunk that is neither waiting,
# claimed nor done.
_CLAIM = """
local chunk = redis.call('LPOP', KEYS[1])
if not chunk then return false end
redis.call('SET', ARGV[1] .. chunk, ARGV[2], 'EX', tonumber(ARGV[3]))
return chunk
"""


def queue_name(settings: Settings) -> str:
    """The RQ queue of the helper jobs: ``<RQ_QUEUE>-embed``."""
    return f"{settings.rq_queue}-embed"


def _key(token: str, *parts) -> str:
    return f"{PREFIX}fanout:{token}:" + ":".join(str(p) for p in parts)


def embed_rows(
    redis,
    settings: Settings,
    *,
    project_id: int,
    model: torch.nn.Module,
    backbone: str,
    image_size: int,
    items: list[tuple[int, str]] | None,
    rows: np.ndarray,
    compute: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """Embeddings (``float32 [len(rows), 512]``) of pool ``rows``, fanned out when it pays.

    Args:
        redis: the queue's Redis, or None (no fan-out: everything here).
        settings: ``EMBED_CHUNK``, ``RQ_QUEUE``, ``JOB_LEASE_S``, ``JOB_TIMEOUT``.
        project_id: for the log.
        model: the network whose backbone embeds (its weights go to the helpers).
        backbone: ``backbone_key(model, image_size)``; helpers check their copy against it.
        image_size: the pool's image size.
        items: ``(task id, URL)`` of every pool row, or None (pixels without URLs: no fan-out).
        rows: the rows to embed (indices into ``items``).
        compute: embeds pool rows here (``float32 [n, 512]`` of row indices).
    """
    rows = np.asarray(rows, dtype=np.int64)
    chunk = int(settings.embed_chunk)
    if redis is None or items is None or chunk <= 0 or len(rows) <= chunk:
        return _local(rows, compute, chunk)
    chunks = [rows[i : i + chunk] for i in range(0, len(rows), chunk)]
    token = uuid.uuid4().hex[:12]
    try:
        helpers = _publish(redis, settings, token, model, backbone, image_size, items, chunks)
    except Exception as exc:  # noqa: BLE001 - Redis trouble: embed here, as without fan-out
        log.warning("project %s: fan-out not started (%s); embedding here", project_id, exc)
        _cleanup(redis, token, len(chunks))
        return _local(rows, compute, chunk)
    log.info(
        "project %s: embedding %d images in %d chunks of %d, with up to %d helper jobs on %s",
        project_id, len(rows), len(chunks), chunk, helpers, queue_name(settings),
    )  # fmt: skip
    try:
        return _join(redis, settings, token, project_id, chunks, compute, items)
    finally:
        _cleanup(redis, token, len(chunks))


def _local(rows: np.ndarray, compute, chunk: int) -> np.ndarray:
    from ml_backend.model.embeddings import CHUNK

    step = chunk if chunk > 0 else CHUNK
    out = np.empty((len(rows), _dim()), dtype=np.float32)
    for start in range(0, len(rows), step):
        out[start : start + step] = compute(rows[start : start + step])
    return out


def _dim() -> int:
    from ml_backend.model.network import EMBEDDING_DIM

    return EMBEDDING_DIM


def _publish(redis, settings, token, model, backbone, image_size, items, chunks) -> int:
    """The weights and meta, the first ``AHEAD`` chunks, and the helper jobs; returns how many
    helpers were asked for."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    ttl = int(settings.job_timeout)
    meta = {"backbone": backbone, "image_size": int(image_size),
            "num_classes": int(model.fc.out_features), "chunks": len(chunks)}  # fmt: skip
    pipe = redis.pipeline()
    pipe.set(_key(token, "meta"), json.dumps(meta), ex=ttl)
    pipe.set(_key(token, "weights"), buf.getvalue(), ex=ttl)
    pipe.set(_key(token, "alive"), "1", ex=max(1, int(settings.job_lease_s)))
    pipe.execute()
    _offer(redis, token, items, chunks, range(min(AHEAD, len(chunks))), ttl)
    helpers = min(len(chunks) - 1, MAX_HELPERS)
    queue = Queue(queue_name(settings), connection=redis)
    for _ in range(helpers):
        queue.enqueue(embed_chunks, token, job_timeout=ttl, result_ttl=3600,
                      failure_ttl=7 * 24 * 3600, description=f"embed chunks of {token}")  # fmt: skip
    return helpers


def _offer(redis, token, items, chunks, which, ttl: int) -> None:
    """Put chunks ``which`` (their items, then their numbers on the to-do list) in Redis."""
    which = list(which)
    if not which:
        return
    pipe = redis.pipeline()
    for i in which:
        pipe.set(_key(token, "chunk", i), json.dumps([list(items[r]) for r in chunks[i]]), ex=ttl)
    pipe.rpush(_key(token, "todo"), *which)
    pipe.expire(_key(token, "todo"), ttl)
    pipe.execute()


def _join(redis, settings, token, project_id, chunks, compute, items) -> np.ndarray:
    """Take chunks and collect the helpers' results until every chunk is in. At most ``AHEAD``
    chunks are out (offered, claimed or with a result waiting) at a time, so Redis holds a
    bounded slice of a pool of any size; a thread collects results and offers the next chunks
    while this one embeds, so fast helpers never wait on the job's own chunk."""
    starts = np.cumsum([0] + [len(c) for c in chunks])
    out = np.empty((int(starts[-1]), _dim()), dtype=np.float32)
    claim = redis.register_script(_CLAIM)
    n, ttl = len(chunks), int(settings.job_timeout)
    first = min(AHEAD, n)
    state = {"offered": first, "mine": 0, "theirs": 0}
    pending, lock, stop = set(range(first)), threading.Lock(), threading.Event()
    lease = str(max(1, int(settings.job_lease_s)))

    def place(i: int, vectors: np.ndarray, who: str) -> None:
        following = None
        with lock:
            if i not in pending:  # both sides read it: the first one counts
                return
            out[starts[i] : starts[i + 1]] = vectors
            pending.discard(i)
            state[who] += 1
            if state["offered"] < n:  # one in, one more out
                following = state["offered"]
                state["offered"] += 1
                pending.add(following)
        redis.delete(_key(token, "chunk", i))
        if following is not None:
            _offer(redis, token, items, chunks, [following], ttl)

    def collect() -> None:
        with lock:
            waiting = sorted(pending)
        for i in waiting:
            got = _result(redis, token, i, len(chunks[i]))
            if got is not None:
                place(i, got, "theirs")

    def collector() -> None:
        while not stop.wait(POLL_S):
            try:
                redis.set(_key(token, "alive"), "1", ex=int(lease))  # helpers wait while it is
                collect()
            except Exception as exc:  # noqa: BLE001 - the main loop collects too
                log.warning("fan-out %s: results not collected (%s)", token, exc)

    thread = threading.Thread(target=collector, name=f"fanout-{token}", daemon=True)
    thread.start()
    try:
        while True:
            with lock:
                if not pending:
                    break
            taken = claim(keys=[_key(token, "todo")], args=[_key(token, "claim", ""), "job", lease])
            if taken is not None:
                i = int(taken)
                vectors = compute(chunks[i])
                redis.delete(_key(token, "claim", i))
                place(i, vectors, "mine")
                continue
            # Nothing to take: every pending chunk is claimed or has its result on the way.
            collect()
            with lock:
                waiting = sorted(pending)
            for i in waiting:
                if redis.exists(_key(token, "claim", i)):
                    continue
                got = _result(redis, token, i, len(chunks[i]))  # written as the claim went
                if got is not None:
                    place(i, got, "theirs")
                    continue
                with lock:
                    if i not in pending:
                        continue
                log.warning(
                    "project %s: chunk %d of %d came back without embeddings (its helper "
                    "stopped or gave it back); embedding it here", project_id, i, n,
                )  # fmt: skip
                place(i, compute(chunks[i]), "mine")
            time.sleep(POLL_S)
    finally:
        stop.set()
        thread.join(timeout=10)
    log.info("project %s: %d chunks embedded here, %d by helpers", project_id, state["mine"],
             state["theirs"])  # fmt: skip
    return out


def _result(redis, token: str, i: int, n: int) -> np.ndarray | None:
    data = redis.get(_key(token, "result", i))
    if data is None:
        return None
    redis.delete(_key(token, "result", i))
    vectors = np.load(io.BytesIO(data), allow_pickle=False)
    if vectors.shape != (n, _dim()):
        log.warning("chunk %d: a result of shape %s ignored", i, vectors.shape)
        return None
    return vectors


def _cleanup(redis, token: str, n: int) -> None:
    keys = [_key(token, name) for name in ("meta", "weights", "todo", "alive")]
    keys += [_key(token, kind, i) for i in range(n) for kind in ("chunk", "claim", "result")]
    try:
        redis.delete(*keys)
    except Exception as exc:  # noqa: BLE001 - the keys expire anyway
        log.warning("fan-out %s: keys left to expire (%s)", token, exc)


class _Renewal:
    """Keeps a chunk's claim alive from a daemon thread while the chunk is embedded."""

    def __init__(self, redis, key: str, lease_s: int):
        self.redis, self.key, self.lease_s = redis, key, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chunk-claim", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.redis.expire(self.key, self.lease_s)
            except Exception as exc:  # noqa: BLE001 - the claim may lapse; the job redoes it
                log.warning("chunk claim %s not renewed (%s)", self.key, exc)


def embed_chunks(token: str, settings: Settings | None = None, redis=None) -> dict:
    """The helper job: take chunks of fan-out ``token`` until none is left; each one's
    embeddings go back through Redis. Returns ``{"chunks": n}`` (0 when the job that asked
    was done before this helper started)."""
    from ml_backend.jobs import queue
    from ml_backend.labelstudio.images import ImageCache
    from ml_backend.model.embeddings import backbone_key
    from ml_backend.model.features import backbone_model
    from ml_backend.model.inference import predict
    from ml_backend.model.network import resolve_device

    settings = settings or queue.worker_settings()
    redis = redis or get_current_job().connection
    raw = redis.get(_key(token, "meta"))
    weights = redis.get(_key(token, "weights"))
    if raw is None or weights is None:
        return {"chunks": 0, "why": "the job that asked for it is done"}
    meta = json.loads(raw)
    state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    model = backbone_model(state, meta["num_classes"])
    if backbone_key(model, meta["image_size"]) != meta["backbone"]:
        raise ValueError(f"fan-out {token}: the weights received are not backbone "
                         f"{meta['backbone']} (damaged in transfer?); no chunk embedded")  # fmt: skip
    cache = ImageCache(settings, size=meta["image_size"])
    device = resolve_device(settings.device)
    claim = redis.register_script(_CLAIM)
    lease = max(1, int(settings.job_lease_s))
    name = f"helper-{uuid.uuid4().hex[:6]}"
    done = 0
    while True:
        taken = claim(keys=[_key(token, "todo")], args=[_key(token, "claim", ""), name, lease])
        if taken is None:
            # Nothing offered right now: more come as the job reads results, while it is alive
            # (its collector renews ``alive``; a killed job's lapses within JOB_LEASE_S).
            if not redis.exists(_key(token, "alive")):
                return {"chunks": done}
            time.sleep(POLL_S)
            continue
        i = int(taken)
        claim_key = _key(token, "claim", i)
        try:
            raw_items = redis.get(_key(token, "chunk", i))
            if raw_items is None:
                return {"chunks": done, "why": "the job that asked for it is done"}
            items = [(int(t), str(u)) for t, u in json.loads(raw_items)]
            with _Renewal(redis, claim_key, lease):
                t0 = time.monotonic()
                arrays, ok, failures = cache.fetch_arrays(items)
                if failures:  # give it back: the job has these images and embeds the chunk
                    log.warning("fan-out %s: chunk %d given back: %d images not fetched here",
                                token, i, len(failures))  # fmt: skip
                    continue
                _, vectors = predict(model, arrays, device=device,
                                     batch_size=settings.inference_batch_size)  # fmt: skip
                buf = io.BytesIO()
                np.save(buf, np.ascontiguousarray(vectors, dtype=np.float32))
                redis.set(_key(token, "result", i), buf.getvalue(), ex=int(settings.job_timeout))
            done += 1
            log.info("fan-out %s: chunk %d (%d images) embedded in %.1f s", token, i, len(items),
                     time.monotonic() - t0)  # fmt: skip
        finally:
            redis.delete(claim_key)
