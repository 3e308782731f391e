"""Versions, jobs and prediction rows after 50 labels: this code against an older checkout.

One throw-away Label Studio 1.23.2; for each checkout (this one, and ``--compare DIR``, e.g. a
``git worktree`` of the commit before the publishing change), its own Redis and backend (web +
worker, as users start them) and its own project of ``--tasks`` generated images, set up as the
demo does (training on every annotation, so each submit sends ANNOTATION_CREATED and
START_TRAINING). After the cold start, ``--labels`` annotations are submitted at a fixed pace as
"Label All Tasks" serves them (``/next/``, then the true label through the API); once the backend
is idle the table counts, from Label Studio and the backend's ``/status``: jobs run, versions
published, prediction rows written, versions and rows left in Label Studio.

    .venv/bin/python tests/benchmarks/bench_versions.py --compare /tmp/ml-backend-before

Prints a Markdown table. Same inputs for both: the same images (seed), labels and pace.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench_support import checkout_backend, run_checkouts  # noqa: E402

from ml_backend.devtools.demo_project import LabelStudioAPI, import_images  # noqa: E402
from ml_backend.devtools.local_services import (  # noqa: E402
    BackendProcesses,
    LabelStudioServer,
)

SETTINGS = {
    "PRETRAINED": "none",
    "DEVICE": "cpu",
    "IMAGE_SIZE": "64",
    "EPOCHS": "5",
    "BATCH_SIZE": "16",
    "QUEUE_BATCH": "10",
    "LOG_LEVEL": "INFO",
}


def run_one(code: Path, ls: LabelStudioServer, api: LabelStudioAPI, args, work: Path) -> dict:
    with checkout_backend(code, ls, work, SETTINGS) as backend:
        project = api.create_project(f"versions {code.name}")
        api.connect_backend(project, backend.url)
        api.update_project(project, start_training_on_annotation_update=True)
        truth = import_images(api, project, ls.document_root, args.tasks, seed=args.seed)
        backend.wait_idle(project)
        started, next_errors = time.monotonic(), 0
        for _ in range(args.labels):
            for _attempt in range(20):  # as a labeler would: reload until a task shows
                try:
                    task = api.next_task(project)["id"]
                    break
                except RuntimeError:  # Label Studio answered an error instead of a task
                    next_errors += 1
                    time.sleep(1.0)
            api.annotate(task, truth[task])
            time.sleep(args.pace)
        final = backend.wait_idle(project)
        seconds = time.monotonic() - started
        jobs = status_history(backend, project)
        versions = api.model_versions(project)
        return {
            "code": code.name,
            "jobs": len(jobs),
            "published": sum(1 for j in jobs if j.get("model_version")),
            "rows_written": sum(
                (j.get("metrics") or {}).get("predictions_pushed", 0) for j in jobs
            ),
            "versions_left": len(versions),
            "rows_left": sum(versions.values()),
            "served_labels": next(
                (
                    j["metrics"].get("labels_used")
                    for j in jobs
                    if j.get("model_version") == final["model_version"]
                ),
                None,
            ),  # fmt: skip
            "next_errors": next_errors,
            "seconds": round(seconds, 1),
        }


def status_history(backend: BackendProcesses, project: int) -> list[dict]:
    """Every finished job of the project (``/status`` keeps the last 50; ask for all of them)."""
    from redis import Redis

    from ml_backend.jobs.state import StatusStore

    return StatusStore(Redis.from_url(backend.env["REDIS_URL"])).history(project, 1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", type=Path, help="an older checkout to run beside this one")
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--labels", type=int, default=50)
    parser.add_argument("--pace", type=float, default=2.0, help="seconds between two labels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = run_checkouts(
        args.compare,
        "bench-versions-",
        lambda code, ls, api, work: run_one(code, ls, api, args, work),
    )
    print(
        f"\n{args.labels} labels, one every {args.pace:g} s, {args.tasks} tasks, "
        "training on every annotation (ANNOTATION_CREATED + START_TRAINING per submit)\n"
    )
    print("| code | jobs | versions published | prediction rows written | versions left in LS "
          "| rows left in LS | labels in the final model | 'next task' errors | seconds |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['code']} | {r['jobs']} | {r['published']} | {r['rows_written']} | "
              f"{r['versions_left']} | {r['rows_left']} | {r['served_labels']} | "
              f"{r['next_errors']} | {r['seconds']} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
