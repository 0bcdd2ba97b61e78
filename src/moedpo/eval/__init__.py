"""Evaluation: specialisation and accuracy metrics."""

from moedpo.eval.metrics import (
    adjusted_rand_index,
    best_permutation,
    pair_accuracy,
    ranking_agreement,
    total_variation,
)

__all__ = ["adjusted_rand_index", "best_permutation", "pair_accuracy", "ranking_agreement", "total_variation"]
