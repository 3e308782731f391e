"""Embedding fan-out (``jobs.fanout``): chunks of a large pool embedded by every worker on the
same Redis, joined in order; a helper that dies or gives its chunk back costs time, not rows."""

from __future__ import annotations

import base64
import io
import logging
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image
from rq import Queue, Worker

from ml_backend.jobs import fanout
from ml_backend.labelstudio.images import ImageCache
from ml_backend.model.embeddings import backbone_key
from ml_backend.model.features import backbone_model
from ml_backend.model.inference import predict
from tests.jobs.test_worker import start_worker, wait_until

SIZE = 32


def _uri(i: int) -> str:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def pool(settings):
    """60 distinct images as ``(task id, data URI)`` items, their pixels, a random backbone."""
    settings = settings.with_overrides(rq_queue="worker-test", embed_chunk=10, job_lease_s=3)
    items = [(100 + i, _uri(i)) for i in range(60)]
    arrays, ok, failures = ImageCache(settings, size=SIZE).fetch_arrays(items)
    assert not failures and len(ok) == 60
    torch.manual_seed(0)
    model = backbone_model(None, 3)
    return settings, items, arrays, model


def _embed(model, arrays):
    return predict(model, arrays, device="cpu", batch_size=64)[1]


def _fan_out(redis, settings, items, arrays, model, compute=None, rows=None):
    rows = np.arange(len(items)) if rows is None else rows
    return fanout.embed_rows(
        redis, settings, project_id=7, model=model, backbone=backbone_key(model, SIZE),
        image_size=SIZE, items=items, rows=rows,
        compute=compute or (lambda part: _embed(model, arrays[part])),
    )  # fmt: skip


def _left(redis) -> list:
    return list(redis.scan_iter("mlb:fanout:*"))


def test_a_worker_process_takes_chunks_and_the_rows_come_back_in_order(
    redis_conn, redis_url, pool, tmp_path, caplog
):
    settings, items, arrays, model = pool
    expected = _embed(model, arrays)
    worker = start_worker(redis_url, tmp_path, EMBED_CHUNK="10", JOB_LEASE_S="3")
    try:
        wait_until(lambda: Worker.all(connection=redis_conn), "the worker to start", 60)

        waited = []

        def helper_claimed() -> bool:
            claims = redis_conn.scan_iter("mlb:fanout:*:claim:*")
            return any(redis_conn.get(k) not in (None, b"job", "job") for k in claims)

        def slow(part):  # the job's own chunks take a while: the helper gets some
            time.sleep(1.0)
            # On a loaded machine the helper's job process takes seconds to start: wait for its
            # first claim (60 s at most; without one the assertion below fails).
            deadline = time.monotonic() + 60
            while not waited and not helper_claimed() and time.monotonic() < deadline:
                time.sleep(0.1)
            waited.append(True)
            return _embed(model, arrays[part])

        with caplog.at_level(logging.INFO, logger="ml_backend.jobs.fanout"):
            got = _fan_out(redis_conn, settings, items, arrays, model, compute=slow)
        np.testing.assert_allclose(got, expected, atol=1e-4)
        assert "embedding 60 images in 6 chunks of 10, with up to 5 helper jobs" in caplog.text
        here, helped = map(int, re.search(r"(\d+) chunks embedded here, (\d+) by helpers",
                                          caplog.text).groups())  # fmt: skip
        assert here + helped == 6 and helped >= 1
        assert _left(redis_conn) == []  # weights, items, claims and results are gone
        # helpers queued after the last chunk was taken find nothing and end
        wait_until(lambda: Queue("worker-test-embed", connection=redis_conn).count == 0,
                   "the leftover helper jobs to run", 60)  # fmt: skip
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def test_a_chunk_whose_helper_stopped_is_embedded_by_the_job(redis_conn, pool, caplog):
    """A helper claimed chunk 3 and died: its claim lapses and the job embeds it itself."""
    settings, items, arrays, model = pool
    claim = redis_conn.register_script(fanout._CLAIM)
    taken = []

    def compute(part):
        if not taken:  # a helper takes one chunk before the job's next turn, then is killed
            token = next(redis_conn.scan_iter("mlb:fanout:*:todo")).decode().split(":")[2]
            taken.append(int(claim(keys=[fanout._key(token, "todo")],
                                   args=[fanout._key(token, "claim", ""), "dead", "1"])))  # fmt: skip
        return _embed(model, arrays[part])

    with caplog.at_level(logging.INFO, logger="ml_backend.jobs.fanout"):
        got = _fan_out(redis_conn, settings.with_overrides(rq_queue="nobody"), items, arrays,
                       model, compute=compute)  # fmt: skip
    np.testing.assert_allclose(got, _embed(model, arrays), atol=1e-4)
    assert taken == [1] and f"chunk {taken[0]} of 6 came back without embeddings" in caplog.text
    assert "6 chunks embedded here, 0 by helpers" in caplog.text and _left(redis_conn) == []


