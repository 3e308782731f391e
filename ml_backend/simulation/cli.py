"""``python -m ml_backend.simulation.cli``: label-efficiency curves of the acquisition strategies.

An oracle reveals the true label of whatever a strategy picks. Each round retrains a fresh model
with the backend's own training code (by default its low-label recipe: a backbone pretrained
once per seed on the pool, a head chosen by validation; ``--recipe legacy`` fine-tunes a fresh
ResNet18 every round as before), measures accuracy on a held-out test split, and lets the
backend's own ``selection.rank`` pick the next ``--batch`` images. Outputs in ``--out``:
``rounds.csv`` (every round), ``full_data.csv`` (the accuracy with every pool label, per seed),
``summary.md`` (accuracy per budget, labels to reach 95% of full-data accuracy), and
``learning_curves.png``.

Exit codes: 0 done, 2 a problem with the dataset or options (one line on stderr says which).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from ml_backend.config import STRATEGIES, UNCERTAINTY_MEASURES, Settings
from ml_backend.errors import BackendError

logger = logging.getLogger(__name__)

RECIPES = ("backend", "legacy")  # simulation.loop.SimConfig.recipe
_DEFAULTS = Settings()  # documented defaults only; the simulator reads no environment variable


def _strategies(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    bad = [s for s in names if s not in STRATEGIES]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"unknown strategy {', '.join(bad) or '(none)'}; choose from {', '.join(STRATEGIES)}"
        )
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _at_least_one(text: str) -> float:
    value = float(text)
    if not value >= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
    return value


def _image_size(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    value = int(text)
    if value < 8:
        raise argparse.ArgumentTypeError(f"must be 'auto' or at least 8, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` options to ``parser`` (used by ``ml_backend.__main__``)."""
    add = parser.add_argument
    add(
        "--dataset",
        default="digits",
        help="'digits' (scikit-learn's 8x8 digits, upscaled) or a folder with one sub-folder "
        "per class (default: digits)",
    )
    add(
        "--initial",
        type=_positive,
        default=20,
        help="random labeled images before round 1, the same for every strategy (default: 20)",
    )
    add(
        "--batch",
        type=_positive,
        default=_DEFAULTS.queue_batch,
        help="labels revealed per round, like QUEUE_BATCH (default: %(default)s)",
    )
    add("--rounds", type=_positive, default=10, help="acquisition rounds (default: 10)")
    add(
        "--strategies",
        type=_strategies,
        default=STRATEGIES,
        help=f"comma-separated, from {','.join(STRATEGIES)} (default: all)",
    )
    add(
        "--seeds",
        type=_positive,
        default=3,
        help="repeats with different splits, initial sets and weights (default: 3)",
    )
    add(
        "--first-seed",
        type=int,
        default=0,
        help="seeds run are first-seed .. first-seed+seeds-1; lets a long experiment be split "
        "over several runs whose CSVs are concatenated (default: 0)",
    )
    add(
        "--test-fraction",
        type=_fraction,
        default=0.25,
        help="share of the dataset held out for accuracy (default: 0.25)",
    )
    add(
        "--image-size",
        type=_image_size,
        default="auto",
        help="square image size in pixels, or auto: the backend's rule from the images' native "
        "sizes (digits: 32) (default: auto)",
    )
    add(
        "--recipe",
        choices=RECIPES,
        default="backend",
        help="backend: pretrain a backbone per seed, then the backend's head/fine-tune choice; "
        "legacy: fine-tune a fresh ResNet18 each round (default: backend)",
    )
    add(
        "--pretrain-budget",
        type=float,
        default=60.0,
        help="seconds of self-supervised pretraining per seed (default: 60)",
    )
    add(
        "--pretrain-epochs",
        type=_positive,
        default=100,
        help="pretraining epochs at most (default: 100)",
    )
    add(
        "--finetune-min-labels",
        type=_positive,
        default=200,
        help="labels from which fine-tuning the whole network is tried (default: 200)",
    )
    add(
        "--epochs",
        type=int,
        default=0,
        help="epochs per retrain; 0 uses the backend's label-count rule (default: 0)",
    )
    add(
        "--train-batch-size",
        type=_positive,
        default=_DEFAULTS.batch_size,
        help="training batch size (default: %(default)s)",
    )
    add(
        "--lr",
        type=float,
        default=_DEFAULTS.learning_rate,
        help="learning rate (default: %(default)s)",
    )
    add(
        "--shortlist-factor",
        type=_at_least_one,
        default=_DEFAULTS.shortlist_factor,
        help="diversified: k-center picks among batch x this many most uncertain (default: %(default)s)",
    )
    add(
        "--uncertainty",
        choices=UNCERTAINTY_MEASURES,
        default=_DEFAULTS.uncertainty,
        help="uncertainty measure (default: %(default)s)",
    )
    add(
        "--pretrained",
        default="none",
        help="none (default: offline and reproducible), imagenet, or a state_dict path",
    )
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    add("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    add(
        "--out", type=Path, default=Path("simulation"), help="output folder (default: ./simulation)"
    )
    add("--no-progress", action="store_true", help="no progress bar (logs still say each round)")
    add("--verbose", action="store_true", help="also log every training epoch")
    add(
        "--report-only",
        action="store_true",
        help="train nothing: rebuild summary.md and the plot from the CSVs already in --out "
        "(e.g. after stopping a long run)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the simulation described by ``args``; return the process exit code."""
    try:
        _simulate(args)
    except BackendError as exc:
        sys.stderr.write(f"simulate: error: {exc}\n")
        return 2
    return 0


def _report_only(args: argparse.Namespace) -> None:
    import csv

    from ml_backend.simulation import report

    out: Path = args.out
    try:
        with (out / "rounds.csv").open() as f:
            rows = list(csv.DictReader(f))
        with (out / "full_data.csv").open() as f:
            full = {int(r["seed"]): float(r["accuracy"]) for r in csv.DictReader(f)}
    except FileNotFoundError as exc:
        raise BackendError(
            f"--report-only needs rounds.csv and full_data.csv in {out}: {exc}"
        ) from None
    rows = [r for r in rows if int(r["seed"]) in full]
    strategies = [s for s in args.strategies if any(r["strategy"] == s for r in rows)]
    if not rows or not strategies:
        raise BackendError(f"no finished seed of {','.join(args.strategies)} in {out}/rounds.csv")
    title = f"{out.name}: {len(full)} seed(s)"
    (out / "summary.md").write_text(report.summary_markdown(rows, full, strategies, title))
    report.plot_curves(out / "learning_curves.png", rows, full, strategies, title)


def _simulate(args: argparse.Namespace) -> None:
    if args.report_only:
        _report_only(args)
        return
    import torch
    from tqdm import tqdm

    from ml_backend.model.network import resolve_device
    from ml_backend.model.sizing import choose_image_size
    from ml_backend.simulation import report
    from ml_backend.simulation.data import load_dataset, native_sizes
    from ml_backend.simulation.loop import (
        SimConfig,
        full_data_accuracy,
        make_split,
        pretrain,
        run_seed,
        train_logger,
    )

    if args.image_size == "auto":
        args.image_size = choose_image_size(native_sizes(str(args.dataset)))
    # Hundreds of retrains x epochs would drown the per-round lines.
    train_logger.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = load_dataset(str(args.dataset), args.image_size)
    cfg = SimConfig(
        strategies=tuple(args.strategies), initial=args.initial, batch=args.batch,
        rounds=args.rounds, seeds=args.seeds, test_fraction=args.test_fraction,
        epochs=args.epochs, train_batch_size=args.train_batch_size, lr=args.lr,
        device=str(device), pretrained=args.pretrained, shortlist_factor=args.shortlist_factor,
        measure=args.uncertainty, probcover_radius=_DEFAULTS.probcover_radius, recipe=args.recipe, pretrain_budget_s=args.pretrain_budget,
        pretrain_epochs=args.pretrain_epochs, finetune_min_labels=args.finetune_min_labels,
    )  # fmt: skip
    seeds = range(args.first_seed, args.first_seed + cfg.seeds)
    splits = [make_split(data, cfg, seed) for seed in seeds]  # fails fast on budget
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    logger.info(
        "Simulating %s on %s (%d images, %d classes), device %s",
        ",".join(cfg.strategies), data.source, len(data.labels), len(data.classes), device,
    )  # fmt: skip
    trainings = cfg.seeds * (2 + len(cfg.strategies) * cfg.rounds)
    rows: list[dict] = []
    full: dict[int, float] = {}
    started = time.perf_counter()
    with tqdm(total=trainings, desc="simulate", unit="fit", disable=args.no_progress) as bar:
        for split in splits:
            backbone = pretrain(data, split, cfg, device)  # None for the legacy recipe
            full[split.seed] = full_data_accuracy(data, split, cfg, device, backbone)
            bar.update()
            rows += run_seed(data, split, cfg, device, tick=bar.update, backbone=backbone)
            # Rewrite after every seed so a long run that is stopped still leaves its results.
            report.write_rounds_csv(out / "rounds.csv", rows)
            report.write_full_csv(
                out / "full_data.csv", full, {s.seed: len(s.pool) for s in splits}
            )
    title = f"{data.source}, {args.image_size}px, {cfg.batch} labels per round"
    (out / "summary.md").write_text(report.summary_markdown(rows, full, cfg.strategies, title))
    report.plot_curves(out / "learning_curves.png", rows, full, cfg.strategies, title)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config |= {"classes": list(data.classes), "n_images": len(data.labels),
               "initial_sets": {s.seed: data_ids(s) for s in splits},
               "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=1, default=str))
    logger.info("Wrote %s in %.0f s", out, time.perf_counter() - started)


def data_ids(split) -> list[int]:
    """Dataset row indices of a split's initial labeled set (identical for every strategy)."""
    return [int(i) for i in split.pool[split.initial]]


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m ml_backend.simulation.cli``."""
    parser = argparse.ArgumentParser(
        prog="python -m ml_backend.simulation.cli", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
