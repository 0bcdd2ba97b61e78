"""A user's own latent preference model, trained by ``moedpo train`` without editing the library.

Hierarchical types: annotator u has a type g_u ~ Categorical(w_u) (the gate's logits, one row per annotator);
each of u's comparisons is labelled by expert z_i ~ Categorical(T[g_u]), where T keeps the annotator's own
expert with probability ``stickiness`` and spreads the rest evenly (an annotator sometimes judges like another
type). ``stickiness = 1`` is moedpo's ``user_bt_model``; ``1/K`` makes the pairs independent (``mixture_bt_model``
with a shared prior). Two discrete latents, nested: ``moedpo.inference.posterior`` gives each its exact
posterior, and the EM M-step uses the joint (clique) posterior of (g_u, z_i).

    moedpo train --config examples/configs/hierarchical.yaml
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex

from moedpo.losses import bernoulli_logits
from moedpo.models import user_slots

ENUM = {"enumerate": "parallel"}


def transition_logits(num_experts: int, stickiness: float, dtype=torch.float32) -> torch.Tensor:
    """log T (K, K): T[g, g] = stickiness, T[g, k != g] = (1 - stickiness) / (K - 1)."""
    if num_experts == 1:
        return torch.zeros(1, 1, dtype=dtype)
    off = (1 - stickiness) / (num_experts - 1)
    table = torch.full((num_experts, num_experts), off, dtype=dtype)
    table.fill_diagonal_(stickiness)
    return table.clamp_min(1e-12).log()


def hierarchical_bt_model(h, gate_logits, beta, obs=None, *, user_index, stickiness=0.9, label_smoothing=0.0, **_):
    """h (B, K) margins; gate_logits (U, K) per annotator; user_index (B,) in [0, U).

    Pairs are laid out per annotator, (U, N) with a mask (``user_slots``), so the pair plate nests inside the
    annotator plate and both latents enumerate exactly.
    """
    num_users, num_experts = gate_logits.shape
    slots, mask = user_slots(user_index, num_users)  # (U, N)
    log_t = transition_logits(num_experts, stickiness, h.dtype).to(h.device)  # (K, K)
    with pyro.plate("users", num_users, dim=-2):
        group = pyro.sample("group", dist.Categorical(logits=gate_logits.unsqueeze(-2)), infer=ENUM)  # (U, 1)
        with pyro.plate("user_pairs", slots.shape[1], dim=-1):
            z = pyro.sample("z", dist.Categorical(logits=log_t[group]), infer=ENUM)  # (U, N); padding: no effect
            logits = bernoulli_logits(Vindex(h[slots])[..., z], beta, label_smoothing)  # (U, N) | (K, 1, U, N)
            pyro.sample("y", dist.Bernoulli(logits=logits).mask(mask), obs=None if obs is None else obs[slots])


hierarchical_bt_model.max_plate_nesting = 2
