"""E-step: the exact posterior of any latent preference model, by differentiating Pyro's enumerated evidence.

A latent preference model is any Pyro program with discrete latents marked for enumeration (see
:mod:`moedpo.models.bt`). Its joint is a product of factors, one per sample site (latent or observed); each
factor's log-probability is a tensor over the site's plates and the enumerated values of the latents it reads.
Adding a zero *tilt* t_s to every factor and differentiating the evidence gives, for each factor, the
posterior marginal of exactly the latents it reads (its clique):

    d log p(obs) / d t_s = scale_s * P(latents in factor s | obs)

From these clique marginals :func:`posterior` returns

- ``marginals``: each latent site's own posterior, (plate dims..., K) — the responsibilities;
- ``factors``: every site's clique posterior, shaped like its enumerated log-probability;
- ``log_evidence``: log p(obs), summed over the batch.

:func:`expected_log_joint` is the EM M-step objective E_q[log p(obs, z; theta)] with q the clique marginals
(exact for nested latents, e.g. a user-level type and a pair-level expert, where products of per-site
marginals would not be). Under a subsampled plate the scale N/b multiplies both the tilt gradient and the
factor; the marginals are divided by it. :func:`sample_posterior` draws one joint assignment of the latents
(``infer_discrete``), for sparse top-1 updates. (``TraceEnum_ELBO.compute_marginals`` fails on plates of size
one, a batch of one pair or one user, and gives no clique marginals; this route has neither problem.)
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceEnum_ELBO, config_enumerate, infer_discrete
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from moedpo.losses.dpo import log_likelihood
from moedpo.models.guides import empty_guide


def plate_nesting(model, max_plate_nesting: int | None) -> int:
    """The model's ``max_plate_nesting``: given, or the attribute the built-in models carry."""
    value = max_plate_nesting if max_plate_nesting is not None else getattr(model, "max_plate_nesting", None)
    if value is None:
        raise ValueError(
            f"pass max_plate_nesting for {getattr(model, '__name__', model)!r}: the number of nested plates "
            "its sample sites sit in (1 for one 'pairs' plate, 2 for users x pairs), or set "
            "`model.max_plate_nesting = N` on the function"
        )
    return value


@dataclass
class Posterior:
    """The exact posterior of one batch under a latent preference model (everything detached)."""

    marginals: dict[str, torch.Tensor]  # latent site -> (plate dims..., K)
    factors: dict[str, torch.Tensor]  # every sample site -> clique marginal, shaped like its log_prob
    log_evidence: torch.Tensor  # scalar: log p(obs) of the batch
    entropy: torch.Tensor  # scalar: H(q) = log p(obs) - E_q[log p(obs, z)] (the ELBO's entropy term)


def _enumerated(model, nesting: int):
    return poutine.enum(config_enumerate(model), first_available_dim=-nesting - 1)


def _trace(model, nesting: int, args, kwargs) -> pyro.poutine.Trace:
    trace = poutine.trace(_enumerated(model, nesting)).get_trace(*args, **kwargs)
    trace.compute_log_prob()
    return trace


def _sample_sites(trace) -> dict:
    return {
        name: site for name, site in trace.nodes.items() if site["type"] == "sample" and not site_is_subsample(site)
    }


def _is_latent(site) -> bool:
    return not site["is_observed"] and site["infer"].get("_enumerate_dim") is not None


def posterior(model, *args, max_plate_nesting: int | None = None, **kwargs) -> Posterior:
    """Exact posterior (clique and per-site marginals) and log evidence of a batch; see the module docstring."""
    nesting = plate_nesting(model, max_plate_nesting)
    args, kwargs = _detached(args), _detached(kwargs)
    with torch.no_grad():
        sites = _sample_sites(_trace(model, nesting, args, kwargs))
    latent = {name: site for name, site in sites.items() if _is_latent(site)}
    if not latent or all(site["value"].shape[site["infer"]["_enumerate_dim"]] == 1 for site in latent.values()):
        return _trivial_posterior(sites, latent, nesting)  # nothing to enumerate (e.g. K = 1)
    tilts = {name: torch.zeros_like(site["unscaled_log_prob"], requires_grad=True) for name, site in sites.items()}
    with torch.enable_grad():
        nll = TraceEnum_ELBO(max_plate_nesting=nesting).differentiable_loss(
            _Tilt(tilts)(config_enumerate(model)), empty_guide, *args, **kwargs
        )
        grads = torch.autograd.grad(nll, list(tilts.values()), allow_unused=True)
    factors = {}
    for (name, site), grad in zip(sites.items(), grads):
        grad = torch.zeros_like(tilts[name]) if grad is None else grad
        factors[name] = (-grad / _scale(site)).clamp(0, 1)
    marginals = {name: _own_marginal(factors[name], site, nesting) for name, site in latent.items()}
    log_evidence = -nll.detach()
    expected = sum((factors[name] * site["log_prob"]).sum() for name, site in sites.items())
    return Posterior(marginals, factors, log_evidence, log_evidence - expected)


