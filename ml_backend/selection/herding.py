"""Herding: cover the pool smoothly, weighted by how unsure the model is (Bae et al.).

MaxHerding (Bae, Noh and Sutherland, ECCV 2024, "Generalized Coverage for More Robust Low-Budget
Active Learning") replaces ProbCover's hard balls by a Gaussian kernel: a labeled image covers
every image in proportion to ``k(x, y) = exp(-(||x - y|| / h)^2)``, so there is no radius that
must fit the embedding space, only a bandwidth ``h`` on unit-length rows. Uncertainty herding
(Bae, Sutherland and Oliveira, ICLR 2025, "Uncertainty Herding: One Active Learning Method for
All Label Budgets") weighs every image's coverage by the model's uncertainty ``w_i``: with no
model every weight is 1 (MaxHerding, a representative cold start); once there is one, the queue
goes where the model is unsure and no labeled image is near, which is uncertainty sampling
spread out by coverage instead of by k-center's outliers.

1. Rows are scaled to unit length (distances in ``[0, 2]``).
2. ``m_i``: the best kernel value from row ``i`` to a labeled row (0 with no label).
3. Greedy, ``batch`` times: the candidate ``j`` with the largest gain
   ``sum_i w_i max(0, k(x_i, x_j) - m_i) / |R|`` over the reference rows ``R``; then
   ``m_i = max(m_i, k(x_i, x_j))``. Ties go to the lower row.
4. Then every other candidate by its gain after the batch (ties to the lower row); then, in a
   large pool, the unlabeled rows outside the candidate sample by descending weight, ties to
   the lower row.

Bounded memory and time (no ``N x N`` matrix): the reference rows ``R`` are the unlabeled rows,
or a seeded sample of ``REFERENCE_ROWS`` of them; the candidates are the unlabeled rows, or a
seeded sample of ``CANDIDATE_ROWS`` that holds ``R``; ``m`` reads at most ``LABELED_ROWS``
labeled rows (a seeded sample beyond, so ``m`` is then an estimate). The kernel between ``R``
and the candidates is kept (``REFERENCE_ROWS x CANDIDATE_ROWS`` floats, 200 MB in float32 at
most); each greedy step reads it in column tiles. Work: ``O((|L| + |C|) |R| d + batch |R| |C|)``
at any ``N``.

Labeled rows need not be reference rows: ``k(x_i, x_i) = 1`` makes their gain 0.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ml_backend.errors import SelectionInputError
from ml_backend.selection.inputs import is_number
from ml_backend.selection.kcenter import _as_indices, _as_tensor, _exact_matmul, _resolve_device
from ml_backend.selection.kmeans import _TILE_ELEMENTS, _sq_dist
from ml_backend.selection.probcover import _check_finite, _sample, _unit_rows

DEFAULT_BANDWIDTH = 1.0  # the papers' value on unit-length self-supervised embeddings
REFERENCE_ROWS = 5_000  # coverage is measured on at most this many unlabeled rows
CANDIDATE_ROWS = 10_000  # the greedy picks among at most this many unlabeled rows
LABELED_ROWS = 20_000  # the labeled coverage reads at most this many labeled rows
NEAR = math.exp(-1.0)  # "close": within one bandwidth (kernel value at distance h)


@dataclasses.dataclass(frozen=True)
class HerdingResult:
    """The herding order and what it was built from.

    Attributes:
        order: ``int64`` every unlabeled row, first to label first.
        picks: how many rows at the top the greedy placed (``min(batch, unlabeled)``).
        gain: ``float64 [N]`` coverage gain of each candidate when it was placed (greedy picks)
            or after the batch (the other candidates); NaN outside the candidates.
        stands_for: ``int64 [N]`` for the greedy picks, the unlabeled rows (estimated over the
            whole pool when ``R`` is a sample) within one bandwidth of the pick that no labeled
            or earlier pick was as close to, itself included; 0 otherwise.
        weighted: whether weights (the model's uncertainty) were given.
        bandwidth: ``h``.
        reference_rows: ``|R|``; candidate_rows: ``|C|``.
    """

    order: np.ndarray
    picks: int
    gain: np.ndarray
    stands_for: np.ndarray
    weighted: bool
    bandwidth: float
    reference_rows: int
    candidate_rows: int


def herding_order(
    embeddings,
    labeled_indices,
    batch: int,
    *,
    weights=None,
    bandwidth: float = DEFAULT_BANDWIDTH,
    seed: int | None = 0,
    device=None,
) -> HerdingResult:
    """The (uncertainty) herding order of the unlabeled rows (the algorithm: module docstring).

    Args:
        embeddings: ``[N, d]`` finite numbers, numpy array or torch tensor.
        labeled_indices: rows already labeled; they cover the pool and are never ordered.
        batch: greedy picks at the top of the queue, >= 1.
        weights: ``[N]`` finite numbers >= 0 (the model's uncertainty per row), or None for 1
            everywhere (MaxHerding).
        bandwidth: the kernel's ``h`` on unit-length rows, > 0.
        seed: seeds the samples of a large pool.
        device: torch device; None means CUDA when available, else CPU.

    Returns:
        A :class:`HerdingResult`.

    Raises:
        SelectionInputError: bad shapes, indices, weights, batch or bandwidth.
    """
    x = _as_tensor(embeddings)
    n = x.shape[0]
    labeled = _as_indices(labeled_indices, n, "labeled_indices", pool_limit=True)
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise SelectionInputError(f"batch must be a whole number >= 1, got {batch!r}")
    if not (is_number(bandwidth) and math.isfinite(bandwidth) and bandwidth > 0):
        raise SelectionInputError(f"bandwidth must be a number > 0, got {bandwidth!r}")
    w = None if weights is None else _weights(weights, n)
    _check_finite(x)
    is_labeled = np.zeros(n, dtype=bool)
    is_labeled[labeled] = True
    unlabeled = np.flatnonzero(~is_labeled)
    gain_n = np.full(n, np.nan)
    stands = np.zeros(n, dtype=np.int64)
    if not len(unlabeled):
        return HerdingResult(np.empty(0, np.int64), 0, gain_n, stands, w is not None,
                             float(bandwidth), 0, 0)  # fmt: skip
    rng = np.random.default_rng(seed)
    dev = _resolve_device(device)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    reference = _sample(rng, unlabeled, REFERENCE_ROWS)
    extra = _sample(rng, np.setdiff1d(unlabeled, reference), CANDIDATE_ROWS - len(reference))
    candidates = np.union1d(reference, extra)
    with _exact_matmul(dev):
        r = _unit_rows(x, reference, dev, dtype)
        c = _unit_rows(x, candidates, dev, dtype)
        k = _kernel(r, c, bandwidth)  # [|R|, |C|]
        m = torch.zeros(len(reference), device=dev, dtype=dtype)
        lab = _sample(rng, labeled, LABELED_ROWS)
        step = max(1, _TILE_ELEMENTS // max(1, len(reference)))
        for s in range(0, len(lab), step):
            part = _unit_rows(x, lab[s : s + step], dev, dtype)
            m = torch.maximum(m, _kernel(r, part, bandwidth).max(dim=1).values)
        wr = torch.ones(len(reference), device=dev, dtype=dtype)
        if w is not None:
            wr = torch.as_tensor(w[reference], device=dev, dtype=dtype)
        free = torch.ones(len(candidates), dtype=torch.bool, device=dev)
        picks, pick_gain, pick_stands = [], [], []
        scale = len(unlabeled) / len(reference)
        for _ in range(min(int(batch), len(candidates))):
            gain = _gains(k, m, wr) / len(reference)
            gain[~free] = -1.0
            j = int(torch.argmax(gain))  # the first maximum: ties to the lower row
            col = k[:, j]
            newly = int(((col >= NEAR) & (col > m)).sum())
            picks.append(j)
            pick_gain.append(float(gain[j]))
            pick_stands.append(max(1, round(newly * scale)))
            free[j] = False
            m = torch.maximum(m, col)
        after = (_gains(k, m, wr) / len(reference)).double().cpu().numpy()
    free_np = free.cpu().numpy()
    rest = np.flatnonzero(free_np)
    rest = rest[np.lexsort((rest, -after[rest]))]
    outside = np.setdiff1d(unlabeled, candidates)
    if w is not None and len(outside):
        outside = outside[np.lexsort((outside, -w[outside]))]
    chosen = candidates[np.asarray(picks, dtype=np.int64)]
    order = np.concatenate([chosen, candidates[rest], outside]).astype(np.int64)
    gain_n[candidates[rest]] = after[rest]
    gain_n[chosen] = pick_gain
    stands[chosen] = pick_stands
    return HerdingResult(order, len(picks), gain_n, stands, w is not None, float(bandwidth),
                         len(reference), len(candidates))  # fmt: skip


def _weights(weights, n: int) -> np.ndarray:
    try:
        w = np.asarray(
            weights.detach().cpu().numpy() if hasattr(weights, "detach") else weights,
            dtype=np.float64,
        ).reshape(-1)
    except (TypeError, ValueError):
        raise SelectionInputError(f"weights must be {n} numbers >= 0, got {weights!r}") from None
    if w.shape != (n,) or not np.all(np.isfinite(w)) or (n and w.min() < 0):
        raise SelectionInputError(f"weights must be {n} finite numbers >= 0")
    return w


def _kernel(a: torch.Tensor, b: torch.Tensor, h: float) -> torch.Tensor:
    """``[len(a), len(b)]`` Gaussian kernel values ``exp(-||a - b||^2 / h^2)``."""
    return _sq_dist(b, (b * b).sum(dim=1), a).div_(-h * h).exp_()


def _gains(k: torch.Tensor, m: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i max(0, k[i, j] - m_i)`` per column ``j``, in column tiles."""
    out = torch.empty(k.shape[1], device=k.device, dtype=k.dtype)
    step = max(1, _TILE_ELEMENTS // max(1, k.shape[0]))
    for s in range(0, k.shape[1], step):
        out[s : s + step] = w @ (k[:, s : s + step] - m[:, None]).clamp_min_(0.0)
    return out
