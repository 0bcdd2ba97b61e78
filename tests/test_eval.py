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


def test_best_permutation_recovers_a_planted_matching_of_12_experts():
    """K = 12 (12! = 479,001,600 orderings: no exhaustive search). Planted entries cost <= 0.1, all others >= 0.5,
    so any other matching swaps at least two planted entries for two costing >= 0.5 each: the planted one is the
    unique minimum."""
    generator = torch.Generator().manual_seed(0)
    planted = torch.randperm(12, generator=generator)
    cost = 0.5 + 0.5 * torch.rand(12, 12, generator=generator)
    cost[torch.arange(12), planted] = 0.1 * torch.rand(12, generator=generator)
    perm = best_permutation(cost)
    assert perm == tuple(planted.tolist()) and all(type(k) is int for k in perm)


def test_best_permutation_is_not_greedy():
    """cost[i, j] = (i + 1)(j + 1): by hand, (0,1,2) -> 1+4+9 = 14, (0,2,1) -> 1+6+6 = 13, (1,0,2) -> 2+2+9 = 13,
    (1,2,0) -> 2+6+3 = 11, (2,0,1) -> 3+2+6 = 11, (2,1,0) -> 3+4+3 = 10: the minimum, although every row's
    cheapest column is 0."""
    cost = torch.tensor([[1.0, 2, 3], [2, 4, 6], [3, 6, 9]])
    assert best_permutation(cost) == (2, 1, 0)


def test_ari_equals_sklearns_on_random_labelings():
    from sklearn.metrics import adjusted_rand_score

    generator = torch.Generator().manual_seed(0)
    for n, k_true, k_pred in [(1, 1, 1), (2, 2, 1), (10, 3, 3), (50, 2, 5), (200, 6, 4), (300, 12, 12)]:
        true, pred = torch.randint(k_true, (n,), generator=generator), torch.randint(k_pred, (n,), generator=generator)
        ari = adjusted_rand_index(true, pred)
        assert type(ari) is float and ari == pytest.approx(adjusted_rand_score(true.numpy(), pred.numpy()), abs=1e-12)


def test_ari_hand_value_on_three_groups():
    """true [0,0,1,1,2,2] vs pred [0,0,1,2,2,2] (tensors): contingency (rows true, columns pred)
    [[2,0,0],[0,1,1],[0,0,2]]; index sum C(n_ij,2) = C(2,2) + C(2,2) = 2; rows (2,2,2): 1+1+1 = 3;
    columns (2,1,3): C(2,2) + C(1,2) + C(3,2) = 1+0+3 = 4; C(6,2) = 15; expected 3*4/15 = 0.8;
    max (3+4)/2 = 3.5 -> (2 - 0.8) / (3.5 - 0.8) = 1.2 / 2.7 = 4/9."""
    ari = adjusted_rand_index(torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 0, 1, 2, 2, 2]))
    assert ari == pytest.approx(4 / 9, abs=1e-12)
    with pytest.raises(ValueError, match="differ in length"):
        adjusted_rand_index([0, 1], [0, 1, 1])


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
