"""auto: the switch rule on evidence, its wiring in rank, and the per-row reasons in words."""

from __future__ import annotations

import numpy as np
import pytest

from ml_backend.errors import SelectionInputError
from ml_backend.selection import REASONS, STRATEGIES, decide, explain, rank


def pool(n=200, c=4, labeled=8, seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(c), size=n)
    emb = rng.normal(size=(n, 6)).astype(np.float32)
    mask = np.zeros(n, bool)
    mask[rng.choice(n, size=labeled, replace=False)] = True
    return probs, emb, mask


@pytest.mark.parametrize(
    ("evidence", "has_model", "n_labeled", "expected"),
    [
        (None, False, 0, "typicality"),  # no model: typicality
        (None, False, 500, "typicality"),
        (None, True, 39, "typicality"),  # 39 / 4 classes = 9.75 < 10
        (None, True, 40, "herding"),  # 10 per class
        ({"labels_per_class": 12}, True, 0, "herding"),  # evidence beats |L| / C
        ({"labels_per_class": {"a": 30, "b": 2, "c": 0, "d": 0}}, True, 99, "typicality"),
        ({"labels_per_class": [10, 10, 10, 10]}, True, 0, "herding"),
        ({"labels_per_class": 12, "val_accuracy": 0.5}, True, 0, "typicality"),  # gate: A = 0.7
        ({"labels_per_class": 12, "val_accuracy": 0.7}, True, 0, "herding"),
        ({"labels_per_class": 12, "acceptance": 0.4}, True, 0, "typicality"),
        ({"labels_per_class": 40, "val_accuracy": 0.2}, True, 0, "herding"),  # 4 T: hard task
        ({"labels_per_class": 39, "val_accuracy": 0.2}, True, 0, "typicality"),
        ({"val_accuracy": 0.9, "acceptance": 0.1}, True, 40, "herding"),  # val wins
        ({"val_accuracy": None}, True, 40, "herding"),
    ],
)
def test_rule(evidence, has_model, n_labeled, expected):
    d = decide(
        evidence,
        has_model=has_model,
        n_labeled=n_labeled,
        n_classes=4 if has_model else 0,
        labels_per_class=10,
        min_accuracy=0.7,
    )
    assert d.strategy == expected
    assert d.why


def test_rule_explains_itself():
    d = decide({"labels_per_class": 2}, has_model=True, n_labeled=0, n_classes=3)
    assert d.why.startswith("2.0 labels per class (fewer than")
    d = decide(
        {"labels_per_class": 20, "val_accuracy": 0.3},
        has_model=True,
        n_labeled=0,
        n_classes=3,
        labels_per_class=10,
        min_accuracy=0.8,
    )
    assert "validation accuracy is 30% (below 80%)" in d.why


@pytest.mark.parametrize(
    ("evidence", "match"),
    [
        ([1, 2], "evidence must be a mapping"),
        ({"accuracy": 0.5}, "unknown evidence 'accuracy'; allowed: labels_per_class"),
        ({"val_accuracy": 1.5}, r"val_accuracy must be a number in \[0, 1\]"),
        ({"acceptance": "high"}, "acceptance must be a number"),
        ({"labels_per_class": -1}, "labels_per_class must be"),
        ({"labels_per_class": []}, "must not be empty"),
        ({"labels_per_class": [1, "x"]}, "labels_per_class must be"),
        ({"labels_per_class": True}, "labels_per_class must be"),
    ],
)
def test_bad_evidence_is_refused(evidence, match):
    with pytest.raises(SelectionInputError, match=match):
        decide(evidence, has_model=True, n_labeled=1, n_classes=2)


def test_rank_auto_delegates_and_says_why():
    probs, emb, mask = pool(labeled=8)  # 2 per class: typicality
    low = rank("auto", probs=probs, embeddings=emb, labeled_mask=mask, batch=5)
    typ = rank("typicality", probs=probs, embeddings=emb, labeled_mask=mask, batch=5)
    np.testing.assert_array_equal(low.order, typ.order)
    assert low.strategy == "typicality (auto)" and "2.0 labels per class" in low.decision
    high = rank(
        "auto",
        probs=probs,
        embeddings=emb,
        labeled_mask=mask,
        batch=5,
        evidence={"labels_per_class": 50, "val_accuracy": 0.9},
    )
    herd = rank("herding", probs=probs, embeddings=emb, labeled_mask=mask, batch=5)
    np.testing.assert_array_equal(high.order, herd.order)
    assert high.strategy == "herding (auto)" and "the model is trusted" in high.decision
    lowered = rank(
        "auto", probs=probs, embeddings=emb, labeled_mask=mask, batch=5, auto_labels_per_class=2
    )
    assert lowered.strategy == "herding (auto)"
    gated = rank(
        "auto",
        probs=probs,
        embeddings=emb,
        labeled_mask=mask,
        auto_labels_per_class=2,
        auto_min_accuracy=0.95,
        evidence={"acceptance": 0.5},
    )
    assert gated.strategy == "typicality (auto)"
    cold = rank("auto", embeddings=emb, labeled_mask=np.zeros(len(emb), bool), batch=5)
    assert cold.strategy == "typicality (auto)" and "no model yet" in cold.decision


