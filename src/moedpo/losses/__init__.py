"""Pure tensor math of Mix-/MoE-DPO: margins, DPO variants, mixtures over pairs and rankings, posteriors, ELBO."""

from moedpo.losses.anticollapse import load_balance_loss, usage_entropy_penalty
from moedpo.losses.dpo import LOSS_TYPES, bernoulli_logits, dpo_loss, log_likelihood, margins
from moedpo.losses.mixture import (
    component_log_likelihood,
    elbo,
    mixture_nll,
    mixture_reward,
    responsibilities,
    user_mixture_nll,
    user_responsibilities,
    weighted_dpo_loss,
)
from moedpo.losses.rankings import (
    pairwise_margins,
    plackett_luce_log_prob,
    ranking_component_log_likelihood,
    ranking_log_likelihood,
    ranking_mixture_nll,
    ranking_pairs,
    ranking_responsibilities,
)

__all__ = [
    "LOSS_TYPES",
    "bernoulli_logits",
    "component_log_likelihood",
    "dpo_loss",
    "elbo",
    "load_balance_loss",
    "log_likelihood",
    "margins",
    "mixture_nll",
    "mixture_reward",
    "pairwise_margins",
    "plackett_luce_log_prob",
    "ranking_component_log_likelihood",
    "ranking_log_likelihood",
    "ranking_mixture_nll",
    "ranking_pairs",
    "ranking_responsibilities",
    "responsibilities",
    "usage_entropy_penalty",
    "user_mixture_nll",
    "user_responsibilities",
    "weighted_dpo_loss",
]
