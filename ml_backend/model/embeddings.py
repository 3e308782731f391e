"""Embeddings cached per (image, backbone): a job embeds only the images it has not seen.

One retrain needs the pool's embeddings under up to three frozen backbones (the project's
self-supervised one, the PRETRAINED weights, and the backbone under the served head), and the
next retrain needs them again. They depend only on the image and the backbone's weights, so they
are kept on disk and a job computes only what is new: images added since, and every image once
per new backbone (after pretraining again, or a fine-tune).

A backbone is named by a hash of its weights (``fc`` excluded) and the image size
(:func:`backbone_key`); an image by a hash of its URL (the image cache's own key, so an image
whose content changes at the same URL is stale here exactly as it is there). Files:
``MODEL_DIR/<project>/embeddings/<backbone key>/part-<n>.npz``, each with ``keys`` (``S16``) and
``vectors`` (``float32 [n, 512]``); a job appends one part with the rows it computed, written
atomically, and parts are merged into one past ``MAX_PARTS``. The ``KEEP`` most recently used
backbones of a project are kept; older ones are deleted. Disk: 2 KiB per image and backbone
(20 MiB for 10,000 images).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ml_backend.model.network import EMBEDDING_DIM

log = logging.getLogger(__name__)

KEEP = 4
MAX_PARTS = 16
# Parts read by this process stay in memory, read-only, up to this many bytes (least recently used
# out first): a part is never changed once written (new rows go to a new file, a merge writes a
# new one), so its path, size and mtime name its content. A worker (one process for every job)
# then reads a 100,000-image backbone's 200 MB once instead of on every label (0.7 s each).
MEMO_BYTES = 1 << 30
_memo: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
_memo_lock = threading.Lock()
# Images are embedded this many at a time when only some are missing (bounded memory: the rows
# to embed are copied out of the pool one chunk at a time).
CHUNK = 4096


def image_key(url: str) -> bytes:
    """The 16-byte cache key of an image URL."""
    return hashlib.sha256(url.encode()).hexdigest()[:16].encode()


def backbone_key(model: nn.Module, image_size: int) -> str:
    """A name for the backbone of ``model`` (its weights except ``fc``) at ``image_size``."""
    h = hashlib.blake2b(digest_size=8)
    h.update(str(int(image_size)).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith("fc."):
            continue
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class EmbeddingCache:
    """The cached embeddings of one project.

    Args:
        root: ``MODEL_DIR``.
        project_id: the Label Studio project.
        keep: how many backbones' embeddings to keep.
    """

    def __init__(self, root: str | Path, project_id: int, keep: int = KEEP):
        self.dir = Path(root) / str(int(project_id)) / "embeddings"
        self.keep = keep

    def lookup(self, backbone: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors, missing)``: ``float32 [n, 512]`` rows for ``keys`` (zeros where missing)
        and the indices of the keys that have no row yet. When one part holds every key in
        order, ``vectors`` is that part's own array, kept in memory for later lookups
        (``MEMO_BYTES``) and read-only: copy it to change it."""
        vectors = None  # allocated on first need: a fresh 200 MB array costs ~0.6 s of page faults
        found = np.zeros(len(keys), dtype=bool)
        folder = self.dir / backbone
        if folder.is_dir():
            os.utime(folder)  # most recently used: kept by prune
            keys = np.asarray(keys, dtype="S16")
            parts = sorted(folder.glob("part-*.npz"))
            _forget(folder, keep=parts)  # parts merged away since
            for part in parts:
                try:
                    part_keys, part_vectors = _read_part(part)
                except (OSError, ValueError, KeyError) as exc:  # damaged: recomputed
                    log.warning("embedding cache part %s unreadable (%s); ignored", part, exc)
                    continue
                dst, src = _matches(keys, np.asarray(part_keys, dtype="S16"))
                if not len(dst):
                    continue
                if vectors is None and len(dst) == len(keys):  # one part has every row
                    same = len(src) == len(part_vectors) and (src == np.arange(len(src))).all()
                    vectors = part_vectors if same else part_vectors[src]  # no copy when aligned
                else:  # a later part's row wins, as in _merge
                    if vectors is None:
                        vectors = np.zeros((len(keys), EMBEDDING_DIM), dtype=np.float32)
                    elif not vectors.flags.writeable:  # an earlier part's own array
                        vectors = vectors.copy()
                    vectors[dst] = part_vectors[src]
                found[dst] = True
        if vectors is None:
            vectors = np.zeros((len(keys), EMBEDDING_DIM), dtype=np.float32)
        return vectors, np.flatnonzero(~found)

    def add(self, backbone: str, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Store rows (one new part, atomically); merge parts past ``MAX_PARTS``; prune."""
        if len(keys) == 0:
            return
        folder = self.dir / backbone
        folder.mkdir(parents=True, exist_ok=True)
        parts = sorted(folder.glob("part-*.npz"))
        number = 1 + max((int(p.stem.split("-")[1]) for p in parts), default=0)
        _write(folder / f"part-{number:06d}.npz", keys, vectors)
        if len(parts) + 1 > MAX_PARTS:
            self._merge(folder)
        self.prune()

    def prune(self) -> list[str]:
        """Delete all but the ``keep`` most recently used backbones; returns what was deleted."""
        if not self.dir.is_dir():
            return []
        folders = sorted(
            (p for p in self.dir.iterdir() if p.is_dir()),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        gone = []
        for old in folders[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)
            _forget(old)
            gone.append(old.name)
        return gone

    def _merge(self, folder: Path) -> None:
        parts = sorted(folder.glob("part-*.npz"))
        keys, vectors = [], []
        for part in parts:
            with np.load(part) as data:
                keys.append(data["keys"])
                vectors.append(data["vectors"])
        all_keys = np.concatenate(keys)
        # The newest row of a key wins (later parts come later).
        _, last = np.unique(all_keys[::-1], return_index=True)
        rows = np.sort(len(all_keys) - 1 - last)
        merged = folder / f"part-{int(parts[-1].stem.split('-')[1]) + 1:06d}.npz"
        _write(merged, all_keys[rows], np.concatenate(vectors)[rows])
        for part in parts:
            part.unlink()


def _read_part(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, vectors)`` of a part, from this process's memory when it read it before
    (``MEMO_BYTES``); the arrays are read-only."""
    st = os.stat(path)
    name = (str(path), st.st_size, st.st_mtime_ns)
    with _memo_lock:
        hit = _memo.get(name)
        if hit is not None:
            _memo.move_to_end(name)
            return hit
    with np.load(path) as data:
        keys, vectors = data["keys"], data["vectors"]
    keys.flags.writeable = False
    vectors.flags.writeable = False
    if keys.nbytes + vectors.nbytes <= MEMO_BYTES:
        with _memo_lock:
            _memo[name] = (keys, vectors)
            total = sum(k.nbytes + v.nbytes for k, v in _memo.values())
            while total > MEMO_BYTES:
                _, (k, v) = _memo.popitem(last=False)
                total -= k.nbytes + v.nbytes
    return keys, vectors


def _forget(folder: Path, keep=()) -> None:
    """Drop the memo's parts of ``folder`` except ``keep``."""
    inside, kept = str(folder) + os.sep, {str(p) for p in keep}
    with _memo_lock:
        for name in [n for n in _memo if n[0].startswith(inside) and n[0] not in kept]:
            del _memo[name]


def _matches(keys: np.ndarray, part_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(dst, src)``: ``keys[dst] == part_keys[src]`` for every key found in the part (sorted
    search, no Python loop: 100,000 keys in ~50 ms); of repeated part keys the last row wins."""
    if not len(keys) or not len(part_keys):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(part_keys, kind="stable")
    sorted_keys = part_keys[order]
    at = np.searchsorted(sorted_keys, keys, side="right") - 1  # the last of equal keys
    at = np.clip(at, 0, len(sorted_keys) - 1)
    hit = sorted_keys[at] == keys
    return np.flatnonzero(hit), order[at[hit]]


def _write(path: Path, keys: np.ndarray, vectors: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, keys=np.asarray(keys, dtype="S16"), vectors=vectors.astype(np.float32))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_embeddings(
    cache: EmbeddingCache | None,
    model: nn.Module,
    images: np.ndarray,
    keys: np.ndarray | None,
    embed: Callable[[np.ndarray], np.ndarray],
    backbone: str | None = None,
    embed_rows: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, dict]:
    """Embeddings of ``images`` under ``model``'s backbone, computing only the missing rows.

    Args:
        cache: the project's cache, or None (compute everything, store nothing).
        model: the network whose backbone embeds.
        images: ``uint8 [N, S, S, 3]`` (a memmap is read in chunks, never copied whole).
        keys: the image keys (``S16 [N]``), or None (no cache).
        embed: computes ``float32 [n, 512]`` embeddings of a ``uint8`` batch of images.
        backbone: ``backbone_key(model, size)`` when the caller has it (hashing costs ~50 ms).
        embed_rows: computes the embeddings of the missing rows (indices into ``images``) when
            the caller does it its own way (``jobs.fanout``: over every worker); None: ``embed``
            here.

    Returns:
        ``(embeddings, info)``, ``info`` saying how many rows came from the cache and how long
        the rest took.
    """
    t0 = time.monotonic()
    if cache is None or keys is None:
        vectors = embed(images)
        return vectors, {"cached": 0, "computed": len(images), "seconds": time.monotonic() - t0}
    if backbone is None:
        backbone = backbone_key(model, images.shape[1] if images.ndim == 4 else 0)
    vectors, missing = cache.lookup(backbone, keys)
    if embed_rows is not None and len(missing):
        vectors[missing] = embed_rows(missing)
    elif len(missing) == len(images):
        vectors = embed(images)  # the whole pool: read it in order, no copy
    else:
        for start in range(0, len(missing), CHUNK):
            rows = missing[start : start + CHUNK]
            vectors[rows] = embed(images[rows])
    cache.add(backbone, keys[missing], vectors[missing])
    info = {
        "backbone": backbone,
        "cached": len(images) - len(missing),
        "computed": len(missing),
        "seconds": time.monotonic() - t0,
    }
    return vectors, info


def head_probs(model: nn.Module, embeddings: np.ndarray, batch: int = 65536) -> np.ndarray:
    """``float32 [N, C]`` softmax of ``model.fc`` on ``embeddings`` (what ``predict`` returns)."""
    weight = model.fc.weight.detach().float().cpu()
    bias = model.fc.bias.detach().float().cpu()
    out = np.empty((len(embeddings), weight.shape[0]), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(embeddings), batch):
            with warnings.catch_warnings():  # the memo's read-only rows are only read here
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                x = torch.from_numpy(np.ascontiguousarray(embeddings[start : start + batch]))
            out[start : start + batch] = F.linear(x, weight, bias).softmax(dim=1).numpy()
    return out
