"""Evaluation metrics: clustering agreement (ARI), expert matching, total variation, pair accuracy."""

from __future__ import annotations

from math import comb

import torch
from scipy.optimize import linear_sum_assignment


def adjusted_rand_index(labels_true, labels_pred) -> float:
    """Hubert–Arabie adjusted Rand index of two labelings (1 = same partition, ~0 = chance)."""
    a = torch.as_tensor(labels_true).long().flatten()
    b = torch.as_tensor(labels_pred).long().flatten()
    if a.numel() != b.numel():
        raise ValueError(f"labelings differ in length: {a.numel()} vs {b.numel()}")
    _, a = torch.unique(a, return_inverse=True)
    _, b = torch.unique(b, return_inverse=True)
    table = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.long)
    table.index_put_((a, b), torch.ones_like(a), accumulate=True)
    pairs = lambda counts: sum(comb(int(c), 2) for c in counts.flatten())
    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), comb(a.numel(), 2)
    expected = rows * cols / total if total else 0.0
    maximum = (rows + cols) / 2
    if maximum == expected:
        return 1.0
    return float((index - expected) / (maximum - expected))


def best_permutation(cost: torch.Tensor) -> tuple[int, ...]:
    """The assignment perm (learned k -> planted perm[k]) minimising sum_k cost[k, perm[k]] for a (K, K) cost.

    scipy's Hungarian-type solver (``linear_sum_assignment``), O(K^3): any K, not only what K! orderings allow.
    """
    table = torch.as_tensor(cost).detach().cpu().double().numpy()
    rows, cols = linear_sum_assignment(table)  # rows = 0..K-1 for a square table
    return tuple(int(cols[k]) for k in rows.argsort())


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """TV distance 0.5 * sum |p - q| over the last axis."""
    return 0.5 * (p - q).abs().sum(-1)


def pair_accuracy(prob_chosen: torch.Tensor) -> float:
    """Fraction of pairs where the model gives the chosen response probability > 1/2."""
    return float((prob_chosen > 0.5).double().mean())
