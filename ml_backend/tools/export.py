"""``python -m ml_backend export --project N --format torchscript|onnx``: a version, portable.

Writes into ``--output`` (default ``./export/project-<N>-<version>-<format>/``):

- ``model.pt`` (TorchScript, ``torch.jit.load``) or ``model.onnx`` (opset 17, any batch size);
- ``labels.json``: the class names, in output order;
- ``preprocessing.json``: what the input must be and how the backend makes it from an image
  file, the normalisation built into the model, and the result of the check below.

The exported model takes what the backend's own inference takes: ``uint8 [N, S, S, 3]`` RGB
images already resized to ``S x S`` (the version's image size), and returns ``float32 [N, C]``
class probabilities. Normalisation (ImageNet mean and std) is inside the model.

The check: the exported file is loaded back (TorchScript with torch, ONNX with onnxruntime) and
run on seeded random images plus any ``--check-images``; its probabilities must match those of
the stored version through ``ml_backend.model.inference.predict`` (the path ``/predict`` and
the worker use) within ``TOLERANCE``, with the same predicted class. Exit 1 when they do not.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np

from ml_backend.config import Settings
from ml_backend.errors import BackendError, ConfigError

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
FILES = {"torchscript": "model.pt", "onnx": "model.onnx"}
TOLERANCE = 1e-4  # max |p_exported - p_stored| over every image and class
CHECK_IMAGES = 8
ONNX_OPSET = 17


class ExportCheckFailed(BackendError):
    """The exported model's outputs differ from the stored version's."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options (called by ``python -m ml_backend``)."""
    parser.description = "Export a trained version as TorchScript or ONNX, checked."
    parser.add_argument("--project", type=int, required=True, help="Label Studio project id")
    parser.add_argument("--format", choices=FORMATS, required=True, help="torchscript or onnx")
    parser.add_argument(
        "--version", help="model version, e.g. resnet18-v7 (default: the served one)"
    )
    parser.add_argument("--output", "-o", help="folder to write (default: ./export/...)")
    parser.add_argument(
        "--check-images",
        nargs="*",
        default=[],
        metavar="PATH",
        help="image files or folders to include in the output check (besides random images)",
    )


class Exported:
    """Builds the exportable module around a loaded version (torch imported lazily)."""

    @staticmethod
    def wrap(model):
        import torch
        from torch import nn

        from ml_backend.model.data import IMAGENET_MEAN, IMAGENET_STD
        from ml_backend.model.network import embed_and_classify

        class ProbabilitiesFromImages(nn.Module):
            """uint8 [N, S, S, 3] RGB -> float32 [N, C] probabilities (the backend's inference)."""

            def __init__(self, inner: nn.Module):
                super().__init__()
                self.inner = inner
                # Buffers, not constants: they move with .to(device) after loading.
                self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0)
                self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0)

            def forward(self, images: torch.Tensor) -> torch.Tensor:
                x = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
                logits, _ = embed_and_classify(self.inner, x)
                return logits.float().softmax(dim=1)

        return ProbabilitiesFromImages(model).eval()


def _export_torchscript(module, example, path: Path) -> None:
    import torch

    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notes: the file is the point
        traced = torch.jit.trace(module, example, check_trace=False)
        traced.save(str(path))


def _export_onnx(module, example, path: Path) -> None:
    import torch

    try:
        import onnx  # noqa: F401  (the exporter needs it; say so clearly when missing)
    except ModuleNotFoundError:
        raise ConfigError(
            "ONNX export needs the onnx package: pip install onnx onnxruntime"
        ) from None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,  # the TorchScript-based exporter: needs only onnx, handles ResNets
            input_names=["images"],
            output_names=["probabilities"],
            dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}},
            opset_version=ONNX_OPSET,
        )


def _run_exported(fmt: str, path: Path, images: np.ndarray) -> np.ndarray | None:
    """Outputs of the exported file on ``images`` (None when no runtime for it is installed)."""
    if fmt == "torchscript":
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation note
            loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.inference_mode():
            return loaded(torch.from_numpy(images)).numpy()
    try:
        import onnxruntime
    except ModuleNotFoundError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"images": images})[0]


def _check_images(size: int, paths: list[str], max_pixels: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (CHECK_IMAGES, size, size, 3), dtype=np.uint8)]
    if paths:
        from ml_backend.errors import ImageError
        from ml_backend.tools.predict import find_images, read_image

        for path in find_images(paths):
            try:
                images.append(read_image(path, size, max_pixels)[None])
            except ImageError as exc:
                log.warning("%s left out of the check: %s", path, exc)
    return np.concatenate(images)


