"""Training objectives as differentiable Pyro losses (a plain torch optimizer steps them; never PyroOptim).

- :func:`marginal_loss` — exact -log p(obs) by enumerating z in the model (``svi`` schedule, no guide), or
  the negative ELBO of an enumerated guide (``svi`` with :class:`~moedpo.models.AmortizedGuide`).
- :func:`em_loss` — the M-step objective -E_q[log p(obs, z)] - H(q) with q the fixed E-step posterior (its
  clique marginals, so nested latents are exact). Its gradient is the weighted DPO loss of the experts plus
  the gate's cross-entropy to q.
- :func:`sampled_loss` — -log p(obs, z) at one posterior draw of z (``gumbel``: sparse top-1 updates).
- :func:`relaxed_loss` — the Gumbel-Softmax Monte Carlo ELBO (for relaxed models and guides).
- :func:`gate_cross_entropy` — -sum_k q_k log w_k, the gate M-step for networks.
"""

from __future__ import annotations

import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from moedpo.inference.estep import Posterior, expected_log_joint, log_joint, plate_nesting, posterior
from moedpo.models.guides import empty_guide


def marginal_loss(model, guide=None, *args, max_plate_nesting: int | None = None, **kwargs) -> torch.Tensor:
    """Negative (exact, enumerated) ELBO summed over the batch; equals -log p(obs) when ``guide`` is None.

    Something must require grad (Pyro refuses a constant); for a plain number use
    :func:`moedpo.inference.marginal_nll`.
    """
    elbo = TraceEnum_ELBO(max_plate_nesting=plate_nesting(model, max_plate_nesting))
    return elbo.differentiable_loss(model, guide or empty_guide, *args, **kwargs)


def em_loss(
    model, *args, max_plate_nesting: int | None = None, post: Posterior | None = None, **kwargs
) -> tuple[torch.Tensor, Posterior]:
    """M-step loss under the E-step posterior, shifted by H(q) so that it equals -log p(obs) where q was
    computed. Returns (loss, posterior); pass ``post`` to reuse an E-step over several updates."""
    nesting = plate_nesting(model, max_plate_nesting)
    if post is None:
        post = posterior(model, *args, max_plate_nesting=nesting, **kwargs)
    expected = expected_log_joint(model, post, *args, max_plate_nesting=nesting, **kwargs)
    return -(expected + post.entropy), post


def sampled_loss(model, values: dict, *args, max_plate_nesting: int | None = None, **kwargs) -> torch.Tensor:
    """-log p(obs, z = values): stochastic EM with one exact posterior draw (only the drawn experts learn)."""
    return -log_joint(model, values, *args, max_plate_nesting=max_plate_nesting, **kwargs)


def relaxed_loss(model, guide, *args, num_particles: int = 1, **kwargs) -> torch.Tensor:
    """Reparameterised Monte Carlo negative ELBO (Gumbel-Softmax z): model/guide with the same signature."""
    nesting = plate_nesting(model, kwargs.pop("max_plate_nesting", None))
    elbo = Trace_ELBO(num_particles=num_particles, max_plate_nesting=nesting, vectorize_particles=False)
    return elbo.differentiable_loss(model, guide, *args, **kwargs)


def gate_cross_entropy(gate_logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """-sum_k q_k log softmax(g)_k: (N, K), (N, K) -> (N,). Minimised by softmax(g) = q."""
    return -(q.detach() * torch.log_softmax(gate_logits, -1)).sum(-1)
