"""The active-learning loop with an oracle: train, evaluate, rank, reveal labels, repeat.

Every step uses the backend's own code, so a curve measured here is the curve the live queue
produces, not that of a re-implementation. The default ``recipe="backend"`` is the backend's
low-label recipe: one self-supervised backbone per seed (``model.pretrain.pretrain_backbone`` on
the pool's images, never the test split's), its frozen embeddings (``model.features.embed``) and
``model.recipe.train_served_model`` each round. ``recipe="legacy"`` is the path before it:
``model.network.build_model`` + ``model.train.fit`` from scratch each round.

Fairness: for one seed, every strategy starts from the same test split, the same random initial
labeled set and the same initial weights, so round 0 is trained once per seed and shared; the
strategies only differ from round 1 on, by what they chose to label.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Iterator

import numpy as np
from sklearn.model_selection import train_test_split

from ml_backend.selection.uncertainty import DEFAULT_MEASURE
from ml_backend.simulation.data import Dataset, DatasetError

logger = logging.getLogger(__name__)
# fit's per-epoch lines go here, so the command line can quiet them apart from the round lines.
train_logger = logger.getChild("train")


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """Knobs of one simulation (see ``ml_backend.simulation.cli`` for their command-line names)."""

    strategies: tuple[str, ...]
    initial: int = 20
    batch: int = 20
    rounds: int = 10
    seeds: int = 3
    test_fraction: float = 0.25
    epochs: int = 0
    train_batch_size: int = 64
    lr: float = 1e-3
    device: str = "cpu"
    pretrained: str = "none"
    shortlist_factor: float = 5.0
    measure: str = DEFAULT_MEASURE
    probcover_radius: float = 0.5  # PROBCOVER_RADIUS's default; 0: the purity rule
    inference_batch_size: int = 256
    recipe: str = "backend"  # or "legacy"
    pretrain_budget_s: float = 60.0
    pretrain_epochs: int = 100
    finetune_min_labels: int = 200


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One seed's pretrained backbone and the frozen embeddings of its pool and test images."""

    state_dict: dict
    pool_embeddings: np.ndarray
    test_embeddings: np.ndarray
    seconds: float


@dataclasses.dataclass(frozen=True)
class Split:
    """One seed's partition: the pool the oracle labels from, the held-out test set, round 0."""

    seed: int
    pool: np.ndarray  # indices into the dataset
    test: np.ndarray
    initial: np.ndarray  # indices into ``pool``

    @property
    def initial_id(self) -> str:
        """Short fingerprint of the initial labeled set, written on every row to show fairness."""
        rows = np.sort(self.pool[self.initial]).astype(np.int64)
        return hashlib.sha1(rows.tobytes()).hexdigest()[:10]


def make_split(data: Dataset, cfg: SimConfig, seed: int) -> Split:
    """Stratified test split and a random initial set with at least two classes, for ``seed``."""
    indices = np.arange(len(data.labels))
    pool, test = train_test_split(
        indices, test_size=cfg.test_fraction, random_state=seed, stratify=data.labels
    )
    pool, test = np.sort(pool), np.sort(test)
    needed = cfg.initial + cfg.rounds * cfg.batch
    if needed > len(pool):
        raise DatasetError(
            f"the budget needs {needed} labels (--initial {cfg.initial} + --rounds {cfg.rounds} x "
            f"--batch {cfg.batch}) but the pool has only {len(pool)} images after the "
            f"{cfg.test_fraction:g} test split; lower the budget or use a bigger dataset"
        )
    rng = np.random.default_rng(seed)
    # Redraw (deterministically) until two classes are present: training needs them.
    for _ in range(100):
        initial = np.sort(rng.choice(len(pool), size=cfg.initial, replace=False))
        if len(np.unique(data.labels[pool[initial]])) >= 2:
            return Split(seed, pool, test, initial.astype(np.int64))
    raise DatasetError(f"--initial {cfg.initial} is too small to hold two classes; raise it")


