"""network.py: head sizing, weight sources (ImageNet fallback, files), devices, embeddings."""

from __future__ import annotations

import logging

import pytest
import torch

from ml_backend.errors import ConfigError
from ml_backend.model import network
from ml_backend.model.network import build_model, embed_and_classify, resolve_device


def test_random_init_has_requested_head():
    model, source = build_model(5, "none")
    assert source == "none"
    assert model.fc.out_features == 5 and model.fc.in_features == 512


def test_seed_makes_init_reproducible_without_touching_global_rng():
    state = torch.random.get_rng_state()
    a, _ = build_model(3, "none", seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = build_model(3, "none", seed=7)
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    c, _ = build_model(3, "none")
    d, _ = build_model(3, "none")
    assert not torch.equal(c.conv1.weight, d.conv1.weight)


def test_imagenet_unavailable_falls_back_with_clear_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(network, "_last_download_failure", None)  # really try the download
    # An empty TORCH_HOME: the weights must be downloaded. Offline that fails fast and the model
    # trains from scratch; where a download works, the contract is the "imagenet" source.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="ml_backend.model.network"):
        model, source = build_model(3, "imagenet")
    assert model.fc.out_features == 3
    if source == "imagenet":
        assert not caplog.records
    else:
        assert source.startswith("random init (ImageNet weights unavailable: ")
        message = caplog.records[-1].getMessage()
        assert caplog.records[-1].levelno == logging.WARNING
        assert "ImageNet weights for ResNet18 are unavailable" in message
        assert "random init" in message
    assert not list(tmp_path.rglob(".partial-*")), "a failed download must not leave a partial file"


def test_imagenet_from_cache_file(tmp_path, monkeypatch):
    # A file already in TORCH_HOME/hub/checkpoints (the docker image puts it there) is used as is.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    donor, _ = build_model(1000, "none", seed=1)
    url = network.torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    target = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    target.parent.mkdir(parents=True)
    torch.save(donor.state_dict(), target)
    model, source = build_model(4, "imagenet")
    assert source == "imagenet"
    assert torch.equal(model.layer1[0].conv1.weight, donor.layer1[0].conv1.weight)
    assert model.fc.out_features == 4


def test_corrupt_cached_imagenet_file_falls_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = network.torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    target = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING):
        _, source = build_model(3, "imagenet")
    assert source.startswith("random init (ImageNet weights unavailable")


def test_weights_file_full_model_keeps_matching_head(tmp_path):
    donor, _ = build_model(3, "none", seed=1)
    path = tmp_path / "w.pt"
    torch.save(donor.state_dict(), path)
    model, source = build_model(3, str(path))
    assert source == f"file:{path}"
    for key, value in donor.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_weights_file_other_head_or_backbone_only(tmp_path):
    donor, _ = build_model(7, "none", seed=1)
    full = tmp_path / "seven.pt"
    torch.save({"model": donor.state_dict()}, full)  # checkpoint dict (torchvision references)
    model, _ = build_model(3, str(full))
    assert model.fc.out_features == 3
    assert torch.equal(model.conv1.weight, donor.conv1.weight)
    backbone = tmp_path / "backbone.pt"
    torch.save({k: v for k, v in donor.state_dict().items() if not k.startswith("fc.")}, backbone)
    model, _ = build_model(2, str(backbone))
    assert torch.equal(model.layer4[1].bn2.running_mean, donor.layer4[1].bn2.running_mean)


@pytest.mark.parametrize(
    "content",
    [b"garbage bytes", "not_resnet"],
    ids=["not-a-torch-file", "wrong-keys"],
)
def test_bad_weights_file_names_the_path(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content == "not_resnet":
        torch.save({"encoder.weight": torch.zeros(3)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        build_model(3, str(path))
    assert str(path) in str(info.value)
    assert "PRETRAINED" in str(info.value)


def test_weights_file_with_pickled_objects_is_refused(tmp_path):
    # weights_only=True: a file that needs arbitrary unpickling is rejected, not executed.
    path = tmp_path / "pickle.pt"
    torch.save({"fc.weight": torch.zeros(3, 512), "payload": object()}, path)
    with pytest.raises(ConfigError, match="could not be loaded"):
        build_model(3, str(path))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            resolve_device("cuda")


def test_embed_and_classify_matches_forward():
    model, _ = build_model(3, "none", seed=0)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        logits, embeddings = embed_and_classify(model, x)
        assert embeddings.shape == (2, 512)
        torch.testing.assert_close(logits, model(x))


def test_failed_download_is_not_retried_every_job(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    attempts = []

    def offline(url, target):
        attempts.append(url)
        raise OSError("no route to host")

    monkeypatch.setattr(network, "_download", offline)
    monkeypatch.setattr(network, "_last_download_failure", None)
    _, first = build_model(3, "imagenet")
    _, second = build_model(3, "imagenet")
    assert len(attempts) == 1
    assert "no route to host" in first and "no route to host" in second
    assert "not retried" in second
