"""Guides q(z | ...) for the latent BT models. Same signature as the models.

- :func:`empty_guide` — nothing sampled in the guide: the model enumerates z, so the ELBO is the exact
  marginal likelihood (Mix-DPO's exact E-step).
- :class:`AmortizedGuide` — an ``nn.Module`` from pair features to logits over experts, per pair or pooled over
  an annotator's pairs (q_phi(z | x, y+, y-), q_phi(z_u | D_u)), enumerated in parallel *in the guide*, so its
  ELBO is computed exactly; outside enumeration it draws z (sparse updates routed by the guide).
- :class:`RelaxedGuide` — Gumbel-Softmax z with a temperature; straight-through top-1 for sparse routing.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from moedpo.models.bt import ENUM


def empty_guide(*args, **kwargs):
    """No latent in the guide: use with a model whose z is enumerated (exact marginal likelihood)."""


class AmortizedGuide(nn.Module):
    """q_phi(z | x, y+, y-): the amortized E-step, from pair features that cost no expert forward.

    ``guide_features`` (B, 3D) are a pair's prompt, chosen and rejected features side by side (the bank gives
    the frozen base's pooled states). Each response is embedded with its prompt, e(x, y) = tanh(W LayerNorm([x, y])).
    A pair's evidence is antisymmetric, a_i = A (e(x, y+) - e(x, y-)): swapping chosen and rejected flips it, and
    what both responses share (length, topic) cancels. A latent unit's logits are the gate's (detached) prior
    logits, plus its pairs' summed evidence, plus a read-out of their mean embeddings:

        logits_u = g_u + sum_{i in u} a_i + b(mean_{i in u} [e(x, y+) - e(x, y-), e(x, y+) + e(x, y-)])

    Pair scope: each pair is its own unit (q(z_i | x_i, y+_i, y-_i)). User scope (``user_index`` (B,) given): the
    unit is an annotator, pooled over its pairs without regard to order (as VPL); the summed evidence mirrors the
    exact posterior, log w_k + sum_i log p(y_i | k), so confidence grows with the number of pairs, and an annotator
    with no pairs gets the prior (plus the read-out's bias). As a Pyro guide (the built-in models' signature) z is
    enumerated in parallel in the guide, so ``TraceEnum_ELBO`` computes its ELBO exactly; outside enumeration it
    draws z.
    """

    def __init__(self, in_dim: int, num_experts: int, hidden: int = 64):
        super().__init__()
        if in_dim % 3:
            raise ValueError(f"guide_features are [prompt, chosen, rejected] of equal width; got {in_dim} columns")
        self.width = in_dim // 3
        pair = 2 * self.width
        self.embed = nn.Sequential(nn.LayerNorm(pair, elementwise_affine=False), nn.Linear(pair, hidden), nn.Tanh())
        self.evidence = nn.Linear(2 * hidden, num_experts, bias=False)
        self.pooled = nn.Linear(2 * hidden, num_experts)
        for layer in (self.evidence, self.pooled):  # start at the prior: q = w
            nn.init.zeros_(layer.weight)
        nn.init.zeros_(self.pooled.bias)

    def logits(self, guide_features: torch.Tensor, gate_logits: torch.Tensor, user_index=None) -> torch.Tensor:
        """(B, K) in pair scope, (U, K) with ``user_index``; ``gate_logits`` are (B, K) or (U, K) to match."""
        f = guide_features.to(self.evidence.weight)
        prompt, chosen, rejected = f.split(self.width, -1)
        e_chosen = self.embed(torch.cat([prompt, chosen], -1))
        e_rejected = self.embed(torch.cat([prompt, rejected], -1))
        both = torch.cat([e_chosen - e_rejected, e_chosen + e_rejected], -1)  # (B, 2H): odd and even parts
        evidence = self.evidence(both)  # (B, K)
        prior = gate_logits.detach().to(evidence)
        if user_index is None:
            return prior + evidence + self.pooled(both)
        num_units = gate_logits.shape[0]
        user_index = user_index.to(evidence.device)
        summed = torch.zeros_like(prior).index_add(0, user_index, evidence)
        counts = torch.bincount(user_index, minlength=num_units).clamp_min(1).unsqueeze(-1).to(both)
        mean = both.new_zeros(num_units, both.shape[-1]).index_add(0, user_index, both) / counts
        return prior + summed + self.pooled(mean)

    def forward(
        self,
        h,
        gate_logits,
        beta,
        obs=None,
        *,
        guide_features,
        user_index=None,
        subsample_size=None,
        subsample=None,
        **_,
    ):
        logits = self.logits(guide_features, gate_logits, user_index)
        if user_index is None:
            plate = pyro.plate("pairs", h.shape[0], subsample_size=subsample_size, subsample=subsample)
        else:
            plate = pyro.plate(
                "users", gate_logits.shape[0], dim=-2, subsample_size=subsample_size, subsample=subsample
            )
        with plate as idx:
            unit_logits = logits[idx] if user_index is None else logits[idx].unsqueeze(-2)  # users sit at dim -2
            pyro.sample("z", dist.Categorical(logits=unit_logits), infer=ENUM)


class RelaxedGuide:
    """Gumbel-Softmax q(z): pairs (or users) draw z ~ RelaxedOneHotCategorical[StraightThrough](tau, logits).

    ``guide_logits`` (a batch keyword) gives log q; use the log of the exact posterior (detached) for
    stochastic EM, or an amortized network's logits. ``straight_through=True`` makes z one-hot in the
    forward pass (top-1 routing: only the chosen expert's margin enters the loss).
    """

    def __init__(self, straight_through: bool = True):
        self.straight_through = straight_through

    def __call__(self, h, gate_logits, beta, obs=None, *, temperature, guide_logits, user_index=None, **_):
        cls = dist.RelaxedOneHotCategoricalStraightThrough if self.straight_through else dist.RelaxedOneHotCategorical
        temperature = torch.as_tensor(temperature, dtype=h.dtype, device=h.device)
        name, size = ("pairs", h.shape[0]) if user_index is None else ("users", gate_logits.shape[0])
        with pyro.plate(name, size):
            pyro.sample("z", cls(temperature, logits=guide_logits))
