"""moedpo.testing: the strategies produce what they promise, and the checks catch broken models."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given
from pyro.ops.indexing import Vindex

from moedpo.losses import mixture_nll
from moedpo.models import mixture_bt_model
from moedpo.testing import (
    check_matches_closed_form,
    check_normalisation,
    check_single_expert_is_dpo,
    check_swap_symmetry,
)
from moedpo.testing import strategies as mst


@given(mst.mixture_batches(max_batch=5, max_experts=3, max_abs=7.0))
def test_mixture_batches_shapes_and_bounds(batch):
    b, k = batch["h"].shape
    assert 1 <= b <= 5 and 1 <= k <= 3
    assert batch["gate_logits"].shape == (b, k) and batch["obs"].shape == (b,)
    assert batch["h"].abs().max() <= 7.0 and batch["beta"] > 0 and batch["h"].dtype == torch.float64


@given(mst.mixture_batches(user_scope=True))
def test_user_batches_cover_every_user(batch):
    users, num_users = batch["user_index"], batch["gate_logits"].shape[0]
    assert sorted(set(users.tolist())) == list(range(num_users))


@given(mst.simplex(4, 3))
def test_simplex_rows(q):
    assert torch.all(q >= 0) and torch.allclose(q.sum(-1), torch.ones(4, dtype=q.dtype))


def wrong_sign_model(h, gate_logits, beta, obs=None, **_):
    """A plausible bug: the margin enters with the wrong sign."""
    with pyro.plate("pairs", h.shape[0]):
        z = pyro.sample("z", dist.Categorical(logits=gate_logits), infer={"enumerate": "parallel"})
        pyro.sample("y", dist.Bernoulli(logits=-beta * Vindex(h)[..., z]), obs=obs)


def unnormalised_model(h, gate_logits, beta, obs=None, **_):
    """Another bug: an extra factor makes p(obs) sum to more than one."""
    mixture_bt_model(h, gate_logits, beta, obs)
    pyro.factor("oops", torch.tensor(0.1, dtype=h.dtype))


def test_checks_pass_on_the_builtin_model():
    h, g = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    check_matches_closed_form(mixture_bt_model, mixture_nll, h, g, 0.5)
    check_normalisation(mixture_bt_model, h, g, 0.5)
    check_swap_symmetry(mixture_bt_model, h, g, 0.5)
    check_single_expert_is_dpo(mixture_bt_model, h[:, :1], g[:, :1], 0.5)


def test_checks_catch_a_wrong_sign():
    h, g = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(AssertionError, match="enumerated loss vs closed form"):
        check_matches_closed_form(wrong_sign_model, mixture_nll, h, g, 0.5, max_plate_nesting=1)
    with pytest.raises(AssertionError, match="K=1 loss vs DPO"):
        check_single_expert_is_dpo(wrong_sign_model, h[:, :1], g[:, :1], 0.5, max_plate_nesting=1)


def test_checks_catch_an_unnormalised_model():
    h, g = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(AssertionError, match="normalisation"):
        check_normalisation(unnormalised_model, h, g, 0.5, max_plate_nesting=1)


WITHOUT_HYPOTHESIS = """
import sys
sys.modules["hypothesis"] = None  # as if not installed: any import of it raises ImportError
import torch
import moedpo.testing
from moedpo.losses import mixture_nll
from moedpo.models import mixture_bt_model
from moedpo.testing import check_matches_closed_form, check_single_expert_is_dpo
h, g = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
check_matches_closed_form(mixture_bt_model, mixture_nll, h, g, 0.5)
check_single_expert_is_dpo(mixture_bt_model, h[:, :1], g[:, :1], 0.5)
try:
    moedpo.testing.strategies
except ImportError as error:
    assert "moedpo[testing]" in str(error), error
else:
    raise AssertionError("strategies imported without hypothesis")
print("checks ran without hypothesis")
"""


def test_checks_import_and_run_without_hypothesis():
    """hypothesis is a test extra only: the checks work without it; only ``strategies`` needs it, and says so."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", WITHOUT_HYPOTHESIS], capture_output=True, text=True, env=os.environ)
    assert done.returncode == 0 and "checks ran without hypothesis" in done.stdout, done.stderr[-2000:]


def test_strategies_stay_reachable_as_an_attribute():
    import moedpo.testing

    assert moedpo.testing.strategies is mst and "strategies" in moedpo.testing.__all__
