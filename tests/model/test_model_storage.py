"""storage.py: atomic versions, monotonic numbering, loading with weights_only, pruning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ml_backend.errors import ModelNotReady
from ml_backend.model import storage
from ml_backend.model.network import build_model
from ml_backend.model.storage import ModelStore


@pytest.fixture
def store(tmp_path):
    return ModelStore(tmp_path / "models")


def _save(store, project=1, num_classes=3, seed=0, **extra):
    model, _ = build_model(num_classes, "none", seed=seed)
    version = store.next_version(project)
    labels = [f"c{i}" for i in range(num_classes)]
    path = store.save(project, version, model, labels, {"val_accuracy": 0.9}, {"train": 1.5}, extra)
    return version, path, model


def test_save_and_load_round_trip(store):
    version, path, model = _save(store, image_size=64, weights_source="none", n_labels=12)
    assert version == "resnet18-v1" and path == store.model_dir / "1" / "resnet18-v1"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["labels"] == ["c0", "c1", "c2"] and meta["num_classes"] == 3
    assert meta["image_size"] == 64 and meta["weights_source"] == "none"
    assert meta["metrics"] == {"val_accuracy": 0.9} and meta["timings"] == {"train": 1.5}
    assert meta["extra"] == {"n_labels": 12} and meta["created_at"]
    loaded, info = store.load(1)
    assert info.version == version and info.labels == ["c0", "c1", "c2"] and info.image_size == 64
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # The file is a plain state_dict that torch can read with weights_only=True.
    state = torch.load(info.weights_path, weights_only=True)
    assert set(state) == set(model.state_dict())


def test_versions_are_sorted_by_number_and_latest_is_newest(store):
    for _ in range(11):
        store.next_version(5)
    _save(store, project=5)  # v12
    _save(store, project=5, num_classes=2)  # v13
    names = [v.version for v in store.versions(5)]
    assert names == ["resnet18-v12", "resnet18-v13"]
    assert store.latest(5).num_classes == 2
    assert store.load(5, "resnet18-v12")[1].num_classes == 3


def test_no_model_yet(store):
    assert store.latest(9) is None and store.versions(9) == []
    with pytest.raises(ModelNotReady):
        store.load(9)
    with pytest.raises(ModelNotReady):
        store.load(9, "resnet18-v1")


def test_crash_mid_save_leaves_no_version(store, monkeypatch):
    first, _, _ = _save(store)

    def crash(path, state, torch_module):
        path.write_bytes(b"half a file")
        raise OSError("disk died")

    monkeypatch.setattr(storage, "_write_weights", crash)
    model, _ = build_model(3, "none")
    version = store.next_version(1)
    with pytest.raises(OSError, match="disk died"):
        store.save(1, version, model, ["a", "b", "c"], {}, {})
    assert not (store.project_dir(1) / version).exists()
    assert store.latest(1).version == first
    monkeypatch.undo()
    # A hard crash (kill -9) would leave the temp folder: readers skip it, the next save cleans it.
    leftover = store.project_dir(1) / ".tmp-resnet18-v99-deadbeef"
    leftover.mkdir()
    (leftover / "meta.json").write_text('{"version": "resnet18-v99"}')
    assert store.latest(1).version == first
    again, _, _ = _save(store)
    assert again == "resnet18-v3" and store.latest(1).version == again
    assert not leftover.exists()


def test_numbers_never_reused_after_prune(store):
    for _ in range(4):
        _save(store, project=2)
    removed = store.prune(2, keep=2)
    assert removed == ["resnet18-v1", "resnet18-v2"]
    assert [v.version for v in store.versions(2)] == ["resnet18-v3", "resnet18-v4"]
    assert store.prune(2, keep=2) == []
    store.prune(2, keep=1)
    (store.project_dir(2) / "resnet18-v4").rename(store.project_dir(2) / ".gone")
    # Even with every version folder gone, the counter remembers.
    assert store.next_version(2) == "resnet18-v5"


def test_existing_version_is_not_overwritten(store):
    version, _, model = _save(store)
    with pytest.raises(FileExistsError):
        store.save(1, version, model, ["a", "b", "c"], {}, {})


@pytest.mark.parametrize("bad", ["../etc", "resnet18-v0", "v1", "resnet18-v1/../../x"])
def test_bad_version_names_are_refused(store, bad):
    with pytest.raises(ValueError):
        store.load(1, bad)


def test_bad_project_id_is_refused(store):
    with pytest.raises(ValueError):
        store.project_dir("../other")


def test_unreadable_meta_is_skipped(store):
    version, path, _ = _save(store)
    (path / "meta.json").write_text("{broken")
    assert store.latest(1) is None


def test_listing_versions_does_not_import_torch(store):
    _save(store, project=3)
    code = (
        "import sys; from ml_backend.model.storage import ModelStore;"
        f"print(ModelStore({str(store.model_dir)!r}).latest(3).version);"
        "print('torch' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.split() == ["resnet18-v1", "False"]
