"""The VariationalEM loop: every schedule recovers planted types on a small tabular world; loop mechanics."""

import math

import pytest
import torch

from moedpo.data import make_tabular_world
from moedpo.eval import adjusted_rand_index
from moedpo.experts import TabularExperts
from moedpo.inference import VariationalEM, anneal_temperature
from moedpo.losses import load_balance_loss, responsibilities, usage_entropy_penalty, user_responsibilities
from moedpo.models import AmortizedGuide, FixedGate, MLPGate, mixture_bt_model, user_bt_model


@pytest.fixture(scope="module")
def world():
    return make_tabular_world(num_types=2, annotators_per_type=8, pairs_per_annotator=80, seed=3)


def fit_user_scope(world, schedule, steps, guide=None, **options):
    torch.manual_seed(0)
    experts = TabularExperts(world.ref_logits, 2, init_std=1.0)
    gate = FixedGate(2, learnable=False)
    pairs, num_users = world.train, world.user_types.numel()
    user_features = torch.eye(num_users)

    def forward(_):
        h = experts.margins(pairs.prompt, pairs.chosen, pairs.rejected)
        return {"h": h, "gate_logits": gate(num_users), "user_index": pairs.user, "features": user_features}

    params = list(experts.parameters()) + (list(guide.parameters()) if guide is not None else [])
    loop = VariationalEM(
        forward,
        torch.optim.Adam(params, lr=0.05),
        beta=1.0,
        model=user_bt_model,
        schedule=schedule,
        guide=guide,
        closed_form_gate=gate,
        **options,
    )
    first = loop.step(None)
    for _ in range(steps - 1):
        loop.step(None)
    with torch.no_grad():
        h = experts.margins(pairs.prompt, pairs.chosen, pairs.rejected)
        q = user_responsibilities(h, gate(num_users), 1.0, pairs.user)
    return adjusted_rand_index(world.user_types, q.argmax(-1)), first, loop


@pytest.mark.parametrize("schedule", ["em", "svi", "gumbel"])
def test_schedules_recover_planted_types(world, schedule):
    ari, first, loop = fit_user_scope(world, schedule, steps=150, temperature=(1.0, 0.2, 100))
    assert ari == 1.0
    assert loop.metrics["em/marginal_nll"] < first
    assert set(loop.metrics) >= {"loss", "em/elbo", "em/responsibility_entropy", "em/expert_usage_0", "gate/usage_1"}


def test_svi_with_amortized_guide_recovers_types(world):
    guide = AmortizedGuide(torch.nn.Linear(world.user_types.numel(), 2))
    ari, _, loop = fit_user_scope(world, "svi", steps=150, guide=guide)
    assert ari == 1.0
    assert loop.metrics["em/elbo"] <= -loop.metrics["em/marginal_nll"] + 1e-6  # ELBO below the evidence


def test_em_m_steps_reuse_one_e_step(world):
    ari, _, loop = fit_user_scope(world, "em", steps=50, m_steps=3)
    assert ari == 1.0 and loop.num_steps == 50


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
    features = torch.eye(4)[prompt]

    def forward(_):
        return {"h": experts.margins(prompt, chosen, rejected), "gate_logits": gate(features)}

    params = list(experts.parameters()) + list(gate.parameters())
    loop = VariationalEM(forward, torch.optim.Adam(params, lr=0.05), beta=1.0, model=mixture_bt_model)
    for _ in range(300):
        loop.step(None)
    routed = gate(torch.eye(4)).argmax(-1)
    assert routed[0] == routed[1] and routed[2] == routed[3] and routed[0] != routed[2]


def test_backward_callable_matches_autograd():
    """forward may return detached h and a `backward(grad_h)` that pushes gradients into the experts itself."""
    torch.manual_seed(0)
    experts = TabularExperts(torch.zeros(3, 4), 3)
    gate = FixedGate(3)
    x, a, b = torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 0])

    def direct(_):
        return {"h": experts.margins(x, a, b), "gate_logits": gate(4)}

    def pushed(_):
        def backward(grad_h):
            for k in range(3):  # one expert at a time, as an LLM bank does
                experts.margins(x, a, b)[:, k].backward(grad_h[:, k])

        return {"h": experts.margins(x, a, b).detach(), "gate_logits": gate(4), "backward": backward}

    grads = []
    for forward in (direct, pushed):
        experts.zero_grad(), gate.zero_grad()
        VariationalEM(forward, torch.optim.SGD([*experts.parameters(), *gate.parameters()], lr=0.0), beta=0.7).backward(
            None
        )
        grads.append([experts.logits.grad.clone(), gate.logits.grad.clone()])
    for a_grad, b_grad in zip(*grads):
        assert torch.allclose(a_grad, b_grad, atol=1e-7)


def test_closed_form_gate_with_momentum():
    torch.manual_seed(0)
    gate = FixedGate(2, learnable=False)
    h = torch.tensor([[5.0, -5.0]] * 3 + [[-5.0, 5.0]])  # 3 pairs for expert 0, 1 for expert 1
    experts = torch.nn.Parameter(torch.zeros(1))

    def forward(_):
        return {"h": h + experts, "gate_logits": gate(4)}

    loop = VariationalEM(
        forward, torch.optim.SGD([experts], lr=0.0), beta=1.0, closed_form_gate=gate, gate_momentum=0.5
    )
    loop.step(None)
    q = responsibilities(h, torch.zeros(4, 2), 1.0).mean(0)
    assert torch.allclose(torch.softmax(gate.logits, -1), 0.5 * torch.tensor([0.5, 0.5]) + 0.5 * q, atol=1e-6)


def test_anticollapse_terms_hand_values():
    """Uniform gate: load balance K * sum_k f_k P_k with f = (1, 0) (argmax ties -> expert 0), P = 1/2 -> 1;
    usage entropy penalty -H(1/2, 1/2) = -log 2."""
    uniform = torch.zeros(4, 2)
    assert load_balance_loss(uniform).item() == pytest.approx(1.0)
    assert usage_entropy_penalty(uniform).item() == pytest.approx(-math.log(2))
    collapsed = torch.tensor([[10.0, -10.0]] * 4)
    assert load_balance_loss(collapsed).item() == pytest.approx(2.0, rel=1e-6)


def test_anneal_temperature_is_geometric():
    assert anneal_temperature(0, 1.0, 0.01, 100) == pytest.approx(1.0)
    assert anneal_temperature(50, 1.0, 0.01, 100) == pytest.approx(0.1)
    assert anneal_temperature(500, 1.0, 0.01, 100) == pytest.approx(0.01)


def test_loop_rejects_unknown_schedule_and_custom_model_without_nesting():
    with pytest.raises(ValueError, match="expected one of"):
        VariationalEM(lambda b: {}, torch.optim.SGD([torch.zeros(1, requires_grad=True)]), beta=1.0, schedule="x")
    with pytest.raises(ValueError, match="pass max_plate_nesting"):
        VariationalEM(
            lambda b: {}, torch.optim.SGD([torch.zeros(1, requires_grad=True)]), beta=1.0, model=lambda *a, **k: None
        )
