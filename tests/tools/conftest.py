"""A real (tiny-image, randomly initialised) ResNet18 version saved by ModelStore, and images."""

from __future__ import annotations

from pathlib import Path

import pytest
from tools_support import IMAGE_SIZE, PROJECT  # noqa: F401

from ml_backend.config import Settings


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """``(settings, version)``: one version of PROJECT in a fresh MODEL_DIR (no Redis)."""
    import torch

    from ml_backend.devtools.synthetic import LABELS
    from ml_backend.model.network import new_resnet18
    from ml_backend.model.storage import ModelStore

    model_dir = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    store = ModelStore(model_dir)
    version = store.next_version(PROJECT)
    model = new_resnet18(len(LABELS))
    store.save(
        PROJECT, version, model, list(LABELS), {"val_accuracy": 0.5}, {},
        extra={"image_size": IMAGE_SIZE},
    )  # fmt: skip
    settings = Settings(model_dir=model_dir, device="cpu", inference_batch_size=4)
    return settings, version


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Nested folders of generated PNGs (13 images), a JPEG, a text file and a broken image."""
    from ml_backend.devtools.synthetic import write_dataset

    root = tmp_path_factory.mktemp("images")
    write_dataset(root / "a", 6, seed=1, size=40)
    write_dataset(root / "a" / "deeper", 5, seed=2, size=48)
    pairs = write_dataset(root / "b", 2, seed=3, size=40)
    from PIL import Image

    Image.open(pairs[0][0]).convert("RGB").save(root / "b" / "photo.JPG", quality=90)
    (root / "b" / "notes.txt").write_text("not an image")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    return root
