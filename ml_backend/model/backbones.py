"""Pretrained backbones on disk: ``MODEL_DIR/<project>/backbones/b<n>/{backbone.pt, meta.json}``.

Written like ``storage.ModelStore`` versions: into a temporary folder (name starting with a dot)
that is fsynced and renamed into place, so a backbone appears whole or not at all. Numbers only
grow. A served model version is trained from one of these, never from another served version.

A pretraining that runs in slices keeps its state between them in ``backbones/in-progress.pt``
(the same atomic write), until it stores its backbone.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from ml_backend.errors import BackendError

logger = logging.getLogger(__name__)

FOLDER = "backbones"
WEIGHTS = "backbone.pt"
META = "meta.json"
TMP_PREFIX = ".tmp-"
LAST_TRY = "last_try.json"
CHECKPOINT = "in-progress.pt"
CHECKPOINT_CONTEXT = "in-progress.json"


class BackboneError(BackendError):
    """A stored backbone cannot be read (missing or corrupt file); pretraining again fixes it."""


class BackboneStore:
    """Backbones of every project under ``model_dir``: the self-supervised ones (``b<n>`` in
    ``backbones/``), or with ``kind="finetuned"`` the fine-tuned networks the fast path puts
    heads on (``f<n>`` in ``finetuned/``)."""

    def __init__(self, model_dir: Path | str, kind: str = "self-supervised"):
        self.model_dir = Path(model_dir)
        self.subfolder, self.prefix = ("finetuned", "f") if kind == "finetuned" else (FOLDER, "b")
        self.name_re = re.compile(rf"^{self.prefix}([1-9][0-9]*)$")

    def folder(self, project_id: int) -> Path:
        """``MODEL_DIR/<project>/backbones`` (project ids are ints)."""
        return self.model_dir / str(int(project_id)) / self.subfolder

    def names(self, project_id: int) -> list[str]:
        """Complete backbones of a project, oldest first."""
        folder = self.folder(project_id)
        if not folder.is_dir():
            return []
        found = [e.name for e in folder.iterdir() if self.name_re.match(e.name) and e.is_dir()]
        return sorted(found, key=_number)

    def save(
        self,
        project_id: int,
        result,
        *,
        image_size: int,
        pool_key: str,
        pool_size: int,
        extra: dict | None = None,
    ) -> str:
        """Write ``result`` (a ``PretrainResult``, or anything with its fields) as the next
        backbone, ``extra`` added to its meta; returns its name."""
        import torch

        folder = self.folder(project_id)
        folder.mkdir(parents=True, exist_ok=True)
        for entry in folder.iterdir():
            if entry.name.startswith(TMP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
        number = max((_number(n) for n in self.names(project_id)), default=0) + 1
        name = f"{self.prefix}{number}"
        meta = {
            **(extra or {}),
            "name": name,
            "image_size": int(image_size),
            "pool_key": str(pool_key),
            "pool_size": int(pool_size),
            "epochs": int(result.epochs),
            "images_seen": int(result.images_seen),
            "seconds": float(result.seconds),
            "loss": result.loss,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        tmp = folder / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            with open(tmp / WEIGHTS, "wb") as f:
                torch.save(result.state_dict, f)
                f.flush()
                os.fsync(f.fileno())
            with open(tmp / META, "w", encoding="utf-8") as f:
                f.write(json.dumps(meta, indent=2))
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, folder / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("Saved backbone %s of project %s (%s)", name, project_id, pool_key)
        return name

    def latest(self, project_id: int) -> tuple[str, dict, dict] | None:
        """``(name, state_dict, meta)`` of the newest backbone, ``None`` when there is none.

        Raises:
            BackboneError: The newest backbone's files are missing or unreadable.
        """
        import torch

        names = self.names(project_id)
        if not names:
            return None
        path = self.folder(project_id) / names[-1]
        try:
            meta = json.loads((path / META).read_text())
            state = torch.load(path / WEIGHTS, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "conv1.weight" not in state:
                raise ValueError("not a ResNet18 backbone state_dict")
        except Exception as exc:
            raise BackboneError(
                f"backbone {path} cannot be read ({_reason(exc)}); delete the "
                "folder and retrain, which pretrains a new one"
            ) from exc
        return names[-1], state, meta

    def last_try(self, project_id: int) -> dict | None:
        """What :meth:`record_try` wrote last (``None``: never, or unreadable)."""
        try:
            return json.loads((self.folder(project_id) / LAST_TRY).read_text())
        except (OSError, ValueError):
            return None

    def record_try(self, project_id: int, info: dict) -> None:
        """Remember an attempt (e.g. a fine-tune that lost), written atomically."""
        folder = self.folder(project_id)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{TMP_PREFIX}{LAST_TRY}-{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(info, indent=2), encoding="utf-8")
        os.replace(tmp, folder / LAST_TRY)

    def save_checkpoint(
        self, project_id: int, checkpoint: dict, info: dict, context: dict | None = None
    ) -> None:
        """Keep an unfinished pretraining's ``checkpoint`` (``pretrain.PretrainResult``) with
        ``info`` (what it must match to go on: image size, initial weights), atomically, and
        ``context`` (JSON: what the next slice may need without Label Studio) beside it."""
        import torch

        folder = self.folder(project_id)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{TMP_PREFIX}{CHECKPOINT}-{uuid.uuid4().hex[:8]}"
        side = folder / f"{TMP_PREFIX}{CHECKPOINT_CONTEXT}-{uuid.uuid4().hex[:8]}"
        try:
            side.write_text(json.dumps(context or {}), encoding="utf-8")
            with open(tmp, "wb") as f:
                torch.save({"info": dict(info), "checkpoint": checkpoint}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(side, folder / CHECKPOINT_CONTEXT)
            os.replace(tmp, folder / CHECKPOINT)
        except BaseException:
            tmp.unlink(missing_ok=True)
            side.unlink(missing_ok=True)
            raise

    def checkpoint_context(self, project_id: int) -> dict | None:
        """The ``context`` saved with the unfinished pretraining's checkpoint; None without one."""
        folder = self.folder(project_id)
        if not (folder / CHECKPOINT).is_file():
            return None
        try:
            return json.loads((folder / CHECKPOINT_CONTEXT).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def load_checkpoint(self, project_id: int, info: dict) -> dict | None:
        """The unfinished pretraining's checkpoint when its ``info`` equals ``info``; None when
        there is none. One that does not match or cannot be read is deleted, with a warning."""
        import torch

        path = self.folder(project_id) / CHECKPOINT
        if not path.is_file():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            found = saved["info"]
            checkpoint = saved["checkpoint"]
        except Exception as exc:
            logger.warning("pretraining checkpoint %s cannot be read (%s); starting over",
                           path, _reason(exc))  # fmt: skip
            self.drop_checkpoint(project_id)
            return None
        if found != dict(info):
            logger.warning("pretraining checkpoint %s was made for %s, not %s; starting over",
                           path, found, dict(info))  # fmt: skip
            self.drop_checkpoint(project_id)
            return None
        return checkpoint

    def drop_checkpoint(self, project_id: int) -> None:
        (self.folder(project_id) / CHECKPOINT).unlink(missing_ok=True)
        (self.folder(project_id) / CHECKPOINT_CONTEXT).unlink(missing_ok=True)

    def prune(self, project_id: int, keep: int = 2) -> list[str]:
        """Delete all but the newest ``keep`` backbones; returns the names removed."""
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        folder = self.folder(project_id)
        removed = []
        for name in self.names(project_id)[:-keep]:
            doomed = folder / f"{TMP_PREFIX}prune-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(folder / name, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(name)
        return removed


def _number(name: str) -> int:
    return int(name[1:])


def _reason(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 160 characters (torch's are pages long)."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
