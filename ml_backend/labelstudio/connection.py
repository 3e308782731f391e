"""Is Label Studio there, and does it take our token? The start-up and periodic check.

``check_connection(settings)`` asks Label Studio who we are (``GET /api/current-user/whoami``
through the SDK, one try, a short timeout) and turns the answer into one of four states, each
with a message that says what is wrong and what to do:

| state | when |
|---|---|
| ``ok`` | Label Studio answered and accepted the token (the user is named) |
| ``unauthorized`` | it answered 401/403: a wrong, revoked or expired token, or legacy tokens off |
| ``unreachable`` | no answer (refused, timed out, DNS), a 5xx, or not Label Studio at that URL |
| ``not configured`` | ``LABEL_STUDIO_API_KEY`` is not set |

``ConnectionMonitor`` keeps the last result and re-checks in a background thread, so ``/health``
never waits on a slow Label Studio. The thread is started on first use in the process that uses
it (gunicorn forks its worker after the app is built; a thread started before would not be
there). Nothing here logs or returns the token.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable

import httpx
import requests
from label_studio_sdk.core.api_error import ApiError

from ml_backend.config import Settings
from ml_backend.errors import ConfigError, LabelStudioUnavailable
from ml_backend.logs import redact

log = logging.getLogger(__name__)

OK = "ok"
UNREACHABLE = "unreachable"
UNAUTHORIZED = "unauthorized"
NOT_CONFIGURED = "not configured"
CHECKING = "checking"  # only before the first check of a process has finished
STATES = (OK, UNREACHABLE, UNAUTHORIZED, NOT_CONFIGURED)
CHECK_TIMEOUT_S = 5.0
# Re-check this often while it works, and sooner while it does not (a fix shows up quickly).
RECHECK_OK_S = 60.0
RECHECK_FAILING_S = 15.0
WHOAMI = "/api/current-user/whoami"


@dataclasses.dataclass(frozen=True)
class Connection:
    """The outcome of one check.

    Attributes:
        state: one of ``STATES`` (or ``CHECKING`` before the first result).
        message: one or two sentences: what was found and, when it is not ``ok``, how to fix it.
        url: the Label Studio URL checked (``LABEL_STUDIO_URL``).
        user: who the token belongs to (e-mail or username), when ``ok``.
        checked_at: epoch seconds of the check (None before the first).
    """

    state: str
    message: str
    url: str
    user: str | None = None
    checked_at: float | None = None

    @property
    def ok(self) -> bool:
        return self.state == OK

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_connection(settings: Settings, timeout: float = CHECK_TIMEOUT_S) -> Connection:
    """Check ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` once (never raises)."""
    from ml_backend.labelstudio.client import LabelStudioClient  # the SDK: only when checking

    url = settings.label_studio_url.rstrip("/")
    now = time.time()

    def result(state: str, message: str, user: str | None = None) -> Connection:
        return Connection(state, redact(message), url, user, now)

    try:
        client = LabelStudioClient(settings, attempts=1, timeout=timeout)
    except ConfigError:
        return result(
            NOT_CONFIGURED,
            "LABEL_STUDIO_API_KEY is not set, so the backend cannot read projects or push "
            f"predictions to Label Studio at {url}. Create a token in Label Studio (Account & "
            "Settings > Personal Access Token, or a legacy token), set LABEL_STUDIO_API_KEY to "
            "it and restart.",
        )
    except LabelStudioUnavailable as exc:  # an expired personal access token
        return result(UNAUTHORIZED, str(exc))
    try:
        me = client.sdk.users.whoami()
    except ApiError as exc:
        return result(*_api_problem(url, exc.status_code or 0))
    except (httpx.TimeoutException, requests.Timeout):
        return result(UNREACHABLE, _unreachable(url, f"no answer within {timeout:g} s"))
    except (httpx.TransportError, requests.ConnectionError) as exc:
        return result(UNREACHABLE, _unreachable(url, _transport_reason(exc)))
    except ValueError:  # a reply that is not JSON: a proxy page, another web server
        return result(UNREACHABLE, _not_json(url))
    finally:
        client.close()
    user = getattr(me, "email", None) or getattr(me, "username", None) or f"user {me.id}"
    return result(OK, f"Label Studio at {url} accepts the token (user {user})", user)


def _api_problem(url: str, status: int) -> tuple[str, str]:
    if status in (401, 403):
        return UNAUTHORIZED, (
            f"Label Studio at {url} refused LABEL_STUDIO_API_KEY (HTTP {status}): the token is "
            "wrong, revoked or expired, or it is a legacy token and legacy tokens are off in the "
            "organization (1.23: Organization > API Tokens Settings). Copy a current token from "
            "Account & Settings into LABEL_STUDIO_API_KEY and restart."
        )
    if 200 <= status < 300:  # the SDK's error for a 2xx body it cannot parse
        return UNREACHABLE, _not_json(url)
    if status == 404:
        return UNREACHABLE, (
            f"{url} answered HTTP 404 for {WHOAMI}: it does not look like Label Studio there. "
            "Set LABEL_STUDIO_URL to Label Studio's base address (scheme, host, port, no path)."
        )
    return UNREACHABLE, _unreachable(url, f"it answered HTTP {status}")


def _not_json(url: str) -> str:
    return (
        f"{url} answered {WHOAMI} with something that is not Label Studio's JSON (a proxy or "
        "login page?): set LABEL_STUDIO_URL to Label Studio's base address (scheme, host, port, "
        "no path)."
    )


def _unreachable(url: str, reason: str) -> str:
    return (
        f"cannot reach Label Studio at {url} ({reason}): check that it is running and that "
        "LABEL_STUDIO_URL is the address this machine reaches it at. The backend keeps running "
        "and checks again."
    )


def _transport_reason(exc: Exception) -> str:
    text = str(exc).lower()
    if "name or service not known" in text or "nodename nor servname" in text:
        return "the host name does not resolve"
    if "refused" in text:
        return "connection refused"
    return type(exc).__name__


class ConnectionMonitor:
    """The last check's result, refreshed in a background thread.

    Args:
        settings: the backend's settings.
        on_change: called with the new ``Connection`` whenever the state changes (and after
            the first check), from the monitor's thread.
        check: the check function (tests pass their own).
    """

    def __init__(
        self,
        settings: Settings,
        on_change: Callable[[Connection], None] | None = None,
        check: Callable[[Settings], Connection] = check_connection,
        recheck_ok_s: float = RECHECK_OK_S,
        recheck_failing_s: float = RECHECK_FAILING_S,
    ):
        self.settings = settings
        self.on_change = on_change
        self._check = check
        self._every = (recheck_ok_s, recheck_failing_s)
        url = settings.label_studio_url.rstrip("/")
        self._current = Connection(CHECKING, "the first check has not finished yet", url)
        if not settings.label_studio_api_key:  # known without asking anyone
            self._current = self._check(settings)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None

    def current(self) -> Connection:
        """The latest result; starts the background checks in this process if needed."""
        self.start()
        return self._current

    def check_now(self, notify: bool = True) -> Connection:
        """Check now (blocking), store and return the result (``notify``: call ``on_change``
        if the state changed)."""
        self._store(self._check(self.settings), notify)
        return self._current

    def start(self) -> ConnectionMonitor:
        """Start the background thread (once per process; a no-op when it runs)."""
        with self._lock:
            if self._pid == os.getpid() and self._thread is not None:
                return self
            self._pid = os.getpid()
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._loop, name="label-studio-check", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background thread (it ends after the check in progress, if any)."""
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            last = self._current
            if last.checked_at is not None:  # e.g. check_now() at start: wait for the next turn
                due = last.checked_at + (self._every[0] if last.ok else self._every[1])
                if self._stop.wait(max(0.0, due - time.time())):
                    return
            try:
                self._store(self._check(self.settings))
            except Exception:  # a bug in the check must not end the checks
                log.exception("checking Label Studio failed unexpectedly")
                self._stop.wait(self._every[1])

    def _store(self, result: Connection, notify: bool = True) -> None:
        with self._lock:
            changed = result.state != self._current.state
            self._current = result
        if changed and notify and self.on_change is not None:
            self.on_change(result)


def log_connection(result: Connection, logger: logging.Logger = log, changed: bool = False) -> None:
    """One log line for a result: INFO when ok, ERROR otherwise (no traceback)."""
    prefix = "Label Studio is now " if changed else "Label Studio: "
    if result.ok:
        logger.info("%s%s: %s", prefix, result.state, result.message)
    else:
        logger.error("%s%s: %s", prefix, result.state.upper(), result.message)


LOG_MODES = ("all", "changes", "none")


def monitor_for(
    settings: Settings, connection_log: str = "all", logger: logging.Logger = log
) -> ConnectionMonitor:
    """The Label Studio check of a ``serve`` or ``worker`` process, checked once already.

    Args:
        connection_log: ``all``: log the first result, then every change; ``changes``: log
            changes only; ``none``: never log (``run`` says it once for all its children).
        logger: where the lines go.
    """
    if connection_log not in LOG_MODES:
        raise ValueError(f"connection_log must be one of {', '.join(LOG_MODES)}")
    monitor = ConnectionMonitor(
        settings,
        on_change=None
        if connection_log == "none"
        else lambda result: log_connection(result, logger, changed=True),
    )
    if connection_log != "none":
        result = monitor.check_now(notify=False)
        if connection_log == "all":
            log_connection(result, logger)
    return monitor
