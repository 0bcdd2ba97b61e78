"""Min-max-regret serving: one randomised policy for a population whose types are unknown at serving time
(EM-DPO's min-max regret aggregation, Chidambaram et al., arXiv 2405.15065; MaxMin-RLHF's egalitarian objective).

Serving expert k with probability w_k gives type t the utility sum_k w_k U_tk (linear in w), where U (T, K) is
each expert's utility for each type (true or estimated rewards, or held-out agreement with the type's labels).
Type t's regret is best_t - sum_k w_k U_tk, best_t its best single expert's utility by default. The gate's
average (w = the types' shares) serves the majority; :func:`minmax_regret_weights` solves the small linear
program min_w max_t regret_t(w) on the simplex (scipy's HiGHS), so no type is left far behind.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linprog


def regrets(utility: torch.Tensor, weights: torch.Tensor, best: torch.Tensor | None = None) -> torch.Tensor:
    """Each type's regret under serving weights: utility (T, K), weights (K,) on the simplex -> (T,)."""
    utility = torch.as_tensor(utility, dtype=torch.float64)
    best = utility.max(-1).values if best is None else torch.as_tensor(best, dtype=torch.float64)
    return best - utility @ torch.as_tensor(weights, dtype=torch.float64)


def minmax_regret_weights(utility: torch.Tensor, best: torch.Tensor | None = None) -> torch.Tensor:
    """The weights (K,) on the simplex that minimise the largest regret over types (``utility`` (T, K)).

    Variables (w_1..w_K, s): minimise s subject to best_t - U_t . w <= s for every t, sum_k w_k = 1, w >= 0.
    """
    u = torch.as_tensor(utility, dtype=torch.float64).cpu().numpy()
    num_types, num_experts = u.shape
    top = u.max(-1) if best is None else torch.as_tensor(best, dtype=torch.float64).cpu().numpy()
    cost = np.zeros(num_experts + 1)
    cost[-1] = 1.0  # minimise s
    upper = np.hstack([-u, -np.ones((num_types, 1))])  # -U_t . w - s <= -best_t
    equal = np.hstack([np.ones((1, num_experts)), np.zeros((1, 1))])
    bounds = [(0, None)] * num_experts + [(None, None)]
    result = linprog(cost, A_ub=upper, b_ub=-top, A_eq=equal, b_eq=[1.0], bounds=bounds, method="highs")
    if not result.success:  # a bounded, feasible LP: this does not happen on finite utilities
        raise ValueError(f"min-max regret: the linear program failed ({result.message}) on utilities {u.tolist()}")
    weights = torch.as_tensor(result.x[:num_experts]).clamp_min(0)
    return weights / weights.sum()
