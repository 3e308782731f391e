"""Task image URLs -> decoded, resized ``uint8 [S, S, 3]`` arrays, cached on disk.

URLs are resolved here with ``requests`` rather than the SDK's ``get_local_path``: that helper
lives in a private SDK module (``_extensions``), has no per-download timeout or size cap, follows
redirects itself and reads ``LOCAL_FILES_DOCUMENT_ROOT`` from the environment. Owning the few
lines lets us bound every download (MAX_IMAGE_BYTES, IMAGE_FETCH_TIMEOUT), run them
concurrently and decide, hop by hop, where a download may go (``hosts.HostPolicy``) and where
the Authorization header goes: only to the Label Studio origin (scheme, host and port of
LABEL_STUDIO_URL), and only while every hop so far was there. Never to the cloud host a presign
redirect points at, nor to any other host, nor back to Label Studio after a detour elsewhere
(that hop's URL was chosen by the other host).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import numpy as np
import requests
from PIL import Image, ImageOps

from ml_backend.config import Settings
from ml_backend.errors import ImageError
from ml_backend.labelstudio.hosts import GuardedAdapter, HostPolicy, PeerRefused, guard, origin

log = logging.getLogger(__name__)

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")  # nothing else is even parsed
DEFAULT_MAX_PIXELS = 100_000_000
PERCENTILES = (0.5, 99.5)  # high-bit-depth images: these percentiles map to 0 and 255
CLOUD_SCHEMES = ("s3", "gs", "gcs", "azure-blob", "azure-spi")
MAX_REDIRECTS = 5
DEFAULT_SIZE = 224  # IMAGE_SIZE=auto before a project's size is known
IN_MEMORY_LIMIT = 2 << 30  # larger pools go to an unlinked memory-mapped temp file
CACHE_HEADER_BYTES = 128  # np.save's header of a uint8 [S, S, 3] array (format 1.0)
_HIGH_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
# URLs whose cache entry this process has already seen whole, per cache folder and size: a
# worker (a SimpleWorker, one process for every job) checks 100,000 entries in 1.8 s of hashing
# and stat calls, and a set lookup in milliseconds. An entry deleted later is fetched again
# where it is read (``read_rows``), and leaves the set there. Past ``KNOWN_LIMIT`` URLs per
# folder the set starts over (about 100 bytes per URL).
KNOWN_LIMIT = 5_000_000
_known_cached: dict[str, set[str]] = {}
_known_lock = threading.Lock()
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, draft_size: int | None = None
):
    """Decode image bytes to an RGB PIL image.

    First frame of animations and multi-page TIFFs; EXIF orientation applied (browsers show it
    so); alpha composited over white; 16/32-bit and float single-channel images (microscopy
    TIFFs) scaled to 8 bits between their 0.5th and 99.5th percentiles, so a few hot pixels do
    not turn the rest black.

    Args:
        data: the file's bytes (png, jpeg, bmp, gif, tiff, webp).
        max_pixels: width x height above which the image is refused before decoding
            (decompression bombs). Pillow's own process-wide guard still refuses anything over
            twice ``Image.MAX_IMAGE_PIXELS`` (about 179 M pixels); we do not change it.
        draft_size: lets JPEG decode at a reduced scale not below this size (much faster).

    Raises:
        ImageError: not a supported image, corrupt, or too large.
    """
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"refused as a decompression bomb ({exc})") from None
    except Exception as exc:  # Pillow raises many types on garbage input
        raise ImageError(f"not a readable image ({', '.join(FORMATS).lower()}): {exc}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            f"{width} x {height} = {width * height} pixels is over MAX_IMAGE_PIXELS={max_pixels} "
            "(decompression-bomb guard); raise MAX_IMAGE_PIXELS if such images are expected"
        )
    try:
        img.seek(0)
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"refused as a decompression bomb ({exc})") from None
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageError(f"corrupt or truncated image data: {exc}") from None


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    step = max(1, int(np.sqrt(arr.size / 250_000)))  # percentiles from ~250k samples suffice
    sample = arr[::step, ::step].astype(np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return Image.new("L", img.size)
    low, high = np.percentile(sample, PERCENTILES)
    if high <= low:
        low, high = float(sample.min()), float(sample.max())
    if high <= low:
        return Image.new("L", img.size)
    if arr.dtype == np.uint16:  # a 65536-entry lookup table beats float math per pixel
        lut = np.clip((np.arange(65536) - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
        return Image.fromarray(lut[arr], mode="L")
    scaled = np.nan_to_num((arr.astype(np.float32) - low) * (255.0 / (high - low)), nan=0.0)
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _HIGH_BIT_MODES:
        return _scale_to_8bit(img).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGB", img.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return img if img.mode == "RGB" else img.convert("RGB")


def to_array(img: Image.Image, size: int) -> np.ndarray:
    """Resize the whole frame to ``size x size`` and return ``uint8 [size, size, 3]``.

    The whole frame is squeezed rather than center-cropped: a crop can cut off the very
    evidence an annotator labeled (a cloud in a corner); a mild aspect change costs a CNN less.
    """
    if img.mode != "RGB":
        img = _to_rgb(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


class ImageCache:
    """Fetch task images concurrently, decode once, keep the resized arrays on disk.

    Cache entries live in ``MODEL_DIR/cache/images/<size>/<xx>/<sha256(url + size)>.npy``,
    written atomically. An image whose URL keeps its address but changes content is not
    refetched: delete the cache folder to force it.

    Args:
        settings: image_size, image_fetch_workers, image_fetch_timeout, max_image_pixels,
            max_image_bytes, image_hosts, model_dir, label_studio_url.
        client: anything with ``auth_header()`` (the LabelStudioClient); None sends no header.
        size: the square size of the arrays; by default IMAGE_SIZE (with ``auto``, the caller
            passes the project's chosen size: ``DEFAULT_SIZE`` when it does not).
    """

    def __init__(self, settings: Settings, client=None, size: int | None = None):
        self.size = int(size or settings.image_size or DEFAULT_SIZE)
        self.root = Path(settings.model_dir) / "cache" / "images"
        self.workers = settings.image_fetch_workers
        self.timeout = settings.image_fetch_timeout
        self.max_pixels = settings.max_image_pixels
        self.max_bytes = settings.max_image_bytes
        self.ls_url = settings.label_studio_url.rstrip("/")
        self._ls_origin = origin(self.ls_url)
        self.policy = HostPolicy(self.ls_url, settings.image_hosts)
        self._client = client
        self._local = threading.local()
        with _known_lock:
            self._known = _known_cached.setdefault(str(self.root / str(self.size)), set())

    def path_for(self, url: str) -> Path:
        """Cache file of ``url`` at this cache's size."""
        key = hashlib.sha256(f"{url}\n{self.size}".encode()).hexdigest()
        return self.root / str(self.size) / key[:2] / f"{key}.npy"

    def fetch_arrays(self, items: list[tuple[int, str]]):
        """Images of ``(task_id, url)`` items as ``uint8 [M, S, S, 3]``, in input order.

        Returns:
            ``(arrays, ok_task_ids, failures)``: rows of ``arrays`` belong to ``ok_task_ids``;
            ``failures`` maps each other task id to a reason. Nothing is raised for one bad image.
        """
        n, s = len(items), self.size
        out = self._allocate(n)
        done_ok = [False] * n
        hits = [False] * n
        failures: dict[int, str] = {}
        every = max(1, n // 10) if n >= 100 else 0
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="image-fetch") as pool:
            futures = {
                pool.submit(self._one, out, hits, i, url, tid): i
                for i, (tid, url) in enumerate(items)
            }
            for count, future in enumerate(as_completed(futures), 1):
                i = futures.pop(future)
                task_id = items[i][0]
                try:
                    future.result()
                    done_ok[i] = True
                except ImageError as exc:
                    failures[task_id] = str(exc)
                    log.warning("task %s: image skipped: %s", task_id, exc)
                if every and (count % every == 0 or count == n):
                    _log_progress(count, n, sum(hits), len(failures), started)
        ok_rows = [i for i in range(n) if done_ok[i]]
        for j, i in enumerate(ok_rows):  # compact in place: no second copy of a large pool
            if i != j:
                out[j] = out[i]
        arrays = out[: len(ok_rows)] if len(ok_rows) < n else out
        return arrays.reshape(len(ok_rows), s, s, 3), [items[i][0] for i in ok_rows], failures

    def fetch_lazy(self, items: list[tuple[int, str]]):
        """Like ``fetch_arrays``, but the pixels stay on disk: ``(CachedImages, ok_task_ids,
        failures)``. An image already in the cache (a file of the right size) is not read at all;
        the others are fetched, decoded and cached now, so failures are known up front. Rows are
        read from the cache when asked for (``CachedImages``), so a job that needs no pixels (its
        embeddings are cached) reads none: at 100,000 images that saves every file's read and the
        pool-sized array."""
        expected = CACHE_HEADER_BYTES + self.size * self.size * 3
        failures: dict[int, str] = {}
        n = len(items)
        ok = [False] * n
        started = time.monotonic()
        # Cache hits first, in this thread: a stat is a few microseconds, and handing 100,000 of
        # them to a thread pool cost seconds of futures and locks in a job that has no image to
        # fetch. Entries an earlier job of this process saw are not even stat'ed (``KNOWN_LIMIT``).
        # Only the misses go to the pool.
        known = self._known
        misses = []
        for i, (_, url) in enumerate(items):
            if url in known:
                ok[i] = True
                continue
            with contextlib.suppress(OSError):
                ok[i] = os.stat(self.path_for(url)).st_size == expected
            if not ok[i]:
                misses.append(i)
        cached = n - len(misses)

        def one(i: int) -> None:
            task_id, url = items[i]
            try:
                self._one(
                    np.empty((1, self.size, self.size, 3), np.uint8), [False], 0, url, task_id
                )
                ok[i] = True
            except ImageError as exc:
                failures[task_id] = str(exc)
                log.warning("task %s: image skipped: %s", task_id, exc)

        m = len(misses)
        every = max(1, m // 10) if m >= 100 else 0
        if misses:
            with ThreadPoolExecutor(
                max_workers=self.workers, thread_name_prefix="image-fetch"
            ) as pool:
                for count, _ in enumerate(pool.map(one, misses), 1):
                    if every and (count % every == 0 or count == m):
                        _log_progress(cached + count, n, cached, len(failures), started)
        if n >= 100 and not every:
            _log_progress(n, n, cached, len(failures), started)
        kept = [item for item, good in zip(items, ok, strict=True) if good]
        with _known_lock:
            new = [url for _, url in kept if url not in known]
            if len(known) + len(new) > KNOWN_LIMIT:  # start over with this pool, if it fits
                known.clear()
                new = [url for _, url in kept] if len(kept) <= KNOWN_LIMIT else []
            known.update(new)
        return CachedImages(self, kept), [task_id for task_id, _ in kept], failures

    def read_rows(self, items: list[tuple[int, str]], out: np.ndarray | None = None) -> np.ndarray:
        """``uint8 [len(items), S, S, 3]`` from the cache (fetched again where an entry is gone
        or unreadable); an image that cannot be had any more is left black, with a warning."""
        if out is None:
            out = self._allocate(len(items))
        hits = [False] * len(items)

        def one(i: int) -> None:
            task_id, url = items[i]
            try:
                self._one(out, hits, i, url, task_id)
            except ImageError as exc:
                out[i] = 0
                self._known.discard(url)  # the next job checks it again
                log.warning("task %s: cached image gone and not fetched again (%s)", task_id, exc)

        if len(items) <= 16:
            for i in range(len(items)):
                one(i)
        else:
            with ThreadPoolExecutor(
                max_workers=self.workers, thread_name_prefix="image-read"
            ) as ex:
                list(ex.map(one, range(len(items))))
        return out

    def native_sizes(self, items: list[tuple[int, str]]) -> list[tuple[int, int]]:
        """``(width, height)`` of each readable image of ``items`` (``(task_id, url)``), as
        stored (before any resize); unreadable ones are left out. For ``IMAGE_SIZE=auto``: the
        caller passes a sample; only the headers are parsed."""

        def one(item):
            task_id, url = item
            try:
                with Image.open(io.BytesIO(self._download(task_id, url)), formats=FORMATS) as img:
                    return img.size
            except Exception as exc:  # noqa: BLE001 - a bad sample image is only left out
                log.info("task %s: image size not read (%s)", task_id, type(exc).__name__)
                return None

        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="probe") as pool:
            return [size for size in pool.map(one, items) if size is not None]

    def _allocate(self, n: int) -> np.ndarray:
        shape = (n, self.size, self.size, 3)
        if n * self.size * self.size * 3 <= IN_MEMORY_LIMIT:
            return np.empty(shape, dtype=np.uint8)
        self.root.mkdir(parents=True, exist_ok=True)
        log.info(
            "pool of %d images exceeds %d GiB: using a memory-mapped temp file",
            n,
            IN_MEMORY_LIMIT >> 30,
        )
        return np.memmap(
            tempfile.TemporaryFile(dir=self.root), dtype=np.uint8, mode="w+", shape=shape
        )

    def _one(self, out: np.ndarray, hits: list, i: int, url: str, task_id: int) -> None:
        path = self.path_for(url)
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.shape == out.shape[1:] and cached.dtype == np.uint8:
                out[i] = cached
                hits[i] = True
                return
        except FileNotFoundError:
            pass
        except (OSError, ValueError, EOFError):
            log.warning("task %s: unreadable cache entry %s; fetching again", task_id, path.name)
        arr = to_array(
            decode_image(self._download(task_id, url), self.max_pixels, draft_size=self.size),
            self.size,
        )
        out[i] = arr
        self._store(path, arr)

    def _store(self, path: Path, arr: np.ndarray) -> None:
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as handle:
                np.save(handle, arr)
            os.replace(tmp, path)  # atomic: readers see the old state or the whole file
        except OSError as exc:
            log.warning("image cache not written (%s); training goes on without it", exc)
            tmp.unlink(missing_ok=True)

    # -- resolving and downloading ---------------------------------------------------------

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:  # requests.Session is not documented thread-safe: one per thread
            session = self._local.session = requests.Session()
            for prefix in ("http://", "https://"):
                session.mount(prefix, GuardedAdapter())
        return session

    def _safe(self, url: str) -> str:
        """URL for logs: no query outside Label Studio (presigned signatures), no userinfo."""
        parts = urlsplit(url)
        if origin(url) == self._ls_origin:
            return parts.path + (f"?{parts.query}" if parts.query else "")
        return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"

    def _first_url(self, task_id: int, url: str) -> str:
        scheme = urlsplit(url).scheme.lower()
        if scheme in CLOUD_SCHEMES:
            fileuri = base64.urlsafe_b64encode(url.encode()).decode()
            return f"{self.ls_url}/tasks/{task_id}/presign/?fileuri={fileuri}"
        if url.startswith("//"):
            return f"{self._ls_origin[0]}:{url}"
        if url.startswith("/"):
            return self.ls_url + url  # uploads, local files, /tasks/<id>/resolve/ links
        if scheme in ("http", "https"):
            return url
        raise ImageError(f"unsupported image URL scheme {scheme or url[:20]!r}")

    def _download(self, task_id: int, url: str) -> bytes:
        if url.startswith("data:"):
            return _data_uri(url, self.max_bytes)
        target = self._first_url(task_id, url)
        deadline = time.monotonic() + self.timeout
        chain_on_ls = True  # every hop so far on Label Studio: only then the token goes along
        redirected_by_ls = after_ls = False
        try:
            for _hop in range(MAX_REDIRECTS + 1):
                on_ls = self.policy.on_ls(target)
                chain_on_ls = chain_on_ls and on_ls
                private_ok = self.policy.check(
                    target, redirected_by_ls=redirected_by_ls, after_ls=after_ls
                )
                send_token = chain_on_ls and self._client is not None
                headers = self._client.auth_header() if send_token else {}
                with (
                    guard(urlsplit(target).hostname or "", private_ok),
                    self._session().get(
                        target,
                        headers=headers,
                        timeout=self.timeout,
                        stream=True,
                        allow_redirects=False,
                    ) as response,
                ):
                    if response.is_redirect:
                        target = urljoin(target, response.headers["location"])
                        redirected_by_ls, after_ls = on_ls, after_ls or on_ls
                        continue
                    if response.status_code != 200:
                        raise ImageError(self._http_reason(response.status_code, target, on_ls))
                    return _read_body(response, deadline, self.max_bytes, self.timeout)
            raise ImageError(f"more than {MAX_REDIRECTS} redirects from {self._safe(url)}")
        except PeerRefused as exc:
            raise ImageError(str(exc)) from None
        except requests.Timeout:
            raise ImageError(
                f"timed out after {self.timeout:g}s fetching {self._safe(target)}"
            ) from None
        except requests.RequestException as exc:
            raise ImageError(f"cannot fetch {self._safe(target)}: {type(exc).__name__}") from None

    def _http_reason(self, status: int, target: str, on_ls: bool) -> str:
        reason = f"HTTP {status} from {self._safe(target)}"
        if on_ls and status in (401, 403):
            reason += " (check LABEL_STUDIO_API_KEY)"
        elif not on_ls and status in (401, 403) and urlsplit(target).path.startswith("/data/"):
            reason += (
                " (looks like a Label Studio file on another address: set LABEL_STUDIO_URL to "
                "this origin so the token is sent there)"
            )
        return reason


def _read_body(response: requests.Response, deadline: float, limit: int, timeout: float) -> bytes:
    """The body, within a total time budget and MAX_IMAGE_BYTES (the socket timeout is per read).

    A Content-Length over the cap is refused before reading; a body that grows past it (no or a
    lying Content-Length, chunked encoding) is refused as soon as it does.
    """
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ImageError(
            f"image is {int(declared)} bytes (Content-Length), over MAX_IMAGE_BYTES={limit}; "
            "raise MAX_IMAGE_BYTES if such images are expected"
        )
    chunks, size = [], 0
    for chunk in response.iter_content(chunk_size=1 << 16):
        size += len(chunk)
        if size > limit:
            raise ImageError(
                f"image is larger than MAX_IMAGE_BYTES={limit} bytes (download stopped there); "
                "raise MAX_IMAGE_BYTES if such images are expected"
            )
        if time.monotonic() > deadline:
            raise ImageError(f"timed out after {timeout:g}s (slow download)")
        chunks.append(chunk)
    return b"".join(chunks)


def _data_uri(url: str, limit: int) -> bytes:
    header, _, payload = url.partition(",")
    if len(payload) * 3 // 4 > limit:  # a base64 payload decodes to 3/4 of its length
        raise ImageError(f"data: URI image is over MAX_IMAGE_BYTES={limit} bytes")
    try:
        if header.endswith(";base64"):
            return base64.b64decode(payload, validate=False)
        return unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise ImageError("malformed data: URI") from None


def _log_progress(count: int, n: int, cached: int, failed: int, started: float) -> None:
    rate = count / max(time.monotonic() - started, 1e-9)
    log.info(
        "images: %d/%d (%d%%), %d from cache, %d failed, %.0f images/s",
        count,
        n,
        100 * count // n,
        cached,
        failed,
        rate,
    )


class CachedImages:
    """A pool's images as a read-only ``uint8 [M, S, S, 3]`` array that lives in the image cache.

    Rows are read when indexed (``images[rows]``, ``images[a:b]``, ``np.take(images, rows, 0)``)
    and ``np.asarray(images)`` reads them all (into a memory-mapped temp file past
    ``IN_MEMORY_LIMIT``, as ``fetch_arrays`` does). What the training code needs from an array
    (``shape``, ``ndim``, ``dtype``, ``len``) is here, so it takes either.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, cache: ImageCache, items: list[tuple[int, str]]):
        self._cache, self._items = cache, list(items)
        self.shape = (len(self._items), cache.size, cache.size, 3)
        self.nbytes = int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def items(self) -> list[tuple[int, str]]:
        """``(task id, URL)`` of each row."""
        return self._items

    def __getitem__(self, index):
        if isinstance(index, tuple):  # rows first, then the rest on what was read
            if not index:
                return self[:]
            first, rest = index[0], index[1:]
            if isinstance(first, (int, np.integer)):
                return self[first][rest]
            return self[first][(slice(None), *rest)]
        if isinstance(index, (int, np.integer)):
            return self._read(np.arange(len(self))[[index]])[0]
        return self._read(np.arange(len(self))[index])

    def take(self, indices, axis=0, out=None, mode="raise"):
        if axis != 0 or mode != "raise":
            return np.take(np.asarray(self), indices, axis=axis, out=out, mode=mode)
        indices = np.asarray(indices)
        rows = self._read(np.arange(len(self))[indices.reshape(-1)])
        rows = rows.reshape(*indices.shape, *self.shape[1:])
        if out is None:
            return rows
        out[...] = rows
        return out

    def __array__(self, dtype=None, copy=None):
        whole = self._cache.read_rows(self._items)
        return whole if dtype is None else whole.astype(dtype)

    def in_memory(self) -> np.ndarray | CachedImages:
        """All rows as one array when they fit in ``IN_MEMORY_LIMIT`` (for a pass that reads
        every row many times, like pretraining); else this object, read batch by batch."""
        return np.asarray(self) if self.nbytes <= IN_MEMORY_LIMIT else self

    def _read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        return self._cache.read_rows([self._items[int(r)] for r in rows], out)
