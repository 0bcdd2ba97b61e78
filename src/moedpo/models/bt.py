"""Latent-class Bradley–Terry models as Pyro programs over tensors (Mix-/MoE-DPO, arXiv 2510.08256).

A *latent preference model* is any Pyro function ``model(h, gate_logits, beta, obs=None, **batch)``:
``h`` (B, K) are the experts' DPO margins, ``gate_logits`` the gate's logits, ``obs`` (B,) is 1 where the
"chosen" response won (all ones for preference data; 0 flips a pair). Extra batch fields arrive as keyword
arguments; a model ignores the ones it does not use, so guides can take their own inputs (``features``...).
Models never see an LLM: the expert bank turns text into ``h``.

The latent ``z`` is marked for parallel enumeration, so ``TraceEnum_ELBO`` with an empty guide computes the
exact marginal likelihood, which :mod:`moedpo.losses` gives in closed form (the hand-written twin).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.ops.indexing import Vindex

from moedpo.losses.dpo import bernoulli_logits

ENUM = {"enumerate": "parallel"}


def mixture_bt_model(h, gate_logits, beta, obs=None, *, label_smoothing=0.0, subsample_size=None, subsample=None, **_):
    """Pair scope: each comparison i has its own type z_i ~ Categorical(softmax(gate_logits_i)).

    h, gate_logits: (B, K); obs: (B,) or None (then labels are sampled). Plate "pairs" (dim -1) subsamples when
    ``subsample_size`` (random) or ``subsample`` (given indices) is set; the ELBO is then rescaled to the batch.
    """
    num_pairs = h.shape[0]
    with pyro.plate("pairs", num_pairs, subsample_size=subsample_size, subsample=subsample) as idx:
        z = pyro.sample("z", dist.Categorical(logits=gate_logits[idx]), infer=ENUM)  # (B,) or (K, 1)
        logits = bernoulli_logits(Vindex(h[idx])[..., z], beta, label_smoothing)  # (B,) or (K, B)
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=None if obs is None else obs[idx])


mixture_bt_model.max_plate_nesting = 1


def user_slots(user_index: torch.Tensor, num_users: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay pairs out per user: returns ``slots`` (U, N) of pair indices and ``mask`` (U, N), N = most pairs."""
    counts = torch.bincount(user_index, minlength=num_users)  # (U,)
    order = torch.argsort(user_index, stable=True)  # pairs grouped by user
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(user_index.numel(), device=user_index.device) - starts[user_index[order]]
    width = max(int(counts.max()), 1) if num_users else 1
    slots = torch.zeros(num_users, width, dtype=torch.long, device=user_index.device)
    mask = torch.zeros(num_users, width, dtype=torch.bool, device=user_index.device)
    slots[user_index[order], position] = order
    mask[user_index[order], position] = True
    return slots, mask


def first_pairs(user_index: torch.Tensor, num_users: int) -> torch.Tensor:
    """The index of each user's first pair in the batch, (U,) (users without pairs get ``len(user_index)``)."""
    positions = torch.arange(user_index.numel(), device=user_index.device)
    empty = torch.full((num_users,), user_index.numel(), dtype=torch.long, device=user_index.device)
    return empty.scatter_reduce(0, user_index, positions, reduce="amin")


def user_bt_model(
    h, gate_logits, beta, obs=None, *, user_index, label_smoothing=0.0, subsample_size=None, subsample=None, **_
):
    """User scope: user u has one type z_u ~ Categorical(softmax(gate_logits_u)) shared by all its pairs.

    h: (B, K); gate_logits: (U, K); user_index: (B,) long in [0, U). Pairs are laid out (U, N) with a mask so
    the pair plate nests inside the user plate and enumeration stays exact:
    P(D_u) = sum_k w_uk prod_i sigmoid(beta h_ik). Plate "users" (dim -2) subsamples users.
    """
    num_users = gate_logits.shape[0]
    slots, mask = user_slots(user_index, num_users)  # (U, N)
    if obs is None:
        obs_u = None
    else:
        obs_u = obs[slots]
    plate = pyro.plate("users", num_users, dim=-2, subsample_size=subsample_size, subsample=subsample)
    with plate as users:
        z = pyro.sample("z", dist.Categorical(logits=gate_logits[users].unsqueeze(-2)), infer=ENUM)
        with pyro.plate("user_pairs", slots.shape[1], dim=-1):
            logits = bernoulli_logits(Vindex(h[slots[users]])[..., z], beta, label_smoothing)  # (U,N) | (K,U,N)
            pyro.sample(
                "y",
                dist.Bernoulli(logits=logits).mask(mask[users]),
                obs=None if obs_u is None else obs_u[users],
            )


user_bt_model.max_plate_nesting = 2


def relaxed_bt_model(
    h, gate_logits, beta, obs=None, *, temperature, user_index=None, label_smoothing=0.0, discrete_prior=True, **_
):
    """The Monte Carlo route: z is a (straight-through) Gumbel-Softmax one-hot.

    With a hard one-hot z the likelihood is exactly sigmoid(beta h_z); gradients reach the chosen expert
    only (sparse MoE-DPO). Pair scope when ``user_index`` is None, else one z per user (gate_logits (U, K)).
    ``discrete_prior`` scores z's prior as log w_argmax(z) (a cross-entropy, bounded like the EM M-step) rather
    than with the Concrete density, whose gradient in the gate grows as the temperature falls and, under global
    gradient clipping, starves the experts.
    """
    temperature = torch.as_tensor(temperature, dtype=h.dtype, device=h.device)
    prior = dist.RelaxedOneHotCategoricalStraightThrough(temperature, logits=gate_logits)
    units = pyro.plate("pairs", h.shape[0]) if user_index is None else pyro.plate("users", gate_logits.shape[0])
    with units:
        with poutine.mask(mask=not discrete_prior):
            z = pyro.sample("z", prior)  # (B | U, K) one-hot forward, relaxed backward
        if discrete_prior:
            pyro.factor("z_prior", dist.Categorical(logits=gate_logits).log_prob(z.argmax(-1)))
        if user_index is None:  # pair scope: the labels sit in the same plate
            _relaxed_labels(z, h, beta, obs, label_smoothing)
            return
    with pyro.plate("pairs", h.shape[0]):
        _relaxed_labels(z[user_index], h, beta, obs, label_smoothing)


def _relaxed_labels(z, h, beta, obs, label_smoothing):
    logits = bernoulli_logits((z * h).sum(-1), beta, label_smoothing)  # (B,): h of the one-hot z's expert
    pyro.sample("y", dist.Bernoulli(logits=logits), obs=obs)


relaxed_bt_model.max_plate_nesting = 1
