"""Label config parsing and the rules that turn annotations into one label."""

import json
from pathlib import Path

import pytest
from label_studio_sdk.label_interface import LabelInterface

from ml_backend.errors import LabelConfigError
from ml_backend.labelstudio.labels import choice_result, image_url, parse_config, task_label

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


def test_other_controls_are_ignored(spec):
    task = {"annotations": [ann(1, "Whatever", name="other"), ann(2, "Sunny")]}
    assert task_label(task, spec) == ("Sunny", None)


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
