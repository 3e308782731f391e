"""Labeled datasets for the simulator: a folder with one sub-folder per class, or ``digits``.

Both come back as the arrays every other module uses (``uint8 [N, S, S, 3]`` images, ``int64``
labels indexing a class list), so the simulator trains exactly what the live backend trains.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from ml_backend.errors import BackendError, ImageError

logger = logging.getLogger(__name__)

# Extensions we try to decode; anything else in a class folder (README, .DS_Store) is skipped.
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)


class DatasetError(BackendError):
    """The dataset cannot be used (missing folder, fewer than two classes, an empty class)."""

    http_status = 422


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A labeled image set in memory.

    Attributes:
        images: ``uint8 [N, S, S, 3]`` RGB.
        labels: ``int64 [N]`` indices into ``classes``.
        classes: Class names (sorted folder names, or the digits ``"0"``..``"9"``).
        source: Where it came from, for the report.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    source: str


def load_dataset(spec: str, image_size: int) -> Dataset:
    """Load ``digits`` or a class-per-folder directory, resized to ``image_size`` squares.

    Raises:
        DatasetError: The folder is missing, has fewer than two class folders, or a class has
            no images.
        ImageError: A file with an image extension cannot be decoded (the message names it).
    """
    if spec == "digits":
        return load_digits(image_size)
    return load_folder(Path(spec), image_size)


def native_sizes(spec: str) -> list[tuple[int, int]]:
    """``(width, height)`` of every image of the dataset before resizing (headers only)."""
    if spec == "digits":
        return [(8, 8)]  # every scikit-learn digit is 8 x 8
    root = Path(spec)
    if not root.is_dir():
        return []  # load_dataset says what is wrong
    sizes = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            try:
                with Image.open(path) as image:
                    sizes.append(image.size)
            except Exception:  # load_dataset names the unreadable file
                continue
    return sizes


def load_digits(image_size: int) -> Dataset:
    """scikit-learn's 1,797 8x8 handwritten digits, upscaled (bilinear) to RGB squares."""
    from sklearn.datasets import load_digits as sk_digits  # bundled with sklearn: no download

    bunch = sk_digits()
    # Pixel values are 0..16; stretch to 0..255 before resizing so the interpolation keeps detail.
    small = np.clip(bunch.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    images = np.empty((len(small), image_size, image_size, 3), dtype=np.uint8)
    for i, digit in enumerate(small):
        big = Image.fromarray(digit, "L").resize((image_size, image_size), Image.BILINEAR)
        images[i] = np.asarray(big)[:, :, None]
    classes = tuple(str(c) for c in bunch.target_names)
    return Dataset(images, bunch.target.astype(np.int64), classes, "digits (scikit-learn)")


def load_folder(root: Path, image_size: int) -> Dataset:
    """Every image under ``root/<class>/``, decoded and resized by the backend's own image code."""
    if not root.is_dir():
        raise DatasetError(
            f"dataset folder {str(root)!r} does not exist; pass a folder with one sub-folder "
            "per class, or --dataset digits"
        )
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise DatasetError(
            f"dataset folder {str(root)!r} has {len(class_dirs)} class sub-folder(s); "
            "it needs at least two (one sub-folder per class, images inside)"
        )
    files: list[Path] = []
    labels: list[int] = []
    for index, class_dir in enumerate(class_dirs):
        found = sorted(
            p
            for p in class_dir.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        if not found:
            raise DatasetError(
                f"class folder {str(class_dir)!r} has no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add some or remove the folder"
            )
        files += found
        labels += [index] * len(found)
    images = np.stack([_read(path, image_size) for path in files])
    classes = tuple(p.name for p in class_dirs)
    logger.info("Loaded %d images in %d classes from %s", len(files), len(classes), root)
    return Dataset(images, np.asarray(labels, dtype=np.int64), classes, f"folder {root.name}")


def _read(path: Path, image_size: int) -> np.ndarray:
    """One file as ``uint8 [S, S, 3]`` through ``labelstudio.images`` (no second decoder)."""
    from ml_backend.labelstudio.images import decode_image, to_array

    try:
        image = decode_image(path.read_bytes(), draft_size=image_size)
        return to_array(image, image_size)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"cannot read image {str(path)!r}: {reason}") from exc
