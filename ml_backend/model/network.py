"""The ResNet18 classifier: construction, pretrained weights, device choice, embeddings.

``build_model`` never hangs on a missing network: the ImageNet weights are fetched with a socket
timeout (torch.hub's own downloader has none), and any failure falls back to random init with a
WARNING that says so. The returned source string is stored with every model version.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
import torchvision
from torch import nn

from ml_backend.errors import ConfigError

logger = logging.getLogger(__name__)

EMBEDDING_DIM = 512
# Seconds a connect or read of the ImageNet download may stall before we give up.
DOWNLOAD_TIMEOUT_S = 15.0
# A long-running worker builds a model per job; offline, one failed download per this many
# seconds is enough (the file in TORCH_HOME is still looked for every time).
DOWNLOAD_RETRY_AFTER_S = 600.0
_last_download_failure: tuple[float, str] | None = None


def new_resnet18(num_classes: int) -> nn.Module:
    """A randomly initialised torchvision ResNet18 whose ``fc`` has ``num_classes`` outputs."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


def build_model(
    num_classes: int,
    pretrained: str,
    log: logging.Logger | logging.LoggerAdapter | None = None,
    *,
    seed: int | None = None,
) -> tuple[nn.Module, str]:
    """Build a ResNet18 classifier and say where its weights came from.

    Args:
        num_classes: Size of the classification head.
        pretrained: ``"imagenet"`` (torchvision weights, cached under ``TORCH_HOME``; falls back
            to random init with a WARNING when they cannot be had), ``"none"`` (random init) or
            the path of a ``state_dict`` file (a whole ResNet18 or only its backbone; an ``fc``
            of another shape is skipped, so a previous version with other labels warm-starts).
        log: Logger for the weights message (defaults to this module's logger).
        seed: When given, the random initialisation uses this seed without touching the global
            torch RNG.

    Returns:
        ``(model, source)`` with ``source`` one of ``"imagenet"``, ``"none"``, ``"file:<path>"``
        or ``"random init (ImageNet weights unavailable: <reason>)"``. The model is on the CPU.

    Raises:
        ConfigError: ``pretrained`` is a path that cannot be loaded as ResNet18 weights.
    """
    log = log or logger
    if seed is None:
        model = new_resnet18(num_classes)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = new_resnet18(num_classes)
    if pretrained == "none":
        return model, "none"
    if pretrained == "imagenet":
        try:
            state = _imagenet_state_dict()
        except Exception as exc:  # any download/cache failure means: train from scratch
            reason = _short_reason(exc)
            log.warning(
                "ImageNet weights for ResNet18 are unavailable (%s); training starts from random "
                "init, which needs more labels for the same accuracy. Put the file in "
                "TORCH_HOME/hub/checkpoints/ or set PRETRAINED to a local state_dict file.",
                reason,
            )
            return model, f"random init (ImageNet weights unavailable: {reason})"
        _load_into(model, state, num_classes, log)
        return model, "imagenet"
    path = Path(pretrained)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        _load_into(model, _unwrap(state), num_classes, log)
    except Exception as exc:
        raise ConfigError(
            f"PRETRAINED file {str(path)!r} could not be loaded as ResNet18 weights "
            f"({_short_reason(exc)}). Save it with torch.save(model.state_dict(), path), "
            "or set PRETRAINED=imagenet or none."
        ) from exc
    return model, f"file:{path}"


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet ResNet18 state_dict from the torch.hub cache, downloading it when absent."""
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not target.is_file():
        global _last_download_failure
        now = time.monotonic()
        if _last_download_failure and now - _last_download_failure[0] < DOWNLOAD_RETRY_AFTER_S:
            raise OSError(
                f"{_last_download_failure[1]} (not retried for {DOWNLOAD_RETRY_AFTER_S:.0f} s)"
            )
        try:
            _download(url, target)
        except Exception as exc:
            _last_download_failure = (now, _short_reason(exc))
            raise
        _last_download_failure = None
    return torch.load(target, map_location="cpu", weights_only=True)


def _download(url: str, target: Path) -> None:
    """Fetch ``url`` into ``target`` atomically, checking torchvision's hash prefix."""
    logger.info("Downloading ImageNet weights %s to %s", url, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
    try:
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r,
        ):
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        expected = re.search(r"-([a-f0-9]+)\.", target.name)
        if expected and not digest.hexdigest().startswith(expected.group(1)):
            raise OSError(
                f"downloaded file has the wrong SHA-256 (expected {expected.group(1)}...)"
            )
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _unwrap(state: object) -> dict[str, torch.Tensor]:
    """Accept a bare state_dict or a checkpoint dict holding one; drop DataParallel prefixes."""
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("the file does not hold a state_dict (a dict of tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_into(
    model: nn.Module, state: dict[str, torch.Tensor], num_classes: int, log: logging.Logger
) -> None:
    """Load backbone weights (and the head when its shape fits) into ``model``."""
    head = {k: v for k, v in state.items() if k.startswith("fc.")}
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected_head = {"fc.weight": (num_classes, EMBEDDING_DIM), "fc.bias": (num_classes,)}
    head_fits = set(head) == set(expected_head) and all(
        tuple(head[k].shape) == shape for k, shape in expected_head.items()
    )
    if head and not head_fits:
        log.info(
            "Pretrained head does not match %d classes; the classifier starts fresh", num_classes
        )
    result = model.load_state_dict({**backbone, **(head if head_fits else {})}, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            "not a ResNet18 state_dict: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {result.unexpected_keys[:3]}{'...' if len(result.unexpected_keys) > 3 else ''}"
        )


def _short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def resolve_device(setting: str) -> torch.device:
    """Turn the DEVICE setting into a torch device, checked now (not at import time).

    Args:
        setting: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        ConfigError: CUDA was asked for but is not available, or the index does not exist.
    """
    setting = setting.strip().lower()
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"DEVICE={setting} but no CUDA GPU is available; set DEVICE=auto or cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"DEVICE={setting} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return device


def embed_and_classify(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a torchvision ResNet and return ``(logits, embeddings)``.

    The embeddings are the 512-d globally average-pooled features that feed ``fc``, computed by
    calling the layers directly so no forward hooks are needed.
    """
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    embeddings = torch.flatten(model.avgpool(x), 1)
    return model.fc(embeddings), embeddings
