"""Benchmark: label efficiency of the acquisition strategies, and the cost of typicality at scale.

Not collected by pytest. Run from the repository root:

    python tests/benchmarks/bench_acquisition.py [--datasets digits,mnist --seeds 10 --batch 10
        --max-labels 300 --model logreg-pca --out docs/results]
    python tests/benchmarks/bench_acquisition.py --scale [--n 100000,1000000 --d 512 --device cpu
        --scale-orders typicality,badge,probcover]

Label efficiency. For each dataset and seed: a stratified 25% test split; the rest is the pool,
with no label. Every strategy starts from zero labels and ranks the pool with
``selection.rank(strategy, batch=--batch)``; an oracle labels the top ``--batch`` rows; the model
is refit on all labels so far, predicts every pool and test row, and the next round ranks with its
probabilities (and embeddings). Accuracy is measured on the test split after each round.
Before two classes are labeled there is no model (``probs=None``): the cold start, which
``rank`` runs as the job does (typicality for every strategy but coreset and random).
``auto`` gets ``evidence={"labels_per_class": <counts per class>}`` only; past its switch it runs
herding (since 2026-12-08; diversified before). ``auto-div`` is ``auto`` with diversified there
(the default before); ``auto-badge`` is ``auto`` with ``badge`` there; ``auto-wkm<factor>`` is
``auto`` with uncertainty-weighted k-means over the ``factor x batch`` most uncertain rows there
(Zhdanov 2019, an experiment); ``auto-gu`` is ``auto`` with diversified there, ranked by the
uncertainty of label spreading along the pool's graph instead of the head's (``--model
recipe``, an experiment);
``auto-pc`` is ``auto`` with ``probcover`` where ``auto`` would run typicality (an experiment);
``herding`` is the backend's ``STRATEGY=herding`` (uncertainty herding, MaxHerding before
a model), ``maxherding`` the same without the uncertainty weights, ``-h<bandwidth>`` after
either sets the kernel's bandwidth (``auto-uh-h<bandwidth>``: ``auto`` with that bandwidth;
``auto-uh`` alone is ``auto`` since herding became its second phase); ``probcover`` runs at the backend's ``PROBCOVER_RADIUS``, ``probcover-purity`` (and
``auto-pc-purity``) with the paper's purity rule, ``probcover-d<radius>`` (and
``auto-pc-d<radius>``) with that radius; ``auto-cv`` is ``auto``
with, in addition, a 5-fold cross-validated accuracy of the labeled set as ``val_accuracy``,
which is what the job passes (the recipe's cross-validated accuracy of the served head).

Datasets: those of ``bench_label_efficiency.py`` (``digits``, ``mnist``, ``weather``).

The model is pluggable (``--model NAME`` or ``--model package.module:factory``): a factory
``factory(x_raw, n_classes, seed, native=uint8 images, dataset=name)`` returns an object with ``embeddings() -> [N, d]`` (used before
any model) and ``fit_predict(rows, labels) -> (probs [N, C], embeddings [N, d])`` over all rows.
The default ``logreg-pca`` is a FAST STAND-IN, not the backend's recipe: logistic regression on
the first 50 principal components of the pixels (PCA fitted on all rows, no labels), which are also
the embeddings selection sees. ``--model recipe`` is the backend's own (below);
``recipe-cosine`` is the same with unit-length embeddings for selection (an experiment).

Report: accuracy at each budget (mean ± std over seeds), the area under the learning curve
(mean accuracy over every round, i.e. the trapezoid area over the budget range divided by it), and
per strategy the difference to random, paired by seed (same split), with ``*`` where it is beyond
two standard errors of the paired differences. ``--ceiling`` adds the same model fitted on every
pool label, per seed, and how far above random any order could lead at each budget: an order
cannot make the model better than every label does, so ``ceiling - random`` bounds the lead.

Scale (``--scale``): time and peak memory (``ru_maxrss``) of ``typicality_order`` on random
float32 data, ``N`` rows x ``d``, with 10 labeled rows and ``batch=20`` (K = 30 groups) and with
480 labeled (K = 500, the cap), and of BADGE's batch of 20 (``badge_picks``, 10 classes of
Dirichlet probabilities) over the unlabeled rows, of ``probcover_order`` (10 classes; the
"groups" column gives its graph's rows and radius), and of ``herding_order`` (batch 20, margin
of the same Dirichlet probabilities as weights; "groups" gives its reference and candidate
rows), each in a fresh subprocess so the peak is its own
(``--scale-orders typicality,badge,probcover,herding``).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import platform
import re
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ml_backend.config import Settings  # noqa: E402
from ml_backend.selection import probcover_order, rank, typicality_order  # noqa: E402
from ml_backend.selection.uncertainty import DEFAULT_MEASURE, MEASURES  # noqa: E402

STRATEGIES = (
    "random",
    "uncertainty",
    "coreset",
    "diversified",
    "typicality",
    "badge",
    "probcover",
    "herding",
    "auto",
    "auto-cv",
)
REPORT_BUDGETS = (10, 20, 30, 50, 100, 150, 200, 300, 400, 500, 600, 700, 800)


# ---------------------------------------------------------------- data and the stand-in model


def load(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(native uint8 images, pixels float32 [N, D] in [0, 1], labels int64 [N])``: the
    datasets of ``bench_label_efficiency.py`` (digits, mnist, weather), loaded by its code."""
    from bench_label_efficiency import load as load_images

    native, raw, labels, _ = load_images(name)
    return native, raw, labels


