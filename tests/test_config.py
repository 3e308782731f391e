"""Settings: every variable documented, parsed, validated with a message naming it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import ml_backend.selection.probcover as probcover
from ml_backend.config import (
    BOUNDS,
    PARAM_RULES,
    SETTINGS_DOC,
    Settings,
    child_environment,
    settings_markdown,
)
from ml_backend.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_every_field_has_exactly_one_documented_variable():
    fields = {f.name.upper() for f in dataclasses.fields(Settings)}
    assert fields == set(SETTINGS_DOC)


def test_defaults_from_empty_environment_match_the_dataclass():
    assert Settings.from_env({}) == Settings()


def test_selection_defaults_are_the_settings_defaults():
    from ml_backend.selection.auto import AUTO_LABELS_PER_CLASS, AUTO_MIN_ACCURACY
    from ml_backend.selection.uncertainty import DEFAULT_MEASURE
    from ml_backend.simulation.loop import SimConfig

    settings = Settings()
    assert settings.uncertainty == DEFAULT_MEASURE == "margin"
    assert SimConfig.__dataclass_fields__["measure"].default == DEFAULT_MEASURE
    assert settings.auto_labels_per_class == AUTO_LABELS_PER_CLASS
    assert settings.auto_min_accuracy == AUTO_MIN_ACCURACY


def test_values_are_parsed():
    settings = Settings.from_env(
        {
            "EPOCHS": "3",
            "LEARNING_RATE": "0.01",
            "REDIS_URL": "redis://:pw@localhost:6379/1",
            "LOG_LEVEL": "debug",
            "DEVICE": "CUDA:1",
            "MODEL_DIR": "/srv/models ",
        }
    )
    assert settings.epochs == 3
    assert settings.learning_rate == 0.01
    assert settings.redis_url == "redis://:pw@localhost:6379/1"
    assert settings.log_level == "DEBUG"
    assert settings.device == "cuda:1"
    assert settings.model_dir == Path("/srv/models")
    assert "pw" not in repr(Settings(basic_auth_pass="pw", label_studio_api_key="k"))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EPOCHS": "-1"}, "EPOCHS must be at least 0, got -1"),
        ({"IMAGE_SIZE": "x"}, "IMAGE_SIZE must be auto or a whole number, got 'x'"),
        ({"VAL_FRACTION": "0.9"}, "VAL_FRACTION must be between 0.0 and 0.5"),
        ({"STRATEGY": "smart"}, "STRATEGY must be one of diversified, uncertainty"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL must start with redis://"),
        ({"BASIC_AUTH_USER": "u"}, "BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together"),
        ({"PRETRAINED": "no/such/file.pt"}, "PRETRAINED must be imagenet, none or the path"),
        ({"DEVICE": "tpu"}, "DEVICE must be auto, cpu, cuda or cuda:N"),
        ({"PROBCOVER_RADIUS": "wide"}, "PROBCOVER_RADIUS must be a number, got 'wide'"),
        ({"PROBCOVER_RADIUS": "3"}, "PROBCOVER_RADIUS must be between 0.05 and 2.0, got 3.0"),
    ],
)
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings.from_env(env)


def test_acquisition_settings():
    assert Settings.from_env({}).strategy == "auto"
    settings = Settings.from_env(
        {"STRATEGY": "typicality", "AUTO_LABELS_PER_CLASS": "2.5", "AUTO_MIN_ACCURACY": "0.6"}
    )
    assert settings.strategy == "typicality"
    assert settings.auto_labels_per_class == 2.5
    assert settings.auto_min_accuracy == 0.6
    for env, message in (
        ({"AUTO_LABELS_PER_CLASS": "0"}, "AUTO_LABELS_PER_CLASS must be between 0.1 and"),
        ({"AUTO_MIN_ACCURACY": "1.5"}, "AUTO_MIN_ACCURACY must be between 0.0 and 1.0"),
        ({"AUTO_MIN_ACCURACY": "high"}, "AUTO_MIN_ACCURACY must be a number"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            Settings.from_env(env)


def test_child_environment_overrides_and_removes(monkeypatch):
    monkeypatch.setenv("ML_BACKEND_TEST_VAR", "1")
    env = child_environment(REDIS_URL="unix:///tmp/r.sock", ML_BACKEND_TEST_VAR=None)
    assert env["REDIS_URL"] == "unix:///tmp/r.sock"
    assert "ML_BACKEND_TEST_VAR" not in env


def test_settings_table_lists_every_setting():
    table = settings_markdown()
    for name in SETTINGS_DOC:
        assert f"| `{name}` |" in table


def test_docs_list_every_setting():
    """The README's Settings section (and the service docs) name every setting."""
    assert "## Settings" in (ROOT / "README.md").read_text(), "README.md lost its Settings section"
    for doc in (ROOT / "README.md", ROOT / "docs" / "service.md"):
        missing = [name for name in SETTINGS_DOC if f"`{name}`" not in doc.read_text()]
        assert not missing, f"{doc.name} does not document {missing}; paste settings_markdown()"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"QUEUE_BATCH": "100000000"}, "QUEUE_BATCH must be between 1 and 1000, got 100000000"),
        ({"EPOCHS": "1000000"}, "EPOCHS must be between 0 and 200, got 1000000"),
        ({"IMAGE_SIZE": "4096"}, "IMAGE_SIZE must be between 32 and 1024"),
        ({"IMAGE_FETCH_WORKERS": "1000"}, "IMAGE_FETCH_WORKERS must be between 1 and 64"),
        ({"MAX_IMAGE_BYTES": str(2 << 30)}, "MAX_IMAGE_BYTES must be between 1024 and"),
        ({"MAX_IMAGE_BYTES": "10"}, "MAX_IMAGE_BYTES must be at least 1024"),
        ({"JOB_TIMEOUT": "1000000"}, "JOB_TIMEOUT must be between 10 and 86400"),
        ({"IMAGE_HOSTS": "http://x.org"}, "IMAGE_HOSTS entries must be host names"),
        ({"IMAGE_HOSTS": "x.org:8080"}, "IMAGE_HOSTS entries must be host names"),
        ({"IMAGE_HOSTS": "x.org/img"}, "IMAGE_HOSTS entries must be host names"),
    ],
)
def test_values_over_their_bound_name_the_bound(env, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings.from_env(env)


def test_every_bound_is_accepted_at_its_ends_and_refused_past_them():
    for name, (low, high) in BOUNDS.items():
        for ok in (low, high):
            assert getattr(Settings.from_env({name: str(ok)}), name.lower()) == ok
        for bad in (low - 1, high + 1):
            with pytest.raises(ConfigError, match=name):
                Settings.from_env({name: str(bad)})
        if SETTINGS_DOC[name][0] == "auto":  # IMAGE_SIZE: auto is 0, outside the bounds
            assert getattr(Settings.from_env({}), name.lower()) == 0
            continue
        default = int(SETTINGS_DOC[name][0])
        assert low <= default <= high, f"{name}'s default is outside its bounds"


def test_knobs_share_the_bounds_of_their_settings():
    for knob in ("queue_batch", "shortlist_factor", "epochs"):
        parse, allowed = PARAM_RULES[knob]
        low, high = BOUNDS[knob.upper()]
        assert parse(str(high)) == high and parse(low) == low
        assert f"from {low} to {high}" in allowed
        for bad in (low - 1, high + 1, True, 1.5, "x"):
            with pytest.raises((ValueError, TypeError)):
                parse(bad)


def test_probcover_radius_knob():
    parse, allowed = PARAM_RULES["probcover_radius"]
    assert parse("0.7") == 0.7 and parse(2) == 2.0 and parse(" Purity ") == 0.0
    assert "0.05 to 2 or purity" in allowed
    for bad in (0.01, 2.5, True, "wide", None):
        with pytest.raises((ValueError, TypeError)):
            parse(bad)


def test_image_hosts_and_byte_cap_are_parsed():
    settings = Settings.from_env(
        {"IMAGE_HOSTS": " Images.Example.com, *.cdn.example.org,*,10.0.0.5 ,[fd00::1],,"}
    )
    assert settings.image_hosts == (
        "images.example.com",
        "*.cdn.example.org",
        "*",
        "10.0.0.5",
        "fd00::1",
    )
    assert Settings.from_env({}).image_hosts == () and Settings().max_image_bytes == 64 << 20
    assert "Allowed: 1 to 1000." in settings_markdown()


def test_auto_and_on_off_settings():
    defaults = Settings.from_env({})
    assert defaults.image_size == 0 and defaults.self_supervised and defaults.pseudo_labels
    assert Settings.from_env({"IMAGE_SIZE": "AUTO"}).image_size == 0
    assert Settings.from_env({"IMAGE_SIZE": "96"}).image_size == 96
    assert Settings.from_env({"SELF_SUPERVISED": "off"}).self_supervised is False
    assert Settings.from_env({"PSEUDO_LABELS": "false"}).pseudo_labels is False
    assert defaults.label_spreading
    assert Settings.from_env({"LABEL_SPREADING": "off"}).label_spreading is False
    with pytest.raises(ConfigError, match="SELF_SUPERVISED must be on or off; got 'maybe'"):
        Settings.from_env({"SELF_SUPERVISED": "maybe"})
    with pytest.raises(ConfigError, match="IMAGE_SIZE must be auto or at least 32, got 8"):
        Settings.from_env({"IMAGE_SIZE": "8"})
    assert defaults.probcover_radius == 0.5 == probcover.DEFAULT_RADIUS  # rank()'s default too
    assert Settings.from_env({"PROBCOVER_RADIUS": "Purity"}).probcover_radius == 0.0
    assert Settings.from_env({"PROBCOVER_RADIUS": "0.8"}).probcover_radius == 0.8


def test_run_workers_auto_is_two_with_a_gpu_and_one_on_a_cpu():
    from ml_backend.config import run_worker_count

    auto = Settings.from_env({})
    assert auto.run_workers == 0
    assert run_worker_count(auto, gpu_present=lambda: True) == 2
    assert run_worker_count(auto, gpu_present=lambda: False) == 1
    assert run_worker_count(auto.with_overrides(device="cpu"), gpu_present=lambda: True) == 1
    assert run_worker_count(auto.with_overrides(device="cuda:1"), gpu_present=lambda: False) == 2
    assert run_worker_count(Settings.from_env({"RUN_WORKERS": "3"})) == 3
    with pytest.raises(ConfigError, match="RUN_WORKERS"):
        Settings.from_env({"RUN_WORKERS": "0"})
    with pytest.raises(ConfigError, match="RUN_WORKERS"):
        Settings.from_env({"RUN_WORKERS": "many"})
