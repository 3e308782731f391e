"""The pool a retrain works on: every task of a project with a decoded image and its label.

Takes every task of the project as the task index has it (``pipeline.task_index``: read from Label
Studio, never from the webhook payload, so no annotation is missed), applies the label rules,
and fetches images through the on-disk cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import Counter
from collections.abc import Iterable

import numpy as np

from ml_backend.labelstudio.labels import LabelSpec, LabelTally, image_url, task_label
from ml_backend.model.embeddings import image_key

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Pool:
    """Tasks with a usable image, aligned row by row.

    Attributes:
        task_ids: Label Studio task ids, int64 [M].
        images: uint8 [M, S, S, 3]: an array, or ``CachedImages`` (read from the image cache
            when rows are asked for).
        labels: int64 [M], index into ``label_names`` or -1 for an unlabeled task.
        label_names: the labels of the project's config, in config order.
        skipped: task id -> why the task is not in the pool (no image field, fetch failure).
        label_problems: task id -> why its annotation was ignored (e.g. label outside the config).
        image_keys: ``S16 [M]`` keys of the images' URLs (``model.embeddings.image_key``), for
            the embedding cache; None when the pool was built from arrays.
    """

    task_ids: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    label_names: list[str]
    skipped: dict[int, str]
    label_problems: dict[int, str]
    image_keys: np.ndarray | None = None

    @property
    def labeled_mask(self) -> np.ndarray:
        return self.labels >= 0

    @property
    def n_labeled(self) -> int:
        return int(self.labeled_mask.sum())

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.labels[self.labeled_mask].tolist())
        return {name: counts.get(i, 0) for i, name in enumerate(self.label_names)}

    def fingerprint(self) -> str:
        """A hash of the labeled set (task id, label) and the label list: same hash, same data."""
        h = hashlib.sha256("\x1f".join(self.label_names).encode())
        mask = self.labeled_mask
        h.update(self.task_ids[mask].astype(np.int64).tobytes())
        h.update(self.labels[mask].astype(np.int64).tobytes())
        return h.hexdigest()[:16]

    def trainable_reason(self, min_labels: int) -> str | None:
        """None when a model can be trained, otherwise why not (shown in the status)."""
        present = [name for name, n in self.class_counts().items() if n > 0]
        if self.n_labeled == 0:
            return "no labels yet"
        if len(present) < 2:
            return f"only one class labeled ({present[0]}); need at least two"
        if self.n_labeled < min_labels:
            return f"{self.n_labeled} labels; MIN_LABELS is {min_labels}"
        return None


def read_tasks(tasks: Iterable[dict], spec: LabelSpec):
    """Split tasks into (task id, image url) items and labels; collect what was skipped and why."""
    items: list[tuple[int, str]] = []
    labels: dict[int, int] = {}
    skipped: dict[int, str] = {}
    problems: dict[int, str] = {}
    index = {name: i for i, name in enumerate(spec.labels)}
    tally = LabelTally(spec)  # one warning per job for a renamed <Choices>, not one per task
    for task in tasks:
        task_id = int(task["id"])
        url, why = image_url(task, spec)
        if url is None:
            skipped[task_id] = why or "no image"
            continue
        items.append((task_id, url))
        label, problem = task_label(task, spec, tally)
        if problem:
            problems[task_id] = problem
        if label is not None:
            labels[task_id] = index[label]
    if summary := tally.summary():
        log.warning("%s", summary)
    return items, labels, skipped, problems


def build_pool(tasks: Iterable[dict], spec: LabelSpec, image_cache, lazy: bool = False) -> Pool:
    """Read tasks, fetch their images (cached) and return the aligned pool.

    ``image_cache``: an ``ImageCache``, or a function of the ``(task_id, url)`` items that returns
    one (``IMAGE_SIZE=auto`` chooses the size from a sample of them). ``lazy``: the pool's images
    stay in the cache (``ImageCache.fetch_lazy``) and are read when rows are asked for.
    """
    items, labels, skipped, problems = read_tasks(tasks, spec)
    if not hasattr(image_cache, "fetch_arrays"):
        image_cache = image_cache(items)
    if problems:
        sample = "; ".join(f"task {t}: {p}" for t, p in list(problems.items())[:5])
        log.warning(
            "ignored %d annotation(s) that do not fit the config: %s", len(problems), sample
        )
    if skipped:
        sample = "; ".join(f"task {t}: {p}" for t, p in list(skipped.items())[:5])
        log.warning("%d task(s) have no image to use: %s", len(skipped), sample)
    fetch = (lazy and getattr(image_cache, "fetch_lazy", None)) or image_cache.fetch_arrays
    arrays, ok_ids, failures = fetch(items)
    for task_id, reason in failures.items():
        skipped[int(task_id)] = reason
    if failures:
        log.warning(
            "%d image(s) could not be fetched or decoded; those tasks are skipped", len(failures)
        )
    ok = np.asarray(ok_ids, dtype=np.int64)
    label_arr = np.array([labels.get(int(t), -1) for t in ok], dtype=np.int64)
    url_of = dict(items)
    keys = np.array([image_key(url_of[int(t)]) for t in ok], dtype="S16")
    return Pool(
        task_ids=ok,
        images=arrays,
        labels=label_arr,
        label_names=list(spec.labels),
        skipped=skipped,
        label_problems=problems,
        image_keys=keys,
    )
