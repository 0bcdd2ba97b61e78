"""Expert banks: the side that turns a batch into per-expert margins (B, K) for the EM loop."""

from moedpo.experts.tabular import TabularExperts, optimal_policy

__all__ = ["TabularExperts", "optimal_policy"]
