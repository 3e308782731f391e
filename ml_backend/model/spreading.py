"""Label spreading over a k-nearest-neighbour graph of the pool's embeddings.

A few dozen labels leave most of a linear head's boundary to chance; the pool's own structure
(images of one class sit in dense, connected regions of a self-supervised embedding) says where
the gaps between classes are. Label spreading (Zhou et al. 2004, "Learning with local and global
consistency"; the graph and weights of Iscen et al. 2019, "Label propagation for deep
semi-supervised learning") carries each label along the graph:

    W_ij = max(cos(e_i, e_j), 0) ** gamma   for j among the k nearest neighbours of i (symmetrised)
    S = D^-1/2 W D^-1/2
    F <- alpha S F + (1 - alpha) Y           (iterated; Y: one row per label, each class's
                                              labels summing to 1 so a frequent class does not
                                              flood the graph)

The spread labels are not served directly: ``recipe`` fits its linear head on them (weighted by
how sure the spreading is), so what is served stays a plain ResNet18 with an ``fc`` layer.

The neighbour search runs in torch on the caller's ``device`` (the job's: a GPU when there is
one); memory is bounded by ``GRAPH_ROWS`` (the graph is built over a seeded sample of the pool
that always holds the labeled rows) and ``BLOCK`` rows of similarities at a time.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp
import torch

# Neighbours per node, the similarity exponent and the spreading strength (Iscen et al.'s values
# for k and gamma; alpha close to 1 lets a label reach far along dense regions).
K = 20
GAMMA = 3.0
ALPHA = 0.99
ITERATIONS = 30
# Nodes of the graph at most: the labeled rows and a seeded sample of the rest. Building it costs
# GRAPH_ROWS^2 x d multiply-adds (10,000 x 512 dims: about a second on two CPU cores).
GRAPH_ROWS = 10_000
# Rows of similarities computed at a time (BLOCK x GRAPH_ROWS float32: 80 MB).
BLOCK = 2_048


@dataclasses.dataclass(frozen=True)
class Graph:
    """A normalised kNN graph over ``nodes`` (sorted rows of the pool's embeddings)."""

    nodes: np.ndarray  # int64 [M], sorted
    s: sp.csr_matrix  # [M, M], D^-1/2 W D^-1/2

    def positions(self, rows: np.ndarray) -> np.ndarray:
        """Where pool ``rows`` sit among ``nodes`` (each must be a node)."""
        pos = np.searchsorted(self.nodes, rows)
        if len(rows) and (pos.max() >= len(self.nodes) or (self.nodes[pos] != rows).any()):
            raise ValueError("rows that are not nodes of the graph")
        return pos


def build_graph(
    embeddings: np.ndarray,
    must_include: np.ndarray,
    *,
    k: int = K,
    gamma: float = GAMMA,
    max_rows: int = GRAPH_ROWS,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Graph:
    """The kNN graph over ``must_include`` and a seeded sample of the other rows.

    Args:
        embeddings: ``[N, d]`` pool embeddings (any float dtype; compared by cosine).
        must_include: Rows that must be nodes (the labeled ones).
        k: Neighbours per node (fewer when the graph is smaller).
        gamma: Exponent on the cosine similarity.
        max_rows: Nodes at most (``must_include`` always fit; the sample fills the rest).
        seed: Seed of the sample.
        device: Where the similarities are computed.
    """
    n = len(embeddings)
    must = np.unique(np.asarray(must_include, dtype=np.int64))
    if n <= max_rows:
        nodes = np.arange(n, dtype=np.int64)
    else:
        rest = np.setdiff1d(np.arange(n, dtype=np.int64), must, assume_unique=True)
        room = max(max_rows - len(must), 0)
        sample = np.random.default_rng(seed).choice(rest, min(room, len(rest)), replace=False)
        nodes = np.sort(np.concatenate([must, sample]))
    m = len(nodes)
    k = min(k, m - 1)
    if k < 1:
        return Graph(nodes, sp.csr_matrix((m, m)))
    z = torch.as_tensor(np.asarray(embeddings[nodes], dtype=np.float32), device=device)
    z = torch.nn.functional.normalize(z, dim=1)
    neighbours = np.empty((m, k), dtype=np.int64)
    sims = np.empty((m, k), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, m, BLOCK):
            block = z[start : start + BLOCK] @ z.T  # [b, m]
            idx = torch.arange(len(block), device=block.device)
            block[idx, idx + start] = -float("inf")  # a node is not its own neighbour
            top = torch.topk(block, k, dim=1)
            neighbours[start : start + BLOCK] = top.indices.cpu().numpy()
            sims[start : start + BLOCK] = top.values.cpu().numpy()
    weights = np.maximum(sims, 0).astype(np.float64).ravel() ** gamma
    w = sp.csr_matrix((weights, (np.repeat(np.arange(m), k), neighbours.ravel())), shape=(m, m))
    w = w + w.T
    degree = np.asarray(w.sum(axis=1)).ravel()
    inv_sqrt = sp.diags(1.0 / np.sqrt(np.maximum(degree, 1e-12)))
    return Graph(nodes, (inv_sqrt @ w @ inv_sqrt).tocsr())


def spread(
    graph: Graph,
    rows: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    alpha: float = ALPHA,
    iterations: int = ITERATIONS,
) -> np.ndarray:
    """Class probabilities of every node after spreading ``labels`` from pool ``rows``.

    Returns ``float64 [M, num_classes]`` (rows in ``graph.nodes`` order): each row sums to 1; a
    node no label reached is uniform.
    """
    m = len(graph.nodes)
    labels = np.asarray(labels, dtype=np.int64)
    seeds = np.zeros((m, num_classes))
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    seeds[graph.positions(np.asarray(rows, dtype=np.int64)), labels] = 1.0 / counts[labels]
    f = seeds.copy()
    for _ in range(iterations):
        f = alpha * (graph.s @ f) + (1 - alpha) * seeds
    f = np.maximum(f, 0.0)
    total = f.sum(axis=1, keepdims=True)
    return np.where(total > 0, f / np.where(total > 0, total, 1.0), 1.0 / num_classes)


def certainty(probs: np.ndarray) -> np.ndarray:
    """``1 - entropy / log C`` per row: 1 for a one-hot row, 0 for a uniform one."""
    c = probs.shape[1]
    if c < 2:
        return np.ones(len(probs))
    entropy = -(probs * np.log(np.maximum(probs, 1e-12))).sum(axis=1)
    return np.clip(1.0 - entropy / np.log(c), 0.0, 1.0)
