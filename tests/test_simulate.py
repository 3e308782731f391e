"""The offline simulator: a short real run on generated images, its outputs, and bad datasets."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ml_backend.devtools.synthetic import write_dataset
from ml_backend.simulation import cli as simulate
from ml_backend.simulation import report
from ml_backend.simulation.data import load_digits

STRATEGIES = ["random", "uncertainty", "coreset", "diversified"]
INITIAL, BATCH, ROUNDS, SEEDS = 6, 4, 2, 2


@pytest.fixture(autouse=True)
def _few_threads():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the CI box has 2 shared cores
    yield
    torch.set_num_threads(before)


def _argv(dataset, out: Path, *extra: str) -> list[str]:
    return [
        "--dataset", str(dataset), "--out", str(out), "--device", "cpu", "--no-progress",
        "--image-size", "32", "--epochs", "1", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One short run of every strategy on 36 generated weather images (3 classes)."""
    root = tmp_path_factory.mktemp("sim")
    write_dataset(root / "data", 36, seed=1, size=32, by_class=True)
    out = root / "out"
    code = simulate.main(
        _argv(
            root / "data", out, "--strategies", ",".join(STRATEGIES), "--initial", str(INITIAL),
            "--batch", str(BATCH), "--rounds", str(ROUNDS), "--seeds", str(SEEDS),
            "--test-fraction", "0.25", "--recipe", "legacy",
        )
    )  # fmt: skip
    assert code == 0
    return out


def _rows(out: Path) -> list[dict]:
    with (out / "rounds.csv").open() as f:
        return list(csv.DictReader(f))


def test_run_writes_csv_with_every_round(finished_run):
    rows = _rows(finished_run)
    assert set(report.ROUND_COLUMNS) <= set(rows[0])
    assert len(rows) == len(STRATEGIES) * SEEDS * (ROUNDS + 1)
    for row in rows:
        assert int(row["n_labels"]) == INITIAL + int(row["round"]) * BATCH
        assert 0.0 <= float(row["accuracy"]) <= 1.0
    assert {r["strategy"] for r in rows} == set(STRATEGIES)
    assert {int(r["seed"]) for r in rows} == set(range(SEEDS))
    with (finished_run / "full_data.csv").open() as f:
        full = list(csv.DictReader(f))
    assert [int(r["seed"]) for r in full] == list(range(SEEDS))
    assert all(int(r["n_labels"]) == 27 for r in full)  # 36 images, 25% held out


def test_strategies_share_initial_set_and_round_zero_per_seed(finished_run):
    rows = _rows(finished_run)
    for seed in range(SEEDS):
        mine = [r for r in rows if int(r["seed"]) == seed]
        assert len({r["initial_set"] for r in mine}) == 1
        round0 = [r for r in mine if r["round"] == "0"]
        assert len(round0) == len(STRATEGIES)
        assert len({r["accuracy"] for r in round0}) == 1
    # ...and different seeds really are different repeats.
    assert len({r["initial_set"] for r in rows}) == SEEDS
    import json

    sets = json.loads((finished_run / "config.json").read_text())["initial_sets"]
    assert len(sets) == SEEDS and all(len(s) == INITIAL for s in sets.values())


def test_default_recipe_pretrains_once_per_seed_and_serves_a_head(tmp_path, caplog):
    import logging

    write_dataset(tmp_path / "data", 36, seed=2, size=32, by_class=True)
    out = tmp_path / "out"
    argv = _argv(tmp_path / "data", out, "--strategies", "random,uncertainty", "--initial", "6",
                 "--batch", "4", "--rounds", "1", "--seeds", "1", "--pretrain-budget", "1", "--verbose")  # fmt: skip
    argv[argv.index("--image-size") + 1] = "auto"  # 32 px images -> 32
    with caplog.at_level(logging.INFO, logger="ml_backend"):
        assert simulate.main(argv) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert sum("pretrained the backbone" in m for m in messages) == 1
    served = [m for m in messages if m.startswith("Serving ")]
    assert len(served) == 1 + 1 + 2  # full data, round 0, one round per strategy
    assert all(m.split()[1] in ("head", "head+pseudo", "head+spread") for m in served)
    rows = _rows(out)
    assert len(rows) == 2 * 2 and all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)


