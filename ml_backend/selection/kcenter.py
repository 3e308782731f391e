"""Greedy k-center (farthest-first traversal) over embeddings, in torch, exact and memory-bounded.

Each step picks the candidate farthest from its nearest centre (labeled rows and earlier picks),
ties to the lowest index. Distances are Euclidean.

Why it is fast and still exact: the textbook loop multiplies the whole pool by one new centre per
pick, so it reads all N x d values k times and waits on memory bandwidth. Here the distances from a
*block* of the current best candidates (the b rows with the largest min-distance) to the whole
pool come out of one matrix product, which is compute-bound and costs about as much as a few
single-row passes. Picks then go on at O(N) each (an argmax, then an elementwise minimum with the
pick's precomputed row) for as long as the argmax lands inside the block; when it does not, a new
block is built from the current best. Each pick is the true argmax of the true min-distance vector,
so the picks are the textbook loop's picks. The block size adapts to how many picks the last block
served.

Numerics: rows are centred on the candidates' mean (distances do not change, cancellation does), and
squared distances come from one product of augmented rows, ``||x||^2 + ||c||^2 - 2 x.c``. Values
up to ``128 eps max ||x||^2`` (the rounding noise of that expansion; eps of the compute dtype) are
set to exactly 0, so an exact duplicate reads 0, not noise: in float32, rows closer than about 0.4%
of the largest centred norm count as duplicates. Rounding also decides between distances equal up
to it (exact ties are only guaranteed to go to the lowest index when computed equal). On CUDA, TF32
matmul is switched off for the call.

Memory: the candidates are copied once (in the input's float precision; float32 unless float64),
the block is ``b x N`` with ``b`` capped by a 512 MiB budget, and the labeled set is folded in tile
by tile. No ``N x N`` or ``N x L`` matrix is built: 1,000,000 x 512 float32 peaked at 5.3 GB
resident, 2 GB of it the input.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from contextlib import contextmanager

import numpy as np
import torch

from ml_backend.errors import SelectionInputError

log = logging.getLogger(__name__)

_BLOCK_BYTES = 512 * 2**20  # cap on the b x N block of candidate distances
_TILE_ELEMENTS = 2**24  # cap on one temporary tile (64 MiB in float32)
_LABELED_TILE = 1024  # labeled rows folded into the min-distances per matrix product
_MIN_BLOCK, _FIRST_BLOCK, _MAX_BLOCK = 32, 128, 1024
_NOISE_EPS = 64  # see "Numerics" above


@dataclasses.dataclass(frozen=True)
class KCenterResult:
    """Everything one greedy k-center run found.

    Attributes:
        picks: ``int64 [k']`` row indices in pick order, ``k' = min(k, number of candidates)``.
        pick_distances: ``float64 [k']`` distance of each pick to its nearest centre (labeled row
            or earlier pick) when it was picked; ``inf`` for the first pick of a run without
            labeled rows (there was no centre yet).
        min_distances: ``float64 [N]`` distance of every row to its nearest centre after the last
            pick: 0 for labeled rows and picks, ``inf`` while there is no centre at all, NaN for
            rows that were neither candidates nor centres (not computed).
    """

    picks: np.ndarray
    pick_distances: np.ndarray
    min_distances: np.ndarray


def k_center_greedy(embeddings, labeled_indices, k: int, device=None) -> np.ndarray:
    """Greedy k-center picks: each is the unlabeled row farthest from labeled rows and earlier picks.

    Args:
        embeddings: ``[N, d]`` finite numbers, numpy array or torch tensor (any device).
        labeled_indices: indices of rows already labeled (the initial centres); never picked.
        k: how many rows to pick; more than the unlabeled count returns every unlabeled row.
        device: torch device to compute on; None (or "auto") means CUDA when available, else CPU.

    Returns:
        ``int64 [min(k, N - L)]`` row indices in pick order. Without labeled rows the first pick is
        the row farthest from the mean of the embeddings (ties: lowest index). Rows at distance 0
        (duplicates of a centre) come only after every row at a positive distance.

    Raises:
        SelectionInputError: not 2-D, non-finite values, indices out of range or more labeled
            indices than rows, negative k.
    """
    return k_center_greedy_details(embeddings, labeled_indices, k, device=device).picks


def k_center_greedy_details(
    embeddings, labeled_indices, k: int, device=None, *, candidates=None
) -> KCenterResult:
    """:func:`k_center_greedy` plus each pick's distance and the final min-distance vector.

    Args:
        embeddings: ``[N, d]`` finite numbers, numpy array or torch tensor.
        labeled_indices: indices of rows already labeled (the initial centres); never picked.
        k: how many rows to pick.
        device: torch device; None (or "auto") means CUDA when available, else CPU.
        candidates: row indices that may be picked (default: every unlabeled row); labeled rows
            among them are dropped. Only candidates and labeled rows are read (and checked for
            NaN/inf); without labeled rows the first pick is the candidate farthest from the
            candidates' mean.

    Returns:
        A :class:`KCenterResult`.
    """
    x = _as_tensor(embeddings)
    n = x.shape[0]
    labeled = _as_indices(labeled_indices, n, "labeled_indices", pool_limit=True)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise SelectionInputError(f"k must be a whole number >= 0, got {k!r}")
    is_labeled = np.zeros(n, dtype=bool)
    is_labeled[labeled] = True
    if candidates is None:
        cand = np.flatnonzero(~is_labeled)
    else:
        cand = _as_indices(candidates, n, "candidates")
        cand = cand[~is_labeled[cand]]
    dev = _resolve_device(device)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    d = x.shape[1]

    with _exact_matmul(dev):
        xa, mean = _prepare(x, cand, dev, dtype)
        min_d2 = torch.full((len(cand),), math.inf, dtype=dtype, device=dev)
        sq_max = float(xa[:, d + 1].max()) if len(cand) else 0.0
        for s in range(0, len(labeled) if len(cand) else 0, _LABELED_TILE):
            ca, _ = _prepare(x, labeled[s : s + _LABELED_TILE], dev, dtype, mean)
            _fold_min(min_d2, xa, _as_centres(ca, d))
            sq_max = max(sq_max, float(ca[:, d + 1].max()))
        noise = 2 * sq_max * _NOISE_EPS * torch.finfo(dtype).eps
        torch.nn.functional.threshold_(min_d2, noise, 0.0)
        picks_u, pick_d2, min_d2 = _greedy(xa, d, noise, min_d2, min(int(k), len(cand)))

    picks = cand[picks_u].astype(np.int64)
    final = np.full(n, np.nan)
    final[cand] = np.sqrt(min_d2.cpu().numpy().astype(np.float64))
    final[labeled] = 0.0
    final[picks] = 0.0
    log.debug(
        "k-center: %d picks among %d candidates, %d labeled", len(picks), len(cand), n - len(cand)
    )
    return KCenterResult(picks, np.sqrt(pick_d2), final)


def _greedy(xa: torch.Tensor, d: int, noise: float, min_d2: torch.Tensor, k: int):
    """k farthest-first picks among the augmented candidate rows (see the module docstring)."""
    n = xa.shape[0]
    picks, pick_d2 = np.empty(k, dtype=np.int64), np.empty(k, dtype=np.float64)
    if k == 0:
        return picks, pick_d2, min_d2
    # Cold start (no centre, every min-distance inf): begin with the row farthest from the mean,
    # i.e. the largest squared norm of the centred rows, which the augmented layout holds.
    cold = bool(torch.isinf(min_d2).all())
    sq = xa[:, d + 1]
    # Per-pick work is O(N); on CPU numpy is far cheaper per call than torch's threaded kernels.
    on_cpu = xa.device.type == "cpu"
    ops = np if on_cpu else torch
    md = min_d2.numpy() if on_cpu else min_d2
    col_of = np.full(n, -1, dtype=np.int64)  # candidate row -> row of the current block
    block, rows, want, used = None, np.empty(0, dtype=np.int64), _FIRST_BLOCK, 0
    cap = max(1, min(_MAX_BLOCK, _BLOCK_BYTES // (n * xa.element_size())))
    for t in range(k):
        key = sq if (cold and t == 0) else min_d2
        v = int(md.argmax()) if not (cold and t == 0) else int(torch.argmax(sq))
        if col_of[v] < 0:
            if block is not None:
                want = max(_MIN_BLOCK, 2 * used)
            b = int(min(cap, want, n, 2 * (k - t) + _MIN_BLOCK))
            rows = _top_rows(key, b, v)
            col_of[col_of >= 0] = -1
            col_of[rows] = np.arange(len(rows))
            block = block_view = None  # free the old block before the new one is allocated
            block = _block(xa, rows, d, noise)
            block_view = block.numpy() if on_cpu else block
            used = 0
        picks[t] = v
        pick_d2[t] = math.inf if (cold and t == 0) else float(md[v])
        ops.minimum(md, block_view[int(col_of[v])], out=md)
        md[v] = -math.inf  # picked: never the argmax again
        used += 1
    min_d2[torch.from_numpy(picks).to(min_d2.device)] = 0.0
    return picks, pick_d2, min_d2


def _top_rows(key: torch.Tensor, b: int, must: int) -> np.ndarray:
    top = torch.topk(key, b).indices.cpu().numpy()
    if must not in top:  # ties at the top may be cut anywhere; the argmax must be in the block
        top[-1] = must
    return top


def _block(xa: torch.Tensor, rows: np.ndarray, d: int, noise: float) -> torch.Tensor:
    """``[len(rows), N]`` squared distances from the candidate rows ``rows`` to every candidate."""
    ca = _as_centres(xa[torch.from_numpy(rows).to(xa.device)], d)
    return torch.nn.functional.threshold_(torch.mm(ca, xa.T), noise, 0.0)


def _fold_min(min_d2: torch.Tensor, xa: torch.Tensor, ca: torch.Tensor) -> None:
    """``min_d2 = min(min_d2, squared distance to the nearest centre row of ca)``, tiled."""
    step = max(1, _TILE_ELEMENTS // ca.shape[0])
    for s in range(0, xa.shape[0], step):
        nearest = torch.mm(ca, xa[s : s + step].T).min(dim=0).values.clamp_min_(0.0)
        torch.minimum(min_d2[s : s + step], nearest, out=min_d2[s : s + step])


# Augmented layout: a candidate row is [x, 1, |x|^2, 0...], a centre row is [-2c, |c|^2, 1, 0...],
# so one product gives |x|^2 + |c|^2 - 2x.c. Width is padded to a multiple of 16 for the kernels.
def _prepare(x, rows: np.ndarray, dev, dtype, mean=None):
    """Augmented copy of ``x[rows]`` on ``dev``, centred on ``mean`` (default: these rows' mean).

    Also the finiteness check, for free: a float64 column sum is finite iff every value is.
    Returns ``(rows in the augmented candidate layout, float64 mean)``.
    """
    d = x.shape[1]
    out = torch.empty((len(rows), -(-(d + 2) // 16) * 16), dtype=dtype, device=dev)
    out[:, d + 2 :] = 0.0
    out[:, d] = 1.0
    idx, step = torch.from_numpy(rows), max(1, _TILE_ELEMENTS // d)
    total = np.zeros(d)
    for s in range(0, len(rows), step):
        part = out[s : s + step, :d]
        part.copy_(_rows_on(x, idx[s : s + step], dev, dtype))
        chunk = _column_sum(part)
        if not np.isfinite(chunk).all():
            bad = torch.nonzero(~torch.isfinite(part).all(dim=1)).flatten().tolist()
            where = f"row {rows[s + bad[0]]} holds NaN or inf" if bad else "values overflow"
            raise SelectionInputError(
                f"embeddings must be finite, but {where} (check the model's inference output)"
            )
        total += chunk
    mean = torch.from_numpy(total / max(1, len(rows))) if mean is None else mean
    m = mean.to(dev, dtype)
    for s in range(0, len(rows), step):
        part = out[s : s + step, :d].sub_(m)
        out[s : s + step, d + 1] = (part * part).sum(dim=1)
    return out, mean


def _rows_on(x: torch.Tensor, idx: torch.Tensor, dev, dtype) -> torch.Tensor:
    """``x[idx]`` on ``dev``; when the rows are dense, moves only their span (no host gather)."""
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    if hi - lo <= 2 * len(idx):  # typical: every row but a few labeled ones
        return x[lo:hi].to(dev, dtype)[(idx - lo).to(dev)]
    return x.index_select(0, idx.to(x.device)).to(dev, dtype)


def _column_sum(part: torch.Tensor) -> np.ndarray:
    # numpy's float64-accumulating sum is several times faster than torch's on CPU
    if part.device.type == "cpu":
        return part.numpy().sum(axis=0, dtype=np.float64)
    return part.sum(dim=0, dtype=torch.float64).cpu().numpy()


def _as_centres(xa: torch.Tensor, d: int) -> torch.Tensor:
    """Turn augmented candidate rows into augmented centre rows (see the layout above)."""
    ca = torch.zeros_like(xa)
    ca[:, :d] = -2.0 * xa[:, :d]
    ca[:, d] = xa[:, d + 1]
    ca[:, d + 1] = 1.0
    return ca


def _as_tensor(embeddings) -> torch.Tensor:
    if isinstance(embeddings, torch.Tensor):
        x = embeddings.detach()
    else:
        arr = np.asarray(embeddings)
        if arr.dtype.kind not in "fiu":
            raise SelectionInputError(f"embeddings must hold real numbers, got dtype {arr.dtype}")
        with warnings.catch_warnings():  # a read-only array (the embedding memo) is only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x = torch.from_numpy(arr if arr.dtype.kind == "f" else arr.astype(np.float32))
    if x.ndim != 2 or x.shape[1] < 1:
        raise SelectionInputError(
            f"embeddings must be a 2-D array [N, d] with d >= 1, got shape {tuple(x.shape)}"
        )
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # float16/bfloat16/int: compute in float32 (numpy has no bfloat16)
    return x


def _as_indices(values, n: int, name: str, pool_limit: bool = False) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim > 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise SelectionInputError(
            f"{name} must be a 1-D sequence of integer row indices, got {arr.dtype} of shape "
            f"{arr.shape} (for a boolean mask pass np.flatnonzero(mask))"
        )
    arr = arr.reshape(-1).astype(np.int64)
    if pool_limit and arr.size > n:
        raise SelectionInputError(
            f"{name} has {arr.size} entries but the pool has only {n} rows; "
            "pass the labeled rows of this pool"
        )
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
        raise SelectionInputError(
            f"{name} must lie in [0, {n}) for a pool of {n} rows; got {int(bad[0])}"
        )
    return np.unique(arr)


def _resolve_device(device) -> torch.device:
    # Looked up per call, never at import: CUDA may be absent, or initialised later in a worker.
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextmanager
def _exact_matmul(dev: torch.device):
    """Full float32 matmul on CUDA for the call: TF32's 10-bit mantissa would blur distances."""
    if dev.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
