"""Why a task is where it is in the queue: one code per ranked row, and the words for a labeler.

``Ranking.reason[row]`` holds one of ``REASONS`` (``""`` for labeled rows); :func:`explain` turns
it into a sentence, with the class names and the model's probabilities when given.

| code | rule that placed the row |
|---|---|
| ``typical`` | typicality: the most typical image of a group with no labeled (or queued) image |
| ``typical_again`` | typicality: typical of a group that already has labeled or queued images |
| ``uncertain_far`` | diversified: in the uncertainty shortlist and farthest from labeled/picked |
| ``uncertain`` | diversified after its batch, and uncertainty: by how unsure the model is |
| ``far`` | coreset: far from every labeled (and earlier picked) image |
| ``random`` | random order |
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

REASONS = ("typical", "typical_again", "uncertain_far", "uncertain", "far", "random")


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
    if code in ("uncertain_far", "uncertain"):
        unsure = _unsure(ranking, row, class_names, probs)
        if code == "uncertain":
            return unsure
        return f"{unsure}, and it is far from every labeled image"
    if code == "far":
        if np.isinf(ranking.distance[row]):
            return "the image most unlike the average image (nothing is labeled yet)"
        return "unlike every labeled image so far (far from all of them)"
    if code == "random":
        return "picked at random"
    return ""


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

    return (
        f"the model is unsure (between {name(first)} {p[first]:.0%} and "
        f"{name(second)} {p[second]:.0%})"
    )
