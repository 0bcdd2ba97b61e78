"""The routed schedule (em.schedule='routed'): what its update must do, checked on tabular experts.

Each test pins one part of ``VariationalEM.routed_update`` that a plausible edit could break without any other
test noticing: the experts that run are the ones the *guide* drew (not the gate's favourite), and the guide's
score-function term is centred by the per-annotator baselines of :class:`~moedpo.inference.objectives.SignalBaseline`.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

from moedpo.data import make_tabular_world
from moedpo.experts import TabularExperts
from moedpo.inference import VariationalEM
from moedpo.losses import component_log_likelihood, dpo_loss
from moedpo.models import FixedGate, mixture_bt_model, user_bt_model
from moedpo.models.bt import ENUM

BETA = 1.0


class TableGuide(torch.nn.Module):
    """q(z_u) = softmax(logits_u) from a free table (U, K), one row per latent unit; keeps its draws so a test can
    work the expected gradients out for the z the loop drew."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())
        self.draws: list[torch.Tensor] = []

    def forward(self, h, gate_logits, beta, obs=None, *, user_index=None, **_):
        if user_index is None:
            with pyro.plate("pairs", h.shape[0]):
                z = pyro.sample("z", dist.Categorical(logits=self.logits), infer=ENUM)
        else:
            with pyro.plate("users", gate_logits.shape[0], dim=-2):
                z = pyro.sample("z", dist.Categorical(logits=self.logits.unsqueeze(-2)), infer=ENUM)
        self.draws.append(z.detach().reshape(-1).clone())


class RoutedTabular:
    """Tabular experts as a routed bank sees them: ``reference`` costs no expert forward; ``margins(route=z)``."""

    def __init__(self, experts: TabularExperts):
        self.experts, self.num_experts = experts, experts.num_experts

    def reference(self, batch):
        return {}

    def margins(self, batch, route=None):
        return {"h": self.experts.margins(batch["prompt"], batch["chosen"], batch["rejected"])}


def _world_batch():
    """4 annotators with 5, 2, 1 and 3 pairs (11 in all), as a dict batch with example indices and annotator ids."""
    world = make_tabular_world(num_types=2, num_prompts=4, annotators_per_type=2, pairs_per_annotator=6, seed=2)
    train = world.train
    counts = {0: 5, 1: 2, 2: 1, 3: 3}
    keep = torch.cat([torch.nonzero(train.user == u).squeeze(-1)[:n] for u, n in counts.items()])
    batch = {"index": torch.arange(keep.numel()), "prompt": train.prompt[keep], "chosen": train.chosen[keep]}
    batch.update(rejected=train.rejected[keep], user=train.user[keep])
    return world, batch


def _loop(world, scope, guide_logits, gate_weights, lr):
    experts = TabularExperts(world.ref_logits, 2, init_std=1.0, seed=4).double()
    gate = FixedGate(2, weights=gate_weights, learnable=False).double()
    guide = TableGuide(guide_logits)

    def gate_logits(batch, _ref):
        if scope == "pair":
            return gate(batch["index"].numel())
        users, local = torch.unique(batch["user"], return_inverse=True)
        return gate(users.numel()), {"user_index": local}

    loop = VariationalEM(
        RoutedTabular(experts),
        gate_logits,
        torch.optim.SGD([*experts.parameters(), *guide.parameters()], lr=lr),
        beta=BETA,
        model=user_bt_model if scope == "user" else mixture_bt_model,
        schedule="routed",
        guide=guide,
        exact_warmup=0,
        exact_every=0,
    )
    return loop, experts, gate, guide


