"""The Plackett–Luce likelihood over rankings: Pyro programs vs closed forms vs a float64 loop written by hand."""

import itertools
import math

import pyro
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moedpo.inference import em_loss, gate_cross_entropy, marginal_loss, posterior
from moedpo.losses import (
    mixture_nll,
    plackett_luce_log_prob,
    ranking_component_log_likelihood,
    ranking_mixture_nll,
    ranking_responsibilities,
    user_mixture_nll,
)
from moedpo.models import PlackettLuce, mixture_bt_model, mixture_pl_model, user_pl_model
from moedpo.testing import check_matches_closed_form, check_posterior_by_enumeration
from moedpo.testing import strategies as mst


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def by_hand(scores: list[float], ranking: list[int], n: int, ranked: int | None = None) -> float:
    """log P(ranking) as the definition reads: pick the best of what is left among the n real completions, for
    each of the first ``ranked`` places (all n when None); the order of the rest is not observed."""
    left, total = list(ranking[:n]), 0.0
    for item in ranking[: n if ranked is None else ranked]:
        top = max(scores[i] for i in left)
        total += scores[item] - (top + math.log(sum(math.exp(scores[i] - top) for i in left)))
        left.remove(item)
    return total


def closed(batch, scope="pairs"):
    users = batch.get("user_index") if scope == "users" else None
    return lambda h, g, beta, **_: ranking_mixture_nll(
        h, g, beta, batch["obs"], batch["mask"], users, ranked=batch["ranked"]
    )


@given(mst.ranking_batches())
def test_log_prob_matches_the_definition_in_float64(batch):
    scores = batch["beta"] * batch["h"][..., 0]
    got = plackett_luce_log_prob(scores, batch["obs"], batch["mask"], batch["ranked"])
    rows = zip(scores.tolist(), batch["obs"].tolist(), batch["mask"], batch["ranked"].tolist())
    for i, (row, rank, mask, ranked) in enumerate(rows):
        assert got[i].item() == pytest.approx(by_hand(row, rank, int(mask.sum()), ranked), rel=1e-9, abs=1e-9)


@given(mst.ranking_batches(max_batch=1, max_completions=4))
def test_probabilities_of_every_ranking_sum_to_one(batch):
    """Over every ranking of the n real completions, or, with k = ``ranked`` < n - 1 observed places, over every
    distinct top-k prefix (each the first of the rankings that share it)."""
    n, k = int(batch["mask"][0].sum()), int(batch["ranked"][0])
    width = batch["mask"].shape[1]
    prefixes = {p[:k]: p for p in itertools.permutations(range(n))}
    rankings = torch.tensor([list(p) + list(range(n, width)) for p in prefixes.values()])
    scores = batch["beta"] * batch["h"][0, :, 0]
    total = plackett_luce_log_prob(scores, rankings, batch["mask"][0], batch["ranked"][0]).exp().sum()
    assert total.item() == pytest.approx(1.0, rel=1e-9)


@given(mst.ranking_batches(max_completions=2), st.booleans())
def test_two_completions_are_the_bradley_terry_mixture(batch, user_scope):
    """A ranking of two is one pair: chosen = the first-ranked, margin h_first - h_second."""
    h, g, beta, ranking = leaf(batch["h"]), leaf(batch["gate_logits"]), batch["beta"], batch["obs"]
    margin = h.gather(1, ranking[:, :1, None].expand(-1, 1, h.shape[-1])) - h.gather(
        1, ranking[:, 1:, None].expand(-1, 1, h.shape[-1])
    )
    margin = margin[:, 0]
    if user_scope:
        users = torch.arange(h.shape[0]) % g.shape[0]
        got, expected = ranking_mixture_nll(h, g, beta, ranking, None, users), user_mixture_nll(margin, g, beta, users)
    else:
        got, expected = ranking_mixture_nll(h, g, beta, ranking), mixture_nll(margin, g, beta)
        pyro_pl = marginal_loss(mixture_pl_model, None, h, g, beta, ranking)
        pyro_bt = marginal_loss(mixture_bt_model, None, margin, g, beta, torch.ones(h.shape[0], dtype=h.dtype))
        assert torch.allclose(pyro_pl, pyro_bt)
    assert torch.allclose(got, expected)
    for a, b in zip(torch.autograd.grad(got.sum(), (h, g)), torch.autograd.grad(expected.sum(), (h, g))):
        assert torch.allclose(a, b)


@given(mst.ranking_batches(), st.randoms(use_true_random=False))
def test_relabelling_the_completions_changes_nothing(batch, rng):
    """Completions are a set: permuting their order in h and renaming the ranking's indices keeps P."""
    width = batch["h"].shape[1]
    new_of_old = list(range(width))
    rng.shuffle(new_of_old)
    perm = torch.tensor(new_of_old)  # completion m moves to slot perm[m]
    h = torch.empty_like(batch["h"])
    h[:, perm] = batch["h"]
    ranking = torch.where(batch["mask"], perm[batch["obs"]], batch["obs"])
    args = (batch["gate_logits"], batch["beta"])
    before = ranking_mixture_nll(batch["h"], *args, batch["obs"], batch["mask"], ranked=batch["ranked"])
    after = ranking_mixture_nll(h, *args, ranking, batch["mask"], ranked=batch["ranked"])
    assert torch.allclose(before, after)


