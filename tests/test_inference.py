"""The VariationalEM loop: every schedule recovers planted types on a small tabular world; loop mechanics."""

import math
from types import SimpleNamespace

import pytest
import torch

from moedpo.data import make_tabular_world
from moedpo.data.synthetic import TabularPairs
from moedpo.eval import adjusted_rand_index
from moedpo.experts import TabularExperts
from moedpo.inference import VariationalEM
from moedpo.losses import load_balance_loss, responsibilities, usage_entropy_penalty, user_responsibilities
from moedpo.models import AmortizedGuide, FixedGate, MLPGate, user_bt_model


@pytest.fixture(scope="module")
def world():
    return make_tabular_world(num_types=2, annotators_per_type=8, pairs_per_annotator=80, seed=3)


class WithGuideFeatures:
    """Tabular experts whose margins carry each pair's features, as an LLM bank's carry the base's states."""

    def __init__(self, experts, features):
        self.experts, self.features, self.num_experts = experts, features, experts.num_experts

    def margins(self, pairs):
        return {"h": self.experts.margins(pairs), "guide_features": self.features}


def fit_user_scope(world, schedule, steps, guide=None, **options):
    torch.manual_seed(0)
    experts = TabularExperts(world.ref_logits, 2, init_std=1.0)
    gate = FixedGate(2, learnable=False)
    pairs, num_users = world.train, world.user_types.numel()
    features = pair_features(pairs, *world.ref_logits.shape)

    def gate_logits(batch, _margins):
        return gate(num_users), {"user_index": batch.user}

    params = list(experts.parameters()) + (list(guide.parameters()) if guide is not None else [])
    loop = VariationalEM(
        WithGuideFeatures(experts, features),
        gate_logits,
        torch.optim.Adam(params, lr=0.05),
        beta=1.0,
        model=user_bt_model,
        schedule=schedule,
        guide=guide,
        closed_form_gate=gate,
        **options,
    )
    first = loop.step(pairs)
    for _ in range(steps - 1):
        loop.step(pairs)
    with torch.no_grad():
        h = experts.margins(pairs.prompt, pairs.chosen, pairs.rejected)
        q = user_responsibilities(h, gate(num_users), 1.0, pairs.user)
    return adjusted_rand_index(world.user_types, q.argmax(-1)), first, loop


@pytest.mark.parametrize("schedule", ["em", "svi", "gumbel"])
def test_schedules_recover_planted_types(world, schedule):
    ari, first, loop = fit_user_scope(world, schedule, steps=150)
    assert ari == 1.0
    assert loop.metrics["loss"] < first
    assert set(loop.metrics) >= {"loss", "em/responsibility_entropy", "em/expert_usage_0", "gate/usage_1"}


def pair_features(pairs, num_prompts, num_responses):
    """A tabular pair's guide features [prompt, chosen, rejected]: one-hot rows of width P x R each."""
    width, rows = num_prompts * num_responses, torch.arange(len(pairs))
    grid = torch.zeros(len(pairs), 3, width)
    grid[rows, 0, pairs.prompt] = 1.0
    grid[rows, 1, pairs.prompt * num_responses + pairs.chosen] = 1.0
    grid[rows, 2, pairs.prompt * num_responses + pairs.rejected] = 1.0
    return grid.reshape(len(pairs), 3 * width)


def test_svi_with_amortized_guide_recovers_types(world):
    guide = AmortizedGuide(3 * world.ref_logits.numel(), 2, hidden=32)
    ari, _, loop = fit_user_scope(world, "svi", steps=150, guide=guide)
    assert ari == 1.0


def test_em_m_steps_reuse_one_e_step(world, monkeypatch):
    calls = []
    original = VariationalEM.e_step
    monkeypatch.setattr(VariationalEM, "e_step", lambda self, *a: calls.append(1) or original(self, *a))
    ari, _, loop = fit_user_scope(world, "em", steps=50, m_steps=3)
    assert ari == 1.0 and loop.num_steps == 50
    assert len(calls) == 50  # one E-step per EM step, shared by its 3 M-step updates


