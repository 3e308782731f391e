"""Webhook latency and throughput of the served app (gunicorn via `python -m ml_backend serve`).

Starts a redis-server on a free port and the real web server against it, then over loopback:

1. a fixed rate (default 200 webhooks/s for 10 s), one new connection per webhook like Label
   Studio; latency is measured from each webhook's scheduled send time, so a stall shows up;
2. as fast as possible from several client threads for a few seconds.

Prints p50/p99 latency and requests/s. Run: `.venv/bin/python tests/benchmarks/bench_webhooks.py`.
No worker runs, so after the first webhook per project the rest coalesce ("already_waiting"):
that is the path Label Studio exercises while annotators work.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from ml_backend.devtools.local_services import redis_server_args  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def payload(project: int, i: int) -> bytes:
    """An ANNOTATION_CREATED webhook about the size Label Studio sends (~1.5 KB)."""
    return json.dumps(
        {
            "action": "ANNOTATION_CREATED",
            "annotation": {
                "id": i,
                "task": i,
                "project": project,
                "completed_by": 1,
                "was_cancelled": False,
                "ground_truth": False,
                "result": [
                    {
                        "from_name": "choice",
                        "to_name": "image",
                        "type": "choices",
                        "value": {"choices": ["Cloudy"]},
                        "id": f"r{i}",
                    }
                ],
            },
            "task": {
                "id": i,
                "data": {"image": f"/data/upload/{project}/img_{i:06d}.png"},
                "meta": {},
                "is_labeled": True,
                "project": project,
            },
            "project": {
                "id": project,
                "title": "Weather",
                "model_version": "resnet18-v3",
                "label_config": "<View>" + "<Choice value='x'/>" * 20 + "</View>",
                "sampling": "Uncertainty sampling",
                "show_collab_predictions": True,
            },
        }
    ).encode()


def post(port: int, body: bytes) -> tuple[int, float]:
    """One webhook on a new connection; returns (status, seconds)."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/webhook", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - started
    finally:
        conn.close()


def wait_for(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not answer /health in {timeout} s")


def fixed_rate(port: int, rate: float, seconds: float, projects: int) -> dict:
    count = int(rate * seconds)
    latencies, errors = [], 0
    start = time.perf_counter() + 0.05
    for i in range(count):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        status, _ = post(port, payload(1 + i % projects, i))
        latencies.append(time.perf_counter() - scheduled)  # includes any lag behind schedule
        errors += status != 201
    elapsed = time.perf_counter() - start
    return summary(f"fixed {rate:g}/s for {seconds:g} s", latencies, errors, elapsed)


def flat_out(port: int, seconds: float, threads: int, projects: int) -> dict:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(offset: int) -> None:
        mine, bad, i = [], 0, offset
        while time.perf_counter() < stop:
            status, seconds_taken = post(port, payload(1 + i % projects, i))
            mine.append(seconds_taken)
            bad += status != 201
            i += threads
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    started = time.perf_counter()
    workers = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return summary(
        f"as fast as possible, {threads} clients",
        latencies,
        errors[0],
        time.perf_counter() - started,
    )


def summary(name: str, latencies: list[float], errors: int, elapsed: float) -> dict:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {
        "phase": name,
        "requests": len(ordered),
        "errors": errors,
        "rps": len(ordered) / elapsed,
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": p99 * 1000,
        "max_ms": ordered[-1] * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--flat-seconds", type=float, default=5)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--projects", type=int, default=5)
    args = parser.parse_args()

    redis_port, web_port = free_port(), free_port()
    redis = subprocess.Popen(
        redis_server_args(shutil.which("redis-server") or "redis-server", redis_port),
        stdout=subprocess.DEVNULL,
    )
    env = dict(
        os.environ,
        REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        LOG_LEVEL="WARNING",
        RQ_QUEUE="bench-webhooks",
        PRETRAINED="none",
    )
    with tempfile.TemporaryDirectory() as tmp:
        env["MODEL_DIR"] = tmp
        web = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ml_backend",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(web_port),
            ],
            env=env,
            cwd=ROOT,
        )
        try:
            wait_for(web_port)
            post(web_port, payload(1, 0))  # warm-up
            rows = [
                fixed_rate(web_port, args.rate, args.seconds, args.projects),
                flat_out(web_port, args.flat_seconds, args.clients, args.projects),
            ]
        finally:
            web.send_signal(signal.SIGTERM)
            web.wait(timeout=30)
            redis.terminate()
            redis.wait(timeout=10)
    print(
        f"\nWebhook benchmark: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, gunicorn 1 process x 4 "
        "threads, client on the same machine\n"
    )
    print("| phase | requests | errors | requests/s | p50 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['phase']} | {r['requests']} | {r['errors']} | {r['rps']:.0f} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.1f} |"
        )
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
