"""Thumbnails of the tasks at the top of a project's queue, for the dashboard.

The browser cannot load task images itself: they sit behind Label Studio's login, in buckets, or
on hosts only the backend may reach. So the dashboard asks ``/dashboard/thumbnail/<p>/<t>`` and
this module fetches the image with the backend's token, through the same ``ImageCache`` (disk
cache, ``IMAGE_HOSTS`` policy, private-address guard, ``MAX_IMAGE_BYTES``) the worker uses.

What it will fetch, so the route cannot be turned into a way to read arbitrary URLs or tasks:
only tasks listed in the project's stored queue top (written by the job), only when Label Studio
says the task belongs to that project, and only the URL in the task's own image field.
"""

from __future__ import annotations

import collections
import io
import threading
import time

from PIL import Image

from ml_backend.config import Settings
from ml_backend.errors import BackendError, ImageError, LabelStudioUnavailable, ProjectNotFound
from ml_backend.jobs.state import StatusStore

THUMB_PX = 160
CACHE_ENTRIES = 256
SPEC_TTL_S = 60.0


class NotInQueueTop(BackendError):
    """The task is not among the project's stored queue top (or not in the project)."""

    http_status = 404


class Thumbnails:
    """JPEG thumbnails of queue-top tasks, cached in memory.

    Args:
        settings: the backend's settings (Label Studio, image policy, MODEL_DIR, IMAGE_SIZE).
        client_factory: makes the Label Studio client (tests pass their own).
    """

    def __init__(self, settings: Settings, client_factory=None):
        self.settings = settings
        self._client_factory = client_factory
        self._client = None
        self._specs: dict[int, tuple[float, object]] = {}
        self._cache: collections.OrderedDict[tuple, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _ls(self):
        if self._client is None:
            if self._client_factory is not None:
                self._client = self._client_factory()
            else:
                from ml_backend.labelstudio.client import LabelStudioClient

                self._client = LabelStudioClient(self.settings, attempts=2, timeout=15)
        return self._client

    def _spec(self, project: int):
        cached = self._specs.get(project)
        if cached and time.monotonic() - cached[0] < SPEC_TTL_S:
            return cached[1]
        spec = self._ls().label_spec(project)
        self._specs[project] = (time.monotonic(), spec)
        return spec

    def jpeg(self, store: StatusStore, project: int, task_id: int) -> bytes:
        """The thumbnail of ``task_id`` as JPEG bytes.

        Raises:
            NotInQueueTop: the task is not in the project's stored queue top, or Label Studio
                puts it in another project.
            ImageError: the image could not be fetched or decoded (the reason says why).
            LabelStudioUnavailable, ConfigError: Label Studio cannot be asked.
        """
        if task_id not in {int(e.get("task_id", -1)) for e in store.read_queue_top(project)}:
            raise NotInQueueTop(f"task {task_id} is not at the top of project {project}'s queue")
        from ml_backend.labelstudio.images import ImageCache
        from ml_backend.labelstudio.labels import image_url

        with self._lock:  # one Label Studio connection; thumbnails are small and mostly cached
            client = self._ls()
            task = _task_dict(client, task_id)
            if int(task.get("project") or -1) != project:
                raise NotInQueueTop(f"task {task_id} is not in project {project}")
            url, problem = image_url(task, self._spec(project))
            if url is None:
                raise ImageError(problem)
            key = (project, task_id, url)
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            arrays, ok, failures = ImageCache(self.settings, client).fetch_arrays([(task_id, url)])
            if not ok:
                raise ImageError(failures.get(task_id, "the image could not be fetched"))
            data = _encode(arrays[0])
            self._cache[key] = data
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
            return data


def _task_dict(client, task_id: int) -> dict:
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    try:
        task = client.sdk.tasks.get(id=str(task_id))
    except ApiError as exc:
        if exc.status_code == 404:
            raise ProjectNotFound(f"Label Studio has no task {task_id}") from None
        raise LabelStudioUnavailable(
            f"Label Studio answered HTTP {exc.status_code} reading task {task_id}"
        ) from None
    except httpx.TransportError as exc:
        raise LabelStudioUnavailable(
            f"cannot reach Label Studio to read task {task_id} ({type(exc).__name__})"
        ) from None
    return task.model_dump() if hasattr(task, "model_dump") else dict(task)


def _encode(array) -> bytes:
    image = Image.fromarray(array)
    if max(image.size) > THUMB_PX:
        image = image.resize((THUMB_PX, THUMB_PX), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()
