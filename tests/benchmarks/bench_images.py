"""Benchmark: image fetch + decode + resize throughput, cold and from the disk cache.

Run: ``.venv/bin/python tests/labelstudio/bench_images.py [N] [workers]``. Serves N generated
640x480 JPEGs (and 1024x1024 16-bit TIFFs) from a local HTTP server and prints a table.
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import io
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path[:0] = [str(Path(__file__).parents[1] / "labelstudio"), str(Path(__file__).parents[2])]
from conftest import FakeLS  # noqa: E402

from ml_backend.config import Settings  # noqa: E402
from ml_backend.labelstudio.images import ImageCache  # noqa: E402


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tiff16(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 4000, (1024, 1024), dtype=np.uint16)).save(buf, format="TIFF")
    return buf.getvalue()


def main(n: int = 400, workers: int = 8) -> None:
    logging.basicConfig(level=logging.WARNING)
    fake = FakeLS()
    rows = []
    try:
        for kind, make, count in (
            ("jpeg 640x480", _jpeg, n),
            ("tiff16 1024^2", _tiff16, max(1, n // 4)),
        ):
            for i in range(count):
                fake.files[f"{kind[:4]}{i}"] = make(i)
            items = [(i, f"/data/upload/1/{kind[:4]}{i}") for i in range(count)]
            with tempfile.TemporaryDirectory() as tmp:
                settings = Settings(
                    label_studio_url=fake.ls.url, label_studio_api_key="0123456789abcdef0123456789abcdef01234567",
                    model_dir=Path(tmp), image_size=224, image_fetch_workers=workers,
                )  # fmt: skip
                from ml_backend.labelstudio.client import LabelStudioClient

                cache = ImageCache(settings, LabelStudioClient(settings))
                for phase in ("cold", "cached"):
                    start = time.perf_counter()
                    arrays, ok, failures = cache.fetch_arrays(items)
                    seconds = time.perf_counter() - start
                    assert len(ok) == count and not failures
                    rows.append((kind, phase, count, workers, seconds, count / seconds))
    finally:
        fake.close()
    print(f"{'images':<14} {'phase':<7} {'n':>5} {'workers':>7} {'seconds':>8} {'images/s':>9}")
    for kind, phase, count, w, seconds, rate in rows:
        print(f"{kind:<14} {phase:<7} {count:>5} {w:>7} {seconds:>8.2f} {rate:>9.0f}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
