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

A renamed ``<Choices>`` tag (annotations keep the ``from_name`` they were made with; Label
Studio accepts the rename when their results never entered its project summary, e.g. tasks
imported with annotations): when an annotation has no result under the current name, a
``choices`` result under another name is used if it points at our ``<Image>``, every value is
one of our labels, the name is not another tag of the config, it is the only such old name in
the annotation, and ours is the only ``<Choices>`` on that image. Otherwise nothing is guessed
(the annotation casts no vote and is reported). ``LabelTally`` counts what was recovered and
dropped so a job can say it once.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
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
        other_controls: names of the config's other control tags (their results are theirs).
        recover_renamed: ours is the only ``<Choices>`` on the image, so a ``choices`` result
            under a name the config no longer has can only be ours, renamed.
    """

    from_name: str
    to_name: str
    value_key: str
    labels: tuple[str, ...]
    other_controls: frozenset[str] = frozenset()
    recover_renamed: bool = False

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
            siblings = [
                c
                for c in interface.controls
                if c.tag.lower() == "choices" and image.name in (c.to_name or [])
            ]
            return LabelSpec(
                control.name,
                image.name,
                str(image.value)[1:],
                labels,
                other_controls=frozenset(c.name for c in interface.controls) - {control.name},
                recover_renamed=len(siblings) == 1,
            )
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


class LabelTally:
    """What the label rules did over one job's tasks, for one warning instead of one per task.

    Pass the same tally to every ``task_label`` call of a job, then log ``summary()`` once.
    """

    def __init__(self, spec: LabelSpec):
        self.spec = spec
        self.recovered: Counter[str] = Counter()  # old from_name -> annotations recovered
        self.dropped: Counter[str] = Counter()  # reason -> annotations
        self.dropped_names: defaultdict[str, set[str]] = defaultdict(set)

    def summary(self) -> str | None:
        """One sentence with counts, or None when every annotation used the current name."""
        parts = []
        if self.recovered:
            names = ", ".join(f'"{n}" ({c})' for n, c in sorted(self.recovered.items()))
            parts.append(
                f"{sum(self.recovered.values())} annotation(s) chose under an old name of "
                f'<Choices name="{self.spec.from_name}">, {names}: their labels were used'
            )
        if self.dropped:
            reasons = "; ".join(
                f"{count} under {', '.join(f'{n!r}' for n in sorted(self.dropped_names[why]))}: {why}"
                for why, count in sorted(self.dropped.items())
            )
            parts.append(
                f"{sum(self.dropped.values())} annotation(s) under names the config does not "
                f"have were dropped ({reasons})"
            )
        if not parts:
            return None
        return (
            "; ".join(parts) + ". The labeling config's <Choices> was renamed after these "
            "annotations were made (or they were imported from another project): rename it "
            "back, or re-annotate, to make every label count for sure."
        )


def _choices_of(
    annotation: dict, spec: LabelSpec, tally: LabelTally | None
) -> tuple[list[str], str | None]:
    """Values chosen under our ``<Choices>`` (or its old name, see the module docstring).

    Returns ``(values, problem)``; ``problem`` says why a result under another name was not used.
    """
    values: list[str] = []
    stale: dict[str, list[str]] = {}
    for region in annotation.get("result") or []:
        if not isinstance(region, dict):
            continue
        chosen = (region.get("value") or {}).get("choices") or []
        name = region.get("from_name")
        if name == spec.from_name:
            values.extend(chosen)
        elif (
            region.get("type") == "choices"
            and region.get("to_name") == spec.to_name
            and isinstance(name, str)
            and name not in spec.other_controls
            and chosen
        ):
            stale.setdefault(name, []).extend(chosen)
    if values or not stale:
        return values, None
    names = ", ".join(repr(n) for n in sorted(stale))
    if not spec.recover_renamed:
        reason = "not guessed: the config has several <Choices> for the image"
    elif len(stale) > 1:
        reason = "not guessed: several old <Choices> names in one annotation"
    elif not all(v in spec.labels for v in next(iter(stale.values()))):
        reason = "values that are not choices of the config"
    else:
        ((name, chosen),) = stale.items()
        if tally is not None:
            tally.recovered[name] += 1
        return chosen, None
    if tally is not None:
        tally.dropped[reason] += 1
        tally.dropped_names[reason].update(stale)
    return (
        [],
        f"annotation {annotation.get('id', '?')} chose under <Choices name={names}>, {reason}",
    )


def task_label(
    task: dict, spec: LabelSpec, tally: LabelTally | None = None
) -> tuple[str | None, str | None]:
    """The training label of a task, by the rules in the module docstring.

    Args:
        task: a task dict as Label Studio returns it (``annotations`` with ``result`` lists).
        spec: the project's LabelSpec.
        tally: counts labels recovered from, or dropped under, an old ``<Choices>`` name.

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
        chosen, stale_problem = _choices_of(annotation, spec, tally)
        ident = annotation.get("id", "?")
        if stale_problem:
            problems.append(stale_problem)
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
