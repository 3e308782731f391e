"""Credentials never reach the log: the redacting filter, and the routes' own logging."""

from __future__ import annotations

import io
import logging

from ml_backend.logs import RedactingFilter, redact

PAT = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2lnbmF0dXJlLXNpZ24"
LEGACY = "0123456789abcdef0123456789abcdef01234567"


def test_redact_hides_tokens_passwords_and_jwts():
    cases = [
        f"Authorization: Token {LEGACY}",
        f"Authorization: Bearer {PAT}",
        f'{{"access_token": "{LEGACY}"}}',
        "url redis://:hunter2secret@redis:6379/0",
        "http://user:hunter2secret@ls:8080/api",
        f"refresh={PAT}",
        "password=hunter2secret&x=1",
        f"bare {LEGACY} token",
    ]
    for text in cases:
        out = redact(text)
        assert "[redacted]" in out, text
        for secret in (LEGACY, PAT, "hunter2secret"):
            assert secret not in out, out
    assert redact("project 7: 12 labels, val_accuracy=0.9") == (
        "project 7: 12 labels, val_accuracy=0.9"
    )


def test_filter_redacts_args_and_tracebacks():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("calling with %s", f"Token {LEGACY}")
        try:
            raise RuntimeError(f"401 for access_token={LEGACY}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert LEGACY not in text
    assert "RuntimeError" in text and "[redacted]" in text


def test_routes_never_log_bodies_or_tokens(client, caplog):
    with caplog.at_level(logging.DEBUG):
        client.post(
            "/setup",
            json={"project": "3.1", "access_token": LEGACY, "extra_params": {"strategy": "random"}},
        )
        client.post(
            "/webhook",
            json={
                "action": "ANNOTATION_CREATED",
                "project": {"id": 3},
                "task": {"data": {"image": "SECRET-IMAGE-URL"}},
            },
        )
    assert LEGACY not in caplog.text
    assert "SECRET-IMAGE-URL" not in caplog.text
