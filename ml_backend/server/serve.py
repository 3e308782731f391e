"""Serving the app with gunicorn from Python (``python -m ml_backend serve``).

One gunicorn process with a few threads: the web layer only validates and enqueues, so threads
are plenty, and one process keeps the /metrics counters and the cached predictor in one place.
"""

from __future__ import annotations

import logging

from gunicorn.app.base import BaseApplication

from ml_backend.config import Settings
from ml_backend.errors import ConfigError
from ml_backend.server.app import create_app

log = logging.getLogger(__name__)

# /predict may load a model and run it over many tasks; Label Studio waits up to 100 s.
REQUEST_TIMEOUT_S = 120


class _Gunicorn(BaseApplication):
    def __init__(self, app, options: dict):
        self.application = app
        self.options = options
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            if key in self.cfg.settings:  # newer options are skipped on older gunicorn
                self.cfg.set(key, value)

    def load(self):
        return self.application


def serve(settings: Settings, host: str = "0.0.0.0", port: int = 9090, threads: int = 4) -> None:
    """Serve the app with gunicorn until SIGTERM/SIGINT.

    Raises:
        ConfigError: REDIS_URL is not set.
    """
    if not settings.redis_url:
        raise ConfigError("REDIS_URL is required to serve (e.g. redis://localhost:6379/0)")
    app = create_app(settings)
    options = {
        "bind": f"{host}:{port}",
        "workers": 1,
        "worker_class": "gthread",
        "threads": threads,
        "timeout": REQUEST_TIMEOUT_S,
        "graceful_timeout": 10,
        "accesslog": None,  # access lines would add a write per webhook; /metrics has the counts
        "loglevel": settings.log_level.lower(),
        "proc_name": "ml-backend-web",
        # gunicorn >= 25 opens a control socket in the home directory; we do not use it, and two
        # backends on one machine would fight over it.
        "control_socket_disable": True,
    }
    log.info("serving on http://%s:%s with %d threads", host, port, threads)
    _Gunicorn(app, options).run()
