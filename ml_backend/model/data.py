"""Batches from uint8 image arrays, normalised and augmented on the device.

Images stay ``uint8 [N, S, S, 3]`` on the host (possibly a ``numpy.memmap``) until the last
moment: a background thread gathers each batch into a (pinned, on CUDA) host buffer while the
device works on the previous one, the copy to the device is asynchronous, and conversion to
float, ImageNet normalisation and augmentation run on the device. On CUDA the result is
``channels_last``, which is what the tensor cores want.
"""

from __future__ import annotations

import functools
import math
import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Index = slice | np.ndarray
_DONE = object()


def check_images(images: np.ndarray) -> None:
    """Raise ``ValueError`` unless ``images`` is ``uint8 [N, S, S, 3]``."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(
            f"images must be a uint8 array [N, S, S, 3] (RGB); got {images.dtype} {images.shape}"
        )


def _gather(images: np.ndarray, index: Index, out: np.ndarray | None) -> np.ndarray:
    """Copy the rows of ``images`` named by ``index`` into ``out`` (or a new array)."""
    if isinstance(index, slice):
        if out is None:
            return np.array(images[index])
        out[...] = images[index]
        return out
    return np.take(images, index, axis=0, out=out)


def iter_device_batches(
    images: np.ndarray, indices: Sequence[Index], device: torch.device, depth: int = 3
) -> Iterator[torch.Tensor]:
    """Yield ``uint8 [B, S, S, 3]`` tensors on ``device``, one per entry of ``indices``.

    A producer thread gathers batch ``k + 1`` (and ``k + 2``) while the caller computes on batch
    ``k``. On CUDA each batch goes through one of ``depth`` pinned buffers with a
    ``non_blocking`` copy on a side stream (overlapping the compute); a buffer is refilled only
    after the event recorded behind its copy has completed. Entries are slices (sequential
    reads, best for memmaps) or index arrays.
    """
    if len(indices) == 0:
        return
    cuda = device.type == "cuda"
    buffers: list[torch.Tensor] = []
    copy_stream = torch.cuda.Stream(device) if cuda else None
    if cuda:
        rows = max(_length(ix, len(images)) for ix in indices)
        buffers = [
            torch.empty((rows, *images.shape[1:]), dtype=torch.uint8).pin_memory()
            for _ in range(depth)
        ]
    events: list[torch.cuda.Event | None] = [None] * depth
    free: queue.Queue = queue.Queue()
    ready: queue.Queue = queue.Queue()
    for slot in range(depth):
        free.put(slot)

    def produce() -> None:
        try:
            for index in indices:
                slot = free.get()
                if slot is None:  # the consumer stopped early
                    return
                if cuda:
                    if events[slot] is not None:
                        events[slot].synchronize()
                    n = _length(index, len(images))
                    _gather(images, index, buffers[slot].numpy()[:n])
                    ready.put((slot, n))
                else:
                    ready.put((slot, _gather(images, index, None)))
            ready.put(_DONE)
        except BaseException as exc:  # hand the failure to the consumer thread
            ready.put(exc)

    thread = threading.Thread(target=produce, name="batch-gather", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            slot, payload = item
            if cuda:
                # The copy runs on its own stream so it overlaps the previous batch's compute;
                # the compute stream waits for it, and the producer waits before refilling.
                with torch.cuda.stream(copy_stream):
                    batch = buffers[slot][:payload].to(device, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(copy_stream)
                compute_stream = torch.cuda.current_stream(device)
                compute_stream.wait_event(event)
                batch.record_stream(compute_stream)
                events[slot] = event
            else:
                batch = torch.from_numpy(payload)
            free.put(slot)
            yield batch
    finally:
        free.put(None)
        thread.join(timeout=10)


def _length(index: Index, n: int) -> int:
    return len(range(n)[index]) if isinstance(index, slice) else len(index)


def normalize(batch: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``uint8 [B, S, S, 3]`` -> float32 ``[B, 3, S, S]`` normalised with ImageNet mean/std.

    Permuting an NHWC tensor already gives the channels_last layout, so CUDA keeps it; on the
    CPU the result is made contiguous in the default layout.
    """
    mean, std = _statistics(batch.device)
    x = (batch.permute(0, 3, 1, 2).float() - mean) / std
    if channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


@functools.lru_cache(maxsize=8)
def _statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a fresh host->device copy of pageable memory per batch would make
    # the CPU wait for the GPU each time. Normal (not inference) tensors, usable in training.
    with torch.inference_mode(False):
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255.0
    return mean, std


def augment(
    x: torch.Tensor,
    generator: torch.Generator,
    min_scale: float = 0.7,
    max_ratio: float = 4 / 3,
) -> torch.Tensor:
    """Random horizontal flip plus a light random resized crop, all in one ``grid_sample``.

    Each image gets a crop covering ``min_scale``..1 of its area, with aspect ratio up to
    ``max_ratio`` either way, at a random position inside the image, resized back to the
    original size; half of the images are mirrored. Deterministic for a given ``generator``
    state (which must live on ``x``'s device).
    """
    b = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, generator=generator, device=x.device)

    area = uniform(min_scale, 1.0)
    log_ratio = uniform(-math.log(max_ratio), math.log(max_ratio))
    sx = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    sy = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    tx = (uniform(-1.0, 1.0)) * (1.0 - sx)
    ty = (uniform(-1.0, 1.0)) * (1.0 - sy)
    flip = torch.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=torch.float32)
    theta[:, 0, 0] = sx * flip
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out