class LogRegPCA:
    """Stand-in model: logistic regression on PCA features (which are also the embeddings)."""

    name = "logistic regression on 50 PCA components of the pixels (stand-in)"

    def __init__(self, x_raw: np.ndarray, n_classes: int, seed: int, components: int = 50, **_):
        from sklearn.decomposition import PCA

        comps = min(components, x_raw.shape[1], len(x_raw))
        z = PCA(comps, random_state=seed).fit_transform(x_raw)
        self.features = (z / z[:, 0].std()).astype(np.float32)
        self.n_classes, self.seed = n_classes, seed

    def embeddings(self) -> np.ndarray:
        return self.features

    def fit_predict(self, rows: np.ndarray, labels: np.ndarray):
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=1.0, max_iter=300, random_state=self.seed)
        clf.fit(self.features[rows], labels)
        probs = np.zeros((len(self.features), self.n_classes))
        probs[:, clf.classes_] = clf.predict_proba(self.features)
        return probs, self.features


class RecipeHead:
    """The backend's model: a SimCLR backbone pretrained on every image of the dataset (as the
    job pretrains on the project's pool) for ``BENCH_PRETRAIN_EPOCHS`` epochs (default 2; bounded
    by epochs, not seconds, so machine load does not change the embeddings), then the head the
    recipe serves (``recipe.choose_head`` with its defaults: the plain logistic head, or the one
    with pseudo-labels or with labels spread along the pool's kNN graph when cross-validation
    clearly prefers it; the row index stands for the task id of the hash folds). Fine-tuning is
    left out for speed. The embeddings are kept in ``.cache/bench-acquisition/`` per dataset,
    seed and epochs, so a rerun (other strategies, other thresholds) ranks the same embeddings
    without pretraining."""

    EPOCHS = int(os.environ.get("BENCH_PRETRAIN_EPOCHS", "2"))
    name = f"the backend's recipe: SimCLR backbone ({EPOCHS} epochs) + the recipe's head"

    def __init__(self, x_raw, n_classes: int, seed: int, *, native: np.ndarray, dataset: str):
        from ml_backend.model import spreading

        cache = ROOT / ".cache" / "bench-acquisition" / f"{dataset}-seed{seed}-e{self.EPOCHS}.npy"
        if cache.exists():
            self.features = np.load(cache)
        else:
            self.features = self._pretrained_embeddings(native, seed)
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, self.features)
        self.mean = self.features.mean(axis=0)  # as recipe.py standardises: the whole pool
        self.scale = self.features.std(axis=0) + 1e-6
        self.n_classes = n_classes
        # one graph per pool, as a job builds it (every row is a node below GRAPH_ROWS)
        self.graph = spreading.build_graph(self.features, np.arange(0), seed=seed)
        self.served: list[str] = []

    def _pretrained_embeddings(self, native: np.ndarray, seed: int) -> np.ndarray:
        from bench_label_efficiency import _resize

        from ml_backend.model.features import backbone_model, embed
        from ml_backend.model.pretrain import pretrain_backbone
        from ml_backend.model.sizing import choose_image_size

        size = choose_image_size([native.shape[1:3]])
        images = _resize(native, size)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        result = pretrain_backbone(images, budget_s=1e9, max_epochs=self.EPOCHS, batch_size=64,
                                   seed=seed, device="cpu")  # fmt: skip
        print(f"  pretrained seed {seed}: {self.EPOCHS} epochs in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
        return embed(backbone_model(result.state_dict, 1), images, device="cpu", batch_size=256)

    def embeddings(self) -> np.ndarray:
        return self.features

    def fit_predict(self, rows: np.ndarray, labels: np.ndarray):
        from ml_backend.model.recipe import RecipeConfig, choose_head

        choice = choose_head(self.features, rows, labels, np.arange(len(self.features)),
                             self.n_classes, RecipeConfig(), graph=self.graph)  # fmt: skip
        self.served.append(choice.served)
        return choice.head.probs(self.features), self.features


class RecipePlainHead(RecipeHead):
    """The plain logistic head alone (C = 0.5, standardised embeddings) on the same backbone:
    what this benchmark measured before the recipe's semi-supervised heads were in it."""

    name = f"SimCLR backbone ({RecipeHead.EPOCHS} epochs) + plain logistic head"

    def fit_predict(self, rows: np.ndarray, labels: np.ndarray):
        from ml_backend.model.recipe import fit_head

        head = fit_head(self.features[rows], labels, self.n_classes, mean=self.mean,
                        scale=self.scale, c=0.5)  # fmt: skip
        return head.probs(self.features), self.features


class RecipeCosine(RecipeHead):
    """The recipe's head as ``recipe``, but selection sees the embeddings scaled to unit length
    (the geometry SimCLR trains: cosine similarity; the head keeps the raw embeddings)."""

    name = f"SimCLR backbone ({RecipeHead.EPOCHS} epochs) + the recipe's head; unit-length embeddings for selection"

    def embeddings(self) -> np.ndarray:
        return self.features / np.linalg.norm(self.features, axis=1, keepdims=True).clip(1e-12)

    def fit_predict(self, rows: np.ndarray, labels: np.ndarray):
        probs, _ = super().fit_predict(rows, labels)
        return probs, self.embeddings()


MODELS = {
    "logreg-pca": LogRegPCA,
    "recipe": RecipeHead,
    "recipe-plain": RecipePlainHead,
    "recipe-cosine": RecipeCosine,
}


def make_model(spec: str):
    if spec in MODELS:
        return MODELS[spec]
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def cv_accuracy(model, rows: np.ndarray, labels: np.ndarray) -> float | None:
    """5-fold (fewer for rare classes) cross-validated accuracy of the labeled set."""
    from sklearn.model_selection import StratifiedKFold

    folds = min(5, int(np.bincount(labels).max()))
    counts = np.bincount(labels)
    if folds < 2 or (counts[counts > 0] < 2).all():
        return None
    keep = counts[labels] >= 2  # classes with one label cannot be split
    rows, labels = rows[keep], labels[keep]
    folds = min(folds, int(np.bincount(labels)[np.bincount(labels) > 0].min()))
    if folds < 2 or len(np.unique(labels)) < 2:
        return None
    right = 0
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=0).split(rows, labels):
        if len(np.unique(labels[tr])) < 2:
            return None
        probs, _ = model.fit_predict(rows[tr], labels[tr])
        right += int((probs[rows[te]].argmax(axis=1) == labels[te]).sum())
    return right / len(rows)


