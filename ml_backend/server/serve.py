"""Serving the app with gunicorn from Python (``python -m ml_backend serve``).

One gunicorn process with a few threads: the web layer only validates and enqueues, so threads
are plenty, and one process keeps the /metrics counters and the cached predictor in one place.
"""

from __future__ import annotations

import ipaddress
import logging

from gunicorn.app.base import BaseApplication

from ml_backend.config import Settings
from ml_backend.errors import ConfigError
from ml_backend.labelstudio.connection import monitor_for
from ml_backend.server.app import create_app

log = logging.getLogger(__name__)

# /predict may load a model and run it over many tasks; Label Studio waits up to 100 s.
REQUEST_TIMEOUT_S = 120
LOOPBACK = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen_host(settings: Settings, requested: str | None) -> tuple[str, str | None]:
    """Where to listen, and what to tell the operator about it (None: nothing to say).

    Without BASIC_AUTH_USER/BASIC_AUTH_PASS the control routes (/setup, /train, /webhook,
    /predict) are open to whoever reaches the port, and they make the backend rewrite any project
    the API key can read. So the default is loopback then, all interfaces with credentials. An
    explicit ``--host`` wins; a non-loopback one without credentials comes with a warning.
    """
    secured = bool(settings.basic_auth_user and settings.basic_auth_pass)
    if requested is None:
        if secured:
            return ALL_INTERFACES, None
        return LOOPBACK, (
            "listening on 127.0.0.1 only: BASIC_AUTH_USER and BASIC_AUTH_PASS are not set, so "
            "the control routes are unauthenticated; set both to listen on all interfaces "
            "(or pass --host to choose)"
        )
    if not secured and not is_loopback(requested):
        return requested, (
            f"WARNING: listening on {requested} without BASIC_AUTH_USER/BASIC_AUTH_PASS: anyone "
            "who reaches this port can POST /setup, /train and /webhook for any project "
            "LABEL_STUDIO_API_KEY can read, and make the backend rewrite its predictions, "
            "sampling and views; set both to require HTTP basic auth"
        )
    return requested, None


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


def serve(
    settings: Settings,
    host: str | None = None,
    port: int = 9090,
    threads: int = 4,
    connection_log: str = "all",
) -> None:
    """Serve the app with gunicorn until SIGTERM/SIGINT.

    Checks Label Studio first and says what is wrong (``monitor_for``); serves either
    way, re-checking in the background (``/health`` and the dashboard show the state).

    Args:
        host: address to listen on; None picks by ``listen_host`` (loopback without credentials).
        connection_log: see ``monitor_for``.

    Raises:
        ConfigError: REDIS_URL is not set.
    """
    if not settings.redis_url:
        raise ConfigError("REDIS_URL is required to serve (e.g. redis://localhost:6379/0)")
    host, note = listen_host(settings, host)
    if note:
        (log.warning if note.startswith("WARNING") else log.info)(note.removeprefix("WARNING: "))
    app = create_app(settings, monitor=monitor_for(settings, connection_log, log))
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
