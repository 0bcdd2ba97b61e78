"""The anti-collapse penalties of one M-step update, over the whole step (every micro-batch and process).

Load balance and usage entropy are functions of the step's mean gate P_bar (and top-1 fractions f_bar), so a
micro-batch cannot compute them from its own units. :func:`gate_penalty` sums the gate's statistics over all of
them (across processes through ``sync.sum``) and returns what each micro-batch needs to add its exact share
(:func:`moedpo.losses.anticollapse.penalty_share`): one batch or any split gives weight * Phi(P_bar) and its
gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moedpo.losses.anticollapse import (
    load_balance_gradient,
    load_balance_value,
    penalty_share,
    usage_entropy_gradient,
    usage_entropy_value,
)


@dataclass
class GatePenalty:
    """weight-summed Phi(P_bar) and dPhi/dP_bar of the step's mean gate ``usage`` = P_bar over ``num_units``."""

    usage: torch.Tensor  # (K,) float64
    value: torch.Tensor  # () float64
    gradient: torch.Tensor  # (K,) float64
    num_units: float

    def share(self, gate_logits: torch.Tensor) -> torch.Tensor:
        """The share of the penalty of one micro-batch's latent units, logits (units, K) -> scalar with a graph."""
        probs = torch.softmax(gate_logits.reshape(-1, gate_logits.shape[-1]), -1)  # (units, K)
        return penalty_share(probs, self.usage, self.value, self.gradient, self.num_units)


def gate_penalty(
    logits: list[torch.Tensor],
    load_balance: float,
    usage_entropy: float,
    num_experts: int,
    device: torch.device,
    sync=None,
) -> GatePenalty:
    """The penalties at the mean over every unit of ``logits`` (one (units, K) tensor per micro-batch, no graph
    needed; a process may have none) and, with ``sync``, of every process's (summed on ``device``)."""
    rows = [torch.softmax(g.detach().to(device, torch.float64).reshape(-1, num_experts), -1) for g in logits]
    probs = sum((p.sum(0) for p in rows), torch.zeros(num_experts, dtype=torch.float64, device=device))
    top1 = sum(
        (torch.nn.functional.one_hot(p.argmax(-1), num_experts).double().sum(0) for p in rows),
        torch.zeros(num_experts, dtype=torch.float64, device=device),
    )
    count = torch.tensor(float(sum(p.shape[0] for p in rows)), dtype=torch.float64, device=device)
    if sync is not None:
        probs, top1, count = sync.sum(probs), sync.sum(top1), sync.sum(count)
    usage, fractions = probs / count, top1 / count
    value, gradient = torch.zeros((), dtype=torch.float64, device=device), torch.zeros_like(usage)
    if load_balance:
        value = value + load_balance * load_balance_value(usage, fractions)
        gradient = gradient + load_balance * load_balance_gradient(fractions)
    if usage_entropy:
        value = value + usage_entropy * usage_entropy_value(usage)
        gradient = gradient + usage_entropy * usage_entropy_gradient(usage)
    return GatePenalty(usage, value, gradient, float(count))
