"""Fine-tuning: a stratified validation split, ``train_one_epoch``, ``evaluate`` and ``fit``.

AdamW with a short linear warm-up and a cosine decay per step, label smoothing 0.1, and loss
weights proportional to ``1 / sqrt(n_class)`` so that rare classes count without the big common
ones being drowned (camera-trap sets are very imbalanced). On CUDA: mixed precision (bf16 when
the GPU supports it, else fp16 with a gradient scaler) and channels_last. On the CPU: plain fp32,
and the same seed with the same starting weights gives the same result.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ml_backend.errors import NotEnoughLabels
from ml_backend.model.data import augment, check_images, iter_device_batches, normalize

logger = logging.getLogger(__name__)

LABEL_SMOOTHING = 0.1
WEIGHT_DECAY = 0.01
MIN_VAL_LABELS = 10


@dataclasses.dataclass
class TrainResult:
    """What one ``fit`` did; ``history`` has one dict per epoch."""

    history: list[dict]
    val_accuracy: float | None
    val_size: int
    train_size: int
    seconds: float
    device: str
    epochs: int = 0
    train_loss: float | None = None
    amp: str = "fp32"


def default_epochs(n_labels: int) -> int:
    """Epochs for a retrain on ``n_labels`` labels: about 40,000 images seen, 3 to 40 epochs.

    A few dozen labels get 40 quick epochs; 10,000 get 4; tens of thousands get 3, so the
    number of optimizer steps stays bounded by the label count, not multiplied by it.
    """
    return int(min(40, max(3, math.ceil(40_000 / max(n_labels, 1)))))


def split_indices(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified ``(train, val)`` index arrays.

    No validation (empty ``val``) when there are fewer than 10 labels or ``val_fraction`` is 0.
    Otherwise ``round(n * val_fraction)`` labels are held out, shared among classes in
    proportion to their size (largest remainders first), and every class keeps at least one
    training example, so a class with a single label is never validated on.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    rng = np.random.default_rng(seed)
    if n < MIN_VAL_LABELS or val_fraction <= 0:
        return np.sort(rng.permutation(n)), np.empty(0, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * val_fraction
    take = np.minimum(np.floor(quota).astype(np.int64), counts - 1)
    target = min(int(round(n * val_fraction)), int((counts - 1).sum()))
    for i in np.argsort(-(quota - np.floor(quota)), kind="stable"):
        if take.sum() >= target:
            break
        if take[i] < counts[i] - 1:
            take[i] += 1
    val = []
    for cls, k in zip(classes, take, strict=True):
        members = np.flatnonzero(labels == cls)
        val.extend(rng.choice(members, size=int(k), replace=False).tolist())
    val_idx = np.sort(np.asarray(val, dtype=np.int64))
    train_idx = np.setdiff1d(np.arange(n), val_idx)
    return train_idx, val_idx


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Loss weights ``1 / sqrt(n_c)``, scaled so an average training example weighs 1."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1)), 1.0)
    weights /= (weights * counts).sum() / counts.sum()
    return torch.tensor(weights, dtype=torch.float32)


def _epoch_batches(train_idx: np.ndarray, batch_size: int, rng: np.random.Generator) -> list:
    """Shuffled batches of row indices; a last batch of one (BatchNorm cannot) is dropped.

    Rows are sorted inside each batch: the loss does not care, and a memmap reads faster.
    """
    order = rng.permutation(train_idx)
    batches = [np.sort(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


def amp_dtype_for(device: torch.device) -> torch.dtype | None:
    """bf16 on GPUs that have it, fp16 on older ones, ``None`` (fp32) on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def concrete_device(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``, so generators and tensors name the same device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    images: np.ndarray,
    labels: torch.Tensor,
    batches: list[np.ndarray],
    device: torch.device,
    generator: torch.Generator,
    amp_dtype: torch.dtype | None,
) -> tuple[float, float, int]:
    """One pass over ``batches`` (row index arrays); returns ``(loss, accuracy, images_seen)``.

    ``labels`` holds every row's label on ``device``. Totals stay on the device until the end
    so the loop never waits for the GPU.
    """
    model.train()
    cuda = device.type == "cuda"
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    # One host->device copy of the epoch's row order, not one (synchronising) copy per step.
    order = torch.from_numpy(np.concatenate(batches)).to(device) if batches else None
    for index, batch in zip(batches, iter_device_batches(images, batches, device), strict=True):
        x = augment(normalize(batch, channels_last=cuda), generator)
        y = labels[order[seen : seen + len(index)]]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.detach().float() * len(index)
        correct += (logits.argmax(1) == y).sum()
        seen += len(index)
    return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1), seen


