"""Generated "weather webcam" images for tests, the demo and benchmarks (no downloads needed).

Three classes matching ``label_config.xml``: Sunny (blue sky with a sun), Cloudy (paler sky with
a few white clouds) and Very Cloudy (grey overcast). Positions, sizes, colours and noise vary per
image, so a model must learn the visual cue rather than memorise pixels, yet a small network
separates the classes after a few epochs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

LABELS = ("Sunny", "Cloudy", "Very Cloudy")


def _sky(rng: np.random.Generator, size: int, top: tuple, bottom: tuple) -> Image.Image:
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    top_c = np.array(top, dtype=np.float32) + rng.normal(0, 8, 3)
    bottom_c = np.array(bottom, dtype=np.float32) + rng.normal(0, 8, 3)
    rows = (1 - t) * top_c + t * bottom_c
    arr = np.repeat(rows, size, axis=1)
    arr += rng.normal(0, 6, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _clouds(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, n: int, grey: int
) -> None:
    for _ in range(n):
        cx, cy = rng.uniform(0, size, 2)
        w, h = rng.uniform(0.15, 0.45) * size, rng.uniform(0.06, 0.18) * size
        shade = int(np.clip(grey + rng.normal(0, 10), 0, 255))
        draw.ellipse([cx - w, cy - h, cx + w, cy + h], fill=(shade, shade, shade))


def make_image(label: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One RGB image of the given class."""
    if label == "Sunny":
        img = _sky(rng, size, (40, 110, 220), (140, 190, 240))
        draw = ImageDraw.Draw(img)
        r = rng.uniform(0.08, 0.16) * size
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size * 0.6)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 230, 80))
        _clouds(draw, rng, size, int(rng.integers(0, 2)), 245)
    elif label == "Cloudy":
        img = _sky(rng, size, (90, 150, 215), (170, 200, 230))
        _clouds(ImageDraw.Draw(img), rng, size, int(rng.integers(3, 6)), 235)
    elif label == "Very Cloudy":
        img = _sky(rng, size, (95, 100, 110), (140, 145, 150))
        _clouds(ImageDraw.Draw(img), rng, size, int(rng.integers(4, 8)), 80)
    else:
        raise ValueError(f"unknown label {label!r}; expected one of {', '.join(LABELS)}")
    return img.filter(ImageFilter.GaussianBlur(radius=0.6))


def make_dataset(n: int, seed: int = 0, size: int = 64) -> tuple[list[Image.Image], list[str]]:
    """``n`` images with balanced, shuffled labels, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    labels = [LABELS[i % len(LABELS)] for i in range(n)]
    rng.shuffle(labels)
    return [make_image(label, rng, size) for label in labels], labels


def write_dataset(
    directory: Path, n: int, seed: int = 0, size: int = 64, by_class: bool = False
) -> list[tuple[Path, str]]:
    """Write ``n`` PNGs under ``directory`` and return ``(path, label)`` pairs.

    With ``by_class`` the files go into one sub-folder per class (the simulator's folder format).
    """
    images, labels = make_dataset(n, seed=seed, size=size)
    out = []
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        folder = directory / label if by_class else directory
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:05d}.png"
        img.save(path)
        out.append((path, label))
    return out