def pretrain(data: Dataset, split: Split, cfg: SimConfig, device) -> Backbone | None:
    """The backend recipe's backbone for one seed (``None`` for the legacy recipe)."""
    if cfg.recipe == "legacy":
        return None
    from ml_backend.model.features import backbone_model, embed
    from ml_backend.model.pretrain import pretrain_backbone

    started = time.perf_counter()
    pool_images = data.images[split.pool]
    result = pretrain_backbone(
        pool_images, budget_s=cfg.pretrain_budget_s, max_epochs=cfg.pretrain_epochs,
        batch_size=cfg.train_batch_size, seed=split.seed, device=device, log=train_logger,
    )  # fmt: skip
    model = backbone_model(result.state_dict, len(data.classes))
    emb = embed(model, data.images[np.concatenate([split.pool, split.test])], device=device,
                batch_size=cfg.inference_batch_size)  # fmt: skip
    seconds = time.perf_counter() - started
    logger.info(
        "seed %d: pretrained the backbone for %d epochs (%d images) in %.1f s",
        split.seed, result.epochs, result.images_seen, seconds,
    )  # fmt: skip
    n = len(split.pool)
    return Backbone(result.state_dict, emb[:n], emb[n:], seconds)


def _train_and_eval(
    data: Dataset,
    split: Split,
    labeled: np.ndarray,
    cfg: SimConfig,
    device,
    backbone: Backbone | None = None,
) -> tuple[float, np.ndarray, np.ndarray, float]:
    """Fit a fresh model on ``pool[labeled]``; return test accuracy, pool probs/embeddings, secs."""
    if backbone is not None:
        return _recipe_train_and_eval(data, split, labeled, cfg, device, backbone)
    from ml_backend.model.inference import predict
    from ml_backend.model.network import build_model
    from ml_backend.model.train import default_epochs, fit

    started = time.perf_counter()
    rows = split.pool[labeled]
    # Same seed -> same initial weights for every strategy and round: only the labels differ.
    model, _ = build_model(len(data.classes), cfg.pretrained, seed=split.seed)
    fit(
        model,
        data.images[rows],
        data.labels[rows],
        epochs=cfg.epochs or default_epochs(len(rows)),
        batch_size=cfg.train_batch_size,
        lr=cfg.lr,
        val_fraction=0.0,  # the held-out test split measures accuracy; no label is wasted
        seed=split.seed,
        device=device,
        log=train_logger,
    )
    # One inference pass over pool + test: the pool feeds the ranking, the test the accuracy.
    both = np.concatenate([split.pool, split.test])
    probs, embeddings = predict(
        model, data.images[both], device=device, batch_size=cfg.inference_batch_size
    )
    n_pool = len(split.pool)
    accuracy = float(np.mean(probs[n_pool:].argmax(1) == data.labels[split.test]))
    return accuracy, probs[:n_pool], embeddings[:n_pool], time.perf_counter() - started


def _recipe_train_and_eval(
    data: Dataset, split: Split, labeled: np.ndarray, cfg: SimConfig, device, backbone: Backbone
) -> tuple[float, np.ndarray, np.ndarray, float]:
    """``train_served_model`` on the frozen embeddings; scored like ``_train_and_eval``."""
    from ml_backend.model.inference import predict
    from ml_backend.model.recipe import RecipeConfig, train_served_model

    started = time.perf_counter()
    recipe = RecipeConfig(
        epochs=cfg.epochs, batch_size=cfg.train_batch_size, lr=cfg.lr, seed=split.seed,
        finetune_min_labels=cfg.finetune_min_labels,
    )  # fmt: skip
    pool_images = data.images[split.pool]
    model, metrics = train_served_model(
        pool_images, labeled, data.labels[split.pool[labeled]], split.pool, len(data.classes),
        backbone_state=backbone.state_dict, embeddings=backbone.pool_embeddings, cfg=recipe,
        device=device, log=train_logger,
    )  # fmt: skip
    if metrics["served"] == "finetune":  # a new backbone: embed again, like the live job
        both = np.concatenate([split.pool, split.test])
        probs, emb = predict(
            model, data.images[both], device=device, batch_size=cfg.inference_batch_size
        )
        n = len(split.pool)
        pool_probs, test_probs, pool_emb = probs[:n], probs[n:], emb[:n]
    else:  # the head on the cached embeddings is exactly what predict() would give
        pool_probs = _head_probs(model, backbone.pool_embeddings)
        test_probs = _head_probs(model, backbone.test_embeddings)
        pool_emb = backbone.pool_embeddings
    accuracy = float(np.mean(test_probs.argmax(1) == data.labels[split.test]))
    return accuracy, pool_probs, pool_emb, time.perf_counter() - started


