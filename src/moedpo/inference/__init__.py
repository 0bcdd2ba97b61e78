"""Inference: the exact E-step of any latent preference model, Pyro objectives and the VariationalEM loop."""

from moedpo.inference.em import SCHEDULES, VariationalEM
from moedpo.inference.estep import (
    EStep,
    Posterior,
    e_step,
    expected_log_joint,
    guide_kl,
    log_joint,
    map_assignment,
    marginal_nll,
    plate_nesting,
    posterior,
    posterior_marginals,
    sample_posterior,
)
from moedpo.inference.objectives import (
    draw_from_guide,
    em_loss,
    gate_cross_entropy,
    marginal_loss,
    relaxed_loss,
    routed_loss,
    sampled_loss,
)

__all__ = [
    "SCHEDULES",
    "EStep",
    "Posterior",
    "VariationalEM",
    "draw_from_guide",
    "e_step",
    "em_loss",
    "expected_log_joint",
    "gate_cross_entropy",
    "guide_kl",
    "log_joint",
    "map_assignment",
    "marginal_loss",
    "marginal_nll",
    "plate_nesting",
    "posterior",
    "posterior_marginals",
    "relaxed_loss",
    "routed_loss",
    "sample_posterior",
    "sampled_loss",
]
