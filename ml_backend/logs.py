"""Logging setup shared by the web app, the worker and the CLI.

Code never logs tokens or request bodies on purpose; ``RedactingFilter`` is defence in depth for
the day someone logs an exception message that quotes a header or a URL with a password in it.
"""

from __future__ import annotations

import logging
import re
import sys

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"
REDACTED = "[redacted]"

# Each pattern keeps its first group (the key) and replaces what follows with REDACTED.
_PATTERNS = [
    # Authorization headers: "Token abc", "Bearer abc", "Basic abc".
    re.compile(r"(\b(?:Token|Bearer|Basic)\s+)[A-Za-z0-9._~+/=-]{8,}"),
    # key=value / "key": "value" for anything named like a secret.
    re.compile(
        r"""((?:access_token|refresh|api_key|apikey|token|password|passwd|secret|authorization)"""
        r"""["']?\s*[:=]\s*["']?)[^"'\s,&}]+""",
        re.IGNORECASE,
    ),
    # Passwords in URLs: redis://:pw@host, http://user:pw@host.
    re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+(?=@)", re.IGNORECASE),
    # JSON web tokens (personal access tokens are JWTs).
    re.compile(r"()\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),
    # Legacy Label Studio tokens: 40 hex characters.
    re.compile(r"()\b[0-9a-f]{40}\b"),
]


def redact(text: str) -> str:
    """Return ``text`` with anything that looks like a credential replaced by ``[redacted]``."""
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrite each record's message (and traceback text) with credentials redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the record
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def setup_logging(level: str = "INFO") -> None:
    """Send our logs (and RQ's) to stderr at ``level``, through the redacting filter.

    Idempotent: a second call only changes the level.
    """
    root = logging.getLogger()
    root.setLevel(level)
    # The SDK's HTTP client logs every request (with URLs) at INFO: keep that out of a retrain's story.
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    for handler in root.handlers:
        if getattr(handler, "_ml_backend", False):
            return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RedactingFilter())
    handler._ml_backend = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    # RQ installs its own handler on its logger when it has none; ours on root is enough.
    logging.getLogger("rq.worker").propagate = True
