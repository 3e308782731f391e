"""The Flask app factory: settings, Redis, auth, body limits, JSON errors, metrics.

The app answers Label Studio fast: it validates, records and enqueues. It never trains and does
not import torch for webhooks (``/predict`` imports the predictor lazily).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import threading
import time

from flask import Flask, g, jsonify, request
from redis import Redis
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from ml_backend.config import Settings
from ml_backend.errors import BackendError, PayloadTooLarge, Unauthorized
from ml_backend.labelstudio.connection import ConnectionMonitor
from ml_backend.server.dashboard import dashboard_bp
from ml_backend.server.metrics import Metrics
from ml_backend.server.routes import bp

log = logging.getLogger(__name__)

# Short timeouts: Label Studio gives /health 1 s and /webhook 1 s; a dead Redis must fail fast.
REDIS_SOCKET_TIMEOUT_S = 0.5


def make_redis(url: str) -> Redis:
    """A Redis client for the web process (fails fast when Redis is down, reconnects after)."""
    return Redis.from_url(
        url,
        socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        retry_on_timeout=False,
        health_check_interval=30,
    )


def create_app(
    settings: Settings, redis: Redis | None = None, monitor: ConnectionMonitor | None = None
) -> Flask:
    """Build the web app.

    Args:
        settings: backend settings (``redis_url`` is used when ``redis`` is not given).
        redis: an existing client (tests); otherwise one is made from ``settings.redis_url``.
            Without either, the app still answers ``/health`` and ``/predict``; the routes that
            need Redis answer 503.
        monitor: the Label Studio connection check shown by ``/health`` and the dashboard; one
            is made when not given. Its checks start on the first request (in the process that
            serves it).
    """
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    if redis is None and settings.redis_url:
        redis = make_redis(settings.redis_url)
    app.extensions["ml_backend"] = {
        "settings": settings,
        "redis": redis,
        "metrics": Metrics(redis),
        "predictor": None,
        "predictor_lock": threading.Lock(),
        "label_studio": monitor or ConnectionMonitor(settings),
    }
    app.register_blueprint(bp)
    app.register_blueprint(dashboard_bp)
    _install_hooks(app, settings)
    _install_error_handlers(app)
    return app


def _install_hooks(app: Flask, settings: Settings) -> None:
    @app.before_request
    def _start():
        g.started = time.perf_counter()
        if (
            request.content_length is not None
            and request.content_length > settings.max_request_bytes
        ):
            raise PayloadTooLarge(
                f"request body is {request.content_length} bytes; the limit is "
                f"{settings.max_request_bytes} (MAX_REQUEST_BYTES)"
            )
        if settings.basic_auth_user and request.endpoint != "api.health":
            _check_basic_auth(settings)

    @app.after_request
    def _observe(response):
        started = g.get("started")
        if started is not None:
            endpoint = request.url_rule.rule if request.url_rule else "unmatched"
            app.extensions["ml_backend"]["metrics"].latency.labels(
                endpoint, request.method, str(response.status_code)
            ).observe(time.perf_counter() - started)
        return response


def _check_basic_auth(settings: Settings) -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, encoded = header.partition(" ")
    user = password = ""
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user = password = ""
    # Both compared every time (constant time), so timing does not tell which one was wrong.
    ok_user = hmac.compare_digest(user.encode(), settings.basic_auth_user.encode())
    ok_pass = hmac.compare_digest(password.encode(), settings.basic_auth_pass.encode())
    if not (ok_user and ok_pass):
        raise Unauthorized("missing or wrong HTTP basic auth credentials")


def _error(message: str, status: int):
    response = jsonify({"error": message})
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Basic realm="ml-backend", charset="UTF-8"'
    return response


def _install_error_handlers(app: Flask) -> None:
    @app.errorhandler(BackendError)
    def _backend_error(exc: BackendError):
        if exc.http_status >= 500:
            log.error("%s %s: %s: %s", request.method, request.path, type(exc).__name__, exc)
        return _error(str(exc) or type(exc).__name__, exc.http_status)

    @app.errorhandler(RedisError)
    def _redis_error(exc: RedisError):
        log.error("%s %s: Redis unavailable: %s", request.method, request.path, type(exc).__name__)
        return _error(
            f"Redis is unavailable ({type(exc).__name__}); the job queue and status cannot be "
            "reached. Check REDIS_URL and that Redis is running; retry when it is back.",
            503,
        )

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc):
        return _error(
            f"request body is larger than {app.config['MAX_CONTENT_LENGTH']} bytes "
            "(MAX_REQUEST_BYTES)",
            413,
        )

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return _error(exc.description or exc.name, exc.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("%s %s: unexpected error", request.method, request.path)
        return _error("internal error", 500)
