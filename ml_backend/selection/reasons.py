"""Why a task is where it is in the queue: one code per ranked row, and the words for a labeler.

``Ranking.reason[row]`` holds one of ``REASONS`` (``""`` for labeled rows); :func:`explain` turns
it into a sentence, with the class names and the model's probabilities when given.

| code | rule that placed the row |
|---|---|
| ``typical`` | typicality: the most typical image of a group with no labeled (or queued) image |
| ``typical_again`` | typicality: typical of a group that already has labeled or queued images |
| ``uncertain_far`` | diversified: in the uncertainty shortlist and farthest from labeled/picked |
| ``uncertain`` | diversified after its batch, and uncertainty: by how unsure the model is |
| ``uncertain_varied`` | badge's batch: unsure, and unlike the batch's other picks in gradient space |
| ``covers`` | probcover, and herding before a model: stands for the most images no labeled or queued image is near |
| ``covers_unsure`` | herding's batch: stands for the most images the model is unsure of, far from labeled or queued ones |
| ``herded`` | herding after its batch: by how much it would add to that coverage |
| ``covered`` | probcover after full coverage: by how many images are near it |
| ``far`` | coreset: far from every labeled (and earlier picked) image |
| ``random`` | random order |

For the uncertainty codes the words name the two likeliest classes; when the likeliest is at
least ``SURE_ENOUGH`` (80%) the model is not called unsure: the sentence says how many unlabeled
images leave it less sure instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

REASONS = (
    "typical",
    "typical_again",
    "uncertain_far",
    "uncertain",
    "uncertain_varied",
    "far",
    "random",
    "covers",
    "covered",
    "covers_unsure",
    "herded",
)


def explain(ranking, row: int, *, class_names: Sequence[str] | None = None, probs=None) -> str:
    """The reason of one ranked row, in words a labeler understands.

    Args:
        ranking: a ``Ranking`` from :func:`ml_backend.selection.rank`.
        row: a pool row (usually one of ``ranking.order[:batch]``).
        class_names: label of each probability column, to name the classes the model hesitates
            between; column numbers are used without them.
        probs: ``[N, C]`` probabilities (or the row's ``[C]``) the ranking was made with.

    Returns:
        A sentence without a final period, e.g. ``"typical of a group of 37 similar images, none
        of them labeled yet"``; ``""`` for a row without a reason (labeled).
    """
    code = str(ranking.reason[row])
    size = int(ranking.group_size[row])
    if code == "typical":
        return f"typical of a group of {size} similar images, none of them labeled yet"
    if code == "typical_again":
        labeled = int(ranking.group_labeled[row])
        queued = int(ranking.group_queued[row])
        done = [f"{labeled} labeled"] if labeled else []
        done += [f"{queued} earlier in the queue"] if queued else []
        return (
            f"typical of a group of {size} similar images ({' and '.join(done) or 'none labeled'}"
            "), to cover it better"
        )
    if code in ("uncertain_far", "uncertain", "uncertain_varied"):
        unsure = _unsure(ranking, row, class_names, probs)
        if code == "uncertain_far":
            return f"{unsure}, and it is far from every labeled image"
        if code == "uncertain_varied":
            return f"{unsure}, in a way unlike the other tasks picked with it"
        return unsure
    if code in ("covers", "covers_unsure"):
        others = int(ranking.covers[row]) - 1
        many = f"{others} similar image{'s' if others != 1 else ''}"
        if code == "covers_unsure":
            unsure = _unsure(ranking, row, class_names, probs)
            if others < 1:  # the images near it, if any, are nearer to a labeled or queued one
                return f"{unsure}; every similar image is already closer to a labeled or queued one"
            return f"{unsure}, and it stands for {many} that no labeled or queued image is close to yet"
        if others < 1:
            return "unlike every labeled or queued image, and unlike the other images too"
        return f"it stands for {many} that no labeled or queued image is close to yet"
    if code == "herded":
        return (
            "after the batch: images that would stand for more of the pool the queue above "
            "does not cover yet come first"
        )
    if code == "covered":
        return (
            "every image is now close to a labeled or queued one; images with more look-alikes "
            "come first"
        )
    if code == "far":
        if np.isinf(ranking.distance[row]):
            return "the image most unlike the average image (nothing is labeled yet)"
        return "unlike every labeled image so far (far from all of them)"
    if code == "random":
        return "picked at random"
    return ""


# Above this top probability the model is not "unsure" in words a labeler reads; the row is
# still among the least sure of the pool (the queue's top), and the sentence says that instead.
SURE_ENOUGH = 0.8
# "only N of M" when at most this share of the unlabeled images leave the model less sure.
FEW_LESS_SURE = 0.25


def _unsure(ranking, row: int, class_names, probs) -> str:
    u = ranking.uncertainty[row]
    level = f"uncertainty {u:.2f}" if np.isfinite(u) else "no model yet"
    if probs is None:
        return f"the model is unsure ({level})"
    p = np.asarray(probs.detach().cpu().numpy() if hasattr(probs, "detach") else probs, float)
    p = p[row] if p.ndim == 2 else p
    if p.size < 2:
        return f"the model is unsure ({level})"
    first, second = np.argsort(-p, kind="stable")[:2]

    def name(c: int) -> str:
        return str(class_names[c]) if class_names is not None and c < len(class_names) else str(c)

    pair = f"{name(first)} {p[first]:.0%} and {name(second)} {p[second]:.0%}"
    if p[first] < SURE_ENOUGH or not np.isfinite(u):
        return f"the model is unsure (between {pair})"
    # A nearly solved project: the top of the queue can be 94% sure. Say what is true: how few
    # unlabeled images the model is less sure of.
    unlabeled = ranking.reason != ""
    scores = ranking.uncertainty[unlabeled]
    less_sure = int(np.sum(np.isfinite(scores) & (scores > u)))
    sure = f"the model is fairly sure ({pair})"
    if less_sure == 0:
        return f"{sure}, but no unlabeled image leaves it less sure"
    count = f"{less_sure} of the {len(scores)} unlabeled images leave it less sure"
    if less_sure <= FEW_LESS_SURE * len(scores):
        return f"{sure}, but only {count}"
    return f"{sure}; {count}"  # picked for another reason too (far from the labeled images)