def test_pair_scope_moe_gate_learns_domain_routing():
    """Prompt domain reveals the type: prompts 0-1 are labelled by type 0, prompts 2-3 by type 1. Pair-scope
    MoE-DPO with an MLP gate on the prompt id routes each domain to its own expert."""
    torch.manual_seed(0)
    rewards = 2.0 * torch.randn(2, 4, 5)
    prompt = torch.randint(4, (4000,))
    first, second = torch.randint(5, (4000,)), torch.randint(5, (4000,))
    keep = first != second
    prompt, first, second = prompt[keep], first[keep], second[keep]
    kind = (prompt >= 2).long()
    wins = torch.rand(prompt.numel()) < torch.sigmoid(rewards[kind, prompt, first] - rewards[kind, prompt, second])
    chosen, rejected = torch.where(wins, first, second), torch.where(wins, second, first)
    experts = TabularExperts(torch.zeros(4, 5), 2, init_std=1.0)
    gate = MLPGate(4, 2, hidden=16)
    pairs = TabularPairs(prompt, chosen, rejected, torch.zeros_like(prompt))

    params = list(experts.parameters()) + list(gate.parameters())
    loop = VariationalEM(
        experts, lambda b, _: gate(torch.eye(4)[b.prompt]), torch.optim.Adam(params, lr=0.05), beta=1.0
    )
    for _ in range(300):
        loop.step(pairs)
    routed = gate(torch.eye(4)).argmax(-1)
    assert routed[0] == routed[1] and routed[2] == routed[3] and routed[0] != routed[2]


class PushedExperts:
    """Tabular experts seen as an LLM bank: log-probs without a graph, and a backward that reruns one expert
    at a time from d loss / d log-probs."""

    def __init__(self, experts):
        self.experts, self.num_experts = experts, experts.num_experts

    def logps(self, pairs):
        logps = torch.log_softmax(self.experts.logits, -1)  # (K, P, R)
        return logps[:, pairs.prompt, pairs.chosen].T, logps[:, pairs.prompt, pairs.rejected].T  # (B, K) each

    def margins(self, pairs):
        ref = self.experts.ref_logps
        with torch.no_grad():
            chosen, rejected = self.logps(pairs)
        return {
            "chosen_logps": chosen,
            "rejected_logps": rejected,
            "ref_chosen_logps": ref[pairs.prompt, pairs.chosen],
            "ref_rejected_logps": ref[pairs.prompt, pairs.rejected],
        }

    def backward(self, pairs, grad_chosen, grad_rejected):
        for k in range(self.num_experts):
            chosen, rejected = self.logps(pairs)
            (chosen[:, k] * grad_chosen[:, k] + rejected[:, k] * grad_rejected[:, k]).sum().backward()


def test_pushed_backward_matches_autograd():
    """Experts may return log-probs without a graph plus ``backward(batch, d_chosen, d_rejected)``."""
    torch.manual_seed(0)
    experts = TabularExperts(torch.zeros(3, 4), 3)
    gate = FixedGate(3)
    pairs = TabularPairs(torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 0]), None)
    grads = []
    for bank in (experts, PushedExperts(experts)):
        experts.zero_grad(), gate.zero_grad()
        optimizer = torch.optim.SGD([*experts.parameters(), *gate.parameters()], lr=0.0)
        VariationalEM(bank, lambda b, _: gate(len(b)), optimizer, beta=0.7).step(pairs)
        grads.append([experts.logits.grad.clone(), gate.logits.grad.clone()])
    for a_grad, b_grad in zip(*grads):
        assert torch.allclose(a_grad, b_grad, atol=1e-6)
    assert grads[0][0].abs().max() > 1e-3


def test_closed_form_gate_with_momentum():
    torch.manual_seed(0)
    gate = FixedGate(2, learnable=False)
    h = torch.tensor([[5.0, -5.0]] * 3 + [[-5.0, 5.0]])  # 3 pairs for expert 0, 1 for expert 1
    shift = torch.nn.Parameter(torch.zeros(1))
    experts = SimpleNamespace(num_experts=2, margins=lambda b: h[b] + shift)
    loop = VariationalEM(
        experts, lambda b, _: gate(len(b)), torch.optim.SGD([shift], lr=0.0), beta=1.0, closed_form_gate=gate,
        gate_momentum=0.9,
    )  # fmt: skip
    loop.step(torch.arange(4))
    q = responsibilities(h, torch.zeros(4, 2), 1.0).mean(0)
    assert torch.allclose(torch.softmax(gate.logits, -1), 0.9 * torch.tensor([0.5, 0.5]) + 0.1 * q, atol=1e-6)


