"""Label config parsing and the rules that turn annotations into one label."""

import json
from pathlib import Path

import pytest
from label_studio_sdk.label_interface import LabelInterface

from ml_backend.errors import LabelConfigError
from ml_backend.labelstudio.labels import (
    LabelTally,
    choice_result,
    image_url,
    parse_config,
    task_label,
)

CONFIG = (Path(__file__).parents[2] / "label_config.xml").read_text()


def ann(
    ident, label=None, *, cancelled=False, updated=None, created=None, choices=None, name="choice"
):
    value = {"choices": choices if choices is not None else ([label] if label else [])}
    result = [{"from_name": name, "to_name": "image", "type": "choices", "value": value}]
    return {
        "id": ident,
        "result": result if (label or choices) else [],
        "was_cancelled": cancelled,
        "updated_at": updated,
        "created_at": created,
    }


@pytest.fixture
def spec():
    return parse_config(CONFIG)


def test_parse_project_config(spec):
    assert spec.from_name == "choice" and spec.to_name == "image" and spec.value_key == "image"
    assert spec.labels == ("Sunny", "Cloudy", "Very Cloudy")  # config order


def test_parse_picks_choices_pointing_at_the_image():
    xml = """<View>
      <Text name="caption" value="$text"/>
      <Choices name="topic" toName="caption"><Choice value="a"/><Choice value="b"/></Choices>
      <Image name="img" value="$photo"/>
      <Choices name="kind" toName="img"><Choice value="Cat"/><Choice value="Dog"/></Choices>
    </View>"""
    spec = parse_config(xml)
    assert (spec.from_name, spec.to_name, spec.value_key, spec.labels) == (
        "kind",
        "img",
        "photo",
        ("Cat", "Dog"),
    )


@pytest.mark.parametrize(
    "xml",
    [
        '<View><Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="a"/><Choice value="b"/></Choices></View>',
        '<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"><Label value="a"/></RectangleLabels></View>',
        '<View><Image name="i" value="$i"/><Choices name="c" toName="i"><Choice value="only"/></Choices></View>',
        "<View><Image",
    ],
)
def test_parse_without_a_pair_says_what_is_needed(xml):
    with pytest.raises(LabelConfigError, match="Choices"):
        parse_config(xml)


def test_majority_wins(spec):
    task = {"annotations": [ann(1, "Sunny"), ann(2, "Cloudy"), ann(3, "Sunny")]}
    assert task_label(task, spec) == ("Sunny", None)


def test_tie_goes_to_most_recently_updated(spec):
    task = {
        "annotations": [
            ann(1, "Sunny", updated="2024-05-02T10:00:00Z"),
            ann(2, "Cloudy", updated="2024-05-01T10:00:00Z", created="2024-05-03T00:00:00Z"),
        ]
    }
    assert task_label(task, spec) == ("Sunny", None)


def test_tie_without_times_goes_to_highest_id(spec):
    task = {"annotations": [ann(7, "Cloudy"), ann(3, "Sunny")]}
    assert task_label(task, spec)[0] == "Cloudy"


def test_tie_falls_back_to_created_at(spec):
    task = {
        "annotations": [
            ann(9, "Sunny", created="2024-01-01T00:00:00Z"),
            ann(2, "Cloudy", created="2024-02-01T00:00:00+00:00"),
        ]
    }
    assert task_label(task, spec)[0] == "Cloudy"


def test_cancelled_annotations_do_not_vote(spec):
    task = {
        "annotations": [
            ann(1, "Sunny", cancelled=True),
            ann(2, "Sunny", cancelled=True),
            ann(3, "Cloudy"),
        ]
    }
    assert task_label(task, spec) == ("Cloudy", None)
    assert task_label({"annotations": [ann(1, "Sunny", cancelled=True)]}, spec) == (None, None)


def test_unlabeled_task_is_not_a_problem(spec):
    assert task_label({"annotations": []}, spec) == (None, None)
    assert task_label({}, spec) == (None, None)
    assert task_label({"annotations": [ann(1)]}, spec) == (None, None)  # submitted empty


def test_label_outside_config_is_reported_and_ignored(spec):
    label, problem = task_label({"annotations": [ann(4, "Rainy")]}, spec)
    assert label is None and "Rainy" in problem and "4" in problem
    label, problem = task_label({"annotations": [ann(4, "Rainy"), ann(5, "Cloudy")]}, spec)
    assert label == "Cloudy" and "Rainy" in problem


def test_several_choices_in_one_annotation_cast_no_vote(spec):
    label, problem = task_label({"annotations": [ann(1, choices=["Sunny", "Cloudy"])]}, spec)
    assert label is None and "several" in problem


