"""Evaluation metrics: clustering agreement (ARI), expert matching, total variation, pair accuracy."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score


def adjusted_rand_index(labels_true, labels_pred) -> float:
    """Hubert–Arabie adjusted Rand index of two labelings (1 = same partition, ~0 = chance): scikit-learn's
    ``adjusted_rand_score`` on any array-like or tensor of integer labels."""
    a = torch.as_tensor(labels_true).long().flatten().cpu()
    b = torch.as_tensor(labels_pred).long().flatten().cpu()
    if a.numel() != b.numel():
        raise ValueError(f"labelings differ in length: {a.numel()} vs {b.numel()}")
    return float(adjusted_rand_score(a.numpy(), b.numpy()))


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
