"""Frozen-backbone features: a ResNet18 with a given backbone, and its pool embeddings."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ml_backend.model.inference import predict
from ml_backend.model.network import new_resnet18


def backbone_model(state_dict: dict[str, torch.Tensor] | None, num_classes: int) -> nn.Module:
    """A torchvision ResNet18 with ``state_dict``'s backbone (random init when ``None``).

    ``fc`` (``num_classes`` outputs) stays freshly initialised: any ``fc.*`` key in
    ``state_dict`` is ignored, so the backbone of a project pretrained for other labels fits.

    Raises:
        ValueError: ``state_dict`` lacks backbone keys or has foreign ones.
    """
    model = new_resnet18(num_classes)
    if state_dict is not None:
        backbone = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        result = model.load_state_dict(backbone, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("fc.")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"not a ResNet18 backbone: missing {missing[:3]}, unexpected "
                f"{result.unexpected_keys[:3]}"
            )
    return model.eval()


def embed(
    model: nn.Module,
    images: np.ndarray,
    *,
    device: torch.device | str,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """``float32 [N, 512]`` penultimate features of ``images`` (eval mode, via ``predict``)."""
    _, embeddings = predict(model, images, device=device, batch_size=batch_size, progress=progress)
    return embeddings
