"""Benchmark: which head the recipe serves, against what each head scores on held-out images.

Not collected by pytest. Run from the repository root:

    python tests/benchmarks/bench_head_choice.py [--datasets mnist,digits,weather --seeds 5
        --sources random,auto --out docs/results/head_incumbent_random.md]

For each dataset and seed (the embeddings and splits of ``bench_acquisition.py --model recipe``:
a SimCLR backbone pretrained for 2 epochs, cached in ``.cache/bench-acquisition/``), labeled sets
come from two sources:

- ``random``: the first 10, 20, 30, 50, 100, 200 (``--budgets``) of a seeded permutation of the
  pool;
- ``auto``: the sets the default queue (``STRATEGY=auto``, batch 10) builds, round by round up to
  150 labels, each round ranked with the probabilities of the head the recipe now serves (rows:
  10-50 labels round by round; 60-100 and 110-150 pooled as 100 and 150).

On every set the three heads (``head``, ``head+pseudo``, ``head+spread``) are cross-validated as
``recipe.choose_head`` does (hash folds of the row index), then fitted on every label and scored
on the test split. The table gives, per budget, the test accuracy of the plain head, of the spread
head, of the head each rule serves, and of the best of the three (an oracle):

- ``plain incumbent``: the rule before 2026-12-07, ``_best(right, default="head")``;
- ``spread incumbent``: the rule now, ``_best(right, default="head+spread")``.

Also counted: in how many sets the spread head was ahead on the test split, and in how many of
those each rule served it.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_acquisition import RecipeHead, load, split  # noqa: E402

from ml_backend.model import recipe  # noqa: E402
from ml_backend.model.split import fold_of  # noqa: E402
from ml_backend.selection import rank  # noqa: E402

HEADS = ("head", "head+pseudo", "head+spread")
RULES = {"plain incumbent": "head", "spread incumbent": "head+spread"}
RANDOM_BUDGETS = (10, 20, 30, 50, 100, 200)
AUTO_MAX = 150


def score_heads(model, have, y, test, n_classes) -> dict:
    """Cross-validation results and test accuracy of each head on one labeled set."""
    cfg = recipe.RecipeConfig()
    mean, scale = recipe.column_stats(model.features)
    makers = {
        "head": recipe._plain_head(cfg),
        "head+pseudo": recipe._pseudo_head(cfg),
        "head+spread": recipe._spread_head(cfg, model.graph),
    }
    folds = fold_of(have, cfg.folds)
    right = recipe._cross_validate(makers, model.features, have, y[have], folds, n_classes,
                                   mean, scale, cfg.head_c)  # fmt: skip
    acc, probs = {}, {}
    for name, make in makers.items():
        p = make(model.features, have, y[have], n_classes, mean, scale).probs(model.features)
        acc[name], probs[name] = float((p[test].argmax(1) == y[test]).mean()), p
    served = {rule: recipe._best(right, default=inc) for rule, inc in RULES.items()}
    return {"n": len(have), "acc": acc, "served": served, "probs": probs}


def labeled_sets(source, model, y, pool, test, seed, n_classes, budgets=RANDOM_BUDGETS):
    """Yield ``(budget, result)`` for one seed (``budgets``: of the random sets)."""
    if source == "random":
        order = np.random.default_rng(seed).permutation(pool)
        for n in budgets:
            have = np.sort(order[:n])
            if len(np.unique(y[have])) >= 2:
                yield n, score_heads(model, have, y, test, n_classes)
        return
    labeled = np.zeros(len(y), bool)
    labeled[test] = True
    probs = None
    while labeled[pool].sum() < AUTO_MAX:
        mask = labeled[pool]
        counts = np.bincount(y[pool][mask], minlength=n_classes)
        r = rank("auto", probs=None if probs is None else probs[pool],
                 embeddings=model.features[pool], labeled_mask=mask, batch=10, seed=seed,
                 device="cpu", evidence={"labels_per_class": counts.tolist()})  # fmt: skip
        labeled[pool[r.order[:10]]] = True
        have = pool[labeled[pool]]
        if len(np.unique(y[have])) < 2:
            continue
        res = score_heads(model, have, y, test, n_classes)
        probs = res["probs"][res["served"]["spread incumbent"]]  # the queue the job would make
        n = len(have)
        yield (n if n <= 50 else 100 if n <= 100 else 150), res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="mnist,digits,weather")
    ap.add_argument("--sources", default="random,auto")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument(
        "--budgets",
        default=",".join(map(str, RANDOM_BUDGETS)),
        help="labels of the random sets (comma-separated)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="", help="markdown file for the tables")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    lines = []
    for dataset in args.datasets.split(","):
        native, x, y = load(dataset)
        n_classes = int(y.max()) + 1
        for source in args.sources.split(","):
            cells = collections.defaultdict(lambda: collections.defaultdict(list))
            ahead = collections.Counter()
            for seed in range(args.seeds):
                pool, test = split(y, seed)
                model = RecipeHead(x, n_classes, seed, native=native, dataset=dataset)
                sets = labeled_sets(source, model, y, pool, test, seed, n_classes, budgets)
                for budget, res in sets:
                    acc, c = res["acc"], cells[budget]
                    c["plain head"].append(acc["head"])
                    c["spread head"].append(acc["head+spread"])
                    for rule, name in res["served"].items():
                        c[rule].append(acc[name])
                    c["best of three"].append(max(acc.values()))
                    if acc["head+spread"] > acc["head"]:
                        ahead["sets"] += 1
                        for rule, name in res["served"].items():
                            ahead[rule] += name == "head+spread"
                    ahead["all"] += 1
            cols = ["plain head", "spread head", *RULES, "best of three"]
            title = f"{dataset}, {source} labels, {args.seeds} seeds"
            lines += [f"### {title}", "", "| labels | sets | " + " | ".join(cols) + " |"]
            lines.append("|---:|---:|" + "---:|" * len(cols))
            for budget in sorted(cells):
                c = cells[budget]
                lines.append(f"| {budget} | {len(c['plain head'])} | "
                             + " | ".join(f"{np.mean(c[k]):.3f}" for k in cols) + " |")  # fmt: skip
            lines += [
                "",
                f"The spread head was ahead on the test split in {ahead['sets']} of "
                f"{ahead['all']} sets; the plain-incumbent rule served it in "
                f"{ahead['plain incumbent']} of those, the spread-incumbent rule in "
                f"{ahead['spread incumbent']}.",
                "",
            ]
            print("\n".join(lines[-(len(cells) + 7) :]), flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