@pytest.mark.parametrize("scope", ["pair", "user"])
def test_routed_step_trains_the_expert_the_guide_drew_not_the_gates_favourite(scope):
    """The guide puts q(expert 0) = 1 - e^-30 on every unit; the gate's prior is (0.01, 0.99), for expert 1. A
    routed step (no exact step: exact_warmup = exact_every = 0) must run and train expert 0 only:

        expert 0:  logits_0 <- logits_0 - lr * d/d logits_0 [ sum_i -log sigmoid(beta h_i0) ] / N   (N = 11 pairs)
        expert 1:  unchanged (its margins never enter the loss)

    Routing by the gate (argmax of its logits) would train expert 1 and leave expert 0 where it was."""
    world, batch = _world_batch()
    units = batch["index"].numel() if scope == "pair" else 4
    guide_logits = torch.tensor([15.0, -15.0], dtype=torch.float64).expand(units, 2)
    loop, experts, _, guide = _loop(world, scope, guide_logits, torch.tensor([0.01, 0.99]), lr=0.5)
    start = experts.logits.detach().clone()
    reference = TabularExperts(world.ref_logits, 2, init_std=1.0, seed=4).double()
    h = reference.margins(batch["prompt"], batch["chosen"], batch["rejected"])  # (N, 2) at the start
    grad = torch.autograd.grad(dpo_loss(h[:, 0], BETA).sum() / h.shape[0], reference.logits)[0][0]
    loop.step(batch)
    assert torch.equal(guide.draws[-1], torch.zeros(units, dtype=torch.long))  # the guide drew expert 0 everywhere
    assert torch.equal(experts.logits.detach()[1], start[1]), "expert 1 (the gate's favourite, not drawn) moved"
    assert grad.abs().max() > 1e-2
    moved = experts.logits.detach()[0] - start[0]
    assert torch.allclose(moved, -0.5 * grad, atol=1e-9), (moved + 0.5 * grad).abs().max()


def _unit_pairs(batch, scope):
    """Pairs per latent unit: 1 per pair, or each annotator's count."""
    return torch.ones(batch["index"].numel()) if scope == "pair" else torch.bincount(batch["user"]).double()


def _signal(h, gate_logits, q_logits, z, user_index):
    """s_u = log w_{u,z_u} + sum_{i in u} log sigmoid(beta h_{i,z_u}) - log q_u(z_u), closed form: (U,)."""
    units = torch.arange(z.numel())
    log_p = component_log_likelihood(h, BETA, user_index, gate_logits.shape[0]) + torch.log_softmax(gate_logits, -1)
    return (log_p - torch.log_softmax(q_logits, -1))[units, z]


@pytest.mark.parametrize("scope", ["pair", "user"])
def test_routed_guide_gradient_is_centred_by_each_units_own_baseline(scope):
    """With lr = 0 nothing moves, so step 2 sees step 1's parameters. SignalBaseline's rule: step 1 sees no history
    (no baseline); afterwards b_u = s_u^(1), unit u's own signal at step 1 (annotators in user scope, example
    indices in pair scope). The surrogate -[sum_u s_u + sum_u (s_u - b_u) log q_u(z_u)] (s_u held constant),
    divided by the N = 11 pairs, has gradient in the guide's logits l_u (a free table here)

        d/dl_u = [1 - (s_u^(2) - b_u)] (onehot(z_u^(2)) - q_u) / N

    with the pathwise -d/dl_u sum_u log q_u(z_u) giving the 1. Dropping the baseline (b = 0) gives (1 - s_u) instead,
    and the per-pair average (units seen for the first time) another value: both are checked to be far off."""
    world, batch = _world_batch()
    units = batch["index"].numel() if scope == "pair" else 4
    torch.manual_seed(0)
    q_logits = 0.5 * torch.randn(units, 2, dtype=torch.float64)  # a guide unsure enough to draw both experts
    loop, experts, gate, guide = _loop(world, scope, q_logits, torch.tensor([0.3, 0.7]), lr=0.0)
    loop.step(batch)
    loop.step(batch)
    with torch.no_grad():
        h = experts.margins(batch["prompt"], batch["chosen"], batch["rejected"])  # (N, 2)
        user_index = batch["user"] if scope == "user" else None
        g = gate(units)
        first, second = (_signal(h, g, q_logits, z, user_index) for z in guide.draws)
    assert torch.unique(torch.stack(guide.draws)).numel() == 2  # both experts drawn: a real score-function term
    q = torch.softmax(q_logits, -1)
    z = guide.draws[-1]
    expected = (1 - (second - first)).unsqueeze(-1) * (torch.nn.functional.one_hot(z, 2) - q) / h.shape[0]
    onehot_minus_q = (torch.nn.functional.one_hot(z, 2) - q) / h.shape[0]
    without = (1 - second).unsqueeze(-1) * onehot_minus_q  # baseline=None
    per_pair = (1 - second + first.sum() / h.shape[0] * _unit_pairs(batch, scope)).unsqueeze(-1) * onehot_minus_q
    for wrong in (without, per_pair):
        assert (wrong - expected).abs().max() > 1e-2  # what the mutations would give is far from the truth
    got = guide.logits.grad
    assert torch.allclose(got, expected, atol=1e-9), (got - expected).abs().max()
