"""``python -m ml_backend predict --project N PATH...``: a trained version on image files.

Images and folders (searched recursively for png, jpeg, bmp, gif, tiff and webp files) are read
the way the backend reads task images (``decode_image`` + ``to_array``: EXIF orientation, alpha
over white, 16-bit scaled, the whole frame squeezed to the version's image size), predicted in
batches with ``ml_backend.model.inference.predict`` on the GPU when there is one, and written as
CSV (one row per file: path, label, confidence, one probability column per class, error) or
JSON. The version is the one the backend serves (``--version`` picks another).

Exit codes: 0 done (unreadable files are reported in their row), 1 no model or nothing
readable, 2 bad options.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ml_backend.config import Settings
from ml_backend.errors import ConfigError, ImageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CHUNK = 512  # images decoded and held at once (bounds memory on big folders)
DECODE_THREADS = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options (called by ``python -m ml_backend``)."""
    parser.description = "Predict image files or folders with a trained version (CSV or JSON)."
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument("--project", type=int, required=True, help="Label Studio project id")
    parser.add_argument(
        "--version", help="model version, e.g. resnet18-v7 (default: the served one)"
    )
    parser.add_argument(
        "--output", "-o", help="file to write (default: standard output); .json means JSON"
    )
    parser.add_argument(
        "--format", choices=("csv", "json"), help="output format (default: from --output, else csv)"
    )
    parser.add_argument(
        "--device", help="torch device: auto, cpu, cuda, cuda:N (default: the DEVICE setting)"
    )
    parser.add_argument(
        "--batch-size", type=int, help="images per forward pass (default: INFERENCE_BATCH_SIZE)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def find_images(paths: list[str]) -> list[Path]:
    """Files named on the command line, and image files under the folders (sorted), deduplicated.

    Raises:
        ConfigError: a path does not exist, or nothing to predict was found.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError(f"{raw}: no such file or folder")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise ConfigError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {', '.join(paths)}")
    return unique


def read_image(path: Path | str, size: int, max_pixels: int) -> np.ndarray:
    """One image file as the backend reads task images: ``uint8 [size, size, 3]`` RGB.

    Raises:
        ImageError: unreadable, not an image, or over ``max_pixels``.
    """
    from ml_backend.labelstudio.images import decode_image, to_array

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read the file: {exc.strerror or exc}") from None
    return to_array(decode_image(data, max_pixels, draft_size=size), size)


def predict_files(
    settings: Settings,
    project: int,
    files: list[Path],
    *,
    version: str | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> tuple[dict, list[dict]]:
    """Predict ``files`` with one version of ``project``.

    Returns:
        ``(about, rows)``: ``about`` has ``project, version, why, labels, image_size, device``;
        ``rows`` one dict per file in order: ``path, label, confidence, probabilities, error``
        (``label`` None and ``error`` set for a file that could not be read).
    """
    from ml_backend.model.inference import predict
    from ml_backend.model.network import resolve_device
    from ml_backend.model.storage import ModelStore
    from ml_backend.tools.versions import pick_version

    chosen, why = pick_version(settings, project, version)
    torch_device = resolve_device(device or settings.device)
    model, info = ModelStore(settings.model_dir).load(project, chosen, device=torch_device)
    size = int(info.image_size or settings.image_size)
    about = {
        "project": project,
        "version": info.version,
        "why": why,
        "labels": list(info.labels),
        "image_size": size,
        "device": str(torch_device),
    }
    log.info("project %s: %s (%s) on %s, %d px", project, info.version, why, torch_device, size)
    rows: list[dict] = []
    bar = _bar(len(files), progress)
    try:
        with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode") as pool:
            for start in range(0, len(files), CHUNK):
                chunk = files[start : start + CHUNK]
                decoded = list(
                    pool.map(lambda p: _safe_read(p, size, settings.max_image_pixels), chunk)
                )
                good = [i for i, (arr, _) in enumerate(decoded) if arr is not None]
                probs = np.empty((0, len(info.labels)), np.float32)
                if good:
                    images = np.stack([decoded[i][0] for i in good])
                    probs, _ = predict(
                        model,
                        images,
                        device=torch_device,
                        batch_size=batch_size or settings.inference_batch_size,
                    )
                by_index = dict(zip(good, probs, strict=True))
                for i, path in enumerate(chunk):
                    rows.append(_row(path, by_index.get(i), decoded[i][1], info.labels))
                bar.update(len(chunk))
    finally:
        bar.close()
    return about, rows


def _safe_read(path: Path, size: int, max_pixels: int):
    try:
        return read_image(path, size, max_pixels), None
    except ImageError as exc:
        return None, str(exc)


def _row(path: Path, probs, error: str | None, labels) -> dict:
    if probs is None:
        return {"path": str(path), "label": None, "confidence": None, "probabilities": None,
                "error": error or "not predicted"}  # fmt: skip
    best = int(np.argmax(probs))
    return {
        "path": str(path),
        "label": labels[best],
        "confidence": round(float(probs[best]), 6),
        "probabilities": {
            label: round(float(p), 6) for label, p in zip(labels, probs, strict=True)
        },
        "error": None,
    }


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="image", desc="predicting", file=sys.stderr, dynamic_ncols=True)


def to_csv(about: dict, rows: list[dict]) -> str:
    """CSV text: path, label, confidence, ``p_<label>`` per class, error."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "label", "confidence", *[f"p_{x}" for x in about["labels"]], "error"])
    for row in rows:
        probs = row["probabilities"] or {}
        writer.writerow(
            [row["path"], row["label"] or "", "" if row["confidence"] is None else row["confidence"],
             *[probs.get(x, "") for x in about["labels"]], row["error"] or ""]
        )  # fmt: skip
    return out.getvalue()


def to_json(about: dict, rows: list[dict]) -> str:
    """JSON text: ``{"project", "version", "labels", "image_size", "predictions": [...]}``."""
    return json.dumps({**about, "predictions": rows}, indent=2) + "\n"


def run(args: argparse.Namespace) -> int:
    """The command: returns the exit status."""
    settings = Settings.from_env()
    fmt = args.format or ("json" if (args.output or "").lower().endswith(".json") else "csv")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        files = find_images(args.paths)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    about, rows = predict_files(
        settings,
        args.project,
        files,
        version=args.version,
        device=args.device,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    text = to_json(about, rows) if fmt == "json" else to_csv(about, rows)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    failed = sum(1 for r in rows if r["error"])
    print(
        f"predicted {len(rows) - failed} of {len(rows)} images with project {about['project']}'s "
        f"{about['version']} ({about['why']}) on {about['device']}"
        + (f"; {failed} could not be read (see the error column)" if failed else "")
        + (f"; wrote {args.output}" if args.output else ""),
        file=sys.stderr,
    )
    return 1 if failed == len(rows) else 0
