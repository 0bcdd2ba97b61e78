"""Models, guides and gates: layouts, shapes, and guides' ELBOs against the closed forms."""

import pytest
import torch
from hypothesis import given

from moedpo.inference import em_loss, map_assignment, marginal_loss, posterior_marginals, relaxed_loss
from moedpo.losses import elbo, mixture_nll, responsibilities, user_responsibilities
from moedpo.models import (
    AmortizedGuide,
    FixedGate,
    MLPGate,
    RelaxedGuide,
    UserGate,
    mixture_bt_model,
    relaxed_bt_model,
    top1_route,
    user_bt_model,
    user_slots,
)
from moedpo.testing import check_normalisation
from moedpo.testing import strategies as mst


def test_user_slots_lay_pairs_out_per_user():
    """users [1, 0, 1, 1] -> user 0: pair 1; user 1: pairs 0, 2, 3."""
    slots, mask = user_slots(torch.tensor([1, 0, 1, 1]), 2)
    assert slots.tolist() == [[1, 0, 0], [0, 2, 3]]
    assert mask.tolist() == [[True, False, False], [True, True, True]]


@given(mst.mixture_batches(max_batch=5, max_experts=3))
def test_pair_model_is_normalised(batch):
    check_normalisation(mixture_bt_model, batch["h"], batch["gate_logits"], batch["beta"])


@given(mst.mixture_batches(max_batch=5, max_experts=3, user_scope=True))
def test_user_model_is_normalised(batch):
    check_normalisation(user_bt_model, batch["h"], batch["gate_logits"], batch["beta"], user_index=batch["user_index"])


@given(mst.mixture_batches(user_scope=True))
def test_one_pair_per_user_equals_pair_scope(batch):
    h, g, beta = batch["h"].requires_grad_(True), batch["gate_logits"], batch["beta"]
    expanded = g[batch["user_index"]]
    distinct = torch.arange(h.shape[0])
    user = marginal_loss(user_bt_model, None, h, expanded, beta, batch["obs"], user_index=distinct)
    assert torch.allclose(user, mixture_nll(h, expanded, beta).sum())


@given(mst.mixture_batches(user_scope=True))
def test_pyro_posterior_matches_closed_form(batch):
    h, g, beta, obs, users = batch["h"], batch["gate_logits"], batch["beta"], batch["obs"], batch["user_index"]
    q = posterior_marginals(user_bt_model, h, g, beta, obs, user_index=users)["z"].squeeze(-2)
    assert torch.allclose(q, user_responsibilities(h, g, beta, users), atol=1e-10)
    q = posterior_marginals(mixture_bt_model, h, g[users], beta, obs)["z"]
    assert torch.allclose(q, responsibilities(h, g[users], beta), atol=1e-10)


def test_map_assignment_is_posterior_argmax():
    torch.manual_seed(0)
    h, g = torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    z = map_assignment(mixture_bt_model, h, g, 2.0, torch.ones(9, dtype=torch.float64))
    assert torch.equal(z, responsibilities(h, g, 2.0).argmax(-1))


def test_amortized_guide_elbo_matches_closed_form():
    """An enumerated amortized guide gives the exact ELBO of its q: -loss = sum_i L(q_i) (SPEC §1)."""
    torch.manual_seed(0)
    h = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 3, dtype=torch.float64)
    features = torch.randn(6, 6, dtype=torch.float64)
    guide = _perturbed(AmortizedGuide(6, 3, hidden=8).double())
    loss = marginal_loss(
        mixture_bt_model, guide, h, g, 1.5, torch.ones(6, dtype=torch.float64), guide_features=features
    )
    q = torch.softmax(guide.logits(features, g), -1)
    expected = -elbo(q, h, g, 1.5).sum()
    assert torch.allclose(loss, expected)
    for a, b in zip(
        torch.autograd.grad(loss, [h, *guide.parameters()]), torch.autograd.grad(expected, [h, *guide.parameters()])
    ):
        assert torch.allclose(a, b)


def _perturbed(guide):
    """The guide starts at the prior (zero read-outs): move it off, so the tests see its features."""
    with torch.no_grad():
        for param in guide.parameters():
            param.add_(0.5 * torch.randn_like(param))
    return guide


