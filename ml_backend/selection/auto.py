"""The ``auto`` strategy's rule: typicality until the model has earned trust, then herding.

Evidence the job can pass (``rank(..., evidence={...})``), every key optional:

- ``labels_per_class``: a number (mean labels per class), or the count per class (a mapping
  ``class -> count`` or a sequence of counts; classes with no label count as 0).
- ``val_accuracy``: the new model's accuracy on held-out labels, in [0, 1].
- ``acceptance``: the share of the previous version's pre-annotations that annotators kept,
  in [0, 1].

Rule, with ``T = auto_labels_per_class`` (setting ``AUTO_LABELS_PER_CLASS``) and
``A = auto_min_accuracy`` (setting ``AUTO_MIN_ACCURACY``):

- no model yet (no probabilities): ``typicality``;
- ``lpc`` = the mean labels per class: from the evidence, else ``|L| / C`` with ``C`` the number
  of classes of the probabilities;
- ``q`` = ``val_accuracy`` if given, else ``acceptance`` if given, else unknown;
- ``herding`` when ``lpc >= T`` and (``q`` unknown or ``q >= A``), or when ``lpc >= 4 T``
  whatever ``q`` says (a hard task must not keep typicality forever); else ``typicality``.

The second phase was ``diversified`` (margin, k-center over the most uncertain images) until
2026-12-08; uncertainty herding replaced it: paired by seed on the same embeddings, its area
under the curve was +0.8 points on MNIST-5k and +0.5 on digits (2-epoch SimCLR backbones), +0.2
on MNIST-5k with a 6-epoch backbone, +0.0 on weather, and +4.5 and +1.4 on the pixel-PCA
stand-in embeddings, never below by more than 0.5 points at any budget (README).

Why labels per class: with a handful of labels per class the model's uncertainty points at the
wrong images and density-based picks win (TypiClust's low-budget regime); once every class has
enough examples, uncertainty plus diversity wins. (``T`` was chosen with diversified as the
second phase and not tuned again for herding.) With the plain head on the self-supervised
backbone that happened at 10-15 labels per class on digits and MNIST-5k (``T = 12`` until
then); with the recipe's head that learns from labels spread over the pool, the model earns
trust sooner (``T = 6`` with entropy), and with margin as the uncertainty measure sooner still:
``T = 3`` is best or tied-best in area under the curve on MNIST-5k, digits and the 3-class
weather set (``docs/selection.md``: T = 3, 4 and 6 with margin on the same seeds).

The accuracy gate (``A > 0``) is off by default, because measured it hurts: accuracy measured on
labels the queue chose is biased (high under typicality, whose picks are easy; low under
diversified, whose picks are hard), so near ``A`` the choice alternates between rounds (there
is no hysteresis), and the mixture was worse than either strategy alone (MNIST-5k, 5 seeds:
area under the curve 0.888 with ``T = 10, A = 0.85`` against 0.896 with ``T = 12, A = 0``). Set
it for a task where a model with many labels per class can still be poor; from ``4 T`` labels
per class the gate no longer holds typicality.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from ml_backend.errors import SelectionInputError

AUTO_LABELS_PER_CLASS = 3.0
AUTO_MIN_ACCURACY = 0.0  # the accuracy gate is off by default: see the module docstring
EVIDENCE_KEYS = ("labels_per_class", "val_accuracy", "acceptance")
_HARD_FACTOR = 4


@dataclasses.dataclass(frozen=True)
class Decision:
    """What ``auto`` chose and why, in one sentence a labeler can read."""

    strategy: str
    why: str


def decide(
    evidence: Mapping | None,
    *,
    has_model: bool,
    n_labeled: int,
    n_classes: int,
    labels_per_class: float = AUTO_LABELS_PER_CLASS,
    min_accuracy: float = AUTO_MIN_ACCURACY,
) -> Decision:
    """Apply the rule of the module docstring.

    Args:
        evidence: None or a mapping with keys among ``EVIDENCE_KEYS``.
        has_model: whether probabilities were given.
        n_labeled: ``|L|``.
        n_classes: ``C`` from the probabilities (0 without them).
        labels_per_class: ``T``, > 0.
        min_accuracy: ``A``, in [0, 1].

    Raises:
        SelectionInputError: unknown evidence keys or values out of range.
    """
    lpc, quality, source = _validated(evidence)
    if not has_model:
        return Decision("typicality", "no model yet, so the most typical images come first")
    if lpc is None:
        lpc = n_labeled / max(n_classes, 1)
    lpc_text = f"{lpc:.1f} labels per class"
    if lpc < labels_per_class:
        return Decision(
            "typicality",
            f"{lpc_text} (fewer than {labels_per_class:g}): too few for the model's uncertainty "
            "to be trusted, so the most typical images come first",
        )
    if quality is not None and quality < min_accuracy and lpc < _HARD_FACTOR * labels_per_class:
        return Decision(
            "typicality",
            f"{lpc_text}, but {source} is {quality:.0%} (below {min_accuracy:.0%}): the model is "
            "not trusted yet, so the most typical images come first",
        )
    checked = "" if quality is None else f" and {source} {quality:.0%}"
    return Decision(
        "herding",
        f"{lpc_text}{checked}: the model is trusted, so images it is unsure about come first, "
        "where they stand for the most unlabeled images",
    )


def _validated(evidence) -> tuple[float | None, float | None, str]:
    if evidence is None:
        return None, None, ""
    if not isinstance(evidence, Mapping):
        raise SelectionInputError(
            f"evidence must be a mapping with keys among {', '.join(EVIDENCE_KEYS)}, "
            f"got {type(evidence).__name__}"
        )
    unknown = sorted(set(evidence) - set(EVIDENCE_KEYS))
    if unknown:
        raise SelectionInputError(
            f"unknown evidence {', '.join(map(repr, unknown))}; allowed: {', '.join(EVIDENCE_KEYS)}"
        )
    lpc = _labels_per_class(evidence.get("labels_per_class"))
    for key, source in (("val_accuracy", "validation accuracy"), ("acceptance", "acceptance")):
        value = evidence.get(key)
        if value is None:
            continue
        if not _is_number(value) or not 0.0 <= float(value) <= 1.0:
            raise SelectionInputError(f"evidence {key} must be a number in [0, 1], got {value!r}")
        return lpc, float(value), source
    return lpc, None, ""


def _labels_per_class(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        value = list(value.values())
    if _is_number(value):
        counts = [float(value)]
    elif isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str):
        counts = [float(v) if _is_number(v) else math.nan for v in value]
        if not counts:
            raise SelectionInputError("evidence labels_per_class must not be empty")
    else:
        counts = [math.nan]
    if any(not (math.isfinite(c) and c >= 0) for c in counts):
        raise SelectionInputError(
            "evidence labels_per_class must be a number >= 0 or counts >= 0 per class, "
            f"got {value!r}"
        )
    return sum(counts) / len(counts)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