def _trivial_posterior(sites, latent, nesting) -> Posterior:
    factors = {name: torch.ones_like(site["unscaled_log_prob"]) for name, site in sites.items()}
    marginals = {name: _own_marginal(factors[name], site, nesting) for name, site in latent.items()}
    log_evidence = sum(site["log_prob"].sum() for site in sites.values()).detach()
    return Posterior(marginals, factors, log_evidence, torch.zeros_like(log_evidence))


def _scale(site):
    scale = site["scale"]
    return scale if isinstance(scale, torch.Tensor) else float(scale)


def _own_marginal(clique: torch.Tensor, site, nesting: int) -> torch.Tensor:
    """A latent site's own posterior from its clique marginal: sum out the other latents -> (plates..., K)."""
    own = site["infer"]["_enumerate_dim"]
    others = [d for d in range(-clique.dim(), -nesting) if d != own]
    if others:
        clique = clique.sum(others, keepdim=True)
    clique = clique.movedim(own, -1)
    return clique.reshape(clique.shape[clique.dim() - nesting - 1 :])


class _Tilted(TorchDistribution):
    """``base`` with ``tilt`` added to its log-probability (the tilt is zero: only its gradient is used)."""

    arg_constraints: dict = {}

    def __init__(self, base, tilt: torch.Tensor):
        self.base, self.tilt = base, tilt
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    @property
    def has_enumerate_support(self):
        return self.base.has_enumerate_support

    def enumerate_support(self, expand: bool = True):
        return self.base.enumerate_support(expand=expand)

    def sample(self, sample_shape=()):
        return self.base.sample(sample_shape)

    def log_prob(self, value):
        return self.base.log_prob(value) + self.tilt


class _Tilt(Messenger):
    """Adds a tensor to the log-probability of the named sample sites."""

    def __init__(self, tilts: dict[str, torch.Tensor]):
        super().__init__()
        self.tilts = tilts

    def _pyro_sample(self, msg):
        tilt = self.tilts.get(msg["name"])
        if tilt is not None:
            msg["fn"] = _Tilted(msg["fn"], tilt)


def expected_log_joint(model, post: Posterior, *args, max_plate_nesting: int | None = None, **kwargs):
    """E_q[log p(obs, z)] under the posterior's clique marginals (a scalar with a graph to the inputs).

    Its gradient equals the gradient of log p(obs) where ``post`` was computed (Fisher's identity); with
    ``post`` held fixed over several updates it is the EM M-step objective.
    """
    return _expected_log_joint(model, post, args, kwargs, plate_nesting(model, max_plate_nesting), scaled=True)


def _expected_log_joint(model, post: Posterior, args, kwargs, nesting: int, scaled: bool):
    """sum_s sum q_s log p_s, each site's log p with its plates' scale N/b (``scaled``: the M-step objective) or
    without it (its derivatives are then the posterior's own, whatever the subsample). Masks apply either way."""
    sites = _sample_sites(_trace(model, nesting, args, kwargs))
    missing = set(post.factors) ^ set(sites)
    if missing:
        raise ValueError(f"the model's sample sites changed since the E-step: {sorted(missing)}")
    return sum((post.factors[name] * _log_prob(site, scaled)).sum() for name, site in sites.items())


def _log_prob(site, scaled: bool) -> torch.Tensor:
    return site["log_prob"] if scaled else scale_and_mask(site["unscaled_log_prob"], mask=site["mask"])


def sample_posterior(model, *args, max_plate_nesting: int | None = None, **kwargs) -> dict[str, torch.Tensor]:
    """One joint draw of every latent site from its exact posterior (forward filter, backward sample)."""
    nesting = plate_nesting(model, max_plate_nesting)
    sampler = infer_discrete(  # latents with one value (K = 1) need no enumeration: no warning for them
        config_enumerate(model), first_available_dim=-nesting - 1, temperature=1, strict_enumeration_warning=False
    )
    args, kwargs = _detached(args), _detached(kwargs)
    with torch.no_grad():
        trace = poutine.trace(sampler).get_trace(*args, **kwargs)
    return {name: site["value"] for name, site in _sample_sites(trace).items() if not site["is_observed"]}


