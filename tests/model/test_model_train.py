"""train.py: a real (tiny) training run, determinism, validation split rules, epochs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from ml_backend.errors import NotEnoughLabels
from ml_backend.model.network import build_model
from ml_backend.model.train import class_weights, default_epochs, fit, split_indices


def test_training_learns_the_weather_classes(weather_train, caplog):
    images, labels = weather_train
    model, _ = build_model(3, "none", seed=0)
    events = []
    with caplog.at_level(logging.INFO, logger="ml_backend.model.train"):
        result = fit(
            model, images, labels, epochs=8, batch_size=32, lr=3e-3, val_fraction=0.3, seed=0,
            device="cpu", progress=events.append,
        )  # fmt: skip
    assert result.val_size == 45 and result.train_size == 105
    assert result.val_accuracy >= 0.8, result.history  # chance is 1/3
    assert result.device == "cpu" and result.amp == "fp32"
    assert [row["epoch"] for row in result.history] == list(range(1, 9))
    assert set(result.history[0]) == {
        "epoch", "loss", "train_accuracy", "val_accuracy", "images_per_s", "seconds",
    }  # fmt: skip
    assert [e["epoch"] for e in events] == list(range(1, 9)) and events[0]["epochs"] == 8
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 8
    assert lines[-1].startswith("epoch 8/8 loss ") and "val acc" in lines[-1]
    assert "images/s" in lines[-1]
    assert not model.training


def test_same_seed_same_weights_on_cpu(weather_small):
    images, labels = weather_small
    states = []
    for _ in range(2):
        model, _ = build_model(3, "none", seed=5)
        result = fit(
            model, images[:24], labels[:24], epochs=2, batch_size=8, lr=1e-3, val_fraction=0.25,
            seed=11, device="cpu",
        )  # fmt: skip
        states.append((model.state_dict(), result.history))
    (a, hist_a), (b, hist_b) = states
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [h["loss"] for h in hist_a] == [h["loss"] for h in hist_b]


def test_tiny_set_trains_without_validation(weather_small, caplog):
    images, labels = weather_small
    # Five images, batch 4: the last batch would hold one image and BatchNorm cannot train on it.
    model, _ = build_model(3, "none", seed=0)
    with caplog.at_level(logging.INFO, logger="ml_backend.model.train"):
        result = fit(
            model, images[:5], labels[:5], epochs=2, batch_size=4, lr=1e-3, val_fraction=0.2,
            seed=0, device="cpu",
        )  # fmt: skip
    assert result.val_accuracy is None and result.val_size == 0 and result.train_size == 5
    assert all(row["val_accuracy"] is None for row in result.history)
    assert any("No validation split" in r.getMessage() for r in caplog.records)
    assert "val acc n/a" in caplog.records[-1].getMessage()


def test_fit_refuses_a_single_image(weather_small):
    images, labels = weather_small
    model, _ = build_model(3, "none")
    with pytest.raises(NotEnoughLabels):
        fit(model, images[:1], labels[:1], epochs=1, batch_size=4, lr=1e-3, val_fraction=0.2,
            seed=0, device="cpu")  # fmt: skip


def test_fit_rejects_labels_outside_the_head(weather_small):
    images, labels = weather_small
    model, _ = build_model(2, "none")
    with pytest.raises(ValueError, match="labels must be in"):
        fit(model, images[:12], labels[:12], epochs=1, batch_size=4, lr=1e-3, val_fraction=0.2,
            seed=0, device="cpu")  # fmt: skip


def test_split_is_stratified_and_keeps_a_training_example_per_class():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 1 + [3] * 2, dtype=np.int64)
    train, val = split_indices(labels, 0.2, seed=0)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    assert len(val) == round(len(labels) * 0.2)
    val_counts = np.bincount(labels[val], minlength=4)
    assert val_counts[0] == 10 and val_counts[1] == 6
    train_counts = np.bincount(labels[train], minlength=4)
    assert (train_counts >= 1).all()
    assert val_counts[2] == 0  # a class with one label is never held out
    again = split_indices(labels, 0.2, seed=0)
    np.testing.assert_array_equal(again[1], val)


@pytest.mark.parametrize("n, fraction", [(9, 0.2), (50, 0.0)])
def test_no_validation_below_ten_labels_or_zero_fraction(n, fraction):
    labels = np.arange(n) % 3
    train, val = split_indices(labels, fraction, seed=0)
    assert len(val) == 0 and sorted(train) == list(range(n))


def test_split_of_singletons_holds_nothing_out():
    labels = np.arange(12)  # twelve classes, one label each
    train, val = split_indices(labels, 0.5, seed=0)
    assert len(val) == 0 and len(train) == 12


def test_class_weights_favour_rare_classes():
    labels = np.array([0] * 90 + [1] * 10)
    w = class_weights(labels, 3)
    assert w[1] / w[0] == pytest.approx(3.0)  # sqrt(90 / 10)
    assert (w[labels].mean()).item() == pytest.approx(1.0)


def test_default_epochs_bounds():
    assert default_epochs(20) == 40
    assert default_epochs(1_000) == 40
    assert default_epochs(10_000) == 4
    assert default_epochs(50_000) == 3
    values = [default_epochs(n) for n in range(1, 100_000, 997)]
    assert values == sorted(values, reverse=True)
    assert max(n * default_epochs(n) for n in range(1_000, 200_000, 1_000)) <= 600_000


def test_divergence_is_reported_not_saved(weather_small):
    images, labels = weather_small
    model, _ = build_model(3, "none", seed=0)
    with pytest.raises(FloatingPointError, match="lower LEARNING_RATE"):
        fit(model, images[:8], labels[:8], epochs=3, batch_size=4, lr=1e30,
            val_fraction=0.0, seed=0, device="cpu")  # fmt: skip


def test_fit_reads_a_memmap(weather_small, tmp_path):
    images, labels = weather_small
    path = tmp_path / "labeled.u8"
    images[:12].tofile(path)
    pool = np.memmap(path, dtype=np.uint8, mode="r", shape=(12, *images.shape[1:]))
    model, _ = build_model(3, "none", seed=0)
    result = fit(model, pool, labels[:12], epochs=1, batch_size=4, lr=1e-3, val_fraction=0.25,
                 seed=0, device="cpu")  # fmt: skip
    assert result.val_size == 3 and result.train_size == 9