def _head_probs(model, embeddings: np.ndarray) -> np.ndarray:
    weight = model.fc.weight.detach().double().numpy()
    bias = model.fc.bias.detach().double().numpy()
    z = embeddings.astype(np.float64) @ weight.T + bias
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def full_data_accuracy(
    data: Dataset, split: Split, cfg: SimConfig, device, backbone: Backbone | None = None
) -> float:
    """Accuracy of a model trained on the whole pool: the ceiling the curves are measured against."""
    if cfg.recipe != "legacy" and backbone is None:
        backbone = pretrain(data, split, cfg, device)
    everything = np.arange(len(split.pool))
    accuracy, _, _, seconds = _train_and_eval(data, split, everything, cfg, device, backbone)
    logger.info("seed %d: full-data accuracy %.4f (%.1f s)", split.seed, accuracy, seconds)
    return accuracy


def run_seed(
    data: Dataset,
    split: Split,
    cfg: SimConfig,
    device,
    tick: Callable[[], None] = lambda: None,
    backbone: Backbone | None = None,
) -> Iterator[dict]:
    """Yield one row per (strategy, round) for one seed; ``tick`` after every training.

    ``backbone`` (from ``pretrain``) is required by the backend recipe and shared by all rounds.
    """
    from ml_backend.selection import rank

    if cfg.recipe != "legacy" and backbone is None:
        backbone = pretrain(data, split, cfg, device)
    accuracy0, probs0, emb0, secs0 = _train_and_eval(
        data, split, split.initial, cfg, device, backbone
    )
    tick()
    for strategy in cfg.strategies:
        labeled, accuracy, probs, emb, secs = split.initial, accuracy0, probs0, emb0, secs0
        ranked_as = "initial (random)"
        for round_ in range(cfg.rounds + 1):
            yield {
                "strategy": strategy,
                "seed": split.seed,
                "round": round_,
                "n_labels": len(labeled),
                "accuracy": round(accuracy, 6),
                "train_seconds": round(secs, 3),
                "ranked_as": ranked_as,
                "initial_set": split.initial_id,
            }
            if round_ == cfg.rounds:
                break
            mask = np.zeros(len(split.pool), dtype=bool)
            mask[labeled] = True
            ranking = rank(
                strategy,
                probs=probs,
                embeddings=emb,
                labeled_mask=mask,
                batch=cfg.batch,
                shortlist_factor=cfg.shortlist_factor,
                measure=cfg.measure,
                seed=split.seed * 100_003 + round_,
                device=device,
                n_classes=len(data.classes),
                probcover_radius=cfg.probcover_radius or None,
            )
            picked = np.asarray(ranking.order[: cfg.batch], dtype=np.int64)
            if mask[picked].any() or len(np.unique(picked)) != len(picked):
                raise RuntimeError(f"{strategy} picked an already labeled or repeated row")
            labeled, ranked_as = np.concatenate([labeled, picked]), ranking.strategy
            accuracy, probs, emb, secs = _train_and_eval(
                data, split, labeled, cfg, device, backbone
            )
            tick()
            logger.info(
                "seed %d %s round %d: %d labels, accuracy %.4f (%.1f s)",
                split.seed, strategy, round_ + 1, len(labeled), accuracy, secs,
            )  # fmt: skip