@given(mst.ranking_batches())
def test_pyro_enumeration_equals_closed_form(batch):
    check_matches_closed_form(
        mixture_pl_model, closed(batch), batch["h"], batch["gate_logits"], batch["beta"], obs=batch["obs"],
        mask=batch["mask"], ranked=batch["ranked"],
    )  # fmt: skip


@given(mst.ranking_batches(user_scope=True))
def test_pyro_enumeration_equals_closed_form_user_scope(batch):
    check_matches_closed_form(
        user_pl_model, closed(batch, "users"), batch["h"], batch["gate_logits"], batch["beta"], obs=batch["obs"],
        mask=batch["mask"], user_index=batch["user_index"], ranked=batch["ranked"],
    )  # fmt: skip


@given(mst.ranking_batches(max_batch=3, user_scope=True))
def test_e_step_posterior_equals_brute_force_and_the_closed_form(batch):
    kwargs = dict(obs=batch["obs"], mask=batch["mask"], user_index=batch["user_index"], ranked=batch["ranked"])
    check_posterior_by_enumeration(user_pl_model, batch["h"], batch["gate_logits"], batch["beta"], **kwargs)
    post = posterior(user_pl_model, batch["h"], batch["gate_logits"], batch["beta"], batch["obs"],
                     mask=batch["mask"], user_index=batch["user_index"], ranked=batch["ranked"])  # fmt: skip
    q = ranking_responsibilities(
        batch["h"], batch["gate_logits"], batch["beta"], batch["obs"], batch["mask"], batch["user_index"],
        ranked=batch["ranked"],
    )  # fmt: skip
    assert torch.allclose(post.marginals["z"].reshape(q.shape), q)


@given(mst.ranking_batches(user_scope=True))
def test_fisher_gradient_identity(batch):
    """grad of -log P(D) equals the gradient of the M-step loss with the E-step posterior held fixed."""
    h, g, beta, users = leaf(batch["h"]), leaf(batch["gate_logits"]), batch["beta"], batch["user_index"]
    ranking, mask, ranked = batch["obs"], batch["mask"], batch["ranked"]
    marginal = torch.autograd.grad(ranking_mixture_nll(h, g, beta, ranking, mask, users, ranked=ranked).sum(), (h, g))
    q = ranking_responsibilities(h, g, beta, ranking, mask, users, ranked=ranked).detach()
    loglik = ranking_component_log_likelihood(h, ranking, beta, mask, users, g.shape[0], ranked=ranked)
    weighted = torch.autograd.grad((-(q * loglik).sum(-1) + gate_cross_entropy(g, q)).sum(), (h, g))
    pyro_em, _ = em_loss(user_pl_model, h, g, beta, ranking, mask=mask, user_index=users, ranked=ranked)
    for a, b, c in zip(marginal, weighted, torch.autograd.grad(pyro_em, (h, g))):
        assert torch.allclose(a, b) and torch.allclose(a, c)


@given(mst.ranking_batches(max_abs=1e4), st.floats(0.5, 1.0))
def test_float32_matches_float64_for_large_rewards(batch, beta):
    h64 = batch["h"]
    args, ranked = (batch["gate_logits"], beta, batch["obs"], batch["mask"]), batch["ranked"]
    exact = ranking_mixture_nll(h64, *args, ranked=ranked)
    low = ranking_mixture_nll(h64.float(), batch["gate_logits"].float(), *args[1:], ranked=ranked)
    assert torch.isfinite(low).all()
    assert torch.allclose(low.double(), exact, rtol=1e-4, atol=1e-2)
    h32 = leaf(h64.float())
    low = ranking_mixture_nll(h32, batch["gate_logits"].float(), *args[1:], ranked=ranked)
    (grad,) = torch.autograd.grad(low.sum(), h32)
    assert torch.isfinite(grad).all()


def test_gumbel_top_k_samples_follow_the_probabilities():
    """500 000 draws of rankings of three: each of the 6 frequencies within 4 standard errors of P."""
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.0, -0.5], dtype=torch.float64)
    draws = PlackettLuce(logits).sample((500_000,))
    for perm in itertools.permutations(range(3)):
        p = plackett_luce_log_prob(logits, torch.tensor(perm)).exp().item()
        freq = (draws == torch.tensor(perm)).all(-1).double().mean().item()
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / draws.shape[0]), (perm, freq, p)


def test_padding_is_sampled_last_and_validated():
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    dist = PlackettLuce(torch.zeros(2, 4), mask, validate_args=True)
    draws = dist.sample((200,))
    assert (draws[:, 0, 2:] == torch.tensor([2, 3])).all()
    assert (draws[:, 0, :2].sort(-1).values == torch.arange(2)).all()
    assert (draws[:, 1].sort(-1).values == torch.arange(4)).all()
    with pytest.raises(ValueError, match="support"):
        dist.log_prob(torch.tensor([[0, 0, 2, 3], [0, 1, 2, 3]]))  # a repeated completion
    with pytest.raises(ValueError, match="support"):
        dist.log_prob(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 4]]))  # an index past the completions
    assert torch.isfinite(dist.log_prob(torch.tensor([[1, 0, 3, 2], [3, 2, 1, 0]]))).all()  # padding's order is free


def test_a_ranking_model_takes_no_label_smoothing():
    h, g, ranking = torch.zeros(2, 3, 2), torch.zeros(2, 2), torch.tensor([[0, 1, 2], [2, 1, 0]])
    with pytest.raises(ValueError, match="label-smoothing"):
        pyro.poutine.trace(mixture_pl_model).get_trace(h, g, 0.1, ranking, label_smoothing=0.1)