# ---------------------------------------------------------------- one run


def _probcover_radius(strategy: str) -> float | None:
    """probcover's radius for a strategy name: ``...-purity`` the purity rule (None), ``...-d<r>``
    the radius ``r``, else the backend's default (``PROBCOVER_RADIUS``)."""
    if strategy.endswith("-purity"):
        return None
    radius = re.search(r"-d(\d+(?:\.\d+)?)$", strategy)
    if radius:
        return float(radius.group(1))
    return Settings().probcover_radius or None


def run_curve(strategy, model, y, pool, test, args, seed) -> list[dict]:
    """Labels and accuracy after every round, for one strategy and one seed."""
    n_classes = int(y.max()) + 1
    labeled = np.zeros(len(y), dtype=bool)
    labeled[test] = True  # never offered: the test split is not part of the queue
    probs, emb = None, model.embeddings()
    rows = []
    while (labeled[pool]).sum() < args.max_labels:
        mask_pool = labeled[pool]
        # without a model, rank() runs the strategy's own cold start, as the job does
        name = strategy
        radius = _probcover_radius(strategy)
        counts = np.bincount(y[pool][mask_pool], minlength=n_classes)
        evidence = {"labels_per_class": counts.tolist()}
        if strategy == "auto-cv" and probs is not None:
            evidence["val_accuracy"] = cv_accuracy(model, pool[mask_pool], y[pool][mask_pool])
        t0 = time.perf_counter()
        r = rank(
            "auto"
            if name.startswith("auto-")
            else "random"
            if name.startswith("maxherding") or name.startswith("herding-h")
            else name.split("-")[0],
            probs=None if probs is None else probs[pool],
            embeddings=emb[pool],
            labeled_mask=mask_pool,
            batch=args.batch,
            measure=args.uncertainty,
            seed=seed,
            device="cpu",
            evidence=evidence,
            auto_labels_per_class=args.auto_labels_per_class,
            auto_min_accuracy=args.auto_min_accuracy,
            n_classes=n_classes,
            probcover_radius=radius,
        )
        second = r.strategy == "herding (auto)"  # auto past its switch
        if strategy == "auto-div" and second:
            r = rank("diversified", probs=probs[pool], embeddings=emb[pool], labeled_mask=mask_pool,
                     batch=args.batch, measure=args.uncertainty, seed=seed,
                     device="cpu")  # fmt: skip
        if strategy == "auto-badge" and second:
            r = rank("badge", probs=probs[pool], embeddings=emb[pool], labeled_mask=mask_pool,
                     batch=args.batch, seed=seed, device="cpu")  # fmt: skip
        if strategy.startswith("auto-wkm") and second:
            factor = int(strategy.removeprefix("auto-wkm") or 10)
            r = _weighted_kmeans_ranking(probs[pool], emb[pool], mask_pool, args, seed, factor)
        if strategy.startswith("auto-pc") and r.strategy.startswith("typicality"):
            r = rank("probcover", embeddings=emb[pool], labeled_mask=mask_pool, batch=args.batch,
                     seed=seed, device="cpu", n_classes=n_classes,
                     probcover_radius=radius)  # fmt: skip
        if strategy == "auto-gu" and second:
            r = rank("diversified", probs=_graph_probs(model, pool, mask_pool, y, n_classes),
                     embeddings=emb[pool], labeled_mask=mask_pool, batch=args.batch,
                     measure=args.uncertainty, seed=seed, device="cpu")  # fmt: skip
        if strategy.startswith(("herding-h", "maxherding")) or (
            strategy.startswith("auto-uh-h") and second
        ):
            r = _herding_ranking(strategy, None if probs is None else probs[pool], emb[pool],
                                 mask_pool, args, seed)  # fmt: skip
        rank_s = time.perf_counter() - t0
        labeled[pool[r.order[: args.batch]]] = True
        have = pool[labeled[pool]]
        if len(np.unique(y[have])) >= 2:
            probs, emb = model.fit_predict(have, y[have])
            accuracy = float((probs[test].argmax(axis=1) == y[test]).mean())
        else:  # one class: the best guess is that class
            accuracy = float((y[test] == y[have][0]).mean())
        rows.append(
            {
                "strategy": strategy,
                "seed": seed,
                "n_labels": int(len(have)),
                "accuracy": round(accuracy, 6),
                "ranked_as": r.strategy,
                "rank_seconds": round(rank_s, 4),
            }
        )
    return rows


