"""Tabular experts: pi_k(y|x) = softmax of a learnable table over a finite response set per prompt.

They let the whole EM run in seconds with no LLM, and their optimum has a closed form to test against
(SPEC §1): pi_k*(y|x) = pi_ref(y|x) exp(r_k(x, y) / beta) / Z_k(x).
"""

from __future__ import annotations

import torch
from torch import nn


def optimal_policy(ref_logits: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """Closed-form KL-regularised optimum pi_ref exp(r / beta) / Z over the last axis: (..., R) -> (..., R)."""
    return torch.softmax(torch.log_softmax(ref_logits, -1) + rewards / beta, -1)


class TabularExperts(nn.Module):
    """K tabular policies over P prompts x R responses, each with the shared reference ``ref_logits`` (P, R).

    Experts start at the reference plus distinct noise (``init_std``): a symmetric start never separates.
    """

    def __init__(self, ref_logits: torch.Tensor, num_experts: int, init_std: float = 0.5, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        ref = torch.log_softmax(ref_logits.double(), -1).float()
        self.register_buffer("ref_logps", ref)  # (P, R)
        noise = init_std * torch.randn((num_experts, *ref.shape), generator=generator)
        self.logits = nn.Parameter(ref.unsqueeze(0) + noise)  # (K, P, R)

    @property
    def num_experts(self) -> int:
        return self.logits.shape[0]

    def policies(self) -> torch.Tensor:
        """pi_k(y|x): (K, P, R)."""
        return torch.softmax(self.logits, -1)

    def margins(self, prompt, chosen: torch.Tensor | None = None, rejected: torch.Tensor | None = None):
        """DPO margins h (B, K) of pairs given as prompt, chosen and rejected response indices (B,), or as one
        object with those attributes (:class:`~moedpo.data.synthetic.TabularPairs`, what the EM loop passes)."""
        if chosen is None and hasattr(prompt, "ranking"):
            return {"h": self.completion_log_ratios(prompt.prompt, prompt.completions), "ranking": prompt.ranking}
        if chosen is None:
            prompt, chosen, rejected = prompt.prompt, prompt.chosen, prompt.rejected
        logps = self.log_ratios()
        return (logps[:, prompt, chosen] - logps[:, prompt, rejected]).T  # (B, K)

    def log_ratios(self) -> torch.Tensor:
        """log pi_k(y|x) - log pi_ref(y|x): (K, P, R)."""
        return torch.log_softmax(self.logits, -1) - self.ref_logps

    def completion_log_ratios(self, prompt: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """Each shown response's log-ratio per expert, (B, M, K), for prompt (B,) and responses ``completions``
        (B, M): the h of a Plackett–Luce model. (Objects with ``ranking``, :class:`TabularRankings`, given to
        :meth:`margins` return it with their rankings, which is what the EM loop passes.)"""
        return self.log_ratios()[:, prompt.unsqueeze(-1), completions].permute(1, 2, 0)
