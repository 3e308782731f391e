"""The simulator's outputs: the per-round CSV, the markdown summary and the learning-curve plot."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

ROUND_COLUMNS = (
    "strategy",
    "seed",
    "round",
    "n_labels",
    "accuracy",
    "train_seconds",
    "ranked_as",
    "initial_set",
)
# "labels to reach X% of the full-data accuracy" uses this share.
TARGET_SHARE = 0.95


def write_rounds_csv(path: Path, rows: Sequence[Mapping]) -> None:
    """One line per (strategy, seed, round)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROUND_COLUMNS)
        writer.writeheader()
        writer.writerows({k: row[k] for k in ROUND_COLUMNS} for row in rows)


def write_full_csv(path: Path, full: Mapping[int, float], n_pool: Mapping[int, int]) -> None:
    """One line per seed: the accuracy of a model trained on the whole pool."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seed", "n_labels", "accuracy"])
        for seed, accuracy in sorted(full.items()):  # only the seeds finished so far
            writer.writerow([seed, n_pool[seed], round(accuracy, 6)])


def _curves(rows: Sequence[Mapping], strategy: str) -> dict[int, dict[int, float]]:
    """``{seed: {n_labels: accuracy}}`` for one strategy."""
    out: dict[int, dict[int, float]] = {}
    for row in rows:
        if row["strategy"] == strategy:
            out.setdefault(int(row["seed"]), {})[int(row["n_labels"])] = float(row["accuracy"])
    return out


def _mean_std(values: Sequence[float]) -> str:
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.3f} ± {std:.3f}"


def labels_to_target(curve: Mapping[int, float], full_accuracy: float) -> int | None:
    """Fewest labels whose accuracy reaches ``TARGET_SHARE`` of ``full_accuracy`` (None: never)."""
    for n_labels in sorted(curve):
        if curve[n_labels] >= TARGET_SHARE * full_accuracy:
            return n_labels
    return None


def summary_markdown(
    rows: Sequence[Mapping], full: Mapping[int, float], strategies: Sequence[str], title: str
) -> str:
    """Accuracy per budget and strategy (mean ± std over seeds) and labels to 95% of full data."""
    seeds = sorted(full)
    budgets = sorted({int(r["n_labels"]) for r in rows})
    curves = {s: _curves(rows, s) for s in strategies}
    lines = [
        f"## {title}",
        "",
        f"Test accuracy, mean ± std over {len(seeds)} seed(s). Full-data accuracy (whole pool "
        f"labeled): {_mean_std([full[s] for s in seeds])}.",
        "",
        "| labels | " + " | ".join(strategies) + " |",
        "|---:|" + "---:|" * len(strategies),
    ]
    for n in budgets:
        cells = []
        for s in strategies:
            values = [curves[s][seed][n] for seed in seeds if n in curves[s].get(seed, {})]
            cells.append(_mean_std(values) if values else "")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Labels needed to reach {TARGET_SHARE:.0%} of the same seed's full-data accuracy "
        "(mean ± std over the seeds that reached it within the budget):",
        "",
        "| strategy | labels to target | seeds reaching it |",
        "|---|---:|---:|",
    ]
    for s in strategies:
        reached = [labels_to_target(curves[s].get(seed, {}), full[seed]) for seed in seeds]
        hits = [n for n in reached if n is not None]
        cell = _mean_std(hits).replace(".000", "") if hits else f"> {max(budgets)}"
        lines.append(f"| {s} | {cell} | {len(hits)}/{len(seeds)} |")
    return "\n".join(lines) + "\n"


def plot_curves(
    path: Path,
    rows: Sequence[Mapping],
    full: Mapping[int, float],
    strategies: Sequence[str],
    title: str,
) -> None:
    """Mean accuracy per strategy with a ±1 std band, and the full-data accuracy as a reference."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers / in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for s in strategies:
        curves = _curves(rows, s)
        budgets = sorted({n for c in curves.values() for n in c})
        stats = [[c[n] for c in curves.values() if n in c] for n in budgets]
        mean = np.array([np.mean(v) for v in stats])
        std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in stats])
        ax.plot(budgets, mean, marker="o", markersize=3, label=s)
        ax.fill_between(budgets, mean - std, mean + std, alpha=0.2)
    full_mean = float(np.mean(list(full.values())))
    ax.axhline(full_mean, color="black", linestyle="--", linewidth=1, label="full data")
    ax.axhline(TARGET_SHARE * full_mean, color="grey", linestyle=":", linewidth=1,
               label=f"{TARGET_SHARE:.0%} of full data")  # fmt: skip
    ax.set_xlabel("labeled images")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    low = min(float(r["accuracy"]) for r in rows)
    ax.set_ylim(max(0.0, math.floor(low * 10) / 10 - 0.05), 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
