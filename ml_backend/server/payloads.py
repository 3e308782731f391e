"""Parsing and validating what Label Studio sends. Every failure is a ``BadRequest`` saying why.

The per-project knobs and their bounds (``PARAM_RULES``) live in ``ml_backend.config``, next to
the settings they override, so the job and this layer read one table.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Request

from ml_backend.config import PARAM_RULES
from ml_backend.errors import BadRequest

# Actions that (re)start the project's job. TASKS_CREATED is here because the job also orders the
# queue of a project with no model yet (cold start) and predicts new tasks when there is one.
TRAINING_ACTIONS = frozenset(
    {
        "ANNOTATION_CREATED",
        "ANNOTATION_UPDATED",
        "ANNOTATIONS_DELETED",
        "START_TRAINING",
        "TASKS_CREATED",
    }
)
# Actions after which the next job lists every task instead of only the changed ones: the Data
# Manager's bulk "Delete annotations" sends its webhook before it bumps the tasks' updated_at.
FULL_LISTING_ACTIONS = frozenset({"ANNOTATIONS_DELETED"})
# Actions Label Studio is known to send; others are counted as "other" in /metrics.
KNOWN_ACTIONS = TRAINING_ACTIONS | frozenset(
    {
        "PROJECT_CREATED",
        "PROJECT_UPDATED",
        "PROJECT_DELETED",
        "TASKS_DELETED",
        "ANNOTATIONS_CREATED",
        "LABEL_LINK_CREATED",
        "LABEL_LINK_UPDATED",
        "LABEL_LINK_DELETED",
        "REVIEW_CREATED",
        "REVIEW_UPDATED",
        "REVIEWS_DELETED",
    }
)


def json_body(request: Request) -> dict:
    """The request body as a JSON object, or ``BadRequest`` saying what it was instead."""
    body = request.get_json(silent=True, force=True)
    if body is None:
        raise BadRequest("request body must be JSON (Content-Type: application/json)")
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_project_id(value: Any, field: str = "project") -> int:
    """Read a Label Studio project id: ``7``, ``"7"`` or ``"7.1718000000"`` (``<id>.<created_at>``)."""
    if value is None:
        raise BadRequest(
            f'missing {field}: expected a Label Studio project id such as 7 or "7.1718000000"'
        )
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadRequest(f"{field} must be a project id number, got {type(value).__name__}")
    text = str(value).strip().split(".", 1)[0]
    if not text.isdigit() or not text.isascii():
        raise BadRequest(f"{field} must be a project id number, got {str(value)[:40]!r}")
    project = int(text)
    if project <= 0 or project >= 2**63:
        raise BadRequest(f"{field} must be a positive project id, got {project}")
    return project


def webhook_project_id(payload: dict) -> int:
    """The project id of a webhook: ``payload["project"]["id"]``."""
    project = payload.get("project")
    if not isinstance(project, dict):
        raise BadRequest(
            'webhook payload has no "project" object (expected {"project": {"id": N}})'
        )
    return parse_project_id(project.get("id"), field="project.id")


def parse_extra_params(raw: Any) -> dict:
    """Validate the model's extra params: a JSON object, a JSON string of one, or ``key=value`` lines.

    Returns:
        the normalised knobs (``{}`` for ``None`` or an empty string).

    Raises:
        BadRequest: unknown key or bad value, naming the key and what is allowed.
    """
    if raw is None:
        return {}
    if isinstance(raw, str):
        raw = _parse_param_text(raw)
    if not isinstance(raw, dict):
        raise BadRequest("extra_params must be a JSON object or key=value lines")
    params = {}
    for key, value in raw.items():
        name = str(key).strip().lower()
        if name not in PARAM_RULES:
            raise BadRequest(
                f"unknown extra param {str(key)[:40]!r}; allowed: {', '.join(PARAM_RULES)}"
            )
        parse, allowed = PARAM_RULES[name]
        try:
            params[name] = parse(value)
        except (ValueError, TypeError):
            raise BadRequest(
                f"extra param {name} must be {allowed}, got {str(value)[:40]!r}"
            ) from None
    return params


def _parse_param_text(text: str) -> Any:
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            return json.loads(text)
        except ValueError:
            raise BadRequest("extra_params looks like JSON but does not parse") from None
    params = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise BadRequest(f"extra_params line {number} must look like key=value")
        params[key.strip()] = value.strip()
    return params
