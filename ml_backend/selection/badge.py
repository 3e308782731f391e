"""BADGE (Ash et al., ICLR 2020): uncertainty and diversity in one, by k-means++ seeding over
gradient embeddings.

For an unlabeled row ``i`` with probabilities ``p_i`` and embedding ``h_i`` (standardised per
column over the pool, as the backend's head sees it: ``recipe.py``), the gradient embedding is
the gradient of the cross-entropy loss with respect to the last layer's weights, had the model's
own guess ``yhat_i = argmax p_i`` been the label::

    g_i = (p_i - onehot(yhat_i)) (x) h_i          (an outer product, C x d)

``||g_i|| = ||p_i - onehot(yhat_i)|| ||h_i||`` is large where the model is unsure; two rows'
gradients are far apart when they differ in how the model is unsure (between which classes) or in
what they look like. The batch is k-means++ seeding over the unlabeled ``g_i``, with the origin (the
gradient of a row the model is sure of) as a centre from the start: first the largest ``||g_i||``
(ties: lowest row), then each next pick drawn with probability proportional to ``D^2``, its squared
distance to the nearest centre (the origin or an earlier pick; seeded). The origin is where
scikit-activeml's ``Badge`` departs from the paper's code, and we follow it: a row the model is
sure of then has ``D^2`` near 0 and is almost never drawn, where the paper's code gives it
``||g_first||^2``. Labeled rows are not centres, as in both. The rest of the queue follows by
descending ``D^2`` after the batch.

Never materialised: with ``g_i = a_i (x) h_i``,
``||g_i - g_j||^2 = ||a_i||^2 ||h_i||^2 + ||a_j||^2 ||h_j||^2 - 2 (a_i . a_j)(h_i . h_j)``, so one
pick costs one pass over the pool, ``O(N (C + d))``, and memory is the inputs plus a few ``N``
vectors: no ``N x C d`` matrix (5,120 floats a row at 10 classes and d = 512) is built.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ml_backend.selection.kcenter import _as_tensor, _exact_matmul, _resolve_device

_ROWS_PER_CHUNK = 2**15  # rows per chunk of a pass (bounds the temporaries: 128 MiB at d = 512)


@dataclasses.dataclass(frozen=True)
class BadgeResult:
    """Picks in order, and every candidate's squared gradient distance to the nearest pick.

    Attributes:
        picks: ``int64 [k']`` rows in pick order, ``k' = min(k, len(candidates))``.
        pick_d2: ``float64 [k']`` each pick's ``D^2`` when it was drawn: squared gradient distance
            to the nearest centre (the origin or an earlier pick).
        min_d2: ``float64 [N]`` every candidate's ``D^2`` after the last pick (0 for picks), NaN
            for rows that were not candidates.
    """

    picks: np.ndarray
    pick_d2: np.ndarray
    min_d2: np.ndarray


def badge_picks(probs, embeddings, candidates, k: int, *, seed: int | None = 0,
                device=None) -> BadgeResult:  # fmt: skip
    """k-means++ seeding over the gradient embeddings of ``candidates`` (module docstring).

    Args:
        probs: ``[N, C]`` class probabilities (rows sum to 1; validated by the caller).
        embeddings: ``[N, d]`` embeddings; standardised here over all ``N`` rows.
        candidates: ``int64`` rows to pick from (the unlabeled rows).
        k: batch size; more than the candidates returns them all.
        seed: seed of the D^2 draws.
        device: torch device; None means CUDA when available, else CPU.
    """
    dev = _resolve_device(device)
    n = len(probs)
    cand = np.asarray(candidates, dtype=np.int64)
    min_d2 = np.full(n, np.nan)
    if not len(cand) or k < 1:
        return BadgeResult(np.empty(0, np.int64), np.empty(0), min_d2)
    p = torch.as_tensor(np.asarray(probs, dtype=np.float64)[cand], device=dev)
    a = p.clone()
    a[torch.arange(len(cand), device=dev), p.argmax(dim=1)] -= 1.0  # p - onehot(argmax p)
    h, h_sq = _standardised(_as_tensor(embeddings), cand, dev)
    norm_sq = (a * a).sum(dim=1) * h_sq  # ||g_i||^2
    rng = np.random.default_rng(seed)
    first = int(torch.argmax(norm_sq))  # torch.argmax returns the first of equal maxima
    picks, pick_d2 = [first], [float(norm_sq[first])]
    with _exact_matmul(dev):
        closest = torch.minimum(norm_sq, _d2_to(a, h, norm_sq, first))
        closest[first] = 0.0  # exactly: rounding must never let a pick be drawn again
        for _ in range(1, min(k, len(cand))):
            total = float(closest.sum())
            if total <= 0.0:  # every candidate left sits on a pick: take the next unpicked row
                free = np.setdiff1d(np.arange(len(cand)), picks)
                nxt = int(free[0])
            else:
                cumulative = torch.cumsum(closest, dim=0)
                draw = torch.tensor([rng.random() * float(cumulative[-1])], device=dev,
                                    dtype=cumulative.dtype)  # fmt: skip
                nxt = int(torch.searchsorted(cumulative, draw).clamp_max_(len(cand) - 1))
                while float(closest[nxt]) <= 0.0:  # a zero-width step (rounding): move on
                    nxt = (nxt + 1) % len(cand)
            picks.append(nxt)
            pick_d2.append(float(closest[nxt]))
            closest = torch.minimum(closest, _d2_to(a, h, norm_sq, nxt))
            closest[nxt] = 0.0
    min_d2[cand] = closest.cpu().numpy()
    return BadgeResult(cand[np.asarray(picks, dtype=np.int64)], np.asarray(pick_d2), min_d2)


def _standardised(x: torch.Tensor, rows: np.ndarray, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` of ``x`` on ``dev``, standardised with the whole pool's columns, and their squared
    norms (float64). Statistics are summed in float64; the copy is in the input's precision
    (float32 unless float64) and is the only one: chunks bound every temporary."""
    mean = torch.zeros(x.shape[1], dtype=torch.float64, device=dev)
    sq = torch.zeros(x.shape[1], dtype=torch.float64, device=dev)
    for start in range(0, len(x), _ROWS_PER_CHUNK):
        part = x[start : start + _ROWS_PER_CHUNK].to(dev).double()
        mean += part.sum(dim=0)
        sq += (part * part).sum(dim=0)
    mean /= len(x)
    scale = (sq / len(x) - mean * mean).clamp_min(0.0).sqrt() + 1e-6
    h = torch.empty((len(rows), x.shape[1]), dtype=x.dtype, device=dev)
    h_sq = torch.empty(len(rows), dtype=torch.float64, device=dev)
    mean, scale = mean.to(x.dtype), scale.to(x.dtype)
    for start in range(0, len(rows), _ROWS_PER_CHUNK):
        index = torch.as_tensor(rows[start : start + _ROWS_PER_CHUNK], device=x.device)
        part = (x.index_select(0, index).to(dev) - mean) / scale
        h[start : start + len(part)] = part
        h_sq[start : start + len(part)] = (part.double() ** 2).sum(dim=1)
    return h, h_sq


def _d2_to(a: torch.Tensor, h: torch.Tensor, norm_sq: torch.Tensor, j: int) -> torch.Tensor:
    """Squared gradient distance of every candidate to candidate ``j`` (clamped at 0)."""
    out = torch.empty_like(norm_sq)
    for start in range(0, len(a), _ROWS_PER_CHUNK):
        stop = start + _ROWS_PER_CHUNK
        cross = (a[start:stop] @ a[j]) * (h[start:stop] @ h[j]).double()
        out[start:stop] = norm_sq[start:stop] + norm_sq[j] - 2.0 * cross
    return out.clamp_min_(0.0)