def test_other_strategies_ignore_evidence():
    probs, emb, mask = pool()
    a = rank("diversified", probs=probs, embeddings=emb, labeled_mask=mask)
    b = rank(
        "diversified", probs=probs, embeddings=emb, labeled_mask=mask, evidence={"acceptance": 0}
    )
    np.testing.assert_array_equal(a.order, b.order)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"auto_labels_per_class": 0}, "auto_labels_per_class must be a number > 0"),
        ({"auto_min_accuracy": 2}, r"auto_min_accuracy must be a number in \[0, 1\]"),
        ({"evidence": {"acceptance": 3}}, "acceptance must be"),
        ({"embeddings": None}, "strategy 'typicality' needs embeddings"),
    ],
)
def test_rank_auto_bad_input(kwargs, match):
    probs, emb, mask = pool()
    args = {"probs": probs, "embeddings": emb, "labeled_mask": mask}
    args.update(kwargs)
    with pytest.raises(SelectionInputError, match=match):
        rank("auto", **args)


# ---------------------------------------------------------------- reasons


def test_reasons_cover_every_ranked_row():
    probs, emb, mask = pool()
    for name in STRATEGIES:
        r = rank(name, probs=probs, embeddings=emb, labeled_mask=mask, batch=6)
        assert set(r.reason[r.order]) <= set(REASONS)
        assert (r.reason[mask] == "").all()
        assert all(explain(r, row, probs=probs) for row in r.order[:6])
        assert explain(r, int(np.flatnonzero(mask)[0])) == ""


def test_typicality_reasons_in_words():
    rng = np.random.default_rng(1)
    emb = np.concatenate([rng.normal(size=(37, 2)), rng.normal(size=(20, 2)) + 30])
    mask = np.zeros(57, bool)
    mask[40] = True  # one label in the 20-image group
    r = rank("typicality", embeddings=emb, labeled_mask=mask, batch=1)
    # K = 1 + 1 = 2 groups: the 37-image one has no label, so its most typical image comes first
    first = int(r.order[0])
    assert first < 37 and r.reason[first] == "typical"
    assert explain(r, first) == "typical of a group of 37 similar images, none of them labeled yet"
    # then round-robin by (labeled + queued) in the group, larger group first on a tie: the big
    # group's second image (1 queued) comes before the small group's first (1 labeled)
    second, third = int(r.order[1]), int(r.order[2])
    assert second < 37 and r.reason[second] == "typical_again"
    assert explain(r, second) == (
        "typical of a group of 37 similar images (1 earlier in the queue), to cover it better"
    )
    assert third >= 37 and r.reason[third] == "typical_again"
    assert explain(r, third) == (
        "typical of a group of 20 similar images (1 labeled), to cover it better"
    )
    assert r.group_size[first] == 37 and r.group_labeled[third] == 1 and r.group_queued[second] == 1


def test_uncertainty_reasons_name_the_classes():
    probs = np.array([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.34, 0.33, 0.33], [0.1, 0.1, 0.8]])
    emb = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0], [0.0, 1.0]])
    mask = np.array([False, False, False, True])
    r = rank("diversified", probs=probs, embeddings=emb, labeled_mask=mask, batch=1)
    names = ["cat", "dog", "bird"]
    assert r.order[0] == 2 and r.reason[2] == "uncertain_far"
    assert explain(r, 2, class_names=names, probs=probs) == (
        "the model is unsure (between cat 34% and dog 33%), and it is far from every labeled image"
    )
    assert explain(r, 0, class_names=names, probs=probs[0]) == (
        "the model is unsure (between cat 50% and dog 30%)"
    )
    assert explain(r, 0).startswith("the model is unsure (uncertainty 0.")


def test_a_sure_model_is_not_called_unsure():
    # A nearly solved project: even the queue's top is 94% sure. The words say how few unlabeled
    # images leave the model less sure, not that it is unsure.
    probs = np.array([[0.94, 0.04, 0.02], [0.99, 0.005, 0.005], [0.97, 0.02, 0.01],
                      [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])  # fmt: skip
    emb = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0], [0.0, 1.0], [3.0, 3.0]])
    mask = np.array([False, False, False, False, True])
    r = rank("uncertainty", probs=probs, embeddings=emb, labeled_mask=mask, batch=2)
    names = ["Sunny", "Cloudy", "Rain"]
    assert list(r.order[:2]) == [3, 0]
    assert explain(r, 3, class_names=names, probs=probs) == (
        "the model is unsure (between Sunny 60% and Cloudy 30%)"
    )
    assert explain(r, 0, class_names=names, probs=probs) == (
        "the model is fairly sure (Sunny 94% and Cloudy 4%), but only 1 of the 4 unlabeled "
        "images leave it less sure"
    )
    # 3 of the 4 unlabeled images are less sure than row 1: not "only"
    assert explain(r, 1, class_names=names, probs=probs) == (
        "the model is fairly sure (Sunny 99% and Cloudy 0%); 3 of the 4 unlabeled images leave "
        "it less sure"
    )
    mask[3] = True
    r = rank("uncertainty", probs=probs, embeddings=emb, labeled_mask=mask, batch=1)
    assert explain(r, 0, class_names=names, probs=probs) == (
        "the model is fairly sure (Sunny 94% and Cloudy 4%), but no unlabeled image leaves it "
        "less sure"
    )


def test_coreset_and_random_reasons_in_words():
    emb = np.array([[0.0], [1.0], [10.0]])
    cold = rank("coreset", embeddings=emb, labeled_mask=np.zeros(3, bool), batch=2)
    assert explain(cold, int(cold.order[0])).startswith("the image most unlike the average")
    assert (
        explain(cold, int(cold.order[1]))
        == "unlike every labeled image so far (far from all of them)"
    )
    r = rank("random", labeled_mask=np.zeros(3, bool))
    assert explain(r, 0) == "picked at random"
