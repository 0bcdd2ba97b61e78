"""Evaluation metrics against hand-worked values."""

import pytest
import torch

from moedpo.eval import adjusted_rand_index, best_permutation, pair_accuracy, total_variation


def test_ari_hand_values():
    """Identical partitions (any relabelling) -> 1. For true [0,0,1,1] vs pred [0,0,0,1]: contingency
    [[2,0],[1,1]], sum C(n_ij,2) = 1, rows C(2,2)+C(2,2) = 2, cols C(3,2)+C(1,2) = 3, C(4,2) = 6;
    expected 2*3/6 = 1, max (2+3)/2 = 2.5 -> (1 - 1)/(2.5 - 1) = 0."""
    assert adjusted_rand_index([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(0.0)
    # [0,0,0,1,1,1] vs [0,0,1,1,2,2]: index C(2,2)+1*0+... = 1+1 = 2, rows 3+3 = 6, cols 1+1+1 = 3,
    # total 15: expected 6*3/15 = 1.2, max 4.5 -> (2 - 1.2) / 3.3
    assert adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(0.8 / 3.3)


def test_best_permutation_and_tv():
    cost = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    assert best_permutation(cost) == (1, 0)
    assert total_variation(torch.tensor([0.5, 0.5]), torch.tensor([0.8, 0.2])).item() == pytest.approx(0.3)
    assert pair_accuracy(torch.tensor([0.9, 0.2, 0.6, 0.5])) == pytest.approx(0.5)


def test_win_rate_interval_is_wilsons():
    """By hand (z = 1.96): 320 of 320 wins -> Wilson lower bound 1 / (1 + 1.96^2 / 320) = 0.98814; 50 of 100 ->
    0.5 +- 0.0962. For whole counts it is scipy's Wilson interval exactly."""
    from scipy import stats

    from moedpo.eval.users import interval

    all_won = interval([1.0] * 320)
    assert all_won["rate"] == 1.0 and abs(all_won["low"] - 1 / (1 + 1.96**2 / 320)) < 1e-5
    half = interval([1.0, 0.0] * 50)
    assert abs(half["low"] - 0.40383) < 1e-4 and abs(half["high"] - 0.59617) < 1e-4
    for wins, n in ((320, 320), (50, 100), (3, 17)):
        ci = stats.binomtest(wins, n).proportion_ci(method="wilson")
        ours = interval([1.0] * wins + [0.0] * (n - wins))
        assert abs(ours["low"] - ci.low) < 1e-12 and abs(ours["high"] - ci.high) < 1e-12
    tied = interval([1.0, 0.5, 0.0, 0.5])  # ties count half: rate 0.5
    assert tied["rate"] == 0.5 and tied["low"] < 0.5 < tied["high"]
