"""E-step: the posterior over experts, in closed form or from any latent preference model via Pyro.

For the built-in models the exact posterior is :func:`moedpo.losses.responsibilities` (pair scope) or
:func:`moedpo.losses.user_responsibilities` (user scope). For any model, :func:`posterior_marginals` gets
the exact marginals from Pyro's enumerated likelihood by differentiation: tilting a latent's logits by t,
d log p(obs) / d t = q_posterior - p_prior at t = 0. (``TraceEnum_ELBO.compute_marginals`` does the same
contraction but fails on plates of size one, i.e. a batch of one pair or one user.) :func:`map_assignment`
runs ``infer_discrete``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate, infer_discrete
from pyro.poutine.messenger import Messenger

from moedpo.models.guides import empty_guide


def plate_nesting(model, max_plate_nesting: int | None) -> int:
    """The model's ``max_plate_nesting``: given, or the attribute the built-in models carry."""
    value = max_plate_nesting if max_plate_nesting is not None else getattr(model, "max_plate_nesting", None)
    if value is None:
        raise ValueError(
            f"pass max_plate_nesting for {getattr(model, '__name__', model)!r}: the number of nested plates "
            "its sample sites sit in (1 for one 'pairs' plate, 2 for users x pairs)"
        )
    return value


def _latent_sites(model, args, kwargs, max_plate_nesting: int) -> dict:
    """Trace ``model`` with enumeration; return its enumerated sample sites by name."""
    enum_model = poutine.enum(config_enumerate(model), first_available_dim=-max_plate_nesting - 1)
    with torch.no_grad():
        trace = poutine.trace(enum_model).get_trace(*args, **kwargs)
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and site["infer"].get("enumerate")
    }


def latent_frames(model, args, kwargs, max_plate_nesting: int) -> dict[str, list[tuple[str, int, int]]]:
    """The enumerated (discrete latent) sites of ``model`` and the plates (name, size, dim) each sits in."""
    sites = _latent_sites(model, args, kwargs, max_plate_nesting)
    return {
        name: [(f.name, f.size, f.dim) for f in site["cond_indep_stack"] if f.vectorized]
        for name, site in sites.items()
    }


def posterior_marginals(model, *args, max_plate_nesting: int | None = None, **kwargs) -> dict[str, torch.Tensor]:
    """Exact posterior marginals of every enumerated latent site: {name: probabilities (batch..., K)}, detached.

    A model whose latents all have one value (K = 1) has the trivial posterior 1 (Pyro cannot contract it).
    """
    nesting = plate_nesting(model, max_plate_nesting)
    sites = _latent_sites(model, args, kwargs, nesting)
    priors = {name: site["fn"].probs.detach() for name, site in sites.items()}
    if all(p.shape[-1] == 1 for p in priors.values()):
        return priors
    args, kwargs = _detached(args), _detached(kwargs)
    tilts = {name: torch.zeros_like(p, requires_grad=True) for name, p in priors.items()}
    elbo = TraceEnum_ELBO(max_plate_nesting=nesting)
    with torch.enable_grad():
        nll = elbo.differentiable_loss(_Tilt(tilts)(model), empty_guide, *args, **kwargs)
        grads = torch.autograd.grad(nll, list(tilts.values()))
    return {name: (priors[name] - g).clamp(0, 1) for name, g in zip(tilts, grads)}


class _Tilt(Messenger):
    """Adds a tensor to the logits of the named categorical sample sites."""

    def __init__(self, tilts: dict[str, torch.Tensor]):
        super().__init__()
        self.tilts = tilts

    def _pyro_sample(self, msg):
        tilt = self.tilts.get(msg["name"])
        if tilt is not None and not msg["is_observed"]:
            msg["fn"] = dist.Categorical(logits=msg["fn"].logits + tilt)


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_detached(v) for v in value)
    return value


def map_assignment(model, *args, max_plate_nesting: int | None = None, site: str = "z", **kwargs) -> torch.Tensor:
    """Most probable joint assignment of the latent ``site`` (``infer_discrete`` with temperature 0)."""
    nesting = plate_nesting(model, max_plate_nesting)
    decoder = infer_discrete(config_enumerate(model), first_available_dim=-nesting - 1, temperature=0)
    with torch.no_grad():
        trace = poutine.trace(decoder).get_trace(*args, **kwargs)
    return trace.nodes[site]["value"]


def marginal_nll(model, *args, max_plate_nesting: int | None = None, **kwargs) -> float:
    """-log p(obs) of a batch, latents summed out by enumeration (a float, no gradient)."""
    elbo = TraceEnum_ELBO(max_plate_nesting=plate_nesting(model, max_plate_nesting))
    with torch.no_grad(), pyro.validation_enabled(False):
        return float(elbo.loss(model, empty_guide, *args, **kwargs))