def log_joint(model, values: dict[str, torch.Tensor], *args, max_plate_nesting: int | None = None, **kwargs):
    """log p(obs, z = values): the model with its latents fixed to ``values`` (a scalar with a graph)."""
    trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args, **kwargs)
    return trace.log_prob_sum()


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


def guide_kl(model, guide, *args, max_plate_nesting: int | None = None, **kwargs) -> float:
    """KL(q || exact posterior) of an enumerable guide, summed over the batch: log p(obs) - ELBO(q) (a float)."""
    elbo = TraceEnum_ELBO(max_plate_nesting=plate_nesting(model, max_plate_nesting))
    with torch.no_grad(), pyro.validation_enabled(False):
        negative_elbo = elbo.loss(model, guide, *args, **kwargs)
    return negative_elbo - marginal_nll(model, *args, max_plate_nesting=max_plate_nesting, **kwargs)


def posterior_marginals(model, *args, max_plate_nesting: int | None = None, **kwargs) -> dict[str, torch.Tensor]:
    """Each latent site's exact posterior, (plate dims..., K): ``posterior(...).marginals``."""
    return posterior(model, *args, max_plate_nesting=max_plate_nesting, **kwargs).marginals


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_detached(v) for v in value)
    return value


@dataclass
class EStep:
    """What the E-step knows about one micro-batch (detached)."""

    post: Posterior
    gate_q: torch.Tensor  # (units, K): posterior of the latent whose prior is the gate
    pair_q: torch.Tensor  # (B, K): responsibilities, P(expert k labelled pair i | data)
    draw: dict | None = None  # gumbel: one posterior draw of the latents (moedpo.inference.draws)


def e_step(model, args, kwargs, beta: float, label_smoothing: float, nesting: int) -> EStep:
    """Exact posterior of a batch; responsibilities and the gate latent's posterior by differentiating E_q[log p].

    ``args`` = (h, gate_logits, beta, obs). dE/dh_ik = r_ik * s_ik, with s_ik = d log p(y_i | expert k) / dh_ik,
    gives the responsibilities r; for rankings h_i is (M, K) and s_i the gradient of the row's Plackett–Luce
    log-likelihood, so r_ik = <dE/dh_ik, s_ik> / <s_ik, s_ik> over the M completions. The row likelihood is the
    model's ``row_log_likelihood(h, beta, obs, **kwargs)`` (B, K) where it has one, else the BT link.
    dE/dg_uk = q_uk - w_uk (g: logits of a categorical prior) gives the gate latent's q.
    Used by training, evaluation and routing alike. The log joint is taken without the plates' scale: under a
    subsampled plate (``subsample`` / ``subsample_size``) N/b would multiply both derivatives, and the q's with
    them; rows outside the subsample get r = 0 and the gate's prior.
    """
    post = posterior(model, *args, max_plate_nesting=nesting, **kwargs)
    h, g = (a.detach().double().requires_grad_(True) for a in args[:2])
    obs = args[3].double() if args[3].is_floating_point() else args[3]  # rankings stay indices
    with torch.enable_grad():
        expected = _expected_log_joint(model, _cast(post), (h, g, args[2], obs), kwargs, nesting, scaled=False)
        dh, dg = torch.autograd.grad(expected, [h, g], allow_unused=True)
        slope = torch.autograd.grad(_row_log_likelihood(model, h, beta, obs, label_smoothing, kwargs).sum(), h)[0]
    events = tuple(range(1, h.dim() - 1))  # rankings: the completions axis; pairs: none
    dh = 0 * h if dh is None else dh
    norm = (slope * slope).sum(events) if events else slope * slope
    along = (dh * slope).sum(events) if events else dh * slope
    pair_q = torch.where(norm > 0, along / norm.clamp_min(1e-300), 0.0)  # (B, K)
    gate_q = torch.softmax(g, -1) + (dg if dg is not None else 0.0)
    dtype = args[0].dtype
    return EStep(post, gate_q.detach().clamp(0, 1).to(dtype), pair_q.detach().clamp(0, 1).to(dtype))


def _row_log_likelihood(model, h, beta, obs, label_smoothing, kwargs) -> torch.Tensor:
    rows = getattr(model, "row_log_likelihood", None)
    if rows is None:
        return log_likelihood(h, beta, label_smoothing)
    return rows(h, beta, obs, **kwargs)


def _cast(post: Posterior) -> Posterior:
    factors = {k: v.double() for k, v in post.factors.items()}
    return Posterior(post.marginals, factors, post.log_evidence, post.entropy)
