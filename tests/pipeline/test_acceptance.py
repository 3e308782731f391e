"""Pre-annotation acceptance and the auto image size, in the status store (a real Redis)."""

from ml_backend.jobs.state import StatusStore


def test_acceptance_counts_each_labeled_task_once_per_version(redis_conn):
    status = StatusStore(redis_conn)
    status.record_pushed(1, "resnet18-v1", {10: "Sunny", 11: "Cloudy", 12: "Sunny"})
    status.record_pushed(1, "resnet18-v2", {12: "Cloudy", 13: "Cloudy"})  # 12 re-pushed by v2
    assert status.acceptance(1) == {}

    new = status.score_acceptance(1, {10: "Sunny", 11: "Sunny", 12: "Cloudy", 99: "Sunny"})
    assert new == {"resnet18-v1": {"kept": 1, "n": 2}, "resnet18-v2": {"kept": 1, "n": 1}}
    # The same labels read again in the next job count nothing more.
    assert status.score_acceptance(1, {10: "Sunny", 11: "Sunny", 12: "Cloudy"}) == {}
    status.score_acceptance(1, {13: "Sunny"})
    assert status.acceptance(1) == {
        "resnet18-v1": {"kept": 1, "n": 2, "rate": 0.5},
        "resnet18-v2": {"kept": 1, "n": 2, "rate": 0.5},
    }
    assert status.project_status(1)["acceptance"]["resnet18-v2"]["rate"] == 0.5
    assert status.acceptance(2) == {} and status.score_acceptance(2, {}) == {}


def test_auto_image_size_is_kept_per_project(redis_conn):
    status = StatusStore(redis_conn)
    assert status.image_size(4) is None and status.project_status(4)["image_size"] is None
    status.set_image_size(4, 32)
    assert status.image_size(4) == 32 and status.project_status(4)["image_size"] == 32
    assert status.image_size(5) is None


def test_backbone_tie_break_is_leave_one_out_1nn_and_bounded():
    import numpy as np

    from ml_backend.pipeline.training import LOO_ROWS, _loo_1nn

    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 30)
    apart = np.concatenate([rng.normal(0, 1, (30, 8)), rng.normal(8, 1, (30, 8))])
    mixed = rng.normal(0, 1, (60, 8))
    assert _loo_1nn(apart, labels) == 1.0 > _loo_1nn(mixed, labels)
    big = np.repeat([0, 1], LOO_ROWS)  # more rows than the cap: sampled, still a share
    assert 0.0 <= _loo_1nn(rng.normal(0, 1, (2 * LOO_ROWS, 4)), big) <= 1.0
