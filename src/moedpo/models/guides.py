"""Guides q(z | ...) for the latent BT models. Same signature as the models.

- :func:`empty_guide` — nothing sampled in the guide: the model enumerates z, so the ELBO is the exact
  marginal likelihood (Mix-DPO's exact E-step).
- :class:`AmortizedGuide` — an ``nn.Module`` from pair or user features to logits over experts
  (q_phi(z | x, y+, y-, u)), enumerated in parallel *in the guide*, so its ELBO is computed exactly.
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


def _unit_plate(h, user_index, num_users, subsample_size):
    if user_index is None:
        return pyro.plate("pairs", h.shape[0], subsample_size=subsample_size), False
    return pyro.plate("users", num_users, dim=-2, subsample_size=subsample_size), True


class AmortizedGuide(nn.Module):
    """q_phi(z | features): ``net`` maps features (B, D) — or (U, D) per user in user scope — to logits (., K).

    The guide reads ``features`` from the batch keyword arguments. Pair scope matches
    :func:`~moedpo.models.mixture_bt_model`; pass ``user_index`` for :func:`~moedpo.models.user_bt_model`.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)  # (B, K) or (U, K)

    def forward(self, h, gate_logits, beta, obs=None, *, features, user_index=None, subsample_size=None, **_):
        plate, per_user = _unit_plate(h, user_index, gate_logits.shape[0], subsample_size)
        with plate as idx:
            logits = self.logits(features[idx])
            if per_user:
                logits = logits.unsqueeze(-2)  # (U, 1, K) to sit in the user plate at dim -2
            pyro.sample("z", dist.Categorical(logits=logits), infer=ENUM)


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
