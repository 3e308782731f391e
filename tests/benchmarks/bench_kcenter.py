"""Benchmark: our greedy k-center against a straightforward per-pick reference.

Not collected by pytest. Run from the repository root:

    python tests/benchmarks/bench_kcenter.py [--n 100000 --d 512 --k 1000 --device cpu|cuda]

The reference is the loop of google/active-learning's ``kCenterGreedy``: per pick, distances from
the new centre to every point with ``sklearn.metrics.pairwise_distances``, then an elementwise
minimum into the min-distance vector. It is linear in the number of picks, so by default it is
timed over the first ``--ref-picks`` picks and extrapolated to ``k`` (the table says so). Both get
the same float32 inputs and the same labeled rows; the picks they share are compared.
A second row times ours alone at ``--big-n`` rows (1,000,000 by default; 0 skips it).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import pairwise_distances

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ml_backend.selection import k_center_greedy  # noqa: E402


def reference_k_center(x: np.ndarray, labeled: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """google/active-learning's kCenterGreedy loop; returns (picks, seconds)."""
    start = time.perf_counter()
    min_d = pairwise_distances(x, x[labeled]).min(axis=1)
    picks = []
    for _ in range(k):
        v = int(np.argmax(min_d))
        picks.append(v)
        min_d = np.minimum(min_d, pairwise_distances(x, x[[v]])[:, 0])
    return np.array(picks), time.perf_counter() - start


def ours(x, labeled, k, device) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    picks = k_center_greedy(x, labeled, k, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return picks, time.perf_counter() - start


def cpu_gflops() -> float:
    """Current float32 matmul throughput: on a shared machine, says how busy it was."""
    a, b = torch.randn(256, 512), torch.randn(512, 50_000)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(5):
        torch.mm(a, b)
    return 5 * 2 * 256 * 512 * 50_000 / (time.perf_counter() - start) / 1e9


def data(n: int, d: int, labeled: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x, rng.choice(n, size=labeled, replace=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--labeled", type=int, default=10, help="labeled rows seeding both runs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ref-picks", type=int, default=50, help="reference picks timed (0 = all k)")
    ap.add_argument(
        "--big-n", type=int, default=1_000_000, help="rows of the ours-only row; 0 skips"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), load average "
        f"{os.getloadavg()[0]:.1f}, CPU float32 matmul now {cpu_gflops():.0f} GFLOP/s"
        + (f", GPU {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else "")
    )
    warm, _ = data(2000, args.d, 5, 1)  # first-call costs (thread pools, CUDA context) excluded
    k_center_greedy(warm, [0], 20, device=args.device)

    rows = []
    x, labeled = data(args.n, args.d, args.labeled, args.seed)
    mine, t_ours = ours(x, labeled, args.k, args.device)
    m = args.k if args.ref_picks <= 0 else min(args.k, args.ref_picks)
    ref, t_ref = reference_k_center(x, labeled, m)
    same = int(np.argmin(np.append(mine[:m] == ref, False)))
    note = f"picks 1..{same} identical"
    if m < args.k:
        t_ref *= args.k / m  # linear in picks; the one-off N x L initialisation is negligible
        note = f"reference timed over {m} picks, x{args.k / m:g}; " + note
    rows.append((args.n, args.d, args.k, args.device, t_ours, t_ref, note))
    del x

    if args.big_n:
        x, labeled = data(args.big_n, args.d, args.labeled, args.seed)
        _, t_big = ours(x, labeled, args.k, args.device)
        rows.append((args.big_n, args.d, args.k, args.device, t_big, None, "ours only"))

    print("| N | d | k | device | seconds ours | seconds reference | ratio | note |")
    print("|---|---|---|---|---|---|---|---|")
    for n, d, k, dev, a, b, note in rows:
        ref_s = f"{b:.1f}" if b is not None else "-"
        ratio = f"{b / a:.0f}x" if b is not None else "-"
        print(f"| {n:,} | {d} | {k:,} | {dev} | {a:.2f} | {ref_s} | {ratio} | {note} |")


if __name__ == "__main__":
    main()
