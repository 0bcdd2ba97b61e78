"""The learned guide q_phi(z | x, y+, y-): its ELBO, its fit to the exact posterior, and the score-function
estimator that trains it when only the drawn expert runs."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from moedpo.data import make_tabular_world
from moedpo.experts.tabular import optimal_policy
from moedpo.inference import draw_from_guide, guide_kl, marginal_loss, marginal_nll, posterior, routed_loss
from moedpo.inference.objectives import SignalBaseline, guide_fit_loss
from moedpo.models import AmortizedGuide, mixture_bt_model, user_bt_model
from moedpo.models.bt import ENUM
from tests.test_inference import pair_features


def fixed_guide(h, gate_logits, beta, obs=None, *, logits, user_index=None, **_):
    """q(z) with given logits: (B, K) per pair, or (U, K) per annotator."""
    if user_index is None:
        with pyro.plate("pairs", h.shape[0]):
            pyro.sample("z", dist.Categorical(logits=logits), infer=ENUM)
    else:
        with pyro.plate("users", gate_logits.shape[0], dim=-2):
            pyro.sample("z", dist.Categorical(logits=logits.unsqueeze(-2)), infer=ENUM)


def batch(scope, seed=0):
    torch.manual_seed(seed)
    h = 2 * torch.randn(9, 3, dtype=torch.float64)
    obs = torch.ones(9, dtype=torch.float64)
    if scope == "pair":
        return mixture_bt_model, (h, torch.randn(9, 3, dtype=torch.float64), 1.5, obs), {}
    users = torch.tensor([0, 1, 0, 2, 2, 1, 0, 3, 0])  # unequal pair counts: 4, 2, 2, 1
    return user_bt_model, (h, torch.randn(4, 3, dtype=torch.float64), 1.5, obs), {"user_index": users}


@pytest.mark.parametrize("scope", ["pair", "user"])
def test_elbo_with_the_exact_posterior_is_the_marginal_likelihood(scope):
    model, args, kwargs = batch(scope)
    exact = posterior(model, *args, **kwargs).marginals["z"].reshape(-1, 3)
    logits = exact.log().requires_grad_(True)
    loss = marginal_loss(model, fixed_guide, *args, logits=logits, **kwargs)  # -ELBO(q = exact)
    assert torch.allclose(loss, torch.tensor(marginal_nll(model, *args, **kwargs), dtype=loss.dtype), atol=1e-9)
    other = torch.log_softmax(exact.log() + torch.randn_like(exact), -1)
    assert guide_kl(model, fixed_guide, *args, logits=other, **kwargs) > 1e-3  # any other q: ELBO strictly below


@pytest.mark.parametrize("scope,steps", [("pair", 300), ("user", 2000)])
def test_trained_guide_matches_the_exact_posterior_on_a_tabular_world(scope, steps):
    """Experts fixed at the three types' optimal policies; annotators with 1-16 pairs each (user scope)."""
    torch.manual_seed(0)
    world = make_tabular_world(num_types=3, annotators_per_type=20, pairs_per_annotator=40, seed=1)
    ref = torch.log_softmax(world.ref_logits, -1)
    ratios = torch.stack([torch.log(optimal_policy(world.ref_logits, r, 1.0)) - ref for r in world.rewards])
    pairs = world.train
    h_all = (ratios[:, pairs.prompt, pairs.chosen] - ratios[:, pairs.prompt, pairs.rejected]).T  # (N, 3)
    f_all = pair_features(pairs, *world.ref_logits.shape)
    guide = AmortizedGuide(f_all.shape[1], 3, hidden=64)
    optimizer = torch.optim.Adam(guide.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)

    def draw():
        if scope == "pair":
            rows = torch.randint(len(pairs), (128,), generator=generator)
            return mixture_bt_model, rows, torch.zeros(128, 3), {}
        users = torch.randperm(world.user_types.numel(), generator=generator)[:16]
        rows, index = [], []
        for j, u in enumerate(users.tolist()):
            mine = torch.nonzero(pairs.user == u).squeeze(-1)
            k = int(torch.randint(1, 17, (1,), generator=generator))
            rows.append(mine[torch.randperm(mine.numel(), generator=generator)[:k]])
            index.append(torch.full((k,), j))
        return user_bt_model, torch.cat(rows), torch.zeros(16, 3), {"user_index": torch.cat(index)}

    def loss_of(model, rows, g, kwargs):
        args = (h_all[rows], g, 1.0, torch.ones(rows.numel()))
        return model, args, {**kwargs, "guide_features": f_all[rows]}

    for _ in range(steps):  # what VariationalEM does with a guide where every margin is known
        model, args, kwargs = loss_of(*draw())
        optimizer.zero_grad()
        guide_fit_loss(model, guide, posterior(model, *args, **kwargs), *args, **kwargs)[0].backward()
        optimizer.step()
    kl, units = 0.0, 0
    for _ in range(20):
        model, args, kwargs = loss_of(*draw())
        kl += guide_kl(model, guide, *args, **kwargs)
        units += args[1].shape[0]
    print(scope, "mean KL(q || exact posterior)", kl / units)
    assert kl / units < 0.05


