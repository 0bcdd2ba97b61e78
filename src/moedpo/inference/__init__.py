"""Inference: E-step posteriors, Pyro objectives, gate M-step and the VariationalEM loop."""

from moedpo.inference.em import SCHEDULES, VariationalEM, anneal_temperature
from moedpo.inference.estep import (
    latent_frames,
    map_assignment,
    marginal_nll,
    plate_nesting,
    posterior_marginals,
)
from moedpo.inference.objectives import em_loss, gate_cross_entropy, marginal_loss, relaxed_loss

__all__ = [
    "SCHEDULES",
    "VariationalEM",
    "anneal_temperature",
    "em_loss",
    "gate_cross_entropy",
    "latent_frames",
    "map_assignment",
    "marginal_loss",
    "marginal_nll",
    "plate_nesting",
    "posterior_marginals",
    "relaxed_loss",
]
