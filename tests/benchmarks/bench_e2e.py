"""End-to-end latency: from the Nth annotation to the new queue order live in Label Studio.

Starts a throw-away Label Studio 1.23.2, a Redis and the backend (web + worker, as users start
them), makes a project of ``--tasks`` generated images, waits for the cold start, then for each
N in ``--labels`` submits annotations up to N through the API and measures the time from the
Nth submit until ``project.model_version`` switches to the version trained on N labels (the
moment "Label All Tasks" serves the new order). The job's own timings (from the backend's
``/status/<project>``) split it into queue wait, fetch, train, predict, rank and push.

    .venv/bin/python tests/benchmarks/bench_e2e.py --tasks 1000 --labels 20 50 100

Prints a Markdown table. Set E2E_LABEL_STUDIO=<base dir>:<port>:<token>:<password> to reuse a
running Label Studio (see tests/e2e/conftest.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ml_backend.devtools.demo_project import LabelStudioAPI, import_images  # noqa: E402
from ml_backend.devtools.local_services import (  # noqa: E402
    BackendProcesses,
    LabelStudioServer,
    RedisProcess,
)


def _status(backend: BackendProcesses, project: int) -> dict:
    reply = requests.get(f"{backend.url}/status/{project}", timeout=10)
    return reply.json() if reply.status_code == 200 else {}


def _served_job(backend: BackendProcesses, project: int, labels: int | None) -> dict | None:
    """The finished job whose version is served, if it was trained on ``labels`` labels."""
    status = _status(backend, project)
    version = status.get("model_version")
    for job in status.get("history", []):
        if job.get("error"):
            raise RuntimeError(f"job failed: {job['error']}\n{backend.logs(40)}")
        if job.get("model_version") == version and job.get("finished_at"):
            used = (job.get("metrics") or {}).get("labels_used")
            if labels is None or used == labels:
                return job
    return None


def _wait(fn, timeout_s: float, what: str, backend: BackendProcesses):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        if not backend.alive():
            raise RuntimeError(f"a backend process died\n{backend.logs(40)}")
        time.sleep(0.25)
    raise TimeoutError(f"{what} not done in {timeout_s:.0f} s\n{backend.logs(40)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--labels", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pretrained", default="none")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    reuse = os.environ.get("E2E_LABEL_STUDIO")
    if reuse:
        base, port, token, password = reuse.rsplit(":", 3)
        ls = LabelStudioServer(Path(base), port=int(port), password=password, token=token)
    else:
        ls = LabelStudioServer(work / "label-studio").start()
    redis = RedisProcess(work / "redis").start()
    env = {
        "REDIS_URL": redis.url, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token,
        "MODEL_DIR": str(work / "models"), "DEVICE": args.device, "PRETRAINED": args.pretrained,
        "IMAGE_SIZE": str(args.image_size), "EPOCHS": str(args.epochs), "LOG_LEVEL": "INFO",
    }  # fmt: skip
    backend = BackendProcesses(env, work / "logs").start()
    rows = []
    try:
        api = LabelStudioAPI(ls.url, ls.token)
        project = api.create_project(f"bench e2e {args.tasks}")
        api.connect_backend(project, backend.url)
        api.update_project(project, start_training_on_annotation_update=True)
        t0 = time.monotonic()
        truth = import_images(api, project, ls.document_root, args.tasks, uploads=args.tasks // 10)
        cold = _wait(lambda: _served_job(backend, project, None), 600, "cold start", backend)
        rows.append(("cold start", 0, time.monotonic() - t0, cold))

        tasks, done = sorted(truth), 0
        for n in args.labels:
            before = api.project(project)["model_version"]
            while done < n:
                api.annotate(tasks[done], truth[tasks[done]])
                done += 1
            t_nth = time.monotonic()
            job = _wait(
                lambda n=n: _served_job(backend, project, n), 1800, f"retrain on {n}", backend
            )
            _wait(
                lambda b=before: api.project(project)["model_version"] != b, 60, "switch", backend
            )
            rows.append((f"{n} labels", n, time.monotonic() - t_nth, job))
    finally:
        backend.stop()
        redis.stop()
        if not reuse:
            ls.stop()

    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"device {args.device}; {args.tasks} tasks, {args.image_size} px, {args.epochs} epochs, "
          f"pretrained={args.pretrained}\n")  # fmt: skip
    cols = ("fetch_s", "train_s", "predict_s", "rank_s", "push_s", "total_s")
    print("| step | labels | Nth submit -> live in LS (s) | job " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for name, n, wall, job in rows:
        timings = (job.get("metrics") or {}).get("timings", {})
        cells = " | ".join(f"{timings.get(c, float('nan')):.1f}" for c in cols)
        print(f"| {name} | {n} | {wall:.1f} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
