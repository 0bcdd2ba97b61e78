"""Hand-worked values of the loss functions (the arithmetic is in each docstring)."""

import math

import pytest
import torch

from moedpo.losses import (
    dpo_loss,
    elbo,
    log_likelihood,
    margins,
    mixture_nll,
    mixture_reward,
    responsibilities,
    user_mixture_nll,
    weighted_dpo_loss,
)


def test_margins_from_logps():
    """h = (-1 - -2) - (-3 - -2.5) = 1 - (-0.5) = 1.5 for both experts' shared reference."""
    h = margins(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-3.0, -2.5]]), torch.tensor([-2.0]), torch.tensor([-2.5]))
    # expert 0: (-1 + 2) - (-3 + 2.5) = 1.5; expert 1: (-2 + 2) - (-2.5 + 2.5) = 0
    assert torch.allclose(h, torch.tensor([[1.5, 0.0]]))


def test_dpo_sigmoid_hand_value():
    """beta h = 0.5 * 2 = 1: -log sigmoid(1) = log(1 + e^-1) = 0.3132617."""
    assert dpo_loss(torch.tensor([2.0]), 0.5).item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-6)
    assert dpo_loss(torch.tensor([0.0]), 0.1).item() == pytest.approx(math.log(2), rel=1e-6)


def test_dpo_variants_hand_values():
    """h = 1, beta = 0.5: ipo (1 - 1/(2*0.5))^2 = 0; hinge relu(1 - 0.5) = 0.5;
    label smoothing 0.1: 0.9 * softplus(-0.5) + 0.1 * softplus(0.5);
    robust: [0.9 * softplus(-0.5) - 0.1 * softplus(0.5)] / 0.8."""
    h = torch.tensor([1.0])
    sp = lambda x: math.log1p(math.exp(x))
    assert dpo_loss(h, 0.5, "ipo").item() == pytest.approx(0.0)
    assert dpo_loss(torch.tensor([3.0]), 0.5, "ipo").item() == pytest.approx(4.0)
    assert dpo_loss(h, 0.5, "hinge").item() == pytest.approx(0.5)
    assert dpo_loss(h, 0.5, "sigmoid", 0.1).item() == pytest.approx(0.9 * sp(-0.5) + 0.1 * sp(0.5), rel=1e-6)
    assert dpo_loss(h, 0.5, "robust", 0.1).item() == pytest.approx((0.9 * sp(-0.5) - 0.1 * sp(0.5)) / 0.8, rel=1e-6)


def test_dpo_loss_rejects_unknown_type():
    with pytest.raises(ValueError, match="expected one of"):
        dpo_loss(torch.zeros(1), 0.1, "kto")


def test_label_noise_likelihood_hand_value():
    """eps = 0.2, beta h = 0: 0.8 * 0.5 + 0.2 * 0.5 = 0.5; beta h = log 3: 0.8 * 0.75 + 0.2 * 0.25 = 0.65."""
    assert log_likelihood(torch.tensor([0.0]), 1.0, 0.2).exp().item() == pytest.approx(0.5)
    assert log_likelihood(torch.tensor([math.log(3)]), 1.0, 0.2).exp().item() == pytest.approx(0.65)


def test_mixture_nll_and_responsibilities_hand_values():
    """w = (1/4, 3/4) (logits 0, log 3); sigmoid(h) = (3/4, 1/4) (h = log 3, -log 3), beta = 1:
    P = 1/4 * 3/4 + 3/4 * 1/4 = 3/8;  q = (3/16, 3/16) / (3/8) = (1/2, 1/2)."""
    h = torch.tensor([[math.log(3), -math.log(3)]], dtype=torch.float64)
    g = torch.tensor([[0.0, math.log(3)]], dtype=torch.float64)
    assert mixture_nll(h, g, 1.0).item() == pytest.approx(-math.log(3 / 8))
    assert torch.allclose(responsibilities(h, g, 1.0), torch.tensor([[0.5, 0.5]], dtype=torch.float64))


def test_weighted_dpo_and_elbo_hand_values():
    """weights (1, 0) pick expert 0: -log(3/4). ELBO at q = (1/2, 1/2) with the numbers above:
    1/2 log(3/4) + 1/2 log(1/4) + 1/2 log(1/4) + 1/2 log(3/4) + log 2 = log(3/16) + log 2 = log(3/8)."""
    h = torch.tensor([[math.log(3), -math.log(3)]], dtype=torch.float64)
    g = torch.tensor([[0.0, math.log(3)]], dtype=torch.float64)
    one_hot = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert weighted_dpo_loss(h, one_hot, 1.0).item() == pytest.approx(-math.log(3 / 4))
    half = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    assert elbo(half, h, g, 1.0).item() == pytest.approx(math.log(3 / 8))


def test_mixture_reward_hand_value():
    """w = (1/2, 1/2), r = (0, log 3): log(1/2 + 3/2) = log 2."""
    r = torch.tensor([0.0, math.log(3)], dtype=torch.float64)
    assert mixture_reward(r, torch.zeros(2, dtype=torch.float64)).item() == pytest.approx(math.log(2))


def test_user_mixture_nll_hand_value():
    """One user, two pairs, w = (1/2, 1/2); expert 0 gives sigmoid 3/4 to both, expert 1 gives 1/4 and 1/2:
    P = 1/2 * 9/16 + 1/2 * 1/8 = 11/32."""
    h = torch.tensor([[math.log(3), -math.log(3)], [math.log(3), 0.0]], dtype=torch.float64)
    g = torch.zeros(1, 2, dtype=torch.float64)
    nll = user_mixture_nll(h, g, 1.0, torch.tensor([0, 0]))
    assert nll.item() == pytest.approx(-math.log(11 / 32))