def export_version(
    settings: Settings,
    project: int,
    fmt: str,
    output: Path | None = None,
    version: str | None = None,
    check_paths: list[str] | None = None,
) -> dict:
    """Export one version of ``project`` and check it; returns what ``preprocessing.json`` says.

    Raises:
        ExportCheckFailed: the exported outputs differ from the stored model's.
        ModelNotReady, ConfigError: no such version, a missing package.
    """
    import torch

    from ml_backend.model.inference import predict
    from ml_backend.model.storage import ModelStore
    from ml_backend.tools.versions import pick_version

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    chosen, why = pick_version(settings, project, version)
    model, info = ModelStore(settings.model_dir).load(project, chosen, device="cpu")
    size = int(info.image_size or settings.image_size)
    folder = Path(output or Path("export") / f"project-{project}-{info.version}-{fmt}")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / FILES[fmt]
    module = Exported.wrap(model)
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    (_export_torchscript if fmt == "torchscript" else _export_onnx)(module, example, target)

    images = _check_images(size, check_paths or [], settings.max_image_pixels)
    expected, _ = predict(model, images, device="cpu", batch_size=64)
    got = _run_exported(fmt, target, images)
    check: dict = {"images": len(images), "tolerance": TOLERANCE}
    if got is None:
        check.update(passed=None, note="onnxruntime is not installed: not checked")
    else:
        diff = float(np.abs(got - expected).max())
        # A class may flip only where the stored model itself had a near-tie.
        top2 = np.sort(expected, axis=1)[:, -2:]
        decided = (top2[:, 1] - top2[:, 0]) > 2 * TOLERANCE
        same = bool((got.argmax(1) == expected.argmax(1))[decided].all())
        check.update(max_abs_difference=diff, same_predicted_class=same,
                     passed=diff <= TOLERANCE and same)  # fmt: skip
    about = {
        "project": project,
        "version": info.version,
        "format": fmt,
        "file": target.name,
        "labels": list(info.labels),
        "image_size": size,
        "input": {
            "name": "images",
            "dtype": "uint8",
            "shape": ["N", size, size, 3],
            "layout": "NHWC, RGB",
        },
        "output": {
            "name": "probabilities",
            "dtype": "float32",
            "shape": ["N", len(info.labels)],
            "meaning": "softmax over labels.json, in that order",
        },
        "preprocessing": [
            "decode the file; first frame of animations and multi-page TIFFs",
            "apply the EXIF orientation",
            "composite transparency over white",
            "16/32-bit and float single-channel images: scale to 8 bits between the 0.5th and "
            "99.5th percentiles",
            "convert to RGB",
            f"resize the whole frame (no crop) to {size} x {size}, bilinear",
        ],
        "in_model": {
            "normalize": "(x - 255 * mean) / (255 * std), per channel",
            "mean": list(_imagenet()[0]),
            "std": list(_imagenet()[1]),
        },
        "python": "ml_backend.labelstudio.images.decode_image + to_array do the preprocessing",
        "check": check,
        "source": {"weights": str(info.weights_path), "created_at": info.created_at},
    }
    (folder / "labels.json").write_text(json.dumps(list(info.labels), indent=2) + "\n")
    (folder / "preprocessing.json").write_text(json.dumps(about, indent=2) + "\n")
    if check.get("passed") is False:
        raise ExportCheckFailed(
            f"the exported {fmt} model differs from {info.version}: max |difference| "
            f"{check['max_abs_difference']:.2e} (tolerance {TOLERANCE:g}), same predicted class: "
            f"{check['same_predicted_class']}; files left in {folder} for inspection"
        )
    log.info("exported project %s %s (%s) as %s to %s", project, info.version, why, fmt, folder)
    return {**about, "folder": str(folder), "why": why}


def _imagenet():
    from ml_backend.model.data import IMAGENET_MEAN, IMAGENET_STD

    return IMAGENET_MEAN, IMAGENET_STD


def run(args: argparse.Namespace) -> int:
    """The command: returns the exit status."""
    settings = Settings.from_env()
    result = export_version(
        settings,
        args.project,
        args.format,
        Path(args.output) if args.output else None,
        args.version,
        args.check_images,
    )
    check = result["check"]
    said = (
        check["note"]
        if check.get("passed") is None
        else f"checked on {check['images']} images: max |difference| "
        f"{check['max_abs_difference']:.1e}, same predicted class"
    )
    print(
        f"exported project {result['project']}'s {result['version']} ({result['why']}) as "
        f"{result['format']}: {result['folder']}/{result['file']}, labels.json, "
        f"preprocessing.json; {said}",
        file=sys.stderr,
    )
    return 0
