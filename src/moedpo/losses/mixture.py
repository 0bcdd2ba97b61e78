"""Closed forms of the latent-class Bradley–Terry mixture (Mix-/MoE-DPO, arXiv 2510.08256, §3).

    z ~ Categorical(w),  w = softmax(gate_logits);   P(y+ > y- | z = k) = sigmoid(beta h_k)

Pair scope: one z per comparison. User scope: one z_u shared by all pairs of user u, so
P(D_u) = sum_k w_uk prod_i sigmoid(beta h_ik). These functions are the hand-written twins of the Pyro programs
in :mod:`moedpo.models`; tests compare the two (losses and gradients). Everything works in log space, so it is
finite for |beta h| up to 1e4 in float32.
"""

from __future__ import annotations

import torch
from torch.special import xlogy

from moedpo.losses.dpo import log_likelihood


def _log_joint(h, gate_logits, beta, label_smoothing) -> torch.Tensor:
    """log w_k + log P(y+ > y- | z = k): (B, K)."""
    return torch.log_softmax(gate_logits, -1) + log_likelihood(h, beta, label_smoothing)


def mixture_nll(h: torch.Tensor, gate_logits: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """-log sum_k softmax(g)_k sigmoid(beta h_k): h, gate_logits (B, K) -> (B,)."""
    return -torch.logsumexp(_log_joint(h, gate_logits, beta, label_smoothing), -1)


def responsibilities(
    h: torch.Tensor, gate_logits: torch.Tensor, beta: float, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Exact posterior q_k ∝ w_k sigmoid(beta h_k): (B, K) -> (B, K), rows on the simplex."""
    return torch.softmax(_log_joint(h, gate_logits, beta, label_smoothing), -1)


def weighted_dpo_loss(h: torch.Tensor, weights: torch.Tensor, beta: float) -> torch.Tensor:
    """EM M-step loss -sum_k weights_k log sigmoid(beta h_k): (B, K), (B, K) -> (B,). Detach weights yourself."""
    return -(weights * log_likelihood(h, beta)).sum(-1)


def elbo(
    q: torch.Tensor, h: torch.Tensor, gate_logits: torch.Tensor, beta: float, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-pair evidence lower bound for any q (B, K) on the simplex -> (B,).

    L(q) = sum_k q_k log sigmoid(beta h_k) + sum_k q_k log w_k + H(q) <= log P(y+ > y-), with equality iff q is
    :func:`responsibilities`. Uses 0 log 0 = 0, so one-hot q is fine.
    """
    log_w = torch.log_softmax(gate_logits, -1)
    expected = (q * (log_likelihood(h, beta, label_smoothing) + log_w)).sum(-1)
    entropy = -xlogy(q, q).sum(-1)
    return expected + entropy


def mixture_reward(rewards: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """Mixture reward r(x, y) = log sum_k w_k exp(r_k(x, y)): (..., K), (..., K) -> (...)."""
    return torch.logsumexp(torch.log_softmax(gate_logits, -1) + rewards, -1)


def component_log_likelihood(
    h: torch.Tensor,
    beta: float,
    user_index: torch.Tensor | None = None,
    num_users: int | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """log P(data of one latent unit | z = k): pair scope (B, K) -> (B, K); user scope -> (U, K).

    In user scope, pair i belongs to user ``user_index[i]`` in [0, U) and the pair terms are summed per user.
    """
    loglik = log_likelihood(h, beta, label_smoothing)  # (B, K)
    if user_index is None:
        return loglik
    num_users = int(user_index.max()) + 1 if num_users is None else num_users
    out = loglik.new_zeros(num_users, loglik.shape[-1])
    return out.index_add(0, user_index, loglik)


def _user_log_joint(h, gate_logits, beta, user_index, label_smoothing) -> torch.Tensor:
    """log w_uk + sum_{i in u} log P(y_i | z_u = k): (U, K)."""
    loglik = component_log_likelihood(h, beta, user_index, gate_logits.shape[0], label_smoothing)
    return torch.log_softmax(gate_logits, -1) + loglik


def user_mixture_nll(
    h: torch.Tensor,
    gate_logits: torch.Tensor,
    beta: float,
    user_index: torch.Tensor,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """User-scope -log sum_k w_uk prod_{i in u} sigmoid(beta h_ik): h (B, K), gate_logits (U, K) -> (U,)."""
    return -torch.logsumexp(_user_log_joint(h, gate_logits, beta, user_index, label_smoothing), -1)


def user_responsibilities(
    h: torch.Tensor,
    gate_logits: torch.Tensor,
    beta: float,
    user_index: torch.Tensor,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Exact posterior over each user's type: h (B, K), gate_logits (U, K) -> (U, K)."""
    return torch.softmax(_user_log_joint(h, gate_logits, beta, user_index, label_smoothing), -1)
