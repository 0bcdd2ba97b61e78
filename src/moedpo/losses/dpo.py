"""Per-expert DPO losses and Bradley–Terry link likelihoods from margins.

The margin of expert k on a pair is

    h_k = [log pi_k(y+|x) - log pi_ref(k)(y+|x)] - [log pi_k(y-|x) - log pi_ref(k)(y-|x)]

so the implicit reward difference is beta * h_k (Rafailov et al. 2023). Every function here is elementwise in
``h``: pass (B,) for one policy or (B, K) for K experts. Loss definitions match TRL's ``DPOTrainer``
(``sigmoid``, ``ipo``, ``hinge``, ``robust``), so K=1 training reproduces TRL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def margins(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """DPO margins h from sequence log-probs.

    Policy log-probs are (B, K) (or (B,)); reference log-probs are (B,) for a shared reference or (B, K) for a
    reference per expert, and broadcast. Returns h with the policy's shape.
    """
    if ref_chosen_logps.dim() == policy_chosen_logps.dim() - 1:
        ref_chosen_logps = ref_chosen_logps.unsqueeze(-1)
        ref_rejected_logps = ref_rejected_logps.unsqueeze(-1)
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def dpo_loss(h: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO loss from margins, elementwise: (B,) -> (B,), (B, K) -> (B, K).

    - ``sigmoid``: -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps = label_smoothing)
    - ``robust``:  [-(1-eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)  (Chowdhury et al.)
    - ``hinge``:   relu(1 - beta h)  (SLiC)
    - ``ipo``:     (h - 1 / (2 beta))^2  (Azar et al.)
    """
    logits = beta * h
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    if loss_type == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"robust loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
        num = -(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)
        return num / (1 - 2 * label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - logits)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


def log_likelihood(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """log P(y+ > y- | expert) under the Bradley–Terry link, elementwise.

    With ``label_smoothing = eps`` the link is the label-noise likelihood
    (1 - eps) sigmoid(beta h) + eps sigmoid(-beta h) (conservative DPO), computed in log space.
    ``ipo`` and ``hinge`` have no likelihood; the mixture uses the BT link for them.
    """
    logits = beta * h
    if label_smoothing == 0.0:
        return F.logsigmoid(logits)
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    eps = torch.tensor(label_smoothing, dtype=h.dtype, device=h.device)
    return torch.logaddexp(torch.log1p(-eps) + F.logsigmoid(logits), torch.log(eps) + F.logsigmoid(-logits))


def bernoulli_logits(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Logits of the Bernoulli "y+ preferred" outcome under :func:`log_likelihood`'s link."""
    if label_smoothing == 0.0:
        return beta * h
    return log_likelihood(h, beta, label_smoothing) - log_likelihood(-h, beta, label_smoothing)
