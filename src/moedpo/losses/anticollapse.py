"""Regularisers that keep a mixture from collapsing onto one expert (SPEC §1 "Relaxation").

Both act on gate logits (B, K) and return a scalar to *add* to the loss, scaled by the caller.
"""

from __future__ import annotations

import torch
from torch.special import xlogy


def load_balance_loss(gate_logits: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance term K * sum_k f_k P_k (=1 when balanced; top-1 fractions f, mean probs P)."""
    probs = torch.softmax(gate_logits, -1)  # (B, K)
    num_experts = probs.shape[-1]
    fractions = torch.nn.functional.one_hot(probs.argmax(-1), num_experts).to(probs.dtype).mean(0)
    return num_experts * (fractions * probs.mean(0)).sum()


def usage_entropy_penalty(gate_logits: torch.Tensor) -> torch.Tensor:
    """-H(mean_b w_b): minimising it spreads the average gate over the experts."""
    usage = torch.softmax(gate_logits, -1).mean(0)  # (K,)
    return xlogy(usage, usage).sum()