@pytest.mark.parametrize("scope", ["pair", "user"])
@pytest.mark.parametrize("with_baseline", [False, True])
def test_score_function_gradient_is_unbiased(scope, with_baseline):
    """The mean of routed_loss's gradient over draws of z equals the exact (enumerated) ELBO gradient for the guide,
    the gate and the margins: pathwise where z is fixed, score function for q. A baseline changes only the
    variance."""
    model, (h, g, beta, obs), kwargs = batch(scope, seed=3)
    h, g = h.requires_grad_(True), g.requires_grad_(True)
    logits = torch.randn(g.shape, dtype=torch.float64, requires_grad=True)
    args = (h, g, beta, obs)
    exact = torch.autograd.grad(-marginal_loss(model, fixed_guide, *args, logits=logits, **kwargs), [logits, g, h])
    draws, total = 4000, [torch.zeros_like(t) for t in (logits, g, h)]
    units = g.shape[0]
    baseline = torch.linspace(-3, 1, units, dtype=torch.float64) if with_baseline else None
    torch.manual_seed(0)
    for _ in range(draws):
        trace = draw_from_guide(fixed_guide, *args, logits=logits, **kwargs)
        loss = routed_loss(model, trace, *args, baseline=baseline, logits=logits, **kwargs)
        for acc, grad in zip(total, torch.autograd.grad(-loss.surrogate, [logits, g, h])):
            acc += grad / draws
    for estimate, truth in zip(total, exact):
        assert torch.allclose(estimate, truth, atol=0.12), (estimate - truth).abs().max()


def test_guide_fit_loss_is_the_two_kls_and_recovers_from_a_confident_wrong_guide():
    """-ELBO(q) + KL(p || q) = -log p(obs) + KL(q || p) + KL(p || q); from q confidently on the wrong expert, the
    ELBO's gradient vanishes and the fit loss's does not."""
    model, args, kwargs = batch("pair", seed=5)
    post = posterior(model, *args, **kwargs)
    p = post.marginals["z"]
    least = torch.nn.functional.one_hot(p.argmin(-1), 3).double()
    wrong = torch.log_softmax(60 * least, -1).requires_grad_(True)  # q sure of the least likely expert
    loss, elbo = guide_fit_loss(model, fixed_guide, post, *args, logits=wrong, **kwargs)
    q = wrong.detach().exp()
    reverse = (q * (q.log() - p.log())).sum()
    forward = (p * (p.log() - q.log())).sum()
    assert torch.allclose(loss, -post.log_evidence + reverse + forward, rtol=1e-6)
    assert torch.allclose(elbo, post.log_evidence - reverse, rtol=1e-6)
    elbo_grad = torch.autograd.grad(marginal_loss(model, fixed_guide, *args, logits=wrong, **kwargs), wrong)[0]
    fit_grad = torch.autograd.grad(loss, wrong)[0]
    assert elbo_grad.abs().max() < 1e-6 < 0.1 < fit_grad.abs().max()


def test_signal_baseline_uses_each_units_own_history():
    baseline = SignalBaseline(decay=0.5)
    assert baseline(["a", "b"], torch.tensor([2, 4])) is None  # nothing seen yet: no baseline
    baseline.update(["a", "b"], torch.tensor([2, 4]), torch.tensor([-2.0, -8.0]))
    baseline.update(["a"], torch.tensor([2]), torch.tensor([-4.0]))
    b = baseline(["a", "b", "new"], torch.tensor([2, 4, 3]))
    assert b[0] == pytest.approx(-3.0) and b[1] == pytest.approx(-8.0)  # own averages
    assert b[2] == pytest.approx(3 * (0.5 * (-10 / 6) + 0.5 * (-2.0)))  # unseen: per-pair average x its pairs


def test_svi_accepts_a_guide_that_is_not_one_categorical_site():
    """A user's own guide (here: the empty guide, i.e. exact enumeration in the model) trains under svi; the
    KL(p || q) term applies only to a guide of the model's one latent site."""
    from moedpo.inference import VariationalEM
    from moedpo.models import empty_guide

    model, (h, g, beta, obs), kwargs = batch("user", seed=6)
    h = h.float().requires_grad_(True)
    loop = VariationalEM(
        lambda b: None, None, torch.optim.SGD([h], lr=0.1), beta=beta, model=model, schedule="svi", guide=empty_guide
    )
    loop.experts = type("E", (), {"num_experts": 3, "margins": staticmethod(lambda b: {"h": h})})()
    loop.gate = lambda b, out: (g.float(), kwargs)
    expected = marginal_nll(model, h.detach(), g.float(), beta, obs.float(), **kwargs) / 9  # before the step
    assert loop.step([0] * 9) == pytest.approx(expected, rel=1e-5)
    assert loop.step([0] * 9) < expected  # and it trains