def test_other_controls_are_ignored():
    xml = CONFIG.replace(
        "</View>",
        '<Choices name="quality" toName="image"><Choice value="Sunny"/><Choice value="Blurry"/>'
        '</Choices><TextArea name="notes" toName="image"/></View>',
    )
    spec = parse_config(xml)
    notes = {"from_name": "notes", "to_name": "image", "type": "textarea", "value": {"text": ["x"]}}
    task = {
        "annotations": [
            ann(1, "Sunny", name="quality"),  # another tag's answer, even with our value
            {**ann(2, "Cloudy"), "result": ann(2, "Cloudy")["result"] + [notes]},
        ]
    }
    assert task_label(task, spec) == ("Cloudy", None)


RENAMED = CONFIG.replace('name="choice"', 'name="weather"')


def test_renamed_choices_tag_keeps_its_labels():
    """Annotations made before the rename keep from_name="choice"; they still count, once
    each, and the tally says so once for the job."""
    spec = parse_config(RENAMED)
    assert spec.from_name == "weather" and spec.recover_renamed
    tally = LabelTally(spec)
    old = {"annotations": [ann(1, "Cloudy", name="choice")]}
    new = {"annotations": [ann(2, "Sunny", name="weather")]}
    mixed = {"annotations": [ann(3, "Sunny", name="choice"), ann(4, "Cloudy", name="weather"),
                             ann(5, "Cloudy", name="choice", updated="2024-01-02")]}  # fmt: skip
    assert task_label(old, spec, tally) == ("Cloudy", None)
    assert task_label(new, spec, tally) == ("Sunny", None)
    assert task_label(mixed, spec, tally) == ("Cloudy", None)
    assert tally.recovered == {"choice": 3} and not tally.dropped
    summary = tally.summary()
    assert "3 annotation(s) chose under an old name" in summary and '"choice" (3)' in summary
    assert LabelTally(spec).summary() is None


def test_renamed_choices_never_guessed_when_unsure():
    spec = parse_config(RENAMED)
    tally = LabelTally(spec)
    foreign = {"annotations": [ann(1, "Rainy", name="choice")]}  # a value the config lacks
    two_names = {
        "annotations": [
            {"id": 2, "result": ann(2, "Sunny", name="a")["result"] + ann(2, "Cloudy", name="b")["result"]}
        ]
    }  # fmt: skip
    other_image = {"annotations": [{"id": 3, "result": [{**ann(3, "Sunny", name="choice")["result"][0], "to_name": "thumb"}]}]}  # fmt: skip
    label, problem = task_label(foreign, spec, tally)
    assert label is None and "annotation 1" in problem and "not choices of the config" in problem
    label, problem = task_label(two_names, spec, tally)
    assert label is None and "several old <Choices> names" in problem
    assert task_label(other_image, spec, tally) == (None, None)  # not aimed at our image
    assert not tally.recovered and sum(tally.dropped.values()) == 2
    assert "2 annotation(s) under names the config does not have were dropped" in tally.summary()

    # Two <Choices> on the image: an old name could be either of them, so nothing is guessed.
    xml = RENAMED.replace(
        "</View>", '<Choices name="mood" toName="image"><Choice value="Sunny"/><Choice value="Grim"/></Choices></View>'
    )  # fmt: skip
    spec = parse_config(xml)
    assert spec.from_name == "weather" and not spec.recover_renamed
    tally = LabelTally(spec)
    label, problem = task_label({"annotations": [ann(4, "Sunny", name="choice")]}, spec, tally)
    assert label is None and "several <Choices> for the image" in problem
    assert task_label({"annotations": [ann(5, "Sunny", name="mood")]}, spec, tally) == (None, None)


def test_choice_result_matches_the_sdk_and_validates(spec):
    ours = choice_result(spec, "Very Cloudy")
    interface = LabelInterface(CONFIG)
    sdk = json.loads(interface.get_control("choice").label(["Very Cloudy"]).to_json())
    sdk.pop("id")
    assert ours == [sdk]
    assert interface.validate_prediction({"result": ours, "score": 0.5, "model_version": "v"})
    with pytest.raises(ValueError, match="Rainy"):
        choice_result(spec, "Rainy")


def test_image_url(spec):
    assert image_url({"id": 1, "data": {"image": " /data/upload/1/a.png "}}, spec) == (
        "/data/upload/1/a.png",
        None,
    )
    url, problem = image_url({"id": 2, "data": {"photo": "x"}}, spec)
    assert url is None and "image" in problem and "photo" in problem
    url, problem = image_url({"id": 3, "data": {"image": 5}}, spec)
    assert url is None and "not a URL" in problem
