"""Public hypothesis strategies and checks for latent preference models (yours and ours)."""

from moedpo.testing import strategies
from moedpo.testing.checks import (
    check_matches_closed_form,
    check_normalisation,
    check_posterior_by_enumeration,
    check_single_expert_is_dpo,
    check_swap_symmetry,
)

__all__ = [
    "check_matches_closed_form",
    "check_normalisation",
    "check_posterior_by_enumeration",
    "check_single_expert_is_dpo",
    "check_swap_symmetry",
    "strategies",
]
