"""Answers ``/predict``: the project's current model version on the tasks Label Studio sends.

Imported lazily by the web app (torch is loaded on the first ``/predict``, never for webhooks).
Models are loaded once per (project, version) and kept; a new version is picked up on the next
call because the version comes from the status store the worker writes.
"""

from __future__ import annotations

import logging
import threading

from ml_backend.errors import ModelNotReady
from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.images import ImageCache
from ml_backend.labelstudio.labels import choice_result, image_url, parse_config
from ml_backend.model.inference import predict
from ml_backend.model.network import resolve_device
from ml_backend.model.storage import ModelStore, is_cold_start

log = logging.getLogger(__name__)


class Predictor:
    """Thread-safe predictions for the web app.

    Args:
        settings: the backend's Settings.
        status: a StatusStore; its ``model_version(project)`` is the version that went live.
            Without it (or before any job), the newest version on disk is used.
    """

    def __init__(self, settings, status=None):
        self.settings = settings
        self.status = status
        self.store = ModelStore(settings.model_dir)
        self._models: dict[tuple[int, str], tuple] = {}
        self._lock = threading.Lock()
        self._client = None

    def _version(self, project_id: int):
        live = self.status.model_version(project_id) if self.status is not None else None
        if live and not is_cold_start(live):
            for info in self.store.versions(project_id):
                if info.version == live:
                    return info
        if is_cold_start(live):
            raise ModelNotReady(
                f"project {project_id} has no trained model yet (queue ordered by cold start)"
            )
        info = self.store.latest(project_id)
        if info is None:
            raise ModelNotReady(
                f"project {project_id} has no trained model yet; submit labels of two classes"
            )
        return info

    def _model(self, project_id: int, info):
        key = (project_id, info.version)
        if key not in self._models:
            device = resolve_device(self.settings.device)
            model, _ = self.store.load(project_id, info.version, device=device)
            # Keep only the newest version per project resident.
            for old in [k for k in self._models if k[0] == project_id]:
                del self._models[old]
            self._models[key] = (model, device)
            log.info("project %s: loaded %s for /predict on %s", project_id, info.version, device)
        return self._models[key]

    def _ls(self) -> LabelStudioClient:
        """The Label Studio client, made on first need (only /predict needs one)."""
        if self._client is None:
            self._client = LabelStudioClient(self.settings)
        return self._client

    def _image_cache(self, size: int | None) -> ImageCache:
        return ImageCache(self.settings, self._ls(), size=size)

    def predict(
        self, project_id: int, tasks: list[dict], label_config: str | None = None
    ) -> list[dict]:
        """One ``{"result", "score", "model_version"}`` per task, in order.

        ``score`` here is the model's confidence in its choice. Tasks whose image cannot be
        used get an empty result (logged with the task id) instead of failing the batch.
        """
        info = self._version(project_id)
        spec = parse_config(label_config) if label_config else self._label_spec(project_id)
        items, rows = [], {}
        for i, task in enumerate(tasks):
            url, why = image_url(task, spec)
            if url is None:
                log.warning(
                    "project %s: task %s has no image to predict (%s)",
                    project_id,
                    task.get("id"),
                    why,
                )
                continue
            task_id = int(task.get("id", -(i + 1)))
            rows[task_id] = i
            items.append((task_id, url))
        empty = {"result": [], "score": 0.0, "model_version": info.version}
        results = [dict(empty) for _ in tasks]
        if not items:
            return results
        arrays, ok_ids, _failures = self._image_cache(info.image_size).fetch_arrays(items)
        with self._lock:
            model, device = self._model(project_id, info)
            probs, _ = predict(
                model, arrays, device=device, batch_size=self.settings.inference_batch_size
            )
        for row, task_id in enumerate(ok_ids):
            best = int(probs[row].argmax())
            label = info.labels[best]
            if label not in spec.labels:
                log.warning(
                    "project %s: %s predicts %r, which the config no longer has",
                    project_id,
                    info.version,
                    label,
                )
                continue
            results[rows[int(task_id)]] = {
                "result": choice_result(spec, label),
                "score": round(float(probs[row][best]), 6),
                "model_version": info.version,
            }
        return results

    def _label_spec(self, project_id: int):
        return self._ls().label_spec(project_id)
