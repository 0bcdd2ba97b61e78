"""Micro-batches give the update of one big batch, also with the anti-collapse penalties on the gate.

The penalties are nonlinear in the step's mean gate probabilities P_bar (and, for load balance, its top-1
fractions f_bar): weight * Phi(P_bar) over every latent unit of the step. Each micro-batch contributes the
gradient of Phi at the global P_bar restricted to its own units, so any split sums to one batch's gradient.
"""

import math
import os
import socket

import pytest
import torch

from moedpo.data import make_tabular_world
from moedpo.data.synthetic import TabularPairs
from moedpo.distributed import DataParallel
from moedpo.experts import TabularExperts
from moedpo.inference import VariationalEM
from moedpo.losses import load_balance_loss, responsibilities, usage_entropy_penalty, user_responsibilities
from moedpo.losses.anticollapse import (
    load_balance_gradient,
    load_balance_value,
    penalty_share,
    top1_fractions,
    usage_entropy_gradient,
    usage_entropy_value,
)
from moedpo.models import FixedGate, MLPGate, mixture_bt_model, user_bt_model

THREE_UNITS = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.9, 0.1]], dtype=torch.float64)  # gate probs (U, K)


def test_load_balance_share_hand_values():
    """P_bar = (2.1, 0.9) / 3 = (0.7, 0.3); top-1 experts 0, 1, 0 so f_bar = (2/3, 1/3).
    Phi = K <f, P> = 2 (2/3 * 0.7 + 1/3 * 0.3) = 2 * 0.5667 = 1.1333; dPhi/dP = K f = (4/3, 2/3); Phi is linear
    in P, so the offset Phi - <dPhi, P_bar> is 0. Units {0, 1}: <(4/3, 2/3), (1.2, 0.8)> / 3 = 2.1333 / 3 = 0.7111;
    unit {2}: <(4/3, 2/3), (0.9, 0.1)> / 3 = 1.2667 / 3 = 0.4222; the two sum to 1.1333."""
    usage, fractions = THREE_UNITS.mean(0), top1_fractions(THREE_UNITS)
    assert torch.allclose(fractions, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    value, gradient = load_balance_value(usage, fractions), load_balance_gradient(fractions)
    assert float(value) == pytest.approx(2 * (2 / 3 * 0.7 + 1 / 3 * 0.3))
    assert torch.allclose(gradient, torch.tensor([4 / 3, 2 / 3], dtype=torch.float64))
    assert float(penalty_share(THREE_UNITS[:2], usage, value, gradient, 3)) == pytest.approx((1.6 + 0.8 * 2 / 3) / 3)
    assert float(penalty_share(THREE_UNITS[2:], usage, value, gradient, 3)) == pytest.approx((1.2 + 0.1 * 2 / 3) / 3)


def test_usage_entropy_share_hand_values():
    """P_bar = (0.7, 0.3): Phi = 0.7 ln 0.7 + 0.3 ln 0.3 = -0.24967 - 0.36119 = -0.61086; dPhi/dP = ln P + 1 =
    (0.64333, -0.20397); offset Phi - <dPhi, P_bar> = -sum P_bar = -1. Units {0, 1}:
    (1.2 * 0.64333 + 0.8 * -0.20397) / 3 - 2/3 = 0.20294 - 0.66667 = -0.46373; unit {2}:
    (0.9 * 0.64333 + 0.1 * -0.20397) / 3 - 1/3 = 0.18620 - 0.33333 = -0.14713; sum -0.61086."""
    usage = THREE_UNITS.mean(0)
    value, gradient = usage_entropy_value(usage), usage_entropy_gradient(usage)
    assert float(value) == pytest.approx(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
    assert torch.allclose(gradient, torch.tensor([math.log(0.7) + 1, math.log(0.3) + 1], dtype=torch.float64))
    g0, g1 = math.log(0.7) + 1, math.log(0.3) + 1
    first = penalty_share(THREE_UNITS[:2], usage, value, gradient, 3)
    assert float(first) == pytest.approx((1.2 * g0 + 0.8 * g1) / 3 - 2 / 3)
    assert float(first) == pytest.approx(-0.4637294, abs=1e-7)
    assert float(penalty_share(THREE_UNITS[2:], usage, value, gradient, 3)) == pytest.approx(
        (0.9 * g0 + 0.1 * g1) / 3 - 1 / 3
    )


@pytest.mark.parametrize("penalty", ["load_balance", "usage_entropy"])
def test_penalty_shares_have_the_penalty_gradient(penalty):
    """One part holding every unit: the share's value and gradient in the logits are autograd's of
    load_balance_loss / usage_entropy_penalty. Parts of 4 + 2 + 1 units: their gradients sum to the same."""
    torch.manual_seed(0)
    logits = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    direct = load_balance_loss(logits) if penalty == "load_balance" else usage_entropy_penalty(logits)
    expected = torch.autograd.grad(direct, logits)[0]
    with torch.no_grad():
        probs = torch.softmax(logits, -1)
        usage, fractions = probs.mean(0), top1_fractions(probs)
        if penalty == "load_balance":
            value, gradient = load_balance_value(usage, fractions), load_balance_gradient(fractions)
        else:
            value, gradient = usage_entropy_value(usage), usage_entropy_gradient(usage)
    whole = penalty_share(torch.softmax(logits, -1), usage, value, gradient, 7)
    assert whole.item() == pytest.approx(direct.item(), rel=1e-12)
    assert torch.allclose(torch.autograd.grad(whole, logits)[0], expected, atol=1e-12)
    parts = sum(penalty_share(torch.softmax(logits[rows], -1), usage, value, gradient, 7) for rows in
                (slice(0, 4), slice(4, 6), slice(6, 7)))  # fmt: skip
    assert parts.item() == pytest.approx(direct.item(), rel=1e-12)
    assert torch.allclose(torch.autograd.grad(parts, logits)[0], expected, atol=1e-12)


def _rows(pairs, keep):
    return TabularPairs(pairs.prompt[keep], pairs.chosen[keep], pairs.rejected[keep], pairs.user[keep])


def _world():
    return make_tabular_world(num_types=2, num_prompts=4, annotators_per_type=2, pairs_per_annotator=6, seed=7)


@pytest.fixture(scope="module")
def world():
    return _world()


def _pair_scope_batches(world):
    """10 pairs, micro-batches of 7 and 3 pairs."""
    pairs = _rows(world.train, torch.arange(10))
    return pairs, [_rows(pairs, torch.arange(7)), _rows(pairs, torch.arange(7, 10))]


def _user_scope_batches(world):
    """Annotators with 5, 2, 1 and 2 pairs; micro-batches of annotators {0, 2} (6 pairs) and {1, 3} (4 pairs)."""
    train = world.train
    counts = {0: 5, 1: 2, 2: 1, 3: 2}
    keep = torch.cat([torch.nonzero(train.user == u).squeeze(-1)[:n] for u, n in counts.items()])
    pairs = _rows(train, keep)
    return pairs, [_rows(pairs, torch.isin(pairs.user, torch.tensor(us))) for us in ([0, 2], [1, 3])]


def _start(world, scope, gate_kind):
    """Fresh experts (K = 2), a gate and the loop's gate function, the same every call, float64."""
    experts = TabularExperts(world.ref_logits, 2, init_std=1.0, seed=3).double()
    num_users, num_prompts = world.user_types.numel(), world.ref_logits.shape[0]
    torch.manual_seed(1)
    gate = MLPGate(num_users if scope == "user" else num_prompts, 2, hidden=4).double()
    for p in gate.parameters():
        torch.nn.init.normal_(p, std=1.0)
    if gate_kind == "fixed":
        gate = FixedGate(2).double()
        with torch.no_grad():
            gate.logits.copy_(torch.tensor([0.4, -0.3]))

    def gate_logits(batch, _margins=None):
        if scope == "pair":
            return gate(len(batch)) if gate_kind == "fixed" else gate(torch.eye(num_prompts).double()[batch.prompt])
        users, local = torch.unique(batch.user, return_inverse=True)
        rows = gate(users.numel()) if gate_kind == "fixed" else gate(torch.eye(num_users).double()[users])
        return rows, {"user_index": local}

    return experts, gate, gate_logits


def _step(world, scope, gate_kind, micro_batches, load_balance=0.3, usage_entropy=0.2, sync=None, schedule="em"):
    """Parameters after one EM step (2 M-step updates, SGD lr 0.5) from the same start."""
    experts, gate, gate_logits = _start(world, scope, gate_kind)
    params = [*experts.parameters(), *gate.parameters()]
    loop = VariationalEM(
        experts,
        gate_logits,
        torch.optim.SGD(params, lr=LR),
        beta=1.0,
        model=user_bt_model if scope == "user" else mixture_bt_model,
        m_steps=2,
        load_balance=load_balance,
        usage_entropy=usage_entropy,
        sync=sync,
        schedule=schedule,
    )
    loop.step(*micro_batches)
    return [p.detach().clone() for p in params]


LR = 0.5


@pytest.mark.parametrize("gate_kind", ["mlp", "fixed"])
@pytest.mark.parametrize("scope", ["pair", "user"])
def test_anticollapse_penalties_give_one_batch_update_from_uneven_micro_batches(world, scope, gate_kind):
    """One step from [b1, b2] (7 + 3 pairs; user scope: whole annotators, 6 + 4 pairs) equals one step from b1 + b2
    within 1e-6, with load_balance=0.3 and usage_entropy=0.2 and m_steps=2 (the global gate statistics are
    recomputed after the first update moves the gate). Before: each micro-batch's penalty used its own mean, and
    the MLP gate's parameters came out ~1e-2 apart."""
    pairs, split = (_pair_scope_batches if scope == "pair" else _user_scope_batches)(world)
    one = _step(world, scope, gate_kind, [pairs])
    two = _step(world, scope, gate_kind, split)
    without = _step(world, scope, gate_kind, [pairs], load_balance=0.0, usage_entropy=0.0)
    for a, b in zip(one, two):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
    moved = max((a - c).abs().max() for a, c in zip(one, without))
    assert moved > 1e-3, f"the penalties should move the gate; they moved it by {moved}"


@pytest.mark.parametrize("scope", ["pair", "user"])
def test_gate_after_a_split_step_is_two_sgd_steps_on_the_closed_form_objective(world, scope):
    """The gate's M-step objective with q fixed at the E-step's exact posterior, written with the closed forms:

        J(gate) = sum_u -q_u . log softmax(g_u) / N  +  0.3 * load_balance_loss(g)  +  0.2 * usage_entropy_penalty(g)

    over all U units (pairs, or annotators with user_responsibilities) and N pairs; two SGD steps (lr 0.5), each
    with its own f_bar and P_bar (the gate moved). The loop, fed micro-batches of 7 + 3 pairs (user scope: 6 + 4,
    whole annotators), must land on the same gate. Statistics computed once per EM step (not per update) miss it."""
    pairs, split = (_pair_scope_batches if scope == "pair" else _user_scope_batches)(world)
    experts, gate, gate_logits = _start(world, scope, "mlp")
    with torch.no_grad():
        h = experts.margins(pairs)
        g, extra = gate_logits(pairs) if scope == "user" else (gate_logits(pairs), {})
        if scope == "pair":
            q = responsibilities(h, g, 1.0)
        else:
            q = user_responsibilities(h, g, 1.0, extra["user_index"])
    for _ in range(2):
        g = gate_logits(pairs)
        g = g[0] if scope == "user" else g
        objective = -(q * torch.log_softmax(g, -1)).sum() / len(pairs)
        objective = objective + 0.3 * load_balance_loss(g) + 0.2 * usage_entropy_penalty(g)
        grads = torch.autograd.grad(objective, list(gate.parameters()))
        with torch.no_grad():
            for p, d in zip(gate.parameters(), grads):
                p -= LR * d
    expected = [p.detach() for p in gate.parameters()]
    got = _step(world, scope, "mlp", split)[1:]  # [0] is the experts' table
    for a, b in zip(expected, got):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()


def _two_process_worker(rank, port, out_dir):
    """One of two gloo processes: rank 0 holds 7 pairs in one micro-batch (user scope: annotators {0, 2}), rank 1
    the other 3 in micro-batches of 2 and 1 (user scope: annotator 1, then annotator 3)."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank)})
    torch.set_num_threads(1)
    sync = DataParallel()
    world = _world()
    results = {}
    for scope in ("pair", "user"):
        pairs, (first, second) = (_pair_scope_batches if scope == "pair" else _user_scope_batches)(world)
        if rank == 0:
            shard = [first]
        elif scope == "pair":
            shard = [_rows(second, torch.arange(2)), _rows(second, torch.arange(2, 3))]
        else:
            shard = [_rows(second, second.user == u) for u in (1, 3)]
        results[scope] = _step(world, scope, "mlp", shard, sync=sync)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    sync.close()  # DDP's reducer, then the group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_share_the_anticollapse_statistics(world, tmp_path):
    """Two gloo processes with uneven shards (7 pairs | 2 + 1 pairs; user scope 6 | 2 + 2 pairs by annotator) take
    the step of one process holding the whole batch: P_bar and f_bar are summed across processes (sync.sum)
    before any micro-batch's share, gradients after. Without the cross-process sum each process's penalty would
    use its own mean gate."""
    torch.multiprocessing.spawn(_two_process_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    for scope in ("pair", "user"):
        pairs, _ = (_pair_scope_batches if scope == "pair" else _user_scope_batches)(world)
        one = _step(world, scope, "mlp", [pairs])
        for rank in (0, 1):
            got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)[scope]
            for a, b in zip(one, got):
                assert torch.allclose(a, b, atol=1e-6, rtol=0), (scope, rank, (a - b).abs().max())
