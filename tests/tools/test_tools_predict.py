"""``python -m ml_backend predict``: a folder of images -> CSV / JSON, checked against the model."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tools_support import IMAGE_SIZE, PROJECT

from ml_backend.errors import ModelNotReady
from ml_backend.tools.predict import find_images, predict_files, read_image


def _expected(settings, version, paths):
    """Probabilities straight from ModelStore.load + inference.predict (what /predict uses)."""
    from ml_backend.model.inference import predict
    from ml_backend.model.storage import ModelStore

    model, info = ModelStore(settings.model_dir).load(PROJECT, version)
    images = np.stack([read_image(p, IMAGE_SIZE, settings.max_image_pixels) for p in paths])
    probs, _ = predict(model, images, device="cpu", batch_size=3)
    return probs, info.labels


def test_find_images_walks_folders_and_keeps_files_named(image_folder):
    found = find_images([str(image_folder), str(image_folder / "a" / "img_00000.png")])
    names = [p.relative_to(image_folder).as_posix() for p in found]
    assert len(names) == 15  # 13 PNGs + the JPEG + the broken PNG; no text file; no duplicate
    assert "b/notes.txt" not in names and "b/photo.JPG" in names
    assert names == sorted(names[:11]) + names[11:]


def test_predict_files_matches_the_stored_model(stored, image_folder):
    settings, version = stored
    files = find_images([str(image_folder)])
    about, rows = predict_files(settings, PROJECT, files, batch_size=4)
    assert about["version"] == version and about["image_size"] == IMAGE_SIZE
    assert about["why"] == "newest on disk"  # no Redis: nothing says what is served
    broken = [r for r in rows if r["error"]]
    assert [r["path"] for r in broken] == [str(image_folder / "b" / "broken.png")]
    good = [r for r in rows if not r["error"]]
    probs, labels = _expected(settings, version, [r["path"] for r in good])
    for row, p in zip(good, probs, strict=True):
        assert row["label"] == labels[int(p.argmax())]
        assert row["confidence"] == pytest.approx(float(p.max()), abs=1e-5)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_unknown_version_names_the_ones_there(stored, image_folder):
    settings, version = stored
    with pytest.raises(ModelNotReady, match=f"there are: {version}"):
        predict_files(settings, PROJECT, find_images([str(image_folder)]), version="resnet18-v99")


def _cli(*args, settings, **env):
    return subprocess.run(
        [sys.executable, "-m", "ml_backend", "predict", "--project", str(PROJECT), *args],
        env={**os.environ, "MODEL_DIR": str(settings.model_dir), "DEVICE": "cpu",
             "REDIS_URL": "", **env},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_cli_writes_csv_for_a_folder(stored, image_folder):
    settings, version = stored
    result = _cli(str(image_folder / "a"), settings=settings)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 11
    assert list(rows[0]) == ["path", "label", "confidence", "p_Sunny", "p_Cloudy",
                             "p_Very Cloudy", "error"]  # fmt: skip
    assert {r["label"] for r in rows} <= {"Sunny", "Cloudy", "Very Cloudy"}
    assert all(0 < float(r["confidence"]) <= 1 for r in rows)
    assert f"predicted 11 of 11 images with project {PROJECT}'s {version}" in result.stderr
    assert "11/11" in result.stderr  # the progress bar


def test_cli_writes_json_and_reports_unreadable_files(stored, image_folder, tmp_path):
    settings, version = stored
    out = tmp_path / "out.json"
    result = _cli(str(image_folder / "b"), "-o", str(out), "--version", version, settings=settings)
    assert result.returncode == 0, result.stderr
    body = json.loads(out.read_text())
    assert body["version"] == version and body["labels"] == ["Sunny", "Cloudy", "Very Cloudy"]
    errors = {os.path.basename(p["path"]): p["error"] for p in body["predictions"]}
    assert errors["broken.png"].startswith("not a readable image")
    assert errors["photo.JPG"] is None
    assert "1 could not be read" in result.stderr


def test_cli_says_what_is_missing(stored, tmp_path):
    settings, _ = stored
    result = _cli(str(tmp_path / "nope"), settings=settings)
    assert result.returncode == 2 and "no such file or folder" in result.stderr
    result = _cli(str(tmp_path), settings=settings, MODEL_DIR=str(tmp_path / "empty"))
    assert result.returncode == 2  # no images there: said before any model is loaded
    assert "Traceback" not in result.stderr
