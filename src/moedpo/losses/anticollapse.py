"""Regularisers that keep a mixture from collapsing onto one expert (SPEC §1 "Relaxation").

Both are functions Phi of the batch means of the gate over its latent units: the mean probabilities
P_bar = mean_u softmax(g_u) (K,) and, for load balance, the top-1 fractions f_bar = mean_u onehot(argmax g_u).
:func:`load_balance_loss` and :func:`usage_entropy_penalty` take the logits (U, K) of one batch and return a
scalar to *add* to the loss, scaled by the caller.

Split over micro-batches (or processes), Phi of each part's own mean is not Phi of the whole batch's mean.
:func:`penalty_share` is the exact split: with P_bar, Phi(P_bar) and dPhi/dP_bar of the whole step
(:func:`load_balance_gradient`, :func:`usage_entropy_gradient`), each part's share has the part's piece of the
gradient, and the shares of any partition of the units sum to Phi(P_bar) with Phi's gradient.
"""

from __future__ import annotations

import torch
from torch.special import xlogy


def load_balance_loss(gate_logits: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance term K * sum_k f_k P_k (=1 when balanced; top-1 fractions f, mean probs P)."""
    probs = torch.softmax(gate_logits, -1)  # (B, K)
    return load_balance_value(probs.mean(0), top1_fractions(probs))


def usage_entropy_penalty(gate_logits: torch.Tensor) -> torch.Tensor:
    """-H(mean_b w_b): minimising it spreads the average gate over the experts."""
    return usage_entropy_value(torch.softmax(gate_logits, -1).mean(0))


def top1_fractions(probs: torch.Tensor) -> torch.Tensor:
    """Share of the units whose top-1 expert is k: (U, K) -> (K,) (ties go to the lower index; no gradient)."""
    return torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype).mean(0)


def load_balance_value(usage: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """K * sum_k f_k P_k from the means P = ``usage`` (K,) and f = ``fractions`` (K,)."""
    return usage.shape[-1] * (fractions * usage).sum()


def load_balance_gradient(fractions: torch.Tensor) -> torch.Tensor:
    """d/dP of K * sum_k f_k P_k (f held fixed: argmax has no gradient): K f, (K,)."""
    return fractions.shape[-1] * fractions


def usage_entropy_value(usage: torch.Tensor) -> torch.Tensor:
    """sum_k P_k log P_k = -H(P) of the mean gate P = ``usage`` (K,)."""
    return xlogy(usage, usage).sum()


def usage_entropy_gradient(usage: torch.Tensor) -> torch.Tensor:
    """d/dP of sum_k P_k log P_k: log P_k + 1, (K,). P_k = 0 is read as the smallest normal number (a finite
    gradient that no unit's probability, zero too, can turn into 0 * inf)."""
    return torch.log(usage.clamp_min(torch.finfo(usage.dtype).tiny)) + 1


def penalty_share(
    probs: torch.Tensor, usage: torch.Tensor, value: torch.Tensor, gradient: torch.Tensor, num_units: float
) -> torch.Tensor:
    """The share of Phi(P_bar) that belongs to ``probs`` (n, K), n of the ``num_units`` units whose mean is
    ``usage`` = P_bar (K,); ``value`` = Phi(P_bar), ``gradient`` = dPhi/dP_bar (both of the whole step, detached):

        share = <gradient, sum_i probs_i> / U + (value - <gradient, P_bar>) * n / U

    Its gradient in probs_i is dPhi/dP_bar / U, exactly d Phi(P_bar) / d probs_i, and the shares of any partition
    of the U units sum to Phi(P_bar). One part holding every unit: the share is Phi(P_bar), gradient included.
    """
    gradient, usage = gradient.detach().to(probs), usage.detach().to(probs)
    offset = value.detach().to(probs) - (gradient * usage).sum()
    return ((probs.sum(0) * gradient).sum() + offset * probs.shape[0]) / num_units