def _weighted_kmeans_ranking(probs, emb, labeled_mask, args, seed, factor):
    """Diverse mini-batch active learning (Zhdanov 2019), a candidate for ``auto``'s second
    phase: among the ``factor x batch`` most uncertain unlabeled rows, k-means into ``batch``
    groups weighted by uncertainty; the row nearest each centre is picked; then the rest by
    descending uncertainty. ``auto-wkm<factor>`` (default 10) in ``--strategies``."""
    from types import SimpleNamespace

    from sklearn.cluster import KMeans

    from ml_backend.selection.uncertainty import uncertainty

    unlabeled = np.flatnonzero(~labeled_mask)
    u = uncertainty(probs[unlabeled], args.uncertainty)
    by_u = unlabeled[np.argsort(-u, kind="stable")]
    short = by_u[: factor * args.batch]
    k = min(args.batch, len(short))
    weights = np.sort(u)[::-1][: len(short)] + 1e-6
    km = KMeans(k, n_init=3, random_state=seed).fit(emb[short], sample_weight=weights)
    picks = []
    for c in range(k):
        members = np.flatnonzero(km.labels_ == c)
        if len(members):
            d2 = ((emb[short[members]] - km.cluster_centers_[c]) ** 2).sum(axis=1)
            picks.append(short[members[np.argmin(d2)]])
    picks = np.array(picks, dtype=np.int64)
    rest = by_u[~np.isin(by_u, picks)]
    return SimpleNamespace(order=np.concatenate([picks, rest]), strategy="diversified (wkm)")


