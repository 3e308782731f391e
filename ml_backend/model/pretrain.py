"""Self-supervised pretraining of the ResNet18 backbone on the project's own pool (SimCLR).

Without ImageNet weights a random-init ResNet18 fine-tuned on tens of labels learns little more
than a pixel nearest neighbour. The unlabeled pool is usually hundreds to thousands of images of
exactly the kind to be labeled, so the backbone first learns from it: two augmented views of
every image are pulled together and pushed away from the other images of the batch (NT-Xent,
Chen et al. 2020) through a small projection MLP that is thrown away afterwards.

Augmentations are chosen to be safe for any image type, digits and grayscale scans included:
random resized crops (a third of the area upwards, so a digit keeps enough of its stroke), a
small rotation, brightness/contrast jitter, saturation/hue-like channel jitter only when the pool
has colour, and random grayscale. No horizontal flip: it changes the meaning of digits, text and
many diagrams (``flip=True`` turns it on for photos).

After training, BatchNorm running statistics are recomputed on clean pool images: statistics of
augmented views do not match the images the frozen backbone embeds later, and the mismatch costs
linear-probe accuracy.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ml_backend.model.backbones import BackboneError, BackboneStore  # noqa: F401 (API)
from ml_backend.model.data import check_images, iter_device_batches, normalize
from ml_backend.model.network import EMBEDDING_DIM, new_resnet18
from ml_backend.model.train import amp_dtype_for, concrete_device

logger = logging.getLogger(__name__)

TEMPERATURE = 0.2
PROJECTION_DIM = 128
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-5
BN_RECALIBRATION_IMAGES = 2048
MIN_CROP_SCALE = 0.3


@dataclasses.dataclass
class PretrainResult:
    """What one ``pretrain_backbone`` run produced.

    ``state_dict`` holds the ResNet18 without ``fc`` (torchvision key names), on the CPU.
    """

    state_dict: dict[str, torch.Tensor]
    epochs: int
    images_seen: int
    seconds: float
    loss: float | None
    history: list[float]


def pretrain_backbone(
    images: np.ndarray,
    *,
    budget_s: float,
    max_epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device | str,
    init_state: dict[str, torch.Tensor] | None = None,
    flip: bool = False,
    progress: Callable[[dict], None] | None = None,
    log: logging.Logger | logging.LoggerAdapter | None = None,
) -> PretrainResult:
    """Train a ResNet18 backbone with SimCLR on ``images`` until the budget or epochs run out.

    Args:
        images: ``uint8 [N, S, S, 3]`` RGB pool (a memmap is fine); at least 2 images.
        budget_s: Seconds of training; the run stops at the first step past it.
        max_epochs: Passes over the pool at most.
        batch_size: Images per step (each gives two views); capped at the pool size.
        seed: Seeds the initialisation, the order and the augmentations.
        device: Where to train (mixed precision and channels_last on CUDA).
        init_state: A backbone to continue from (e.g. the previous one of the project).
        flip: Also mirror views horizontally (photos yes; digits, text no).
        progress: Called after every epoch with ``epoch``, ``loss``, ``images_per_s``,
            ``seconds_left``.
        log: Logger for the per-epoch lines.

    Returns:
        A ``PretrainResult``; ``epochs`` counts epochs started (the last may be cut short).
    """
    log = log or logger
    check_images(images)
    if len(images) < 2:
        raise ValueError(f"pretraining needs at least 2 images; got {len(images)}")
    if max_epochs < 1 or batch_size < 2:
        raise ValueError(
            f"max_epochs >= 1 and batch_size >= 2 needed; got {max_epochs}, {batch_size}"
        )
    device = concrete_device(torch.device(device))
    cuda = device.type == "cuda"
    amp_dtype = amp_dtype_for(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = new_resnet18(1)
        head = _projection_head()
    model.fc = nn.Identity()
    if init_state is not None:
        model.load_state_dict(_backbone_only(init_state), strict=True)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    model.to(device, memory_format=fmt)
    head.to(device)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    generator = torch.Generator(device=device).manual_seed(seed)
    rng = np.random.default_rng(seed)
    colour = _has_colour(images, rng)
    batch_size = min(batch_size, len(images))
    started = time.perf_counter()
    history: list[float] = []
    seen = 0
    epoch = 0
    out_of_time = False
    model.train()
    head.train()
    while epoch < max_epochs and not out_of_time:
        epoch += 1
        t0, epoch_seen = time.perf_counter(), 0
        loss_sum = torch.zeros((), device=device)
        order = rng.permutation(len(images))
        batches = [np.sort(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
        batches = [b for b in batches if len(b) >= 2]
        for index, batch in zip(
            batches, iter_device_batches(images, batches, device), strict=False
        ):
            x = normalize(batch, channels_last=cuda)
            views = torch.cat([_view(x, generator, colour, flip) for _ in range(2)])
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                z = head(model(views))
            loss = nt_xent(z.float(), TEMPERATURE)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach() * len(index)
            epoch_seen += len(index)
            if time.perf_counter() - started >= budget_s:
                out_of_time = True
                break
        seen += epoch_seen
        epoch_loss = loss_sum.item() / max(epoch_seen, 1)
        if not math.isfinite(epoch_loss):
            raise FloatingPointError(f"pretraining diverged at epoch {epoch} (loss {epoch_loss})")
        history.append(epoch_loss)
        seconds = time.perf_counter() - t0
        row = {
            "epoch": epoch,
            "loss": round(epoch_loss, 5),
            "images_per_s": round(epoch_seen / max(seconds, 1e-9), 1),
            "seconds_left": round(max(0.0, budget_s - (time.perf_counter() - started)), 1),
        }
        log.info(
            "pretrain epoch %d/%d loss %.4f %.0f images/s %.0f s left",
            epoch, max_epochs, epoch_loss, row["images_per_s"], row["seconds_left"],
        )  # fmt: skip
        if progress is not None:
            progress(row)
    recalibrate_batchnorm(model, images, device=device, batch_size=max(batch_size, 64), seed=seed)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return PretrainResult(
        state_dict=state,
        epochs=epoch,
        images_seen=seen,
        seconds=round(time.perf_counter() - started, 3),
        loss=history[-1] if history else None,
        history=history,
    )


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss for ``z = [views_a; views_b]`` (``[2B, D]``): view ``i``'s positive is ``i±B``."""
    z = F.normalize(z, dim=1)
    n = z.shape[0] // 2
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def recalibrate_batchnorm(
    model: nn.Module, images: np.ndarray, *, device: torch.device, batch_size: int, seed: int
) -> None:
    """Recompute every BatchNorm's running mean/var on clean images (2,048 at most)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    rows = np.random.default_rng(seed).permutation(len(images))
    rows = rows[:BN_RECALIBRATION_IMAGES]
    batches = [np.sort(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    batches = [b for b in batches if len(b) >= 2] or [np.arange(len(images))]
    model.train()
    cuda = device.type == "cuda"
    with torch.no_grad():
        for batch in iter_device_batches(images, batches, device):
            model(normalize(batch, channels_last=cuda))
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


def _projection_head() -> nn.Module:
    return nn.Sequential(
        nn.Linear(EMBEDDING_DIM, EMBEDDING_DIM),
        nn.BatchNorm1d(EMBEDDING_DIM),
        nn.ReLU(inplace=True),
        nn.Linear(EMBEDDING_DIM, PROJECTION_DIM),
    )


def _backbone_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _has_colour(images: np.ndarray, rng: np.random.Generator) -> bool:
    """Whether a sample of the pool has any pixel whose channels differ (not grayscale)."""
    sample = np.take(images, rng.choice(len(images), size=min(64, len(images)), replace=False), 0)
    return bool(np.any(sample.max(axis=3).astype(np.int16) - sample.min(axis=3) > 8))


def _view(x: torch.Tensor, g: torch.Generator, colour: bool, flip: bool) -> torch.Tensor:
    """One random view of a normalised batch: crop + rotation, then photometric jitter."""
    b, dev = x.shape[0], x.device

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, *shape, generator=g, device=dev)

    area = uniform(MIN_CROP_SCALE, 1.0)
    log_ratio = uniform(-math.log(4 / 3), math.log(4 / 3))
    sx = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    sy = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    angle = uniform(-math.pi / 12, math.pi / 12)  # +-15 degrees
    mirror = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if flip else torch.ones(b, device=dev)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 1] = sx * cos * mirror, -sy * sin
    theta[:, 1, 0], theta[:, 1, 1] = sx * sin * mirror, sy * cos
    theta[:, 0, 2] = uniform(-1.0, 1.0) * (1.0 - sx)
    theta[:, 1, 2] = uniform(-1.0, 1.0) * (1.0 - sy)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # Photometric jitter in normalised space: contrast around the image mean, then brightness.
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * uniform(0.6, 1.4, 1, 1, 1) + mean + uniform(-0.4, 0.4, 1, 1, 1)
    if colour:  # gentle: in webcams, satellite tiles and stains colour is often the class
        out = out * uniform(0.9, 1.1, 3, 1, 1) + uniform(-0.1, 0.1, 3, 1, 1)
    if x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out
