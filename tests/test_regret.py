"""Min-max-regret serving weights (issue 20 item 3): hand-solved programs and the optimum against every other
point of the simplex."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moedpo.eval.regret import minmax_regret_weights, regrets
from moedpo.testing import strategies as mst


def test_two_types_that_disagree_by_hand():
    """U = [[1, 0], [0, 3]]: regrets 1 - w0 and 3 (1 - w1) = 3 w0 are equal at w0 = 1/4, both 3/4; the gate's
    average (0.8, 0.2) leaves type 1 at 2.4."""
    utility = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    weights = minmax_regret_weights(utility)
    torch.testing.assert_close(weights, torch.tensor([0.25, 0.75], dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(regrets(utility, weights), torch.tensor([0.75, 0.75], dtype=torch.float64))
    torch.testing.assert_close(
        regrets(utility, torch.tensor([0.8, 0.2])), torch.tensor([0.2, 2.4], dtype=torch.float64)
    )


def test_an_expert_best_for_everyone_is_served_alone_and_a_given_best_is_used():
    utility = torch.tensor([[2.0, 1.0, 0.0], [3.0, 0.5, 1.0]])
    torch.testing.assert_close(minmax_regret_weights(utility), torch.tensor([1.0, 0, 0], dtype=torch.float64))
    best = torch.tensor([2.0, 5.0])  # regret against an ideal (e.g. a type's oracle policy), not the best expert
    torch.testing.assert_close(regrets(utility, torch.tensor([1.0, 0, 0]), best), torch.tensor([0.0, 2.0]).double())


@given(mst.tensors((3, 4), max_abs=5.0), mst.simplex(64, 4))
def test_no_point_of_the_simplex_has_a_smaller_worst_regret(utility, others):
    """The program's worst regret is at most every vertex's and every drawn point's (64 per example)."""
    weights = minmax_regret_weights(utility)
    assert weights.min() >= 0 and float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    worst = float(regrets(utility, weights).max())
    candidates = torch.cat([torch.eye(4, dtype=torch.float64), others])
    for w in candidates:
        assert worst <= float(regrets(utility, w).max()) + 1e-7


@given(st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**16))
def test_shapes_and_a_grid_search_agree_for_two_experts(num_types, num_experts, seed):
    utility = torch.randn(num_types, num_experts, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    weights = minmax_regret_weights(utility)
    assert weights.shape == (num_experts,)
    if num_experts == 2:  # a fine grid over w0 finds the same worst regret
        grid = torch.linspace(0, 1, 2001, dtype=torch.float64)
        best = min(float(regrets(utility, torch.stack([g, 1 - g])).max()) for g in grid)
        assert float(regrets(utility, weights).max()) == pytest.approx(best, abs=1e-3)