def _herding_ranking(strategy, probs, emb, labeled_mask, args, seed):
    """The herding variants ``rank`` has no knob for (plain ``herding`` and ``auto`` go through
    ``rank``): ``maxherding`` never weighs by uncertainty; ``-h<h>`` in the name sets the
    bandwidth (default ``DEFAULT_BANDWIDTH``), ``auto-uh-h<h>`` in ``auto``'s second phase."""
    from types import SimpleNamespace

    from ml_backend.selection.herding import DEFAULT_BANDWIDTH, herding_order
    from ml_backend.selection.uncertainty import uncertainty

    h = float(strategy.rsplit("-h", 1)[1]) if "-h" in strategy else DEFAULT_BANDWIDTH
    weights = None
    if probs is not None and not strategy.startswith("maxherding"):
        weights = uncertainty(probs, args.uncertainty)
    res = herding_order(emb, np.flatnonzero(labeled_mask), args.batch, weights=weights,
                        bandwidth=h, seed=seed, device="cpu")  # fmt: skip
    return SimpleNamespace(order=res.order, strategy="herding")


def _graph_probs(model, pool, labeled_mask, y, n_classes):
    """``auto-gu`` (an experiment): the uncertainty of label spreading itself, not of the head
    fitted on it: the class distribution the labels so far give each pool row along the pool's
    kNN graph (``spreading.spread``; a row no label reached is uniform)."""
    from ml_backend.model import spreading

    rows = pool[labeled_mask]
    spread = spreading.spread(model.graph, rows, y[rows], n_classes)
    return spread[model.graph.positions(pool)]


