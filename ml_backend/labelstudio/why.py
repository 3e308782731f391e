"""Why this task, where labelers look: a task data field a ``<Header>`` in the labeling config shows.

Label Studio 1.23 shows a labeler the task's ``data`` (through the config's tags) and nothing of
its ``meta``, and the label stream shows neither the prediction's score nor its version. So the
explanation goes into a data field, ``data.why_this_task``, and the shipped ``label_config.xml``
has ``<Header value="$why_this_task"/>`` above the image. The field also becomes a Data Manager
column. A task without the field shows no header (a ``$field`` inside a longer text would read
"undefined": keep the tag's value exactly ``$why_this_task``).

``write_task_notes`` writes, for each queue-top entry, the text into ``data`` and the full entry
into ``meta.active_learning`` in one PATCH per task, and clears the text of tasks that were at
the top before and are not any more. Task data is read with ``resolve_uri=false`` and written
back whole: a read with resolved URLs (the default) would replace ``s3://`` and other storage
URIs with Label Studio's proxy links.
"""

from __future__ import annotations

import logging

import httpx
import requests
from label_studio_sdk.core.api_error import ApiError

from ml_backend.errors import LabelStudioUnavailable

log = logging.getLogger(__name__)

WHY_FIELD = "why_this_task"
META_KEY = "active_learning"
COLD_START_PREFIX = "coldstart-"


def why_text(entry: dict, version: str) -> str:
    """The sentence a labeler reads, e.g. "Why this task (#2 in the queue of resnet18-v4): the
    model is unsure (between Sunny 48% and Cloudy 41%), and it is far from every labeled image"."""
    model = "before the first model" if version.startswith(COLD_START_PREFIX) else f"of {version}"
    reason = entry.get("why") or entry.get("reason") or "ranked by the active-learning queue"
    return f"Why this task (#{entry.get('rank', '?')} in the queue {model}): {reason}"


def _read(client, task_id: int) -> dict:
    task = client.sdk.tasks.get(
        id=str(task_id),
        request_options={"additional_query_parameters": {"resolve_uri": "false"}},
    )
    return task.model_dump() if hasattr(task, "model_dump") else dict(task)


def _write(client, task_id: int, data: dict, meta: dict | None) -> None:
    fields = {"data": data} if meta is None else {"data": data, "meta": meta}
    client.sdk.tasks.update(id=str(task_id), **fields)


def _note(client, task_id: int, text: str, meta_entry: dict | None) -> bool:
    """Set the text (and the meta entry); False when there was nothing to change."""
    try:
        task = _read(client, task_id)
        data = dict(task.get("data") or {})
        meta = None
        if meta_entry is not None:
            meta = {**(task.get("meta") or {}), META_KEY: meta_entry}
        elif not data.get(WHY_FIELD):
            return False  # already clear
        data[WHY_FIELD] = text
        _write(client, task_id, data, meta)
        return True
    except ApiError as exc:
        if exc.status_code == 404:  # deleted meanwhile
            return False
        raise LabelStudioUnavailable(
            f"Label Studio answered HTTP {exc.status_code} while writing why task {task_id} is "
            "in the queue"
        ) from None
    except (httpx.TransportError, requests.RequestException) as exc:
        raise LabelStudioUnavailable(
            f"cannot reach Label Studio to write why task {task_id} is in the queue "
            f"({type(exc).__name__})"
        ) from None


def write_task_notes(client, top: list[dict], version: str, previous_top=()) -> int:
    """Write why each queue-top task is there; clear the text on tasks that dropped out.

    Args:
        client: the ``LabelStudioClient`` (its ``sdk`` is used).
        top: queue-top entries (``publish.queue_top``: task_id, rank, reason, why, ...).
        version: the prediction version just published (named in the text and the meta).
        previous_top: the entries of the queue top published before (their text is cleared
            unless they are in ``top`` again).

    Returns:
        how many tasks were written.

    Raises:
        LabelStudioUnavailable: Label Studio failed (best effort: the caller logs it).
    """
    written = 0
    current = {int(e["task_id"]) for e in top}
    for entry in top:
        meta = {"model_version": version, **{k: v for k, v in entry.items() if k != "task_id"}}
        written += _note(client, int(entry["task_id"]), why_text(entry, version), meta)
    for entry in previous_top or ():
        task_id = int(entry["task_id"])
        if task_id not in current:
            written += _note(client, task_id, "", None)
    return written
