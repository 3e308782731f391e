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
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

WHY_FIELD = "why_this_task"
META_KEY = "active_learning"
# Notes are written by a few threads at once: each is two Label Studio requests.
WRITERS = 4


def why_text(entry: dict, version: str, cold_start: bool = False) -> str:
    """The sentence a labeler reads, e.g. "Why this task (#2 in the queue of resnet18-v4): the
    model is unsure (between Sunny 48% and Cloudy 41%), and it stands for 23 similar images that
    no labeled or queued image is close to yet"."""
    model = "before the first model" if cold_start else f"of {version}"
    reason = entry.get("why") or entry.get("reason") or "ranked by the active-learning queue"
    return f"Why this task (#{entry.get('rank', '?')} in the queue {model}): {reason}"


def _note(client, task_id: int, text: str, meta_entry: dict | None) -> bool:
    """Set the text (and the meta entry); False when there was nothing to change."""
    task = client.stored_task(task_id)
    if task is None:  # deleted meanwhile
        return False
    data = dict(task.get("data") or {})
    meta = None
    if meta_entry is not None:
        meta = {**(task.get("meta") or {}), META_KEY: meta_entry}
    elif not data.get(WHY_FIELD):
        return False  # already clear
    data[WHY_FIELD] = text
    client.update_task(task_id, data=data, meta=meta)
    return True


def write_task_notes(
    client, top: list[dict], version: str, previous_top=(), cold_start: bool = False
) -> int:
    """Write why each queue-top task is there; clear the text on tasks that dropped out.

    Args:
        client: the ``LabelStudioClient`` (``stored_task``, ``update_task``).
        top: queue-top entries (``publish.queue_top``: task_id, rank, reason, why, ...).
        version: the prediction version just published (named in the text and the meta).
        previous_top: the entries of the queue top published before (their text is cleared
            unless they are in ``top`` again).
        cold_start: the version is a cold-start ordering (no model yet).

    Returns:
        how many tasks were written.

    Raises:
        LabelStudioUnavailable: Label Studio failed (best effort: the caller logs it).
    """
    current = {int(e["task_id"]) for e in top}
    notes = [
        (
            int(entry["task_id"]),
            why_text(entry, version, cold_start),
            {"model_version": version, **{k: v for k, v in entry.items() if k != "task_id"}},
        )
        for entry in top
    ]
    notes += [
        (int(entry["task_id"]), "", None)
        for entry in previous_top or ()
        if int(entry["task_id"]) not in current
    ]
    with ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="task-notes") as pool:
        return sum(pool.map(lambda note: _note(client, *note), notes))
