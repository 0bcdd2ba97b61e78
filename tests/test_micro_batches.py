"""Micro-batches give the update of one big batch, also with the anti-collapse penalties on the gate.

The penalties are nonlinear in the step's mean gate probabilities P_bar (and, for load balance, its top-1
fractions f_bar): weight * Phi(P_bar) over every latent unit of the step. Each micro-batch contributes the
gradient of Phi at the global P_bar restricted to its own units, so any split sums to one batch's gradient.
"""

import math

import pytest
import torch

from moedpo.losses import load_balance_loss, usage_entropy_penalty
from moedpo.losses.anticollapse import (
    load_balance_gradient,
    load_balance_value,
    penalty_share,
    top1_fractions,
    usage_entropy_gradient,
    usage_entropy_value,
)

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
