"""Checks a user runs on their own latent preference model (any Pyro function with the signature of
:func:`moedpo.models.mixture_bt_model`). Each raises ``AssertionError`` naming the law and the numbers.

    from moedpo.testing import check_matches_closed_form
    check_matches_closed_form(my_model, my_closed_form_nll, h, gate_logits, beta, max_plate_nesting=1)
"""

from __future__ import annotations

import itertools

import torch
from pyro import poutine

from moedpo.inference.estep import log_joint, posterior
from moedpo.inference.objectives import marginal_loss
from moedpo.losses.dpo import dpo_loss


def _nll(model, h, gate_logits, beta, obs, nesting, **kwargs) -> torch.Tensor:
    return marginal_loss(model, None, h, gate_logits, beta, obs, max_plate_nesting=nesting, **kwargs)


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol):
        diff = (actual - expected).abs().max().item()
        raise AssertionError(
            f"{name}: max abs difference {diff:.3g} (rtol={rtol}, atol={atol})\ngot      {actual}\nexpected {expected}"
        )


def _observed(obs, h) -> torch.Tensor:
    return torch.ones(h.shape[0], dtype=h.dtype) if obs is None else obs


def _leaves(h, gate_logits):
    return h.detach().clone().requires_grad_(True), gate_logits.detach().clone().requires_grad_(True)


def check_normalisation(model, h, gate_logits, beta, *, max_plate_nesting=None, max_pairs=8, **kwargs):
    """Sum over every labelling obs in {0, 1}^B of p(obs) is 1 (B <= ``max_pairs``)."""
    num_pairs = h.shape[0]
    if num_pairs > max_pairs:
        raise ValueError(f"check_normalisation enumerates 2^B labellings; B={num_pairs} > max_pairs={max_pairs}")
    h, gate_logits = _leaves(h, gate_logits)
    total = 0.0
    for labels in itertools.product((0.0, 1.0), repeat=num_pairs):
        obs = torch.tensor(labels, dtype=h.dtype)
        total = total + torch.exp(-_nll(model, h, gate_logits, beta, obs, max_plate_nesting, **kwargs))
    _close("normalisation: sum over labellings of p(obs)", total.detach(), torch.ones_like(total), 1e-6, 1e-6)


def check_single_expert_is_dpo(model, h, gate_logits, beta, *, max_plate_nesting=None, rtol=1e-6, **kwargs):
    """With K=1 the model's -log p(obs = 1) is the summed DPO sigmoid loss (loss and gradient in h)."""
    if h.shape[-1] != 1:
        raise ValueError(f"check_single_expert_is_dpo needs h of shape (B, 1), got {tuple(h.shape)}")
    h, gate_logits = _leaves(h, gate_logits)
    obs = torch.ones(h.shape[0], dtype=h.dtype)
    loss = _nll(model, h, gate_logits, beta, obs, max_plate_nesting, **kwargs)
    expected = dpo_loss(h[:, 0], beta).sum()
    _close("K=1 loss vs DPO", loss.detach(), expected.detach(), rtol, 1e-8)
    (grad,) = torch.autograd.grad(loss, h)
    (expected_grad,) = torch.autograd.grad(expected, h)
    _close("K=1 gradient vs DPO", grad, expected_grad, rtol, 1e-8)


def check_matches_closed_form(
    model, closed_form_nll, h, gate_logits, beta, *, obs=None, max_plate_nesting=None, rtol=1e-6, atol=1e-8,
    **kwargs,
):  # fmt: skip
    """Pyro enumeration of ``model`` equals ``closed_form_nll(h, gate_logits, beta, **kwargs)`` summed:
    the loss and its gradients with respect to h and gate_logits. ``obs`` defaults to every chosen response
    winning (pairs); a ranking model takes its rankings here (the closed form then closes over them)."""
    h, gate_logits = _leaves(h, gate_logits)
    obs = _observed(obs, h)
    loss = _nll(model, h, gate_logits, beta, obs, max_plate_nesting, **kwargs)
    expected = closed_form_nll(h, gate_logits, beta, **kwargs).sum()
    _close("enumerated loss vs closed form", loss.detach(), expected.detach(), rtol, atol)
    grads = torch.autograd.grad(loss, (h, gate_logits), allow_unused=True)
    expected_grads = torch.autograd.grad(expected, (h, gate_logits), allow_unused=True)
    for name, g, e in zip(("h", "gate_logits"), grads, expected_grads):
        g = torch.zeros_like(h if name == "h" else gate_logits) if g is None else g
        e = torch.zeros_like(g) if e is None else e
        _close(f"gradient in {name} vs closed form", g, e, rtol, atol)


def check_swap_symmetry(model, h, gate_logits, beta, *, max_plate_nesting=None, rtol=1e-6, **kwargs):
    """Swapping chosen and rejected (h -> -h) and flipping the labels (obs 1 -> 0) leaves p(obs) unchanged."""
    h, gate_logits = _leaves(h, gate_logits)
    ones = torch.ones(h.shape[0], dtype=h.dtype)
    loss = _nll(model, h, gate_logits, beta, ones, max_plate_nesting, **kwargs)
    swapped = _nll(model, -h, gate_logits, beta, 1 - ones, max_plate_nesting, **kwargs)
    _close("swap symmetry", swapped.detach(), loss.detach(), rtol, 1e-8)


def check_posterior_by_enumeration(
    model, h, gate_logits, beta, *, obs=None, max_plate_nesting=None, max_assignments=4096, atol=1e-8, **kwargs
):
    """moedpo's E-step (:func:`moedpo.inference.posterior`) equals brute force: every joint assignment of every
    latent site scored by the model, then normalised. Checks each site's marginal and the log evidence.
    ``obs`` as in :func:`check_matches_closed_form`."""
    obs = _observed(obs, h)
    args = (h.detach(), gate_logits.detach(), beta, obs)
    post = posterior(model, *args, max_plate_nesting=max_plate_nesting, **kwargs)
    with torch.no_grad():
        prior = poutine.trace(model).get_trace(*args, **kwargs)
    latent = {
        name: post.marginals[name].shape[-1]
        for name, site in prior.nodes.items()
        if site["type"] == "sample" and name in post.marginals
    }
    shapes = {name: prior.nodes[name]["value"].shape for name in latent}
    cells = [(name, index) for name in latent for index in itertools.product(*(range(n) for n in shapes[name]))]
    count = 1
    for name, _ in cells:
        count *= latent[name]
    if count > max_assignments:
        raise ValueError(f"check_posterior_by_enumeration: {count} joint assignments > max_assignments")
    joint, marginals = [], {name: torch.zeros((*shapes[name], k), dtype=torch.float64) for name, k in latent.items()}
    assignments = list(itertools.product(*(range(latent[name]) for name, _ in cells)))
    for assignment in assignments:
        values = {name: torch.zeros(shapes[name], dtype=torch.long) for name in latent}
        for (name, index), value in zip(cells, assignment):
            values[name][index] = value
        with torch.no_grad():
            joint.append(float(log_joint(model, values, *args, **kwargs)))
    joint_t = torch.tensor(joint, dtype=torch.float64)
    weights = torch.softmax(joint_t, 0)
    for w, assignment in zip(weights, assignments):
        for (name, index), value in zip(cells, assignment):
            marginals[name][(*index, value)] += w
    _close("log evidence vs brute force", post.log_evidence.double(), torch.logsumexp(joint_t, 0), 1e-6, atol)
    for name, expected in marginals.items():
        _close(f"posterior of {name!r} vs brute force", post.marginals[name].double(), expected, 1e-6, atol)