def test_anticollapse_terms_hand_values():
    """Uniform gate: load balance K * sum_k f_k P_k with f = (1, 0) (argmax ties -> expert 0), P = 1/2 -> 1;
    usage entropy penalty -H(1/2, 1/2) = -log 2."""
    uniform = torch.zeros(4, 2)
    assert load_balance_loss(uniform).item() == pytest.approx(1.0)
    assert usage_entropy_penalty(uniform).item() == pytest.approx(-math.log(2))
    collapsed = torch.tensor([[10.0, -10.0]] * 4)
    assert load_balance_loss(collapsed).item() == pytest.approx(2.0, rel=1e-6)


def test_loop_rejects_unknown_schedule_and_custom_model_without_nesting():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)])
    with pytest.raises(ValueError, match="expected one of"):
        VariationalEM(None, None, optimizer, beta=1.0, schedule="x")
    with pytest.raises(ValueError, match="pass max_plate_nesting"):
        VariationalEM(None, None, optimizer, beta=1.0, model=lambda *a, **k: None)
    with pytest.raises(ValueError, match="m_steps must be >= 1"):
        VariationalEM(None, None, optimizer, beta=1.0, m_steps=0)


def _one_update(world, micro_batches, schedule="em"):
    """Gradients of one step from fresh experts, with the given split of the batch into micro-batches."""
    experts = TabularExperts(world.ref_logits, 2, init_std=1.0, seed=3)
    gate = MLPGate(world.user_types.numel(), 2, hidden=4)
    torch.manual_seed(1)
    for p in gate.parameters():
        torch.nn.init.normal_(p, std=0.5)

    def user_gate(batch, _):  # user scope: one row per annotator of the micro-batch
        users, local = torch.unique(batch.user, return_inverse=True)
        return gate(torch.eye(world.user_types.numel())[users]), {"user_index": local}

    optimizer = torch.optim.SGD([*experts.parameters(), *gate.parameters()], lr=0.0)
    loop = VariationalEM(experts, user_gate, optimizer, beta=1.0, model=user_bt_model, schedule=schedule)
    loss = loop.step(*micro_batches)
    return loss, [experts.logits.grad.clone(), *(p.grad.clone() for p in gate.parameters())]


def _pairs_of(pairs, users):
    keep = torch.isin(pairs.user, torch.tensor(users))
    return TabularPairs(pairs.prompt[keep], pairs.chosen[keep], pairs.rejected[keep], pairs.user[keep])


@pytest.mark.parametrize("schedule", ["em", "svi"])
def test_uneven_accumulation_gives_the_update_of_one_big_batch(schedule):
    """Annotators with 5, 9, 2 and 14 pairs; micro-batches of 1, 2 and 0 annotators (an empty shard). The
    objective is a sum over pairs divided by the global pair count, so the split changes nothing (float tol 1e-6).
    Averaging per-micro-batch means (the old loop) differs by ~1e-2 here."""
    world = make_tabular_world(num_types=2, annotators_per_type=2, pairs_per_annotator=14, seed=5)
    pairs = world.train
    counts = {0: 5, 1: 9, 2: 2, 3: 14}
    keep = torch.cat([torch.nonzero(pairs.user == u).squeeze(-1)[:n] for u, n in counts.items()])
    pairs = TabularPairs(pairs.prompt[keep], pairs.chosen[keep], pairs.rejected[keep], pairs.user[keep])
    big_loss, big = _one_update(world, [pairs], schedule)
    split_loss, split = _one_update(
        world, [_pairs_of(pairs, [2]), _pairs_of(pairs, [0, 3]), None, _pairs_of(pairs, [1])], schedule
    )
    assert split_loss == pytest.approx(big_loss, abs=1e-6)
    for a, b in zip(big, split):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    assert max(g.abs().max() for g in big) > 1e-2


def test_learning_rate_schedule_counts_em_steps_not_m_steps():
    """Cosine over 10 EM steps with m_steps=3: after 10 steps the schedule has taken 10 steps (not 30)."""
    world = make_tabular_world(num_types=2, annotators_per_type=2, pairs_per_annotator=10, seed=1)
    experts = TabularExperts(world.ref_logits, 2)
    optimizer = torch.optim.SGD(experts.parameters(), lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / 10, 1))))
    loop = VariationalEM(
        experts, lambda b, _: torch.zeros(len(b), 2), optimizer, beta=1.0, m_steps=3, lr_scheduler=schedule
    )
    lrs = []
    for _ in range(10):
        lrs.append(schedule.get_last_lr()[0])
        loop.step(world.train)
    assert schedule.last_epoch == 10
    assert lrs[5] == pytest.approx(0.5) and min(lrs) > 0.02
