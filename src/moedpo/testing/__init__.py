"""Public hypothesis strategies and checks for latent preference models (yours and ours).

The checks need only torch and Pyro. ``moedpo.testing.strategies`` needs hypothesis, an optional dependency
(``pip install 'moedpo[testing]'``), so it is imported on first use, not here.
"""

import importlib

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


def __getattr__(name: str):
    # Lazy only because `strategies` imports hypothesis, an optional dependency (the `testing` extra): the
    # checks above must import without it. `from moedpo.testing import strategies` lands here too.
    if name == "strategies":
        return importlib.import_module("moedpo.testing.strategies")
    raise AttributeError(f"module 'moedpo.testing' has no attribute {name!r}")
