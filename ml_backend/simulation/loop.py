"""The active-learning loop with an oracle: train, evaluate, rank, reveal labels, repeat.

Every step uses the backend's own code (``model.network.build_model``, ``model.train.fit``,
``model.inference.predict``, ``selection.rank``), so a curve measured here is the curve the live
queue produces, not that of a re-implementation.

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

from ml_backend.simulation.data import Dataset, DatasetError

logger = logging.getLogger(__name__)
# fit's per-epoch lines go here, so the command line can quiet them apart from the round lines.
train_logger = logger.getChild("train")


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """Knobs of one simulation (see ``ml_backend.simulate`` for their command-line names)."""

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
    measure: str = "entropy"
    inference_batch_size: int = 256


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


def _train_and_eval(
    data: Dataset, split: Split, labeled: np.ndarray, cfg: SimConfig, device
) -> tuple[float, np.ndarray, np.ndarray, float]:
    """Fit a fresh model on ``pool[labeled]``; return test accuracy, pool probs/embeddings, secs."""
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


def full_data_accuracy(data: Dataset, split: Split, cfg: SimConfig, device) -> float:
    """Accuracy of a model trained on the whole pool: the ceiling the curves are measured against."""
    accuracy, _, _, seconds = _train_and_eval(data, split, np.arange(len(split.pool)), cfg, device)
    logger.info("seed %d: full-data accuracy %.4f (%.1f s)", split.seed, accuracy, seconds)
    return accuracy


def run_seed(
    data: Dataset, split: Split, cfg: SimConfig, device, tick: Callable[[], None] = lambda: None
) -> Iterator[dict]:
    """Yield one row per (strategy, round) for one seed; ``tick`` after every training."""
    from ml_backend.selection import rank

    accuracy0, probs0, emb0, secs0 = _train_and_eval(data, split, split.initial, cfg, device)
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
            )
            picked = np.asarray(ranking.order[: cfg.batch], dtype=np.int64)
            if mask[picked].any() or len(np.unique(picked)) != len(picked):
                raise RuntimeError(f"{strategy} picked an already labeled or repeated row")
            labeled, ranked_as = np.concatenate([labeled, picked]), ranking.strategy
            accuracy, probs, emb, secs = _train_and_eval(data, split, labeled, cfg, device)
            tick()
            logger.info(
                "seed %d %s round %d: %d labels, accuracy %.4f (%.1f s)",
                split.seed, strategy, round_ + 1, len(labeled), accuracy, secs,
            )  # fmt: skip