def evaluate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    device: torch.device,
    batch_size: int,
    amp_dtype: torch.dtype | None = None,
) -> tuple[float, float]:
    """Plain (unweighted, unsmoothed) cross-entropy and accuracy of ``model`` on ``images``."""
    model.eval()
    cuda = device.type == "cuda"
    n = len(images)
    slices = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    y_all = torch.as_tensor(labels, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    with torch.inference_mode():
        for s, batch in zip(slices, iter_device_batches(images, slices, device), strict=True):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(normalize(batch, channels_last=cuda)).float()
            y = y_all[s]
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
    return loss_sum.item() / max(n, 1), correct.item() / max(n, 1)


def _optimizer(model: nn.Module, lr: float) -> torch.optim.AdamW:
    # No weight decay on BatchNorm parameters and biases (torchvision references' norm_weight_decay=0).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr)


def _schedule(
    optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, min(100, total_steps // 20))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    val_fraction: float,
    seed: int,
    device: torch.device | str,
    log: logging.Logger | logging.LoggerAdapter | None = None,
    progress: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place on ``images`` / ``labels`` and report how it went.

    Args:
        model: A ResNet18 from ``network.build_model``; moved to ``device``.
        images: ``uint8 [N, S, S, 3]`` RGB (a memmap is fine).
        labels: ``int64 [N]`` class indices into the model's head.
        epochs: Passes over the training split (``default_epochs`` picks one by label count).
        batch_size: Training batch size.
        lr: Peak AdamW learning rate (cosine decay to 0 after a short warm-up).
        val_fraction: Share held out for validation (stratified; only with >= 10 labels).
        seed: Seeds the split, the shuffling and the augmentation.
        device: Where to train.
        log: Logger for the per-epoch lines (defaults to this module's logger).
        progress: Called after every epoch with that epoch's history dict plus ``epochs``.

    Raises:
        NotEnoughLabels: fewer than two training examples.
        ValueError: images and labels do not fit together or with the model.
    """
    log = log or logger
    device = concrete_device(torch.device(device))
    check_images(images)
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = model.fc.out_features
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}); got {labels.min()}..{labels.max()}"
        )
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive; got {epochs}, {batch_size}")
    train_idx, val_idx = split_indices(labels, val_fraction, seed)
    if len(train_idx) < 2:
        raise NotEnoughLabels(f"training needs at least 2 labeled images; got {len(train_idx)}")
    if len(val_idx) == 0:
        log.info(
            "No validation split (%d labels; needs at least %d and VAL_FRACTION > 0): "
            "validation accuracy will not be reported",
            len(labels),
            MIN_VAL_LABELS,
        )
    # Validation images are small and read every epoch: hold them in memory once.
    val_images = np.take(images, val_idx, axis=0) if len(val_idx) else None
    cuda = device.type == "cuda"
    amp_dtype = amp_dtype_for(device)
    if cuda:
        torch.backends.cudnn.benchmark = (
            True  # fixed image size: let cuDNN pick the fastest kernels
        )
    model.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
    criterion = nn.CrossEntropyLoss(
        weight=class_weights(labels[train_idx], num_classes).to(device),
        label_smoothing=LABEL_SMOOTHING,
    )
    rng = np.random.default_rng(seed)
    steps_per_epoch = len(_epoch_batches(train_idx, batch_size, np.random.default_rng(0)))
    optimizer = _optimizer(model, lr)
    scheduler = _schedule(optimizer, epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    generator = torch.Generator(device=device).manual_seed(seed)
    labels_dev = torch.as_tensor(labels, device=device)
    history: list[dict] = []
    started = time.perf_counter()
    val_acc = None
    loss = None
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        batches = _epoch_batches(train_idx, batch_size, rng)
        loss, train_acc, seen = train_one_epoch(
            model, criterion, optimizer, scheduler, scaler, images, labels_dev, batches, device,
            generator, amp_dtype,
        )  # fmt: skip
        train_s = time.perf_counter() - t0
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"training diverged at epoch {epoch}/{epochs} (loss {loss}); "
                f"lower LEARNING_RATE (now {lr}) and retrain"
            )
        if val_images is not None:
            _, val_acc = evaluate(
                model, val_images, labels[val_idx], device, max(batch_size, 256), amp_dtype
            )
        row = {
            "epoch": epoch,
            "loss": round(loss, 5),
            "train_accuracy": round(train_acc, 5),
            "val_accuracy": None if val_acc is None else round(val_acc, 5),
            "images_per_s": round(seen / max(train_s, 1e-9), 1),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        history.append(row)
        log.info(
            "epoch %d/%d loss %.4f train acc %.3f val acc %s %.0f images/s %.1f s",
            epoch, epochs, loss, train_acc, "n/a" if val_acc is None else f"{val_acc:.3f}",
            row["images_per_s"], row["seconds"],
        )  # fmt: skip
        if progress is not None:
            progress({**row, "epochs": epochs})
    model.eval()
    return TrainResult(
        history=history,
        val_accuracy=val_acc,
        val_size=len(val_idx),
        train_size=len(train_idx),
        seconds=round(time.perf_counter() - started, 3),
        device=str(device),
        epochs=epochs,
        train_loss=loss,
        amp={None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype],
    )