def split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    pool, test = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=seed)
    return np.sort(pool), np.sort(test)


# ---------------------------------------------------------------- report


def summarise(rows: list[dict], strategies, budgets) -> str:
    acc = {}  # (strategy, seed) -> {n_labels: accuracy}
    for r in rows:
        acc.setdefault((r["strategy"], int(r["seed"])), {})[int(r["n_labels"])] = float(
            r["accuracy"]
        )
    seeds = sorted({int(r["seed"]) for r in rows})
    ns = sorted({int(r["n_labels"]) for r in rows})
    budgets = [b for b in budgets if b in ns]

    def auc(curve):  # trapezoid over the budget range, divided by it: a mean accuracy
        xs = np.array(ns, dtype=float)
        return float(np.trapezoid([curve[n] for n in ns], xs) / (xs[-1] - xs[0]))

    def cell(s, value_of):
        vals = np.array([value_of(acc[(s, seed)]) for seed in seeds])
        text = f"{vals.mean():.3f} ± {vals.std(ddof=1) if len(vals) > 1 else 0:.3f}"
        if s == "random" or ("random", seeds[0]) not in acc:  # no random run: no differences
            return text
        base = np.array([value_of(acc[("random", seed)]) for seed in seeds])
        diff = vals - base
        se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else np.inf
        star = "*" if abs(diff.mean()) > 2 * se else ""
        return f"{text} ({diff.mean() * 100:+.1f}{star})"

    head = "| strategy | " + " | ".join(f"{b} labels" for b in budgets) + " | AUC |"
    lines = [head, "|---" * (len(budgets) + 2) + "|"]
    for s in strategies:
        cells = [cell(s, lambda c, b=b: c[b]) for b in budgets] + [cell(s, auc)]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    aucs = {s: np.array([auc(acc[(s, seed)]) for seed in seeds]) for s in strategies}
    best = max(strategies, key=lambda s: aucs[s].mean())
    notes = []
    for s in strategies:
        if s != best:
            diff = aucs[s] - aucs[best]
            se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else np.inf
            tied = "tied" if abs(diff.mean()) <= 2 * se else "below"
            notes.append(f"{s} {diff.mean() * 100:+.1f} ({tied})")
    if notes:
        lines += [
            "",
            f"AUC against the best ({best}), paired by seed, in points: " + ", ".join(notes) + ".",
        ]
    return "\n".join(lines)


def ceiling_report(rows: list[dict], ceilings: dict[int, float], n_pool: int, budgets) -> str:
    """The model on every pool label, and the most any order could lead random by at each budget
    (``ceiling - random``, per seed; an order cannot beat every label)."""
    seeds = sorted(ceilings)
    top = np.array([ceilings[s] for s in seeds])
    random = {}
    for r in rows:
        if r["strategy"] == "random" and int(r["seed"]) in ceilings:
            random.setdefault(int(r["n_labels"]), {})[int(r["seed"])] = float(r["accuracy"])
    lines = [
        f"Ceiling: the same model on all {n_pool:,} pool labels, {top.mean():.3f} ± "
        f"{top.std(ddof=1) if len(top) > 1 else 0:.3f} (per seed "
        + ", ".join(f"{c:.3f}" for c in top)
        + ")."
    ]
    have = [b for b in budgets if b in random and len(random[b]) == len(seeds)]
    if have:
        lines += [
            "",
            "| labels | random | ceiling − random (points, mean; per seed) |",
            "|---|---|---|",
        ]
        for b in have:
            gap = np.array([ceilings[s] - random[b][s] for s in seeds]) * 100
            acc = np.mean([random[b][s] for s in seeds])
            per_seed = ", ".join(f"{g:+.1f}" for g in gap)
            lines.append(f"| {b} | {acc:.3f} | {gap.mean():+.1f} ({per_seed}) |")
    return "\n".join(lines)


