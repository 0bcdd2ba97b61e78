"""Preference data: built-in synthetic worlds (and, for LLM training, datasets and collation)."""

from moedpo.data.synthetic import TabularPairs, TabularWorld, make_tabular_world

__all__ = ["TabularPairs", "TabularWorld", "make_tabular_world"]
