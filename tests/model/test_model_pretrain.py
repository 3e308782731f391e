"""pretrain.py and backbones.py: SimCLR learns on structured images, budgets, the store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_backend.model.backbones import BackboneError, BackboneStore
from ml_backend.model.data import normalize
from ml_backend.model.features import backbone_model, embed
from ml_backend.model.pretrain import (
    COLOUR_PHOTOMETRIC,
    GREY_PHOTOMETRIC,
    _view,
    nt_xent,
    pretrain_backbone,
)


@pytest.fixture(scope="module")
def pool(weather_pool) -> np.ndarray:
    return weather_pool[0]


def test_loss_decreases_and_progress_is_reported(pool):
    events = []
    result = pretrain_backbone(
        pool, budget_s=120, max_epochs=4, batch_size=32, seed=0, device="cpu",
        progress=events.append,
    )  # fmt: skip
    assert result.epochs == 4 and len(result.history) == 4
    assert result.images_seen == 4 * 64
    assert result.history[-1] < result.history[0], result.history
    assert result.loss == result.history[-1]
    assert [e["epoch"] for e in events] == [1, 2, 3, 4]
    assert set(events[0]) == {"epoch", "loss", "images_per_s", "seconds_left"}
    assert not any(k.startswith("fc.") for k in result.state_dict)
    model = torchvision_resnet18_with(result.state_dict)
    assert model.fc.out_features == 5


def torchvision_resnet18_with(state):
    model = backbone_model(state, 5)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    return model


def test_budget_stops_the_run(pool):
    result = pretrain_backbone(
        pool, budget_s=1.0, max_epochs=1000, batch_size=16, seed=0, device="cpu"
    )
    assert result.epochs < 1000
    # One step may finish past the budget, then BatchNorm statistics are recomputed.
    assert result.seconds < 1.0 + 10.0


def test_same_seed_same_backbone_on_cpu(pool):
    a, b = (
        pretrain_backbone(pool[:16], budget_s=60, max_epochs=1, batch_size=8, seed=3, device="cpu")
        for _ in range(2)
    )
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_batchnorm_statistics_are_those_of_clean_images(pool):
    result = pretrain_backbone(pool, budget_s=60, max_epochs=1, batch_size=32, seed=0, device="cpu")
    model = backbone_model(result.state_dict, 3)
    with torch.no_grad():
        first = model.bn1(model.conv1(normalize(torch.from_numpy(pool), channels_last=False)))
    # bn1 normalises clean pool images to about zero mean and unit variance per channel.
    assert first.mean(dim=(0, 2, 3)).abs().max() < 0.15
    assert (first.var(dim=(0, 2, 3)) - 1).abs().max() < 0.15


def test_nt_xent_is_low_for_matching_views():
    z = torch.randn(8, 16)
    matched = nt_xent(torch.cat([z, z]), 0.2)
    random = nt_xent(torch.randn(16, 16), 0.2)
    assert matched < random


def test_store_round_trip_and_prune(tmp_path, pool):
    result = pretrain_backbone(
        pool[:8], budget_s=60, max_epochs=1, batch_size=8, seed=0, device="cpu"
    )
    store = BackboneStore(tmp_path)
    assert store.latest(7) is None
    names = [store.save(7, result, image_size=32, pool_key=f"k{i}", pool_size=8) for i in range(3)]
    assert names == ["b1", "b2", "b3"]
    name, state, meta = store.latest(7)
    assert name == "b3" and meta["pool_key"] == "k2" and meta["image_size"] == 32
    assert {"image_size", "pool_size", "pool_key", "epochs", "seconds", "created"} <= set(meta)
    assert all(torch.equal(state[k], v) for k, v in result.state_dict.items())
    assert store.prune(7, keep=2) == ["b1"]
    assert store.names(7) == ["b2", "b3"]
    assert not any(p.name.startswith(".") for p in store.folder(7).iterdir())


def test_store_says_which_backbone_is_broken(tmp_path, pool):
    result = pretrain_backbone(
        pool[:8], budget_s=60, max_epochs=1, batch_size=8, seed=0, device="cpu"
    )
    store = BackboneStore(tmp_path)
    store.save(1, result, image_size=32, pool_key="k", pool_size=8)
    (store.folder(1) / "b1" / "backbone.pt").write_bytes(b"not a torch file")
    with pytest.raises(BackboneError, match="b1.*delete the folder"):
        store.latest(1)
    (store.folder(1) / "b1" / "backbone.pt").unlink()
    with pytest.raises(BackboneError, match="b1"):
        store.latest(1)
    (store.folder(1) / "b1" / "meta.json").write_text("{")
    with pytest.raises(BackboneError):
        store.latest(1)


def test_embed_gives_512_float32_rows(pool):
    emb = embed(backbone_model(None, 3), pool[:10], device="cpu", batch_size=4)
    assert emb.shape == (10, 512) and emb.dtype == np.float32


def test_a_run_in_slices_is_the_same_run_through_saved_checkpoints(pool, tmp_path):
    """Paused after every step and resumed from the checkpoint on disk (what the sliced job
    does between two slices), the run ends with the same weights as one call."""
    whole = pretrain_backbone(pool[:24], budget_s=600, max_epochs=2, batch_size=8, seed=3,
                              device="cpu")  # fmt: skip
    store, info = BackboneStore(tmp_path), {"image_size": 32, "init": "random"}
    slices, resume, events = 0, None, []
    while True:
        part = pretrain_backbone(pool[:24], budget_s=600, max_epochs=2, batch_size=8, seed=3,
                                 device="cpu", slice_s=0, resume=resume,
                                 progress=events.append)  # fmt: skip
        slices += 1
        if part.finished:
            break
        assert part.epochs in (1, 2) and part.seconds > 0
        store.save_checkpoint(7, part.checkpoint, info)
        resume = store.load_checkpoint(7, info)
    assert slices == 6  # 3 steps per epoch, one per slice
    assert part.history == whole.history and part.images_seen == whole.images_seen == 48
    assert all(torch.equal(whole.state_dict[k], part.state_dict[k]) for k in whole.state_dict)
    # Two pauses mid-epoch and the epoch's end, twice.
    assert [e["epoch"] for e in events] == [1, 1, 1, 2, 2, 2]


def test_the_budget_counts_every_slice(pool):
    first = pretrain_backbone(pool, budget_s=1.5, max_epochs=1000, batch_size=8, seed=0,
                              device="cpu", slice_s=0.5)  # fmt: skip
    assert not first.finished and 0.5 <= first.seconds < 1.5
    second = pretrain_backbone(pool, budget_s=1.5, max_epochs=1000, batch_size=8, seed=0,
                               device="cpu", slice_s=60, resume=first.checkpoint)  # fmt: skip
    assert second.finished and 1.5 <= second.seconds < 1.5 + 10
    assert second.images_seen > first.images_seen


def test_a_checkpoint_goes_on_over_a_changed_pool(pool):
    part = pretrain_backbone(pool[:32], budget_s=600, max_epochs=3, batch_size=8, seed=0,
                             device="cpu", slice_s=0)  # fmt: skip
    assert not part.finished and part.images_seen == 8
    grown = pretrain_backbone(pool, budget_s=600, max_epochs=3, batch_size=8, seed=0,
                              device="cpu", resume=part.checkpoint)  # fmt: skip
    # The started epoch counts as done; two more run over the grown pool.
    assert grown.finished and grown.epochs == 3 and grown.images_seen == 8 + 2 * len(pool)


def test_a_checkpoint_that_does_not_match_or_is_broken_is_dropped(pool, tmp_path, caplog):
    part = pretrain_backbone(pool[:16], budget_s=600, max_epochs=2, batch_size=8, seed=0,
                             device="cpu", slice_s=0)  # fmt: skip
    store = BackboneStore(tmp_path)
    store.save_checkpoint(3, part.checkpoint, {"image_size": 32, "init": "random"})
    assert store.load_checkpoint(3, {"image_size": 32, "init": "random"})["epoch"] == 1
    assert store.load_checkpoint(3, {"image_size": 64, "init": "random"}) is None
    assert "was made for" in caplog.text and store.load_checkpoint(3, {"image_size": 32,
                                                                       "init": "random"}) is None  # fmt: skip
    path = store.folder(3) / "in-progress.pt"
    path.write_bytes(b"not a checkpoint")
    assert store.load_checkpoint(3, {"image_size": 32, "init": "random"}) is None
    assert "cannot be read" in caplog.text and not path.exists()
    assert store.names(3) == []  # a checkpoint is not a backbone


def test_pause_early_ends_a_slice_when_asked(pool):
    asked = []

    def pause(ran):
        asked.append(ran)
        return len(asked) == 2

    part = pretrain_backbone(pool, budget_s=600, max_epochs=5, batch_size=8, seed=0,
                             device="cpu", slice_s=600, pause_early=pause)  # fmt: skip
    assert not part.finished and part.images_seen == 16  # two steps, then paused
    assert asked == sorted(asked)


@pytest.mark.parametrize(
    ("colour", "largest"),
    [(False, GREY_PHOTOMETRIC[1]), (True, COLOUR_PHOTOMETRIC[1] * 1.1 + 0.1)],
)
def test_colour_pools_get_gentler_brightness_jitter(colour, largest):
    # A flat black image stays flat through the crop and the contrast jitter, so a view of it
    # is the brightness shift (for colour pools then scaled by 0.9-1.1 and shifted by +-0.1 per
    # channel). Colour pools keep brightness as a cue (overcast skies, stains): +-0.2 there;
    # grey pools +-0.4, as before.
    flat = torch.zeros((4096, 3, 8, 8))
    shift = _view(flat, torch.Generator().manual_seed(0), colour, flip=False)[:, :, 0, 0]
    biggest = float(shift.abs().max())
    assert biggest <= largest + 1e-5
    assert biggest > 0.9 * largest  # the whole range is used