def test_helper_job_checks_the_weights_and_gives_back_a_chunk_it_cannot_fetch(
    redis_conn, pool, caplog
):
    settings, items, arrays, model = pool
    assert fanout.embed_chunks("gone", settings, redis_conn) == {
        "chunks": 0, "why": "the job that asked for it is done"}  # fmt: skip
    chunks = [np.arange(0, 10), np.arange(10, 20)]
    broken = [(1, "data:image/png;base64,bm90IGFuIGltYWdl")] + items[1:]
    fanout._publish(redis_conn, settings, "t1", model, "not-this-backbone", SIZE, items, chunks)
    with pytest.raises(ValueError, match="not backbone not-this-backbone"):
        fanout.embed_chunks("t1", settings, redis_conn)
    assert redis_conn.llen(fanout._key("t1", "todo")) == 2  # nothing was taken
    fanout._publish(redis_conn, settings, "t2", model, backbone_key(model, SIZE), SIZE, broken,
                    chunks)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="ml_backend.jobs.fanout"):
        assert fanout.embed_chunks("t2", settings, redis_conn) == {"chunks": 1}
    assert "chunk 0 given back: 1 images not fetched here" in caplog.text
    assert not redis_conn.exists(fanout._key("t2", "result", 0))
    assert not redis_conn.exists(fanout._key("t2", "claim", 0))  # the job embeds it
    data = redis_conn.get(fanout._key("t2", "result", 1))
    np.testing.assert_allclose(np.load(io.BytesIO(data)), _embed(model, arrays[10:20]), atol=1e-4)


def test_no_fan_out_for_few_rows_without_redis_or_without_urls(redis_conn, pool):
    settings, items, arrays, model = pool
    calls = []

    def compute(part):
        calls.append(len(part))
        return _embed(model, arrays[part])

    for redis, its, rows in ((redis_conn, items, np.arange(10)), (None, items, np.arange(60)),
                             (redis_conn, None, np.arange(60))):  # fmt: skip
        calls.clear()
        got = _fan_out(redis, settings, its, arrays, model, compute=compute, rows=rows)
        assert got.shape == (len(rows), 512) and sum(calls) == len(rows)
        assert max(calls) <= 10 and _left(redis_conn) == []
    assert Queue("worker-test-embed", connection=redis_conn).count == 0


def test_redis_holds_at_most_ahead_chunks_of_a_pool_of_any_size(redis_conn, pool, monkeypatch):
    settings, items, arrays, model = pool
    monkeypatch.setattr(fanout, "AHEAD", 2)
    out = []

    def compute(part):
        out.append(len(list(redis_conn.scan_iter("mlb:fanout:*:chunk:*"))))
        return _embed(model, arrays[part])

    got = _fan_out(redis_conn, settings.with_overrides(rq_queue="nobody"), items, arrays, model,
                   compute=compute)  # fmt: skip
    np.testing.assert_allclose(got, _embed(model, arrays), atol=1e-4)
    assert len(out) == 6 and max(out) <= 2 and _left(redis_conn) == []
