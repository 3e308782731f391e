"""``python -m ml_backend export``: TorchScript and ONNX files that give the stored model's outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tools_support import IMAGE_SIZE, PROJECT

from ml_backend.tools.export import TOLERANCE, ExportCheckFailed, export_version
from ml_backend.tools.predict import find_images, read_image


def _stored_probs(settings, version, images):
    from ml_backend.model.inference import predict
    from ml_backend.model.storage import ModelStore

    model, _ = ModelStore(settings.model_dir).load(PROJECT, version)
    return predict(model, images, device="cpu", batch_size=4)[0]


def _images(settings, folder):
    paths = [p for p in find_images([str(folder / "a")])]
    return np.stack([read_image(p, IMAGE_SIZE, settings.max_image_pixels) for p in paths])


def _run_file(fmt, path, images):
    if fmt == "torchscript":
        import torch

        loaded = torch.jit.load(str(path))
        with torch.inference_mode():
            return loaded(torch.from_numpy(images)).numpy()
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})[0]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load is deprecated
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_round_trips_outputs(stored, image_folder, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnx")
    settings, version = stored
    out = tmp_path / fmt
    about = export_version(settings, PROJECT, fmt, out, check_paths=[str(image_folder / "b")])
    assert about["check"]["passed"] is True
    assert about["check"]["max_abs_difference"] <= TOLERANCE
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["labels.json", "preprocessing.json", about["file"]])
    assert json.loads((out / "labels.json").read_text()) == ["Sunny", "Cloudy", "Very Cloudy"]
    written = json.loads((out / "preprocessing.json").read_text())
    assert written["version"] == version and written["image_size"] == IMAGE_SIZE
    assert written["input"]["shape"] == ["N", IMAGE_SIZE, IMAGE_SIZE, 3]

    # Independently of the command's own check: load the file, compare on other images and on
    # a batch size the export never saw.
    images = _images(settings, image_folder)
    got = _run_file(fmt, out / about["file"], images)
    expected = _stored_probs(settings, version, images)
    assert got.shape == expected.shape == (len(images), 3)
    np.testing.assert_allclose(got, expected, atol=TOLERANCE)
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_a_wrong_export_is_caught(stored, tmp_path, monkeypatch):
    """The check compares with the stored model's inference: break the exported copy and the
    command must fail rather than write a model that answers differently."""
    import torch

    from ml_backend.tools import export

    settings, _ = stored
    real_wrap = export.Exported.wrap

    def broken_wrap(model):
        module = real_wrap(model)
        with torch.no_grad():
            module.std.mul_(3.0)  # wrong normalisation inside the exported model
        return module

    monkeypatch.setattr(export.Exported, "wrap", staticmethod(broken_wrap))
    with pytest.raises(ExportCheckFailed, match="differs from"):
        export_version(settings, PROJECT, "torchscript", tmp_path / "broken")


def test_cli_exports_and_says_where(stored, tmp_path):
    settings, version = stored
    result = subprocess.run(
        [sys.executable, "-m", "ml_backend", "export", "--project", str(PROJECT), "--format",
         "torchscript", "-o", str(tmp_path / "ts")],
        env={**os.environ, "MODEL_DIR": str(settings.model_dir), "REDIS_URL": ""},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"exported project {PROJECT}'s {version}" in result.stderr
    assert "same predicted class" in result.stderr
    assert (tmp_path / "ts" / "model.pt").stat().st_size > 1_000_000
