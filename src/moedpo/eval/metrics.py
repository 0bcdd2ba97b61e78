"""Evaluation metrics: clustering agreement (ARI), expert matching, total variation, pair and ranking accuracy."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score

from moedpo.losses.rankings import pairwise_margins


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


def ranking_agreement(
    scores: torch.Tensor, ranking: torch.Tensor, mask: torch.Tensor | None = None, ranked: torch.Tensor | None = None
) -> dict:
    """How well ``scores`` (N, M) (higher = better) predict observed rankings (N, M) (indices, best first;
    ``mask`` (N, M) marks real positions, ``ranked`` (N,) the observed first choices): ``top1``, the share of
    rankings whose best completion has the unique top score, and ``kendall_tau``, the mean over rankings of
    (concordant - discordant) / known pairs, ties in ``scores`` counted as neither (tau-a)."""
    margins, valid = pairwise_margins(scores.unsqueeze(-1), ranking, mask, ranked)  # (N, P, 1), (N, P)
    signs = torch.sign(margins.squeeze(-1)) * valid
    tau = signs.sum(-1) / valid.sum(-1).clamp_min(1)
    masked = scores if mask is None else scores.masked_fill(~mask, -torch.inf)
    best = masked.max(-1).values
    top1 = (masked.gather(-1, ranking[:, :1]).squeeze(-1) == best) & ((masked == best.unsqueeze(-1)).sum(-1) == 1)
    return {"top1": float(top1.double().mean()), "kendall_tau": float(tau.double().mean())}
