"""Self-supervised pretraining of the ResNet18 backbone on the project's own pool (SimCLR).

Without ImageNet weights a random-init ResNet18 fine-tuned on tens of labels learns little more
than a pixel nearest neighbour. The unlabeled pool is usually hundreds to thousands of images of
exactly the kind to be labeled, so the backbone first learns from it: two augmented views of
every image are pulled together and pushed away from the other images of the batch (NT-Xent,
Chen et al. 2020) through a small projection MLP that is thrown away afterwards.

Augmentations are chosen to be safe for any image type, digits and grayscale scans included:
random resized crops (a third of the area upwards, so a digit keeps enough of its stroke), a
small rotation, brightness/contrast jitter, and gentle per-channel jitter only when the pool has
colour. In a colour pool brightness and colour are often the class (an overcast sky, a stain,
a land-cover tile), so there the brightness/contrast jitter is half as strong
(``COLOUR_PHOTOMETRIC``; on the generated weather set it lifted the served head by 0.6-1.0
points at 10-200 random labels). No random grayscale, for the same reason. No horizontal flip:
it changes the meaning of digits, text and many diagrams (``flip=True`` turns it on for photos).

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
# (contrast, brightness) jitter: contrast factor in 1 +- c, brightness shift in +- b (normalised)
GREY_PHOTOMETRIC = (0.4, 0.4)
COLOUR_PHOTOMETRIC = (0.2, 0.2)


@dataclasses.dataclass
class PretrainResult:
    """What one ``pretrain_backbone`` call produced.

    ``state_dict`` holds the ResNet18 without ``fc`` (torchvision key names), on the CPU.
    ``checkpoint`` is set when the call paused at ``slice_s`` before the run was over: pass it
    back as ``resume`` to go on (``state_dict`` is then the unfinished backbone, without the
    BatchNorm recalibration). ``seconds`` counts training seconds over every slice so far.
    """

    state_dict: dict[str, torch.Tensor]
    epochs: int
    images_seen: int
    seconds: float
    loss: float | None
    history: list[float]
    checkpoint: dict | None = None

    @property
    def finished(self) -> bool:
        return self.checkpoint is None


CHECKPOINT_VERSION = 1


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
    slice_s: float | None = None,
    resume: dict | None = None,
    pause_early: Callable[[float], bool] | None = None,
) -> PretrainResult:
    """Train a ResNet18 backbone with SimCLR on ``images`` until the budget or epochs run out.

    Args:
        images: ``uint8 [N, S, S, 3]`` RGB pool (a memmap is fine); at least 2 images.
        budget_s: Seconds of training in all (over every slice); the run stops at the first
            step past it.
        max_epochs: Passes over the pool at most.
        batch_size: Images per step (each gives two views); capped at the pool size.
        seed: Seeds the initialisation, the order and the augmentations.
        device: Where to train (mixed precision and channels_last on CUDA).
        init_state: A backbone to continue from (e.g. the previous one of the project).
        flip: Also mirror views horizontally (photos yes; digits, text no).
        progress: Called after every epoch (and at a pause) with ``epoch``, ``loss``,
            ``images_per_s``, ``seconds_left``.
        log: Logger for the per-epoch lines.
        slice_s: Pause after this many seconds of this call (at least one step) and return a
            ``checkpoint``; None runs to the end.
        pause_early: With ``slice_s``, asked after every step with the seconds this call has
            run; True pauses the slice now (e.g. when other work waits).
        resume: A previous call's ``checkpoint``: the run goes on where it paused (the same
            steps as without the pause, on the same images). When the pool's size changed, the
            weights and the optimizer go on and a new epoch starts over the new pool.

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
    run = _SimCLRRun(images, batch_size=batch_size, seed=seed, device=device,
                     init_state=init_state, resume=resume)  # fmt: skip
    started = time.perf_counter()

    def trained_s() -> float:
        return run.elapsed + time.perf_counter() - started

    out_of_time = paused = False
    while not (out_of_time or paused):
        if run.order is None:
            if run.epoch >= max_epochs:
                break
            run.new_epoch()
        t0 = time.perf_counter()
        for _, batch in run.remaining_batches():
            run.step(batch, flip)
            if trained_s() >= budget_s:
                out_of_time = True
            elif slice_s is not None:
                ran = time.perf_counter() - started
                paused = ran >= slice_s or (pause_early is not None and pause_early(ran))
            if out_of_time or paused:
                break
        run.epoch_seconds += time.perf_counter() - t0
        if run.next_batch >= len(run.batches) or out_of_time:
            row = run.end_epoch(budget_s - trained_s())
            log.info(
                "pretrain epoch %d/%d loss %.4f %.0f images/s %.0f s left",
                row["epoch"], max_epochs, row["loss"], row["images_per_s"], row["seconds_left"],
            )  # fmt: skip
            if progress is not None:
                progress(row)
    run.elapsed = trained_s()
    finished = out_of_time or (run.order is None and run.epoch >= max_epochs)
    if not finished:
        if progress is not None and run.order is not None:  # paused mid-epoch
            progress(run.progress_row(budget_s - run.elapsed))
        return run.result(checkpoint=run.checkpoint())
    recalibrate_batchnorm(
        run.model, images, device=device, batch_size=max(run.batch_size, 64), seed=seed
    )
    return run.result(checkpoint=None)