def plot(rows, strategies, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in strategies:
        by_n = {}
        for r in rows:
            if r["strategy"] == s:
                by_n.setdefault(int(r["n_labels"]), []).append(float(r["accuracy"]))
        ns = sorted(by_n)
        mean = np.array([np.mean(by_n[n]) for n in ns])
        std = np.array([np.std(by_n[n], ddof=1) if len(by_n[n]) > 1 else 0 for n in ns])
        ax.plot(ns, mean, label=s, lw=2 if s == "auto" else 1.2)
        ax.fill_between(ns, mean - std, mean + std, alpha=0.12)
    ax.set_xscale("log")
    ax.set_xlabel("labels")
    ax.set_ylabel("test accuracy")
    ax.set_title(textwrap.fill(title, 100), fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_from_csv(args, strategies) -> None:
    """Merge the rounds of earlier runs (e.g. baselines once, auto with several thresholds)."""
    chosen: dict[str, list[dict]] = {}
    for path in args.from_csv.split(","):
        with open(path, newline="") as f:
            by_strategy: dict[str, list[dict]] = {}
            for row in csv.DictReader(f):
                by_strategy.setdefault(row["strategy"], []).append(row)
        chosen.update({s: r for s, r in by_strategy.items() if s in strategies})
    missing = [s for s in strategies if s not in chosen]
    if missing:
        raise SystemExit(f"--from-csv: no rows for {', '.join(missing)}")
    rows = [r for s in strategies for r in chosen[s]]
    table = summarise(rows, strategies, REPORT_BUDGETS)
    print(f"\n### {args.title}\n\n{table}\n")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.tag}_summary.md").write_text(f"### {args.title}\n\n{table}\n")
        with (out / f"{args.tag}_rounds.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        plot(rows, strategies, out / f"{args.tag}_curves.png", args.title)


# ---------------------------------------------------------------- scale


def scale_one(n: int, d: int, labeled: int, device: str, what: str = "typicality") -> dict:
    from ml_backend.selection.badge import badge_picks

    x = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
    weighted = what in ("badge", "herding")
    probs = np.random.default_rng(1).dirichlet(np.ones(10), n) if weighted else None
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if what == "badge":
        badge_picks(probs, x, np.arange(labeled, n), 20, seed=0, device=device)
        groups = "-"
    elif what == "probcover":
        res = probcover_order(x, np.arange(labeled), n_classes=10, device=device)
        groups = f"graph {res.graph_rows:,}, delta {res.delta:.2f}"
    elif what == "herding":
        from ml_backend.selection.herding import herding_order
        from ml_backend.selection.uncertainty import margin

        res = herding_order(x, np.arange(labeled), 20, weights=margin(probs), device=device)
        groups = f"R {res.reference_rows:,}, C {res.candidate_rows:,}"
    else:
        groups = typicality_order(x, np.arange(labeled), 20, device=device).n_clusters
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "what": what,
        "n": n,
        "d": d,
        "labeled": labeled,
        "clusters": groups,
        "seconds": round(seconds, 2),
        "peak_rss_gb": round(peak / 2**20, 2),
        "input_gb": round((x.nbytes + (0 if probs is None else probs.nbytes)) / 2**30, 2),
        "rss_before_gb": round(rss0 / 2**20, 2),
    }


def scale(args) -> None:
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__} ({args.threads} threads), load average {os.getloadavg()[0]:.1f}"
    )
    print("| order | N | d | labeled | groups K | device | seconds | peak RSS GB (input GB) |")
    print("|---|---|---|---|---|---|---|---|")
    for what in args.scale_orders.split(","):
        for n in [int(v) for v in args.n.split(",")]:
            for labeled in (10, 480):
                spec = f"{n},{args.d},{labeled},{args.device},{what}"
                cmd = [
                    sys.executable,
                    __file__,
                    "--scale-one",
                    spec,
                    "--threads",
                    str(args.threads),
                ]
                out = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)
                print(
                    f"| {what} | {n:,} | {args.d} | {labeled} | {out['clusters']} | "
                    f"{args.device} | {out['seconds']:.1f} | {out['peak_rss_gb']:.1f} "
                    f"({out['input_gb']:.1f}) |"
                )


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="digits,mnist")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--max-labels", type=int, default=300)
    ap.add_argument("--model", default="logreg-pca")
    ap.add_argument("--auto-labels-per-class", type=float, default=None)
    ap.add_argument("--auto-min-accuracy", type=float, default=None)
    ap.add_argument(
        "--uncertainty",
        default=DEFAULT_MEASURE,
        choices=MEASURES,
        help="uncertainty measure of diversified and uncertainty (default: the backend's, "
        "%(default)s)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="", help="folder for <dataset>_rounds.csv, summary, plot")
    ap.add_argument("--tag", default="acquisition", help="file name prefix in --out")
    ap.add_argument(
        "--from-csv",
        default="",
        help="comma-separated rounds CSVs of earlier runs (same dataset, seeds, batch): report "
        "--strategies from them without running anything (a strategy found in several files is "
        "taken from the last)",
    )
    ap.add_argument("--title", default="", help="--from-csv: heading of the report")
    ap.add_argument(
        "--ceiling",
        action="store_true",
        help="also fit the model on every pool label per seed: the most any order could reach",
    )
    ap.add_argument("--scale", action="store_true", help="time typicality at --n rows instead")
    ap.add_argument("--n", default="100000,1000000")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale-orders", default="typicality,badge", help="--scale: which orders")
    ap.add_argument("--scale-one", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.scale_one:
        n, d, labeled, device, what = args.scale_one.split(",")
        print(json.dumps(scale_one(int(n), int(d), int(labeled), device, what)))
        return
    if args.scale:
        scale(args)
        return
    from ml_backend.selection.auto import AUTO_LABELS_PER_CLASS, AUTO_MIN_ACCURACY

    if args.auto_labels_per_class is None:
        args.auto_labels_per_class = AUTO_LABELS_PER_CLASS
    if args.auto_min_accuracy is None:
        args.auto_min_accuracy = AUTO_MIN_ACCURACY
    strategies = args.strategies.split(",")
    if args.from_csv:
        report_from_csv(args, strategies)
        return
    factory = make_model(args.model)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets.split(","):
        native, x, y = load(dataset)
        rows, ceilings, t0 = [], {}, time.perf_counter()
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            pool, test = split(y, seed)
            model = factory(x, int(y.max()) + 1, seed, native=native, dataset=dataset)
            for s in strategies:
                rows += run_curve(s, model, y, pool, test, args, seed)
            if args.ceiling:
                probs, _ = model.fit_predict(pool, y[pool])
                ceilings[seed] = float((probs[test].argmax(axis=1) == y[test]).mean())
        wall = time.perf_counter() - t0
        title = (
            f"{dataset}: {len(y):,} images, pool {len(pool):,}, test {len(test):,}; "
            f"{args.seeds} seeds; batch {args.batch}; model: {getattr(model, 'name', args.model)}; "
            f"auto: AUTO_LABELS_PER_CLASS={args.auto_labels_per_class:g}, "
            f"AUTO_MIN_ACCURACY={args.auto_min_accuracy:g}; UNCERTAINTY={args.uncertainty}"
            f"; {wall:.0f} s"
        )
        table = summarise(rows, strategies, REPORT_BUDGETS)
        if ceilings:
            table += "\n\n" + ceiling_report(rows, ceilings, len(pool), REPORT_BUDGETS)
        print(f"\n### {title}\n\n{table}\n", flush=True)
        if out:
            with (out / f"{args.tag}_{dataset}_rounds.csv").open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            (out / f"{args.tag}_{dataset}_summary.md").write_text(f"### {title}\n\n{table}\n")
            plot(rows, strategies, out / f"{args.tag}_{dataset}_curves.png", title)


if __name__ == "__main__":
    main()
