"""Whole-pool inference: class probabilities and 512-d embeddings for every image.

Built for throughput on a GPU: large batches, mixed precision, channels_last, a producer thread
that gathers the next uint8 batches into pinned memory while the GPU works, asynchronous copies
both ways, and results read back one batch late so the host never waits on the batch the GPU is
computing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ml_backend.model.data import check_images, iter_device_batches, normalize
from ml_backend.model.network import EMBEDDING_DIM, embed_and_classify
from ml_backend.model.train import amp_dtype_for, concrete_device

PROGRESS_EVERY_S = 0.5


def predict(
    model: nn.Module,
    images: np.ndarray,
    *,
    device: torch.device | str,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Predict every image.

    Args:
        model: A torchvision ResNet18 (moved to ``device`` and put in eval mode).
        images: ``uint8 [N, S, S, 3]`` RGB, possibly a ``numpy.memmap``; read in order.
        device: Where to compute.
        batch_size: Images per forward pass (hundreds to a few thousand on a GPU).
        progress: ``progress(done, total)``, called at most twice a second and once at the end.

    Returns:
        ``(probs, embeddings)``: ``float32 [N, C]`` softmax rows (summing to 1) and
        ``float32 [N, 512]`` penultimate-layer features. ``N = 0`` gives empty arrays.
    """
    check_images(images)
    device = concrete_device(torch.device(device))
    cuda = device.type == "cuda"
    n, num_classes = len(images), model.fc.out_features
    probs = np.empty((n, num_classes), dtype=np.float32)
    embeddings = np.empty((n, EMBEDDING_DIM), dtype=np.float32)
    if n == 0:
        if progress is not None:
            progress(0, 0)
        return probs, embeddings
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if cuda:
        torch.backends.cudnn.benchmark = True
    model.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
    model.eval()
    amp_dtype = amp_dtype_for(device)
    slices = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    readback = _Readback(probs, embeddings, batch_size, cuda)
    last_report = time.monotonic()
    with torch.inference_mode():
        for s, batch in zip(slices, iter_device_batches(images, slices, device), strict=True):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits, emb = embed_and_classify(model, normalize(batch, channels_last=cuda))
            done = readback.push(s, logits.float().softmax(dim=1), emb.float())
            if progress is not None and time.monotonic() - last_report >= PROGRESS_EVERY_S:
                progress(done, n)
                last_report = time.monotonic()
        readback.flush()
    if progress is not None:
        progress(n, n)
    return probs, embeddings


class _Readback:
    """Copies results into the output arrays, on CUDA one batch behind the GPU.

    Each batch is copied asynchronously into one of two pinned staging slots; the previous
    batch's slot is waited for (its event) and copied into the numpy outputs meanwhile.
    """

    def __init__(self, probs: np.ndarray, embeddings: np.ndarray, batch_size: int, cuda: bool):
        self.probs, self.embeddings, self.cuda = probs, embeddings, cuda
        self.done = 0
        self.pending: tuple | None = None
        self.slot = 0
        if cuda:
            rows = min(batch_size, len(probs))
            self.staging = [
                (
                    torch.empty((rows, probs.shape[1]), dtype=torch.float32).pin_memory(),
                    torch.empty((rows, embeddings.shape[1]), dtype=torch.float32).pin_memory(),
                )
                for _ in range(2)
            ]

    def push(self, rows: slice, probs: torch.Tensor, embeddings: torch.Tensor) -> int:
        """Queue one batch's results; returns how many rows are in the outputs so far."""
        if not self.cuda:
            self.probs[rows] = probs.numpy()
            self.embeddings[rows] = embeddings.numpy()
            self.done = rows.stop
            return self.done
        p_host, e_host = self.staging[self.slot]
        b = probs.shape[0]
        p_host[:b].copy_(probs, non_blocking=True)
        e_host[:b].copy_(embeddings, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.flush()
        self.pending = (rows, self.slot, b, event)
        self.slot = 1 - self.slot
        return self.done

    def flush(self) -> None:
        """Wait for the batch in flight and copy it into the outputs."""
        if self.pending is None:
            return
        rows, slot, b, event = self.pending
        event.synchronize()
        p_host, e_host = self.staging[slot]
        self.probs[rows] = p_host[:b].numpy()
        self.embeddings[rows] = e_host[:b].numpy()
        self.done = rows.stop
        self.pending = None
