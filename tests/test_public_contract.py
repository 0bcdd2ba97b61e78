"""The SPEC §3 names exist with their signatures and shapes (users and tests rely on them)."""

import inspect

import torch

import moedpo
from moedpo.losses import dpo_loss, mixture_nll, responsibilities, weighted_dpo_loss
from moedpo.models import mixture_bt_model


def params(fn):
    return list(inspect.signature(fn).parameters)


def test_spec_signatures_and_shapes():
    assert params(dpo_loss)[:3] == ["h", "beta", "loss_type"]
    assert inspect.signature(dpo_loss).parameters["loss_type"].default == "sigmoid"
    assert params(mixture_nll)[:3] == params(responsibilities)[:3] == ["h", "gate_logits", "beta"]
    assert params(weighted_dpo_loss) == ["h", "weights", "beta"]
    assert params(mixture_bt_model)[:4] == ["h", "gate_logits", "beta", "obs"]
    assert inspect.signature(mixture_bt_model).parameters["obs"].default is None
    assert params(moedpo.train)[0] == "config"
    h, g = torch.randn(5, 3), torch.randn(5, 3)
    assert dpo_loss(h[:, 0], 0.1).shape == (5,)
    assert mixture_nll(h, g, 0.1).shape == (5,)
    assert responsibilities(h, g, 0.1).shape == (5, 3)
    assert weighted_dpo_loss(h, torch.softmax(g, -1), 0.1).shape == (5,)
