"""The E-step under a subsampled plate: the plate's scale N/b rescales the ELBO, never the posterior.

``e_step`` reads the responsibilities off d E_q[log p] / d h and the gate latent's posterior off d E_q[log p] / d g.
Under ``subsample`` the built-in models scale every site of the plate by N/b, so unless the scale is divided out
those derivatives, and the q's read from them, come out N/b times too large (rows summing to N/b, not 1).
"""

import torch

from moedpo.inference import e_step
from moedpo.losses import responsibilities, user_responsibilities
from moedpo.models import mixture_bt_model, user_bt_model

BETA = 1.5


def _margins(seed=0):
    torch.manual_seed(seed)
    h = 2 * torch.randn(9, 3, dtype=torch.float64)
    return h, torch.ones(9, dtype=torch.float64)


def test_pair_scope_subsampled_rows_are_the_closed_form_responsibilities():
    """9 pairs, plate subsampled to pairs 1, 4, 5, 8 (scale 9/4 = 2.25): the subsampled rows of pair_q and gate_q
    equal q_ik = w_ik sigmoid(beta h_ik) / sum_j w_ij sigmoid(beta h_ij) on those rows and sum to 1 (before the
    fix they summed to 2.25)."""
    h, obs = _margins()
    g = torch.randn(9, 3, dtype=torch.float64)
    rows = torch.tensor([1, 4, 5, 8])
    e = e_step(mixture_bt_model, (h, g, BETA, obs), {"subsample": rows}, BETA, 0.0, 1)
    expected = responsibilities(h[rows], g[rows], BETA)
    assert torch.allclose(e.pair_q[rows].sum(-1), torch.ones(4, dtype=torch.float64), atol=1e-9), e.pair_q[rows].sum(-1)
    assert torch.allclose(e.pair_q[rows], expected, atol=1e-9), (e.pair_q[rows] - expected).abs().max()
    assert torch.allclose(e.gate_q[rows], expected, atol=1e-9), (e.gate_q[rows] - expected).abs().max()


def test_user_scope_subsampled_users_are_the_closed_form_user_responsibilities():
    """Annotators 0-3 with 4, 2, 2, 1 pairs; the users plate subsampled to annotators 0 and 2 (scale 4/2 = 2).
    Annotator u's posterior q_uk ∝ w_uk prod_{i in u} sigmoid(beta h_ik) depends on its own pairs only, so the
    closed form over all annotators gives the expected rows: gate_q[u] for u in {0, 2}, and pair_q[i] = q_{u(i)}
    for each of their pairs (the pair's expert is its annotator's type). Rows on the simplex."""
    h, obs = _margins(seed=1)
    users = torch.tensor([0, 1, 0, 2, 2, 1, 0, 3, 0])
    g = torch.randn(4, 3, dtype=torch.float64)
    kept = torch.tensor([0, 2])
    e = e_step(user_bt_model, (h, g, BETA, obs), {"user_index": users, "subsample": kept}, BETA, 0.0, 2)
    q = user_responsibilities(h, g, BETA, users)  # (4, 3)
    gate_q = e.gate_q.reshape(4, 3)[kept]
    assert torch.allclose(gate_q.sum(-1), torch.ones(2, dtype=torch.float64), atol=1e-9), gate_q.sum(-1)
    assert torch.allclose(gate_q, q[kept], atol=1e-9), (gate_q - q[kept]).abs().max()
    pairs = torch.isin(users, kept)  # pairs 0, 2, 3, 4, 6, 8
    assert torch.allclose(e.pair_q[pairs], q[users[pairs]], atol=1e-9), (e.pair_q[pairs] - q[users[pairs]]).abs().max()
    assert torch.allclose(e.pair_q[pairs].sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-9)
