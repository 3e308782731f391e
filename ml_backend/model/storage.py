"""Versioned model files: ``MODEL_DIR/<project>/<version>/{weights.pt, meta.json}``.

A version appears all at once or not at all: ``save`` writes into a temporary folder inside the
project folder, fsyncs the files and the folder, then renames it into place. Readers ignore
temporary folders (names starting with a dot); the next ``save`` of the project removes those a
crash left behind. Version numbers only grow: ``.counter`` remembers the highest number ever
handed out, so pruning never lets a number be reused (Label Studio keeps predictions by version
name). torch is imported only inside ``save`` and ``load``, so listing versions is cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from ml_backend.errors import ModelNotReady

logger = logging.getLogger(__name__)

# Version names: the one place they are made and recognised. Trained versions are files here
# and predictions in Label Studio; a cold-start ordering is only predictions (no model yet).
PREFIX = "resnet18-v"
VERSION_RE = re.compile(r"^resnet18-v([1-9][0-9]*)$")
COLD_START_PREFIX = "coldstart-"


def cold_start_version(when: float | None = None) -> str:
    """The name of a cold-start ordering published at ``when`` (epoch seconds; now by default)."""
    import time

    return f"{COLD_START_PREFIX}{time.strftime('%Y%m%d-%H%M%S', time.gmtime(when))}"


def is_cold_start(version: str | None) -> bool:
    return bool(version) and version.startswith(COLD_START_PREFIX)


def is_backend_version(version: str) -> bool:
    """Whether a Label Studio prediction version was made by this backend."""
    return bool(VERSION_RE.match(version)) or is_cold_start(version)


WEIGHTS = "weights.pt"
META = "meta.json"
COUNTER = ".counter"
LOCK = ".lock"
TMP_PREFIX = ".tmp-"


@dataclasses.dataclass(frozen=True)
class VersionInfo:
    """One saved model version, as read from its ``meta.json``."""

    version: str
    number: int
    path: Path
    labels: list[str]
    num_classes: int
    metrics: dict
    timings: dict
    created_at: str
    image_size: int | None = None
    weights_source: str | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def weights_path(self) -> Path:
        """The ``state_dict`` file (usable as ``PRETRAINED`` / ``build_model`` path to warm-start)."""
        return self.path / WEIGHTS


def version_number(version: str) -> int:
    """``"resnet18-v12"`` -> 12; ``ValueError`` for anything else (guards paths from requests)."""
    match = VERSION_RE.match(version)
    if not match:
        raise ValueError(f"not a model version name: {version!r} (expected {PREFIX}<N>)")
    return int(match.group(1))


class ModelStore:
    """Model versions of every project under one folder.

    Args:
        model_dir: ``MODEL_DIR``; created on first save.
    """

    def __init__(self, model_dir: Path | str):
        self.model_dir = Path(model_dir)

    def project_dir(self, project: int) -> Path:
        """The folder of one project (project ids are ints; ``"7"`` is accepted, ``"../x"`` not)."""
        return self.model_dir / str(int(project))

    def next_version(self, project: int) -> str:
        """Reserve and return the next version name, one above any version ever made."""
        with self._locked(project) as folder:
            number = max(self._counter(folder), self._max_on_disk(folder)) + 1
            self._write_counter(folder, number)
        return f"{PREFIX}{number}"

    def save(
        self,
        project: int,
        version: str,
        model,
        labels: list[str],
        metrics: dict,
        timings: dict,
        extra: dict | None = None,
    ) -> Path:
        """Write a version atomically and return its folder.

        Args:
            project: Label Studio project id.
            version: A name from ``next_version``.
            model: The trained module; its ``state_dict`` is saved (moved to the CPU).
            labels: Class names in head order.
            metrics: JSON-able numbers (validation accuracy, ...).
            timings: Seconds per phase.
            extra: More JSON-able facts; ``image_size`` and ``weights_source`` are lifted to the
                top level of ``meta.json``.

        Raises:
            FileExistsError: the version already exists.
        """
        import torch

        number = version_number(version)
        extra = dict(extra or {})
        meta = {
            "version": version,
            "number": number,
            "labels": list(labels),
            "num_classes": len(labels),
            "image_size": extra.pop("image_size", None),
            "weights_source": extra.pop("weights_source", None),
            "metrics": metrics,
            "timings": timings,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "extra": extra,
        }
        meta_text = json.dumps(meta, indent=2, default=_json_default)
        # Plain contiguous CPU tensors: a channels_last GPU model loads anywhere.
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        with self._locked(project) as folder:
            final = folder / version
            if final.exists():
                raise FileExistsError(f"model version {final} already exists")
            self._remove_leftovers(folder)
            tmp = folder / f"{TMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                _write_weights(tmp / WEIGHTS, state, torch)
                _write_text(tmp / META, meta_text)
                _fsync_dir(tmp)
                os.rename(tmp, final)
                _fsync_dir(folder)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._write_counter(folder, max(number, self._counter(folder)))
        logger.info("Saved model %s for project %s in %s", version, project, final)
        return final

    def versions(self, project: int) -> list[VersionInfo]:
        """Every complete version of a project, oldest first (by number)."""
        folder = self.project_dir(project)
        if not folder.is_dir():
            return []
        found = []
        for entry in folder.iterdir():
            if VERSION_RE.match(entry.name) and entry.is_dir():
                info = _read_info(entry)
                if info is not None:
                    found.append(info)
        return sorted(found, key=lambda info: info.number)

    def latest(self, project: int) -> VersionInfo | None:
        """The newest version, or ``None`` before the first save."""
        found = self.versions(project)
        return found[-1] if found else None

    def get(self, project: int, version: str) -> VersionInfo:
        """One version's info; ``ModelNotReady`` when it does not exist."""
        version_number(version)
        info = _read_info(self.project_dir(project) / version)
        if info is None:
            raise ModelNotReady(f"project {project} has no model version {version}")
        return info

    def load(self, project: int, version: str | None = None, device="cpu"):
        """Load a version (default: the latest) as an eval-mode ResNet18 on ``device``.

        Returns:
            ``(model, VersionInfo)``.

        Raises:
            ModelNotReady: the project has no (such) version yet.
        """
        import torch

        from ml_backend.model.network import new_resnet18

        info = self.latest(project) if version is None else self.get(project, version)
        if info is None:
            raise ModelNotReady(
                f"project {project} has no trained model yet; label a few tasks (or start training) first"
            )
        model = new_resnet18(info.num_classes)
        state = torch.load(info.weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return model.to(device).eval(), info

    def prune(self, project: int, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions; returns the names removed."""
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        removed = []
        with self._locked(project) as folder:
            for info in self.versions(project)[:-keep]:
                # Rename first so no reader ever sees a half-deleted version.
                doomed = folder / f"{TMP_PREFIX}prune-{info.version}-{uuid.uuid4().hex[:8]}"
                os.rename(info.path, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
                removed.append(info.version)
        if removed:
            logger.info("Pruned model versions %s of project %s", ", ".join(removed), project)
        return removed

    @contextlib.contextmanager
    def _locked(self, project: int):
        folder = self.project_dir(project)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield folder
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _counter(folder: Path) -> int:
        try:
            return int((folder / COUNTER).read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    @staticmethod
    def _write_counter(folder: Path, number: int) -> None:
        tmp = folder / f"{COUNTER}.{uuid.uuid4().hex[:8]}"
        _write_text(tmp, f"{number}\n")
        os.replace(tmp, folder / COUNTER)

    @staticmethod
    def _max_on_disk(folder: Path) -> int:
        numbers = [int(m.group(1)) for e in folder.iterdir() if (m := VERSION_RE.match(e.name))]
        return max(numbers, default=0)

    @staticmethod
    def _remove_leftovers(folder: Path) -> None:
        for entry in folder.iterdir():
            if entry.name.startswith(TMP_PREFIX):
                logger.info("Removing %s left by an interrupted save", entry)
                shutil.rmtree(entry, ignore_errors=True)


def _read_info(path: Path) -> VersionInfo | None:
    try:
        meta = json.loads((path / META).read_text())
        return VersionInfo(
            version=meta["version"],
            number=version_number(meta["version"]),
            path=path,
            labels=list(meta["labels"]),
            num_classes=int(meta["num_classes"]),
            metrics=meta.get("metrics") or {},
            timings=meta.get("timings") or {},
            created_at=meta.get("created_at", ""),
            image_size=meta.get("image_size"),
            weights_source=meta.get("weights_source"),
            extra=meta.get("extra") or {},
        )
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("Ignoring model folder %s: unreadable %s (%s)", path, META, exc)
        return None


def _write_weights(path: Path, state: dict, torch) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_default(value):
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
