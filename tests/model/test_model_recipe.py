"""recipe.py: the served model is a plain ResNet18 whose fc is the chosen head, edge cases."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from ml_backend.model.features import backbone_model, embed
from ml_backend.model.inference import predict
from ml_backend.model.recipe import (
    ABSENT_LOGIT,
    RecipeConfig,
    fit_head,
    fit_pseudo_head,
    train_served_model,
)

FAST = RecipeConfig(finetune_min_labels=10**9)


@pytest.fixture(scope="module")
def pool(weather_pool):
    images, labels = weather_pool
    torch.manual_seed(0)
    state = backbone_model(None, 3).state_dict()  # a random backbone, the same for embed and serve
    emb = embed(backbone_model(state, 3), images, device="cpu", batch_size=64)
    return images, labels, emb, np.arange(1000, 1000 + len(images)), state


def _serve(pool, rows, num_classes=3, cfg=FAST, labels=None):
    images, y, emb, ids, state = pool
    rows = np.asarray(rows)
    return train_served_model(
        images, rows, y[rows] if labels is None else labels, ids, num_classes,
        backbone_state=state, embeddings=emb, cfg=cfg, device="cpu",
    )  # fmt: skip


def test_predict_on_the_served_model_gives_the_heads_probabilities(pool):
    images, y, emb, _, _ = pool
    rows = np.arange(30)
    model, metrics = _serve(
        pool,
        rows,
        cfg=RecipeConfig(finetune_min_labels=10**9, pseudo_labels=False, label_spreading=False),
    )
    assert type(model.fc) is torch.nn.Linear and model.fc.out_features == 3
    probs, got_emb = predict(model, images, device="cpu", batch_size=32)
    np.testing.assert_allclose(got_emb, emb, atol=1e-4)
    mean, scale = emb.mean(0).astype(np.float64), emb.std(0).astype(np.float64) + 1e-6
    head = fit_head(emb[rows], y[rows], 3, mean=mean, scale=scale, c=FAST.head_c)
    np.testing.assert_allclose(probs, head.probs(emb), atol=1e-4)
    assert set(metrics) >= {"served", "why", "candidates", "val_accuracy", "val_size", "train_size"}
    assert metrics["served"] == "head" and set(metrics["candidates"]) == {"head"}
    assert metrics["train_size"] == 30
    assert metrics["val_size"] == 30  # every label validated once across the folds
    _, both = _serve(pool, rows)
    assert set(both["candidates"]) == {"head", "head+pseudo", "head+spread"}


def test_standardisation_folds_exactly_into_fc(pool):
    _, y, emb, _, _ = pool
    mean, scale = emb.mean(0).astype(np.float64), emb.std(0).astype(np.float64) + 1e-6
    head = fit_head(emb[:40], y[:40], 3, mean=mean, scale=scale, c=0.5)
    from sklearn.linear_model import LogisticRegression

    ref = LogisticRegression(C=0.5, max_iter=300, tol=1e-4).fit((emb[:40] - mean) / scale, y[:40])
    np.testing.assert_allclose(head.probs(emb), ref.predict_proba((emb - mean) / scale), atol=1e-6)


def test_heads_score_in_blocks_and_draw_pseudo_labels_from_a_bounded_sample(pool, monkeypatch):
    """Large pools: logits come block by block (no float64 copy of the pool), the same numbers;
    pseudo-labels are drawn from a sample of at most PSEUDO_CANDIDATES unlabeled rows."""
    from ml_backend.model import heads, recipe

    _, y, emb, _, _ = pool
    mean, scale = emb.mean(0, dtype=np.float64), emb.std(0, dtype=np.float64) + 1e-6
    head = fit_head(emb[:40], y[:40], 3, mean=mean, scale=scale, c=0.5)
    whole = emb.astype(np.float64) @ head.weight.T + head.bias
    monkeypatch.setattr(heads, "LOGIT_BLOCK", 7)
    np.testing.assert_allclose(head.logits(emb), whole, rtol=1e-12)

    seen = []
    real_probs = recipe.LinearHead.probs
    monkeypatch.setattr(
        recipe.LinearHead, "probs", lambda self, x: seen.append(len(x)) or real_probs(self, x)
    )
    monkeypatch.setattr(heads, "PSEUDO_CANDIDATES", 25)
    cfg = RecipeConfig(pseudo_threshold=0.0, pseudo_rounds=1)
    labeled = np.arange(10)
    out = fit_pseudo_head(emb, labeled, y[labeled], 3, cfg, mean=mean, scale=scale)
    assert seen == [25] and out.weight.shape == (3, emb.shape[1])


def test_warm_started_heads_end_where_cold_ones_do_in_fewer_steps(pool, monkeypatch):
    """``fit_head(init=...)`` starts L-BFGS from another head (a pseudo-label round from the
    round before): the same optimum within the solver's tolerance, multinomial and binary, and
    fewer iterations; a head that lacks a class now labeled is no starting point."""
    from sklearn.linear_model import LogisticRegression

    from ml_backend.model import recipe

    _, y, emb, _, _ = pool
    mean, scale = recipe.column_stats(emb)
    iterations = []
    real_fit = LogisticRegression.fit

    def fit(self, *args, **kwargs):
        out = real_fit(self, *args, **kwargs)
        iterations.append((bool(self.warm_start), int(self.n_iter_[0])))
        return out

    monkeypatch.setattr(LogisticRegression, "fit", fit)
    for rows in (np.arange(60), np.flatnonzero(y < 2)[:60]):  # three classes, then two
        first = fit_head(emb[rows[:40]], y[rows[:40]], 3, mean=mean, scale=scale, c=0.5)
        cold = fit_head(emb[rows], y[rows], 3, mean=mean, scale=scale, c=0.5)
        warm = fit_head(emb[rows], y[rows], 3, mean=mean, scale=scale, c=0.5, init=first)
        (_, _), (_, n_cold), (was_warm, n_warm) = iterations[-3:]
        assert was_warm and n_warm < n_cold
        # both stop at the tolerance: near-ties may move a little, decisions do not
        np.testing.assert_allclose(warm.probs(emb), cold.probs(emb), atol=0.1)
        assert (warm.probs(emb).argmax(1) == cold.probs(emb).argmax(1)).mean() > 0.97
    two = fit_head(emb[:60][y[:60] < 2], y[:60][y[:60] < 2], 3, mean=mean, scale=scale, c=0.5)
    fit_head(emb[:60], y[:60], 3, mean=mean, scale=scale, c=0.5, init=two)
    assert iterations[-1][0] is False  # class 2 had no weights in ``two``


def test_column_stats_match_numpy_block_by_block(pool, monkeypatch):
    from ml_backend.model import recipe

    _, _, emb, _, _ = pool
    mean, scale = recipe.column_stats(emb, block=7)
    np.testing.assert_allclose(mean, emb.mean(0, dtype=np.float64), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(scale, emb.std(0, dtype=np.float64) + 1e-6, rtol=1e-6)


def test_two_labels_of_two_classes(pool):
    _, y, _, _, _ = pool
    rows = [int(np.flatnonzero(y == 0)[0]), int(np.flatnonzero(y == 1)[0])]
    model, metrics = _serve(pool, rows)
    # too few to cross-validate: the incumbent, the spread head, is served
    assert metrics["served"] == "head+spread" and metrics["train_size"] == 2
    assert "too few to cross-validate; served head+spread" in metrics["why"]
    assert model.fc.bias[2].item() == ABSENT_LOGIT  # no label of class 2 yet
    _, plain = _serve(pool, rows, cfg=RecipeConfig(finetune_min_labels=10**9,
                                                   label_spreading=False))  # fmt: skip
    assert plain["served"] == "head"


def test_classes_without_labels_are_never_predicted(pool):
    images, y, _, _, _ = pool
    rows = np.flatnonzero(y < 2)[:20]
    model, _ = _serve(pool, rows, num_classes=5)
    probs, _ = predict(model, images, device="cpu", batch_size=64)
    assert probs.shape == (len(images), 5) and np.isfinite(probs).all()
    assert probs[:, 2:].max() < 1e-20


def test_one_labeled_class_and_a_single_label_class(pool):
    _, y, _, _, _ = pool
    only_zero = np.flatnonzero(y == 0)[:4]
    model, _ = _serve(pool, only_zero)
    assert model.fc.bias.argmax().item() == 0
    single = np.concatenate([np.flatnonzero(y == 0)[:8], np.flatnonzero(y == 1)[:1]])
    _, metrics = _serve(pool, single)
    assert metrics["train_size"] == 9


def test_fewer_labels_than_folds(pool):
    _, y, _, _, _ = pool
    rows = np.concatenate([np.flatnonzero(y == c)[:1] for c in range(3)])
    _, metrics = _serve(pool, rows)
    assert metrics["served"] in ("head", "head+pseudo", "head+spread")


def test_finetune_is_tried_from_enough_labels(pool):
    cfg = RecipeConfig(finetune_min_labels=20, epochs=1, batch_size=16, val_fraction=0.4)
    model, metrics = _serve(pool, np.arange(60), cfg=cfg)
    assert "finetune" in metrics["candidates"] and "hash split" in metrics["why"]
    assert metrics["served"] in ("head", "head+pseudo", "head+spread", "finetune")


def test_config_from_settings():
    settings = types.SimpleNamespace(
        epochs=3, batch_size=16, learning_rate=2e-3, seed=9, pseudo_labels="off",
        finetune_min_labels=50, label_spreading=False,
    )  # fmt: skip
    cfg = RecipeConfig.from_settings(settings)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed) == (3, 16, 2e-3, 9)
    assert cfg.pseudo_labels is False and cfg.finetune_min_labels == 50
    assert cfg.label_spreading is False
    assert RecipeConfig.from_settings(object()) == RecipeConfig()


def test_bad_labels_are_refused(pool):
    with pytest.raises(ValueError, match="labels must be in"):
        _serve(pool, [0, 1], labels=np.array([0, 7]))