class _SimCLRRun:
    """The state of one SimCLR run: networks, optimizer, random streams and the position in the
    current epoch; ``checkpoint()`` / ``resume=`` carry it between slices (or processes)."""

    def __init__(self, images, *, batch_size, seed, device, init_state, resume):
        self.images, self.device = images, device
        self.cuda = device.type == "cuda"
        self.amp_dtype = amp_dtype_for(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = new_resnet18(1)
            self.head = _projection_head()
        self.model.fc = nn.Identity()
        if init_state is not None:
            self.model.load_state_dict(_backbone_only(init_state), strict=True)
        fmt = torch.channels_last if self.cuda else torch.contiguous_format
        self.model.to(device, memory_format=fmt)
        self.head.to(device)
        params = list(self.model.parameters()) + list(self.head.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.colour = _has_colour(images, self.rng)
        self.batch_size = min(batch_size, len(images))
        self.epoch = self.seen = 0
        self.history: list[float] = []
        self.elapsed = 0.0
        self.order: np.ndarray | None = None  # the current epoch's image order; None between
        self.batches: list[np.ndarray] = []
        self.next_batch = self.epoch_seen = 0
        self.epoch_seconds = 0.0
        self.loss_sum = torch.zeros((), device=device)
        if resume is not None:
            self._restore(resume)
        self.model.train()
        self.head.train()

    def new_epoch(self) -> None:
        self.epoch += 1
        self.order = self.rng.permutation(len(self.images))
        self._split_batches()
        self.next_batch = self.epoch_seen = 0
        self.epoch_seconds = 0.0
        self.loss_sum = torch.zeros((), device=self.device)

    def _split_batches(self) -> None:
        order, size = self.order, self.batch_size
        batches = [np.sort(order[i : i + size]) for i in range(0, len(order), size)]
        self.batches = [b for b in batches if len(b) >= 2]

    def remaining_batches(self):
        todo = self.batches[self.next_batch :]
        return zip(todo, iter_device_batches(self.images, todo, self.device), strict=False)

    def step(self, batch: torch.Tensor, flip: bool) -> None:
        x = normalize(batch, channels_last=self.cuda)
        views = torch.cat([_view(x, self.generator, self.colour, flip) for _ in range(2)])
        with torch.autocast(self.device.type, dtype=self.amp_dtype,
                            enabled=self.amp_dtype is not None):  # fmt: skip
            z = self.head(self.model(views))
        loss = nt_xent(z.float(), TEMPERATURE)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        rows = len(self.batches[self.next_batch])
        self.loss_sum += loss.detach() * rows
        self.epoch_seen += rows
        self.next_batch += 1

    def progress_row(self, seconds_left: float) -> dict:
        loss = self.loss_sum.item() / max(self.epoch_seen, 1)
        return {
            "epoch": self.epoch,
            "loss": round(loss, 5),
            "images_per_s": round(self.epoch_seen / max(self.epoch_seconds, 1e-9), 1),
            "seconds_left": round(max(0.0, seconds_left), 1),
        }

    def end_epoch(self, seconds_left: float) -> dict:
        row = self.progress_row(seconds_left)
        epoch_loss = self.loss_sum.item() / max(self.epoch_seen, 1)
        if not math.isfinite(epoch_loss):
            raise FloatingPointError(
                f"pretraining diverged at epoch {self.epoch} (loss {epoch_loss})"
            )
        self.seen += self.epoch_seen
        self.history.append(epoch_loss)
        self.order = None
        return row

    def result(self, checkpoint: dict | None) -> PretrainResult:
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        return PretrainResult(
            state_dict=state,
            epochs=self.epoch,
            images_seen=self.seen + (self.epoch_seen if self.order is not None else 0),
            seconds=round(self.elapsed, 3),
            loss=self.history[-1] if self.history else None,
            history=list(self.history),
            checkpoint=checkpoint,
        )

    def checkpoint(self) -> dict:
        def cpu(state):
            return {k: v.detach().cpu().clone() for k, v in state.items()}

        return {
            "version": CHECKPOINT_VERSION,
            "model": cpu(self.model.state_dict()),
            "head": cpu(self.head.state_dict()),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state().cpu(),
            "rng": self.rng.bit_generator.state,
            "colour": self.colour,
            "pool_size": len(self.images),
            "batch_size": self.batch_size,
            "epoch": self.epoch,
            "order": None if self.order is None else torch.from_numpy(self.order.copy()),
            "next_batch": self.next_batch,
            "epoch_seen": self.epoch_seen,
            "epoch_seconds": self.epoch_seconds,
            "loss_sum": float(self.loss_sum.item()),
            "seen": self.seen,
            "history": list(self.history),
            "elapsed": self.elapsed,
        }

    def _restore(self, ckpt: dict) -> None:
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"pretraining checkpoint version {ckpt.get('version')!r} is not "
                             f"{CHECKPOINT_VERSION}")  # fmt: skip
        self.model.load_state_dict(ckpt["model"])
        self.head.load_state_dict(ckpt["head"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.generator.set_state(ckpt["generator"])
        self.rng.bit_generator.state = ckpt["rng"]
        self.colour = bool(ckpt["colour"])
        self.epoch, self.seen = int(ckpt["epoch"]), int(ckpt["seen"])
        self.history, self.elapsed = list(ckpt["history"]), float(ckpt["elapsed"])
        same_pool = ckpt["pool_size"] == len(self.images) and ckpt["batch_size"] == self.batch_size
        if ckpt["order"] is not None and same_pool:
            self.order = torch.as_tensor(ckpt["order"]).numpy().astype(np.int64)
            self._split_batches()
            self.next_batch, self.epoch_seen = int(ckpt["next_batch"]), int(ckpt["epoch_seen"])
            self.epoch_seconds = float(ckpt["epoch_seconds"])
            self.loss_sum = torch.tensor(float(ckpt["loss_sum"]), device=self.device)
        elif ckpt["order"] is not None:  # the pool changed: the started epoch counts as done
            self.seen += int(ckpt["epoch_seen"])
            if ckpt["epoch_seen"]:
                self.history.append(float(ckpt["loss_sum"]) / int(ckpt["epoch_seen"]))


def _to_cpu(value):
    """A copy of an optimizer state with every tensor on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


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
    contrast, brightness = COLOUR_PHOTOMETRIC if colour else GREY_PHOTOMETRIC
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * uniform(1 - contrast, 1 + contrast, 1, 1, 1) + mean
    out = out + uniform(-brightness, brightness, 1, 1, 1)
    if colour:  # gentle: in webcams, satellite tiles and stains colour is often the class
        out = out * uniform(0.9, 1.1, 3, 1, 1) + uniform(-0.1, 0.1, 3, 1, 1)
    if x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out