def test_summary_table_and_plot(finished_run):
    text = (finished_run / "summary.md").read_text()
    assert "| labels | " + " | ".join(STRATEGIES) + " |" in text
    for n in (INITIAL, INITIAL + BATCH, INITIAL + 2 * BATCH):
        assert f"\n| {n} | " in text
    assert text.count(" ± ") >= 3 * len(STRATEGIES)
    for s in STRATEGIES:
        assert f"\n| {s} | " in text  # the labels-to-95% table
    png = (finished_run / "learning_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5_000


def test_labels_to_target_and_summary_by_hand():
    curve = {20: 0.5, 40: 0.85, 60: 0.9}
    assert report.labels_to_target(curve, full_accuracy=0.9) == 60  # needs 0.95 * 0.9 = 0.855
    rows = [
        {"strategy": s, "seed": seed, "round": r, "n_labels": 10 * (r + 1), "accuracy": acc}
        for s, base in (("random", 0.5), ("coreset", 0.6))
        for seed in (0, 1)
        for r, acc in enumerate([base, base + 0.2 + 0.1 * seed])
    ]
    text = report.summary_markdown(rows, {0: 0.8, 1: 0.9}, ["random", "coreset"], "t")
    assert "| 10 | 0.500 ± 0.000 | 0.600 ± 0.000 |" in text
    assert "| 20 | 0.750 ± 0.071 | 0.850 ± 0.071 |" in text
    # coreset: seed 0 reaches 0.8 >= 0.76 at 20; seed 1 0.9 >= 0.855 at 20.
    assert "| coreset | 20 ± 0 | 2/2 |" in text
    # random: seed 0 0.7 < 0.76, seed 1 0.8 < 0.855: never.
    assert "| random | > 20 | 0/2 |" in text


def test_digits_loader_upscales_to_rgb():
    data = load_digits(16)
    assert data.images.shape == (1797, 16, 16, 3) and data.images.dtype == np.uint8
    assert data.classes == tuple(str(i) for i in range(10))
    assert data.images.max() == 255 and set(np.unique(data.labels)) == set(range(10))


def _error(tmp_path, dataset, *extra) -> str:
    """Run the real command line; it must exit 2 with one error line (after any log lines)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ml_backend.simulation.cli",
            *_argv(dataset, tmp_path / "out", *extra),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("simulate: error: ")]
    assert errors == lines[-1:], done.stderr
    assert "Traceback" not in done.stderr
    return errors[0]


def test_missing_folder(tmp_path):
    assert "does not exist" in _error(tmp_path, tmp_path / "nowhere")


def test_one_class_folder(tmp_path):
    write_dataset(tmp_path / "data", 6, size=16, by_class=True)
    for extra in ("Cloudy", "Very Cloudy"):
        for f in (tmp_path / "data" / extra).iterdir():
            f.unlink()
        (tmp_path / "data" / extra).rmdir()
    assert "at least two" in _error(tmp_path, tmp_path / "data")


def test_empty_class_folder(tmp_path):
    write_dataset(tmp_path / "data", 6, size=16, by_class=True)
    (tmp_path / "data" / "Foggy").mkdir()
    (tmp_path / "data" / "Foggy" / "notes.txt").write_text("no images here")
    assert "Foggy" in _error(tmp_path, tmp_path / "data")


def test_unreadable_image_is_named(tmp_path):
    write_dataset(tmp_path / "data", 6, size=16, by_class=True)
    (tmp_path / "data" / "Sunny" / "broken.png").write_bytes(b"not a png at all")
    assert "broken.png" in _error(tmp_path, tmp_path / "data")


def test_budget_larger_than_pool(tmp_path):
    write_dataset(tmp_path / "data", 12, size=16, by_class=True)
    line = _error(tmp_path, tmp_path / "data", "--initial", "6", "--rounds", "3", "--batch", "4")
    assert "budget" in line


def test_report_only_rebuilds_summary_and_plot(finished_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("rounds.csv", "full_data.csv"):
        shutil.copy(finished_run / name, copy / name)
    code = simulate.main(["--report-only", "--out", str(copy), "--strategies", "random,coreset"])
    assert code == 0
    text = (copy / "summary.md").read_text()
    assert "| labels | random | coreset |" in text
    assert (copy / "learning_curves.png").read_bytes().startswith(b"\x89PNG")
