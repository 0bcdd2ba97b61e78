"""One property test per likelihood law of SPEC §5, float64, Pyro model vs hand-written closed form.

Each compares losses and, where both exist, gradients.
"""

import itertools

import torch
from hypothesis import given
from hypothesis import strategies as st

from moedpo.experts import TabularExperts, optimal_policy
from moedpo.inference import em_loss, gate_cross_entropy, marginal_loss
from moedpo.losses import (
    dpo_loss,
    elbo,
    mixture_nll,
    responsibilities,
    user_mixture_nll,
    weighted_dpo_loss,
)
from moedpo.models import mixture_bt_model, user_bt_model
from moedpo.testing import check_matches_closed_form, check_single_expert_is_dpo, check_swap_symmetry
from moedpo.testing import strategies as mst


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


@given(mst.mixture_batches(max_experts=1))
def test_k1_equals_dpo(batch):
    check_single_expert_is_dpo(mixture_bt_model, batch["h"], batch["gate_logits"], batch["beta"])
    assert torch.allclose(
        mixture_nll(batch["h"], batch["gate_logits"], batch["beta"]), dpo_loss(batch["h"][:, 0], batch["beta"])
    )


@given(mst.mixture_batches(max_experts=1, user_scope=True))
def test_k1_equals_dpo_user_scope(batch):
    check_single_expert_is_dpo(
        user_bt_model, batch["h"], batch["gate_logits"], batch["beta"], user_index=batch["user_index"]
    )


@given(st.data(), st.integers(1, 6), st.integers(1, 5), mst.betas())
def test_identical_experts_equal_dpo_for_any_w(data, batch, experts, beta):
    h1 = data.draw(mst.margins(batch, 1))
    g = leaf(data.draw(mst.gate_logits(batch, experts)))
    h = leaf(h1.expand(batch, experts))
    loss = mixture_nll(h, g, beta).sum()
    h1 = leaf(h1)
    expected = dpo_loss(h1[:, 0], beta).sum()
    assert torch.allclose(loss, expected)
    gh, gg = grads(loss, h, g)
    assert torch.allclose(gh.sum(-1), grads(expected, h1)[0][:, 0])  # gradient in the shared margin
    assert torch.allclose(gg, torch.zeros_like(gg), atol=1e-12)  # the gate is irrelevant


@given(mst.mixture_batches())
def test_pyro_enumeration_equals_closed_form(batch):
    check_matches_closed_form(mixture_bt_model, mixture_nll, batch["h"], batch["gate_logits"], batch["beta"])


@given(mst.mixture_batches(user_scope=True))
def test_pyro_enumeration_equals_closed_form_user_scope(batch):
    check_matches_closed_form(
        user_bt_model, user_mixture_nll, batch["h"], batch["gate_logits"], batch["beta"], user_index=batch["user_index"]
    )


@given(mst.mixture_batches(), st.floats(0.01, 0.49))
def test_pyro_enumeration_equals_closed_form_label_noise_link(batch, eps):
    check_matches_closed_form(
        mixture_bt_model, mixture_nll, batch["h"], batch["gate_logits"], batch["beta"], label_smoothing=eps
    )


@given(mst.mixture_batches(max_abs=1e3))
def test_responsibilities_on_simplex(batch):
    q = responsibilities(batch["h"], batch["gate_logits"], batch["beta"])
    assert torch.all(q >= 0) and torch.all(q <= 1)
    assert torch.allclose(q.sum(-1), torch.ones(q.shape[0], dtype=q.dtype))


@given(mst.mixture_batches(min_experts=2), st.randoms(use_true_random=False))
def test_expert_permutation_equivariance(batch, rng):
    h, g, beta = batch["h"], batch["gate_logits"], batch["beta"]
    perm = list(range(h.shape[1]))
    rng.shuffle(perm)
    assert torch.allclose(mixture_nll(h[:, perm], g[:, perm], beta), mixture_nll(h, g, beta))
    assert torch.allclose(responsibilities(h[:, perm], g[:, perm], beta), responsibilities(h, g, beta)[:, perm])


@given(mst.mixture_batches())
def test_chosen_rejected_swap_symmetry(batch):
    check_swap_symmetry(mixture_bt_model, batch["h"], batch["gate_logits"], batch["beta"])
    # closed form: P(y- > y+) = 1 - P(y+ > y-), i.e. the swapped pair's likelihood complements
    p = torch.exp(-mixture_nll(batch["h"], batch["gate_logits"], batch["beta"]))
    p_swapped = torch.exp(-mixture_nll(-batch["h"], batch["gate_logits"], batch["beta"]))
    assert torch.allclose(p + p_swapped, torch.ones_like(p))


@given(mst.mixture_batches(user_scope=True))
def test_chosen_rejected_swap_symmetry_user_scope(batch):
    check_swap_symmetry(user_bt_model, batch["h"], batch["gate_logits"], batch["beta"], user_index=batch["user_index"])


