"""The low-label recipe: which model to serve after N labels, chosen by validation.

Candidates, cheapest first:

- ``head``: multinomial logistic regression on the frozen (self-supervised) backbone's
  embeddings, standardised with the whole pool's mean and spread. Trains in milliseconds, and
  standardisation folds exactly into ``fc`` (``W / s``, ``b - W m / s``), so the served model is
  a plain torchvision ResNet18.
- ``head+pseudo``: the same head refit with the pool's confident predictions added as labels of
  lower weight (self-training, ``pseudo_rounds`` rounds). Unlabeled images near labeled clusters
  move the boundary into the gaps between clusters.
- ``finetune``: from ``finetune_min_labels`` labels on, the whole network fine-tuned with
  ``train.fit`` starting from the pretrained backbone (never from a served version, whose weights
  have seen the validation tasks).

The heads are compared by cross-validated accuracy over hash folds of the task ids
(``split.fold_of``); the fine-tune, too slow to cross-validate, against the head on the hash
split's validation part. The winner is refit on every label before it is served.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch import nn

from ml_backend.model.features import backbone_model
from ml_backend.model.split import fold_of, hash_split
from ml_backend.model.train import default_epochs, fit

logger = logging.getLogger(__name__)

# Pseudo-labels per real label at most (the most confident first): bounds the refit's cost.
PSEUDO_PER_LABEL = 5
# Pseudo-labels are drawn from at most this many unlabeled rows (a seeded sample of a larger
# pool): the refit then costs the same at 100,000 images as at 20,000.
PSEUDO_CANDIDATES = 20_000
# Rows per float64 block when a head scores embeddings (never a float64 copy of the pool).
LOGIT_BLOCK = 16_384
# Logit of a class with no label yet: far below any fitted class, so it is never predicted.
ABSENT_LOGIT = -100.0


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    """Knobs of ``train_served_model`` (``from_settings`` reads them from ``Settings``)."""

    folds: int = 5
    pseudo_labels: bool = True
    pseudo_threshold: float = 0.9
    pseudo_weight: float = 0.5
    pseudo_rounds: int = 2
    head_c: float = 0.5
    finetune_min_labels: int = 200
    val_fraction: float = 0.2
    epochs: int = 0  # 0: train.default_epochs by label count
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0

    @classmethod
    def from_settings(cls, settings) -> RecipeConfig:
        """Read the knobs that ``settings`` has; the others keep their defaults."""
        pseudo = getattr(settings, "pseudo_labels", cls.pseudo_labels)
        if isinstance(pseudo, str):
            pseudo = pseudo.strip().lower() in ("on", "true", "1", "yes")
        return cls(
            pseudo_labels=bool(pseudo),
            finetune_min_labels=int(
                getattr(settings, "finetune_min_labels", cls.finetune_min_labels)
            ),
            val_fraction=float(getattr(settings, "val_fraction", cls.val_fraction)) or 0.2,
            epochs=int(getattr(settings, "epochs", cls.epochs)),
            batch_size=int(getattr(settings, "batch_size", cls.batch_size)),
            lr=float(getattr(settings, "learning_rate", cls.lr)),
            seed=int(getattr(settings, "seed", cls.seed)),
        )


@dataclasses.dataclass
class LinearHead:
    """``logits = x @ weight.T + bias`` on raw embeddings (standardisation already folded in)."""

    weight: np.ndarray  # float64 [C, 512]
    bias: np.ndarray  # float64 [C]

    def logits(self, x: np.ndarray) -> np.ndarray:
        out = np.empty((len(x), len(self.bias)))
        for start in range(0, len(x), LOGIT_BLOCK):  # float64 per block, not of the whole pool
            block = np.asarray(x[start : start + LOGIT_BLOCK], dtype=np.float64)
            out[start : start + LOGIT_BLOCK] = block @ self.weight.T + self.bias
        return out

    def probs(self, x: np.ndarray) -> np.ndarray:
        z = self.logits(x)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def fit_head(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    mean: np.ndarray,
    scale: np.ndarray,
    c: float,
    weights: np.ndarray | None = None,
    init: LinearHead | None = None,
) -> LinearHead:
    """Multinomial logistic regression on ``(x - mean) / scale``, folded back onto raw ``x``.

    Classes without a label get zero weights and ``ABSENT_LOGIT``; with a single labeled class
    every image is that class. ``init``: a head fitted on similar rows (the same labels before
    pseudo-labels were added) to start L-BFGS from; the problem is convex, so it changes how
    many iterations the fit takes, not (beyond the solver's tolerance) where it ends.
    """
    present = np.unique(y)
    weight = np.zeros((num_classes, x.shape[1]))
    bias = np.full(num_classes, ABSENT_LOGIT)
    if len(present) == 1:
        bias[present[0]] = 0.0
        return LinearHead(weight, bias)
    clf = LogisticRegression(C=c, max_iter=300, tol=1e-4)
    if init is not None and not np.any(init.bias[present] <= ABSENT_LOGIT):
        # back to standardised space: coef = w * scale, intercept = b + w @ mean
        coef = init.weight[present] * scale
        intercept = init.bias[present] + init.weight[present] @ mean
        if len(present) == 2:  # sklearn's single row: logit(b) - logit(a)
            coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
        clf.set_params(warm_start=True)
        clf.coef_, clf.intercept_ = coef, intercept
    # One BLAS thread: at a few thousand rows x 512 a threaded OpenBLAS spends more on waking
    # and joining its threads than on the products (4x slower per L-BFGS step on 2 cores).
    with threadpool_limits(limits=1, user_api="blas"):
        clf.fit((x - mean) / scale, y, sample_weight=weights)
    coef, intercept = clf.coef_, clf.intercept_
    if len(present) == 2:  # sklearn keeps one row for two classes: logit(b) - logit(a)
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    w = coef / scale
    weight[clf.classes_] = w
    bias[clf.classes_] = intercept - w @ mean
    return LinearHead(weight, bias)


def fit_pseudo_head(
    embeddings: np.ndarray,
    labeled: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    cfg: RecipeConfig,
    *,
    mean: np.ndarray,
    scale: np.ndarray,
    exclude: np.ndarray | None = None,
    base: LinearHead | None = None,
) -> LinearHead:
    """``fit_head`` plus ``cfg.pseudo_rounds`` rounds of confident pool predictions as labels.

    ``labeled`` are rows of ``embeddings``; rows in ``exclude`` (a validation fold) are never
    pseudo-labeled. At most ``PSEUDO_PER_LABEL`` pseudo-labels per real label are kept (the most
    confident); each weighs ``cfg.pseudo_weight``, and together never more than the real labels,
    so a large pool cannot drown them. They are drawn from at most ``PSEUDO_CANDIDATES``
    unlabeled rows (a sample seeded by ``cfg.seed`` of a larger pool). ``base``: the plain head
    on these labels when the caller has it already (it is the first round); each round starts
    from the one before.
    """
    head = base or fit_head(
        embeddings[labeled], y, num_classes, mean=mean, scale=scale, c=cfg.head_c
    )
    if len(np.unique(y)) < 2:
        return head
    mask = np.ones(len(embeddings), dtype=bool)
    mask[labeled] = False
    if exclude is not None:
        mask[exclude] = False
    pool = np.flatnonzero(mask)
    if len(pool) > PSEUDO_CANDIDATES:
        pool = np.sort(
            np.random.default_rng(cfg.seed).choice(pool, PSEUDO_CANDIDATES, replace=False)
        )
    for _ in range(cfg.pseudo_rounds):
        probs = head.probs(embeddings[pool])
        confidence = probs.max(axis=1)
        sure = np.flatnonzero(confidence >= cfg.pseudo_threshold)
        if not len(sure):
            break
        sure = sure[np.argsort(-confidence[sure], kind="stable")[: PSEUDO_PER_LABEL * len(labeled)]]
        rows, guess = pool[sure], probs[sure].argmax(axis=1)
        w = min(cfg.pseudo_weight, len(labeled) / len(rows))
        x = np.concatenate([embeddings[labeled], embeddings[rows]])
        yy = np.concatenate([y, guess])
        weights = np.concatenate([np.ones(len(labeled)), np.full(len(rows), w)])
        head = fit_head(x, yy, num_classes, mean=mean, scale=scale, c=cfg.head_c,
                        weights=weights, init=head)  # fmt: skip
    return head


def train_served_model(
    images: np.ndarray,
    labeled_idx: np.ndarray,
    labels: np.ndarray,
    task_ids: np.ndarray,
    num_classes: int,
    *,
    backbone_state: dict[str, torch.Tensor] | None,
    embeddings: np.ndarray,
    cfg: RecipeConfig,
    device: torch.device | str,
    progress: Callable[[dict], None] | None = None,
    log: logging.Logger | logging.LoggerAdapter | None = None,
) -> tuple[nn.Module, dict]:
    """Pick the best candidate by validation, refit it on every label, return it with metrics.

    Args:
        images: ``uint8 [N, S, S, 3]`` whole pool (a memmap is fine).
        labeled_idx: Rows of the labeled tasks.
        labels: Their class ids (``0..num_classes-1``).
        task_ids: Task id of every pool row (the hash folds follow them).
        num_classes: Classes of the label config, labeled yet or not.
        backbone_state: The pretrained backbone (``None``: random init).
        embeddings: ``float32 [N, 512]`` of the pool through that backbone (``features.embed``).
        cfg: The recipe's knobs.
        device: Where a fine-tune runs.
        progress: Passed on to ``train.fit`` (per-epoch dicts) when a fine-tune runs.
        log: Logger for the decision line.

    Returns:
        ``(model, metrics)``: an eval-mode torchvision ResNet18 whose ``fc`` is the served head,
        and ``served``, ``why``, ``candidates``, ``val_accuracy``, ``val_size``, ``train_size``,
        ``seconds``.
    """
    log = log or logger
    started = time.perf_counter()
    labeled_idx = np.asarray(labeled_idx, dtype=np.int64)
    y = np.asarray(labels, dtype=np.int64)
    if len(labeled_idx) != len(y) or len(y) < 1:
        raise ValueError(f"{len(labeled_idx)} labeled rows but {len(y)} labels (need >= 1)")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}); got {y.min()}..{y.max()}")
    emb = np.asarray(embeddings)  # float32 stays float32: heads take float64 rows as they need
    mean, scale = column_stats(emb)
    folds = fold_of(np.asarray(task_ids)[labeled_idx], cfg.folds)
    heads = {"head": _plain_head(cfg), "head+pseudo": _pseudo_head(cfg)}
    if not cfg.pseudo_labels:
        heads.pop("head+pseudo")
    candidates, val_size = _cross_validate(
        heads, emb, labeled_idx, y, folds, num_classes, mean, scale, cfg.head_c
    )
    served = _best(candidates, default="head")
    if candidates[served] is None:
        why = f"{len(y)} labels are too few to cross-validate; served the plain head"
    else:
        why = (
            f"{served} had the best {cfg.folds}-fold cross-validated accuracy "
            f"({candidates[served]:.3f} over {val_size} labels)"
        )
    head = heads[served](emb, labeled_idx, y, num_classes, mean, scale)
    model = _with_head(backbone_model(backbone_state, num_classes), head)
    val_accuracy, train_size = candidates[served], len(y)
    if len(y) >= cfg.finetune_min_labels:
        tuned = _try_finetune(images, labeled_idx, y, task_ids, num_classes, backbone_state, emb,
                              heads[served], mean, scale, cfg, device, progress, log)  # fmt: skip
        if tuned is not None:
            (ft_acc, head_acc, n_val), candidates["finetune"] = tuned, tuned[0]
            verdict = "beat" if ft_acc > head_acc else "did not beat"
            why = (
                f"fine-tuning {verdict} the {served} head on the hash split "
                f"({ft_acc:.3f} vs {head_acc:.3f} on {n_val} tasks)"
            )
            if ft_acc > head_acc:
                model = _finetune(images, labeled_idx, y, num_classes, backbone_state, cfg, device,
                                  progress, log)  # fmt: skip
                served, val_accuracy, val_size = "finetune", ft_acc, n_val
    metrics = {
        "served": served,
        "why": why,
        "candidates": {k: None if v is None else round(v, 5) for k, v in candidates.items()},
        "val_accuracy": None if val_accuracy is None else round(val_accuracy, 5),
        "val_size": int(val_size),
        "train_size": int(train_size),
        "seconds": round(time.perf_counter() - started, 3),
    }
    log.info("Serving %s (%s); candidates %s", served, why, metrics["candidates"])
    return model.eval(), metrics


HeadMaker = Callable[..., LinearHead]


def column_stats(emb: np.ndarray, block: int = LOGIT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std + 1e-6)`` of each column in float64, a block of rows at a time: no float64
    copy of a large pool (``ndarray.std`` made two, 0.6 s at 100,000 x 512)."""
    n, total, squares = len(emb), np.zeros(emb.shape[1]), np.zeros(emb.shape[1])
    for start in range(0, n, block):
        x = np.asarray(emb[start : start + block], dtype=np.float64)
        total += x.sum(axis=0)
        squares += np.einsum("ij,ij->j", x, x)
    mean = total / max(n, 1)
    return mean, np.sqrt(np.maximum(squares / max(n, 1) - mean * mean, 0.0)) + 1e-6


def _plain_head(cfg: RecipeConfig) -> HeadMaker:
    def make(emb, rows, y, num_classes, mean, scale, exclude=None, base=None) -> LinearHead:
        return base or fit_head(emb[rows], y, num_classes, mean=mean, scale=scale, c=cfg.head_c)

    return make


def _pseudo_head(cfg: RecipeConfig) -> HeadMaker:
    def make(emb, rows, y, num_classes, mean, scale, exclude=None, base=None) -> LinearHead:
        return fit_pseudo_head(emb, rows, y, num_classes, cfg, mean=mean, scale=scale,
                               exclude=exclude, base=base)  # fmt: skip

    return make


def _cross_validate(
    heads: dict[str, HeadMaker], emb, rows, y, folds, num_classes, mean, scale, c
) -> tuple[dict[str, float | None], int]:
    """Each head's accuracy over every fold that has validation rows and training rows
    (``None`` if none). The plain head of a fold is fitted once and shared: it is the first
    round of the pseudo-labeled one."""
    correct, total = dict.fromkeys(heads, 0), 0
    for fold in np.unique(folds):
        val = folds == fold
        if val.all():
            continue
        base = fit_head(emb[rows[~val]], y[~val], num_classes, mean=mean, scale=scale, c=c)
        for name, make in heads.items():
            head = make(emb, rows[~val], y[~val], num_classes, mean, scale, exclude=rows[val],
                        base=base)  # fmt: skip
            correct[name] += int((head.logits(emb[rows[val]]).argmax(axis=1) == y[val]).sum())
        total += int(val.sum())
    return {name: (correct[name] / total if total else None) for name in heads}, total


def _best(candidates: dict[str, float | None], default: str) -> str:
    """The candidate with the highest accuracy; ``default`` on ties or when none was measured."""
    best = default
    for name, acc in candidates.items():
        if acc is not None and (candidates[best] is None or acc > candidates[best]):
            best = name
    return best


def _with_head(model: nn.Module, head: LinearHead) -> nn.Module:
    """Copy ``head`` into ``model.fc`` (float32)."""
    with torch.no_grad():
        model.fc.weight.copy_(torch.as_tensor(head.weight, dtype=torch.float32))
        model.fc.bias.copy_(torch.as_tensor(head.bias, dtype=torch.float32))
    return model


def _try_finetune(images, rows, y, task_ids, num_classes, backbone_state, emb, make, mean, scale,
                  cfg, device, progress, log):  # fmt: skip
    """``(finetune_acc, head_acc, val_size)`` on the hash split, ``None`` if it is too small."""
    from ml_backend.model.inference import predict

    train, val = hash_split(np.asarray(task_ids)[rows], cfg.val_fraction)
    if len(val) < 10 or len(np.unique(y[train])) < 2:
        return None
    model = _finetune(images, rows[train], y[train], num_classes, backbone_state, cfg, device,
                      progress, log)  # fmt: skip
    probs, _ = predict(model, np.take(images, rows[val], axis=0), device=device,
                       batch_size=max(cfg.batch_size, 256))  # fmt: skip
    ft_acc = float(np.mean(probs.argmax(axis=1) == y[val]))
    head = make(emb, rows[train], y[train], num_classes, mean, scale, exclude=rows[val])
    head_acc = float(np.mean(head.logits(emb[rows[val]]).argmax(axis=1) == y[val]))
    return ft_acc, head_acc, len(val)


def _finetune(images, rows, y, num_classes, backbone_state, cfg, device, progress, log):
    """A fresh model from the backbone, fine-tuned with ``train.fit`` on ``images[rows]``."""
    model = backbone_model(backbone_state, num_classes)
    fit(model, np.take(images, np.sort(rows), axis=0), y[np.argsort(rows)],
        epochs=cfg.epochs or default_epochs(len(rows)), batch_size=cfg.batch_size, lr=cfg.lr,
        val_fraction=0.0, seed=cfg.seed, device=device, log=log, progress=progress)  # fmt: skip
    return model.eval()
