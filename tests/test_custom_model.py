"""A user's own latent model (examples/hierarchical_model.py: an annotator-level type and a pair-level expert)
is checked with moedpo.testing, gets the exact posterior for every latent site, and trains through
``moedpo train`` (``em.model=package.module:name``) with every schedule."""

import sys
from pathlib import Path

import pytest
import torch

from moedpo.config import ConfigError, load_config
from moedpo.inference import posterior, sample_posterior
from moedpo.losses import log_likelihood
from moedpo.models import mixture_bt_model, user_bt_model
from moedpo.runs import read_metrics
from moedpo.testing import (
    check_matches_closed_form,
    check_normalisation,
    check_posterior_by_enumeration,
    check_swap_symmetry,
)
from moedpo.training import train

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
from hierarchical_model import hierarchical_bt_model, transition_logits  # noqa: E402


def hierarchical_nll(h, gate_logits, beta, *, user_index, stickiness=0.9, **_):
    """Hand twin: -log sum_g w_ug prod_{i in u} sum_k T[g, k] sigmoid(beta h_ik), per annotator (U,)."""
    log_t = transition_logits(h.shape[-1], stickiness, h.dtype)  # (G, K)
    per_pair = torch.logsumexp(log_t.unsqueeze(0) + log_likelihood(h, beta).unsqueeze(1), -1)  # (B, G)
    per_user = torch.zeros(gate_logits.shape, dtype=h.dtype).index_add(0, user_index, per_pair)  # (U, G)
    return -torch.logsumexp(torch.log_softmax(gate_logits, -1) + per_user, -1)


@pytest.fixture
def batch():
    torch.manual_seed(0)
    h = 2 * torch.randn(6, 3, dtype=torch.float64)
    return h, torch.randn(3, 3, dtype=torch.float64), torch.tensor([0, 0, 1, 2, 2, 2])


def test_hierarchical_model_passes_the_public_checks(batch):
    h, g, users = batch
    options = dict(user_index=users, stickiness=0.7)
    check_matches_closed_form(hierarchical_bt_model, hierarchical_nll, h, g, 0.8, **options)
    check_normalisation(hierarchical_bt_model, h, g, 0.8, **options)
    check_swap_symmetry(hierarchical_bt_model, h, g, 0.8, **options)


@pytest.mark.parametrize("users", [[0, 0, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0]])
def test_e_step_is_exact_for_every_latent_site(batch, users):
    """Both nested latents (annotator type, pair expert) against brute-force enumeration of all 2^(U + U*N)
    assignments (K = 2), including a batch of a single annotator (a plate of size one)."""
    h, g, _ = batch
    users = torch.tensor(users[:4])
    g = g[: int(users.max()) + 1, :2]
    check_posterior_by_enumeration(hierarchical_bt_model, h[:4, :2], g, 0.8, user_index=users, stickiness=0.7)


@pytest.mark.parametrize(
    "model, extra", [(mixture_bt_model, {}), (user_bt_model, {"user_index": torch.tensor([0, 1, 1, 0])})]
)
def test_e_step_is_exact_for_the_built_in_models(batch, model, extra):
    h, g, _ = batch
    gate = g[:2] if extra else torch.randn(4, 3, dtype=torch.float64)
    check_posterior_by_enumeration(model, h[:4], gate, 0.8, **extra)


def test_e_step_is_exact_under_a_subsampled_plate(batch):
    """The N/b scale of a subsampled plate multiplies the evidence, not the posterior (was off by 0.21)."""
    h, g, _ = batch
    g = torch.randn(6, 3, dtype=torch.float64)
    q = posterior(
        mixture_bt_model, h, g, 0.8, torch.ones(6, dtype=torch.float64), subsample=torch.tensor([1, 4])
    ).marginals["z"]
    expected = torch.softmax(torch.log_softmax(g[[1, 4]], -1) + log_likelihood(h[[1, 4]], 0.8), -1)
    assert torch.allclose(q, expected, atol=1e-10)


SMALL = [
    "model.hidden_size=32",
    "data.annotators_per_type=4",
    "data.pairs_per_annotator=16",
    "train.max_steps=40",
    "train.eval_steps=0",
    "train.save_steps=0",
    "em.model=hierarchical_model:hierarchical_bt_model",
]


@pytest.mark.parametrize("schedule", ["em", "svi", "gumbel"])
def test_hierarchical_model_trains_through_moedpo_train(tmp_path, monkeypatch, schedule):
    monkeypatch.chdir(EXAMPLES)  # em.model imports from the working directory, like `python -m`
    run = train(load_config(overrides=[f"train.output_dir={tmp_path / schedule}", f"em.schedule={schedule}", *SMALL]))
    rows = read_metrics(run)
    assert len(rows) == 40 and rows[-1]["loss"] < rows[0]["loss"]
    assert (run / "report" / "eval.json").exists()


def test_unknown_model_path_fails_with_a_named_error(tmp_path):
    with pytest.raises(ConfigError, match="em.model='nowhere.at_all:model': cannot import 'nowhere.at_all'"):
        train(load_config(overrides=[f"train.output_dir={tmp_path}", "em.model=nowhere.at_all:model"]))
    assert not any(tmp_path.iterdir())


def test_posterior_draws_follow_the_exact_posterior(batch):
    """2000 joint draws (sparse updates): each site's frequencies within 4 standard errors of its marginal."""
    h, g, users = batch
    options = dict(user_index=users[:4], stickiness=0.7)
    args = (h[:4, :2].float(), g[:3, :2].float(), 0.8, torch.ones(4))
    exact = posterior(hierarchical_bt_model, *args, **options).marginals
    draws = [sample_posterior(hierarchical_bt_model, *args, **options) for _ in range(2000)]
    for name, q in exact.items():
        counts = torch.stack([torch.nn.functional.one_hot(d[name], 2).float() for d in draws]).mean(0)
        error = 4 * (q * (1 - q) / 2000).sqrt() + 1e-3
        assert ((counts - q).abs() <= error).all(), name


def test_fisher_identity_under_a_subsampled_plate(batch):
    """d E_q[log p(obs, z)] / dh equals d log p(obs) / dh with the N/b scale of a subsampled plate."""
    from moedpo.inference import expected_log_joint, marginal_loss

    h, g, _ = batch
    g = torch.randn(6, 3, dtype=torch.float64)
    obs, pick = torch.ones(6, dtype=torch.float64), torch.tensor([1, 4])
    post = posterior(mixture_bt_model, h, g, 0.8, obs, subsample=pick)
    leaf = h.clone().requires_grad_(True)
    (ours,) = torch.autograd.grad(expected_log_joint(mixture_bt_model, post, leaf, g, 0.8, obs, subsample=pick), leaf)
    leaf = h.clone().requires_grad_(True)
    (theirs,) = torch.autograd.grad(-marginal_loss(mixture_bt_model, None, leaf, g, 0.8, obs, subsample=pick), leaf)
    assert torch.allclose(ours, theirs, atol=1e-10) and theirs.abs().max() > 0.1