@given(mst.mixture_batches())
def test_fisher_gradient_identity(batch):
    """grad of -log sum_k w_k s_k equals grad of the weighted loss with q = posterior held fixed (M-step)."""
    h, g, beta = leaf(batch["h"]), leaf(batch["gate_logits"]), batch["beta"]
    marginal = grads(mixture_nll(h, g, beta).sum(), h, g)
    q = responsibilities(h, g, beta).detach()
    weighted = grads((weighted_dpo_loss(h, q, beta) + gate_cross_entropy(g, q)).sum(), h, g)
    pyro_em, _ = em_loss(mixture_bt_model, h, g, beta, batch["obs"])
    for a, b, c in zip(marginal, weighted, grads(pyro_em, h, g)):
        assert torch.allclose(a, b) and torch.allclose(a, c)


@given(st.data(), st.integers(1, 6), st.integers(2, 4), mst.betas())
def test_one_hot_weights_give_partitioned_dpo(data, batch, experts, beta):
    """weighted_dpo_loss with one-hot weights = each pair's DPO loss on its own expert only (and its gradient
    vanishes on the other experts)."""
    h = leaf(data.draw(mst.margins(batch, experts)))
    assign = torch.tensor(data.draw(st.lists(st.integers(0, experts - 1), min_size=batch, max_size=batch)))
    weights = torch.nn.functional.one_hot(assign, experts).double()
    loss = weighted_dpo_loss(h, weights, beta)
    expected = dpo_loss(h[torch.arange(batch), assign], beta)
    assert torch.allclose(loss, expected)
    (gh,) = grads(loss.sum(), h)
    assert torch.all(gh[weights == 0] == 0)


@given(mst.mixture_batches(max_batch=8), st.data())
def test_minibatch_scaling(batch, data):
    """Pyro rescales a subsampled plate by N / b: the minibatch ELBO is unbiased for the full batch."""
    h, g, beta = leaf(batch["h"]), leaf(batch["gate_logits"]), batch["beta"]
    n = h.shape[0]
    idx = torch.tensor(sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n))))
    loss = marginal_loss(mixture_bt_model, None, h, g, beta, batch["obs"], subsample=idx)
    expected = n / idx.numel() * mixture_nll(h[idx], g[idx], beta).sum()
    assert torch.allclose(loss, expected)
    for a, b in zip(grads(loss, h, g), grads(expected, h, g)):
        assert torch.allclose(a, b)


@given(mst.mixture_batches(max_abs=1e4), st.floats(0.5, 1.0))
def test_float32_matches_float64_for_large_margins(batch, beta):
    """Finite in float32 for |beta h| up to 1e4 and equal to float64 to float32 precision."""
    h, g = batch["h"], batch["gate_logits"]
    for fn in (mixture_nll, responsibilities):
        hi = fn(h, g, beta)
        lo = fn(h.float(), g.float(), beta)
        assert torch.all(torch.isfinite(lo))
        assert torch.allclose(lo.double(), hi, rtol=1e-5, atol=1e-4)
    h32, g32 = leaf(h.float()), leaf(g.float())
    for grad in grads(mixture_nll(h32, g32, beta).sum(), h32, g32):
        assert torch.all(torch.isfinite(grad))


@given(mst.mixture_batches(), st.data())
def test_elbo_bounds_marginal_with_equality_at_posterior(batch, data):
    h, g, beta = batch["h"], batch["gate_logits"], batch["beta"]
    log_marginal = -mixture_nll(h, g, beta)
    q = data.draw(mst.simplex(*h.shape))
    assert torch.all(elbo(q, h, g, beta) <= log_marginal + 1e-9)
    assert torch.allclose(elbo(responsibilities(h, g, beta), h, g, beta), log_marginal)


def test_closed_form_optimal_policy_on_tabular_experts():
    """Minimising the population DPO loss under BT labels from reward r_k recovers pi_ref exp(r_k/beta)/Z_k."""
    torch.manual_seed(0)
    beta, prompts, responses = 0.5, 3, 4
    rewards = torch.randn(2, prompts, responses, dtype=torch.float64)
    ref_logits = torch.randn(prompts, responses, dtype=torch.float64)
    experts = TabularExperts(ref_logits, 2, init_std=0.3).double()
    pairs = torch.tensor(list(itertools.permutations(range(responses), 2)))  # ordered (a, b)
    x = torch.arange(prompts).repeat_interleave(len(pairs))
    a, b = pairs[:, 0].repeat(prompts), pairs[:, 1].repeat(prompts)
    p_a_wins = torch.sigmoid(rewards[:, x, a] - rewards[:, x, b]).T  # (N, K) expert k's labeller
    optimizer = torch.optim.LBFGS(experts.parameters(), max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        optimizer.zero_grad()
        loss = (p_a_wins * dpo_loss(experts.margins(x, a, b), beta)).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    target = optimal_policy(ref_logits, rewards, beta)
    assert torch.allclose(experts.policies(), target, atol=1e-6)
    # implicit rewards beta log(pi_k / pi_ref) recover r_k up to the per-prompt constant -beta log Z_k(x)
    implicit = beta * (torch.log(experts.policies()) - torch.log_softmax(ref_logits, -1)).detach()
    offset = implicit - rewards  # (K, P, R), constant in R
    assert torch.allclose(offset, offset[..., :1].expand_as(offset), atol=1e-6)