def test_amortized_guide_user_scope_matches_closed_form():
    torch.manual_seed(1)
    h = torch.randn(7, 2, dtype=torch.float64)
    users = torch.tensor([0, 1, 0, 2, 2, 1, 0])
    g = torch.randn(3, 2, dtype=torch.float64)
    features = torch.randn(7, 6, dtype=torch.float64)
    guide = _perturbed(AmortizedGuide(6, 2, hidden=8).double())
    obs = torch.ones(7, dtype=torch.float64)
    loss = marginal_loss(user_bt_model, guide, h, g, 1.0, obs, user_index=users, guide_features=features)
    q = torch.softmax(guide.logits(features, g, users), -1)  # (U, K)
    loglik = torch.zeros(3, 2, dtype=torch.float64).index_add(0, users, torch.nn.functional.logsigmoid(h))
    expected = -((q * (loglik + torch.log_softmax(g, -1))).sum(-1) - torch.special.xlogy(q, q).sum(-1)).sum()
    assert torch.allclose(loss, expected)


def test_amortized_guide_pools_an_annotators_pairs_without_order():
    """q(z_u | D_u) is a function of the set of u's pairs: reordering the batch changes nothing; an annotator
    with no pairs in the batch gets the prior."""
    torch.manual_seed(4)
    guide = _perturbed(AmortizedGuide(6, 3, hidden=8).double())
    features, users = torch.randn(7, 6, dtype=torch.float64), torch.tensor([0, 1, 0, 2, 2, 1, 0])
    g = torch.randn(4, 3, dtype=torch.float64)
    order = torch.randperm(7)
    assert torch.allclose(guide.logits(features, g, users), guide.logits(features[order], g, users[order]))
    empty = guide.logits(features, g, users)[3]
    assert torch.allclose(empty, g[3] + guide.pooled.bias)  # no evidence: prior plus the read-out's bias


def test_em_loss_with_exact_posterior_is_the_marginal_nll():
    torch.manual_seed(2)
    h, g = torch.randn(5, 3, dtype=torch.float64, requires_grad=True), torch.randn(5, 3, dtype=torch.float64)
    loss, _ = em_loss(mixture_bt_model, h, g, 1.0, torch.ones(5, dtype=torch.float64))
    assert torch.allclose(loss, mixture_nll(h, g, 1.0).sum())


def test_relaxed_straight_through_uses_one_expert_per_pair():
    """With a straight-through sample z is one-hot, so only one expert per pair gets a gradient."""
    torch.manual_seed(3)
    h = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    g = torch.zeros(8, 3, dtype=torch.float64, requires_grad=True)
    obs = torch.ones(8, dtype=torch.float64)
    loss = relaxed_loss(relaxed_bt_model, RelaxedGuide(), h, g, 1.0, obs, temperature=0.5, guide_logits=g.detach())
    (grad_h,) = torch.autograd.grad(loss, h)
    assert torch.all((grad_h != 0).sum(-1) == 1)
    soft = relaxed_loss(
        relaxed_bt_model, RelaxedGuide(straight_through=False), h, g, 1.0, obs, temperature=0.5, guide_logits=g.detach()
    )
    assert torch.all((torch.autograd.grad(soft, h)[0] != 0).sum(-1) == 3)


def test_relaxed_user_scope_shares_one_z_per_user():
    torch.manual_seed(4)
    h = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    users = torch.tensor([0, 0, 0, 1, 1, 1])
    g = torch.zeros(2, 2, dtype=torch.float64)
    loss = relaxed_loss(
        relaxed_bt_model,
        RelaxedGuide(),
        h,
        g,
        1.0,
        torch.ones(6, dtype=torch.float64),
        temperature=0.3,
        guide_logits=g,
        user_index=users,
    )
    used = torch.autograd.grad(loss, h)[0] != 0  # (6, 2)
    assert torch.equal(used[:3], used[:1].expand(3, 2)) and torch.equal(used[3:], used[3:4].expand(3, 2))


def test_gates_shapes_and_closed_form():
    gate = FixedGate(3, weights=torch.tensor([0.2, 0.3, 0.5]))
    assert torch.allclose(torch.softmax(gate(4), -1), torch.tensor([[0.2, 0.3, 0.5]]).expand(4, 3))
    gate.set_proportions(torch.tensor([[1.0, 0, 0], [0, 0.5, 0.5]]))
    assert torch.allclose(torch.softmax(gate.logits, -1), torch.tensor([0.5, 0.25, 0.25]))
    assert MLPGate(5, 3)(torch.randn(4, 5)).shape == (4, 3)
    user_gate = UserGate(3, num_users=10, user_feature_dim=2, prompt_feature_dim=5)
    assert user_gate(torch.tensor([1, 9]), torch.randn(2, 2), torch.randn(2, 5)).shape == (2, 3)
    with pytest.raises(ValueError, match="pass user_ids"):
        user_gate(None, torch.randn(2, 2), torch.randn(2, 5))
    with pytest.raises(ValueError, match="needs num_users"):
        UserGate(3)
    assert top1_route(torch.tensor([[0.1, 2.0, -1.0]])).tolist() == [[0.0, 1.0, 0.0]]
