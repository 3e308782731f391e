"""What the benchmarks that compare checkouts share: one Label Studio for every checkout, and
for each its own Redis and backend (web + worker, started as users start them)."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ml_backend.devtools.demo_project import LabelStudioAPI  # noqa: E402
from ml_backend.devtools.local_services import (  # noqa: E402
    BackendProcesses,
    LabelStudioServer,
    RedisProcess,
)


@contextlib.contextmanager
def checkout_backend(
    code: Path, ls: LabelStudioServer, work: Path, settings: dict, workers: int = 1
):
    """The backend of checkout ``code`` with its own Redis and ``MODEL_DIR`` under ``work``,
    connected to ``ls``, with ``settings`` on top, ``workers`` worker processes; stopped (all)
    on exit."""
    redis = RedisProcess(work / "redis").start()
    env = {
        **settings,
        "REDIS_URL": redis.url,
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.token,
        "MODEL_DIR": str(work / "models"),
    }
    backend = BackendProcesses(env, work / "logs", code=code, workers=workers)
    try:
        backend.start()
        yield backend
    finally:
        backend.stop()
        redis.stop()


def run_checkouts(
    compare: Path | None,
    prefix: str,
    run: Callable[[Path, LabelStudioServer, LabelStudioAPI, Path], dict],
    ls_env: dict[str, str] | None = None,
) -> list[dict]:
    """``run(code, ls, api, work)`` for this checkout, then for ``compare`` (an older one) when
    given, one after the other under one Label Studio (with ``ls_env`` in its environment);
    each row is printed as it comes."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    codes = [ROOT] + ([compare.resolve()] if compare else [])
    rows = []
    with LabelStudioServer(work / "label-studio", extra_env=ls_env) as ls:
        api = LabelStudioAPI(ls.url, ls.token)
        for i, code in enumerate(codes):
            rows.append(run(code, ls, api, work / f"run-{i}"))
            print(rows[-1], flush=True)
    return rows
