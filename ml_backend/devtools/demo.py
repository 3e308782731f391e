"""``python -m ml_backend demo``: the whole loop on this machine, in one command.

Starts a throw-away Label Studio 1.23.2 (installing it into ``.cache/ls-venv`` the first time),
a Redis, the backend's web app and worker, creates a "Weather (demo)" project with generated
images, connects the backend, prints the URL and login, and waits for Ctrl-C; then stops
everything. Label a few images in the browser and watch the queue reorder itself.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import signal
import tempfile
import time
from pathlib import Path

from ml_backend.devtools.demo_project import LabelStudioAPI, import_images
from ml_backend.devtools.local_services import (
    BackendProcesses,
    LabelStudioServer,
    RedisProcess,
    free_port,
    tail,
)

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (called by the CLI for ``demo``)."""
    parser.add_argument("--images", type=int, default=300, help="generated images (default 300)")
    parser.add_argument(
        "--ls-port", type=int, default=8080, help="Label Studio port (default 8080)"
    )
    parser.add_argument("--port", type=int, default=9090, help="backend port (default 9090)")
    parser.add_argument(
        "--device",
        default="auto",
        help="torch device for the worker: auto, cpu, cuda (default auto)",
    )
    parser.add_argument(
        "--pretrained",
        default="imagenet",
        help="imagenet (falls back to random init offline), none, or a state_dict path",
    )
    parser.add_argument(
        "--image-size", type=int, default=96, help="training image size (default 96: quick on CPU)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep Label Studio's data, models and logs here (default: a temp dir, deleted at exit)",
    )


def _port(wanted: int) -> int:
    """``wanted`` if it is free, else any free port (another Label Studio may own 8080)."""
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", wanted))
            return wanted
        except OSError:
            return free_port()


def _banner(ls: LabelStudioServer, backend: BackendProcesses, project: int, workdir: Path) -> str:
    return f"""
  Label Studio   {ls.url}/projects/{project}/data
  login          {ls.username}  /  {ls.password}
  API token      (legacy) in {workdir / "login.txt"}
  backend        {backend.url}   status: {backend.url}/status/{project}
  logs           {backend.log_dir}/worker.log, web.log; {ls.log_path}

  Click "Label All Tasks", label a few images: each submit retrains the model in the background
  and the queue reorders (least certain, diverse images first). Ctrl-C stops everything.
"""


def run(args: argparse.Namespace) -> int:
    """Run the demo until Ctrl-C; returns the exit status."""
    own_dir = args.workdir is None
    workdir = (
        Path(tempfile.mkdtemp(prefix="ml-backend-demo-")) if own_dir else args.workdir.resolve()
    )
    workdir.mkdir(parents=True, exist_ok=True)
    ls = LabelStudioServer(workdir / "label-studio", port=_port(args.ls_port))
    redis = RedisProcess(workdir / "redis")
    backend = None
    stopping: list[str] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append("SIGTERM"))
    try:
        print(f"Starting Label Studio on {ls.url} (first start: 1-2 minutes)...", flush=True)
        ls.start()
        redis.start()
        backend = BackendProcesses(
            {
                "REDIS_URL": redis.url,
                "LABEL_STUDIO_URL": ls.url,
                "LABEL_STUDIO_API_KEY": ls.token,
                "MODEL_DIR": str(workdir / "models"),
                "DEVICE": args.device,
                "PRETRAINED": args.pretrained,
                "IMAGE_SIZE": str(args.image_size),
            },
            workdir / "logs",
            port=_port(args.port),
        ).start()
        api = LabelStudioAPI(ls.url, ls.token)
        project = api.create_project("Weather (demo)")
        api.connect_backend(project, backend.url, title="active learning (demo)")
        api.update_project(project, start_training_on_annotation_update=True)
        print(f"Importing {args.images} generated images...", flush=True)
        import_images(
            api, project, ls.document_root, args.images, uploads=min(20, args.images // 10)
        )
        (workdir / "login.txt").write_text(f"{ls.username}\n{ls.password}\n{ls.token}\n")
        (workdir / "login.txt").chmod(0o600)
        print(_banner(ls, backend, project, workdir), flush=True)
        while not stopping:
            if not backend.alive():
                print(f"a backend process exited:\n{backend.logs(30)}", flush=True)
                return 1
            if ls.process is not None and ls.process.poll() is not None:
                print(f"Label Studio exited:\n{tail(ls.log_path, 30)}", flush=True)
                return 1
            time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        print("\nStopping...", flush=True)
        with contextlib.suppress(Exception):
            if backend is not None:
                backend.stop()
        redis.stop()
        ls.stop()
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
        print("Stopped.", flush=True)
