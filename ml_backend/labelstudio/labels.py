"""Label Studio tasks and configs <-> (image URL, class label).

The backend trains a single-label image classifier, so it needs one ``<Image>`` and one
``<Choices>`` that points at it. ``parse_config`` finds that pair with the SDK's
``LabelInterface``; everything else here is plain dict handling so it stays cheap for 100k tasks.

Rules for turning a task's annotations into one label (``task_label``):

- cancelled (skipped) annotations are ignored;
- each remaining annotation votes for the choice it selected in our ``<Choices>``;
- an annotation selecting a value that is not in the config, or several values at once, casts
  no vote and is reported as a problem: a single-label classifier cannot learn from a
  multi-choice answer, and guessing "the first one" would train on a label nobody gave;
- the majority wins; a tie goes to the label of the most recently updated annotation
  (``updated_at``, then ``created_at``, then ``id``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import datetime, timezone

from label_studio_sdk.label_interface import LabelInterface

from ml_backend.errors import LabelConfigError

_NEEDS = (
    'The labeling config must contain an <Image name=... value="$field"/> and a '
    '<Choices name=... toName="<that image\'s name>"> with at least two <Choice value=.../>.'
)


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    """The part of a labeling config this backend uses.

    Attributes:
        from_name: ``name`` of the ``<Choices>`` tag (prediction ``from_name``).
        to_name: ``name`` of the ``<Image>`` tag (prediction ``to_name``).
        value_key: key of the image URL in ``task["data"]`` (the Image's ``value`` without ``$``).
        labels: choice values in config order; class index ``i`` is ``labels[i]``.
    """

    from_name: str
    to_name: str
    value_key: str
    labels: tuple[str, ...]

    def index(self, label: str) -> int:
        """Class index of ``label`` (config order)."""
        return self.labels.index(label)


def parse_config(xml: str) -> LabelSpec:
    """Find the first Image + Choices pair in a labeling config.

    Args:
        xml: the project's ``label_config``.

    Returns:
        The LabelSpec of the first ``<Choices>`` (document order) whose ``toName`` is an
        ``<Image>`` with a ``$field`` value.

    Raises:
        LabelConfigError: the config does not parse, or has no such pair, or fewer than two choices.
    """
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises several types for broken XML
        raise LabelConfigError(
            f"The labeling config could not be parsed ({exc}). {_NEEDS}"
        ) from None
    images = {obj.name: obj for obj in interface.objects if obj.tag.lower() == "image"}
    for control in interface.controls:
        if control.tag.lower() != "choices":
            continue
        for to_name in control.to_name or []:
            image = images.get(to_name)
            if image is None or not str(image.value).startswith("$"):
                continue
            labels = tuple(control.labels or [])
            if len(labels) < 2:
                raise LabelConfigError(
                    f'<Choices name="{control.name}"> has {len(labels)} choice(s); a classifier '
                    f"needs at least two. {_NEEDS}"
                )
            return LabelSpec(control.name, image.name, str(image.value)[1:], labels)
    found = ", ".join(
        sorted(
            {f"<{c.tag}>" for c in interface.controls} | {f"<{o.tag}>" for o in interface.objects}
        )
    )
    raise LabelConfigError(
        f"No <Image> + <Choices> pair found (config has: {found or 'no tags'}). {_NEEDS}"
    )


def _when(annotation: dict) -> tuple:
    """Sort key: most recent annotation last (updated_at, created_at, id)."""

    def stamp(value) -> float:
        if not value:
            return float("-inf")
        try:
            parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return float("-inf")
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.timestamp()

    ident = annotation.get("id")
    return (
        stamp(annotation.get("updated_at")),
        stamp(annotation.get("created_at")),
        ident if isinstance(ident, int) else -1,
    )


def _choices_of(annotation: dict, spec: LabelSpec) -> list[str]:
    values: list[str] = []
    for region in annotation.get("result") or []:
        if not isinstance(region, dict) or region.get("from_name") != spec.from_name:
            continue
        values.extend((region.get("value") or {}).get("choices") or [])
    return values


def task_label(task: dict, spec: LabelSpec) -> tuple[str | None, str | None]:
    """The training label of a task, by the rules in the module docstring.

    Args:
        task: a task dict as Label Studio returns it (``annotations`` with ``result`` lists).
        spec: the project's LabelSpec.

    Returns:
        ``(label, problem)``. ``label`` is a value of ``spec.labels`` or None (unlabeled or
        unusable). ``problem`` is None, or a sentence for the log saying what was ignored; it can
        come with a label (e.g. one of three annotations used an unknown value).
    """
    votes: Counter[str] = Counter()
    latest: dict[str, tuple] = {}
    problems: list[str] = []
    for annotation in task.get("annotations") or []:
        if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
            continue
        chosen = _choices_of(annotation, spec)
        ident = annotation.get("id", "?")
        if not chosen:
            continue  # submitted without choosing: no vote, nothing to report
        if len(chosen) > 1:
            problems.append(f"annotation {ident} selects several choices {chosen}; ignored")
            continue
        label = chosen[0]
        if label not in spec.labels:
            problems.append(
                f"annotation {ident} uses {label!r}, not a choice in the config; ignored"
            )
            continue
        votes[label] += 1
        latest[label] = max(latest.get(label, _when(annotation)), _when(annotation))
    problem = "; ".join(problems) or None
    if not votes:
        return None, problem
    top = max(votes.values())
    tied = [label for label, count in votes.items() if count == top]
    return max(tied, key=lambda label: latest[label]), problem


def choice_result(spec: LabelSpec, label: str) -> list[dict]:
    """The prediction ``result`` that selects ``label``.

    Built by hand (it runs once per task); the shape equals what the SDK's
    ``ChoicesTag.label([label])`` produces, which the tests check.

    Raises:
        ValueError: ``label`` is not one of ``spec.labels``.
    """
    if label not in spec.labels:
        raise ValueError(
            f"{label!r} is not a choice of <Choices name={spec.from_name!r}>: {spec.labels}"
        )
    return [
        {
            "from_name": spec.from_name,
            "to_name": spec.to_name,
            "type": "choices",
            "value": {"choices": [label]},
        }
    ]


def image_url(task: dict, spec: LabelSpec) -> tuple[str | None, str | None]:
    """The image URL of a task (``task["data"][spec.value_key]``).

    Returns:
        ``(url, None)``, or ``(None, problem)`` when the field is missing or not a string.
    """
    data = task.get("data") or {}
    value = data.get(spec.value_key)
    if isinstance(value, str) and value.strip():
        return value.strip(), None
    if spec.value_key not in data:
        keys = ", ".join(sorted(data)) or "none"
        return None, f"task {task.get('id')} has no data field {spec.value_key!r} (fields: {keys})"
    return None, f"task {task.get('id')} field {spec.value_key!r} is not a URL string"
