"""Shared test settings: one hypothesis profile, offline hub, fresh Pyro state and seeds for every test.

Hypothesis profiles: ``ci`` (derandomized, the default under ``CI``), ``dev`` (random draws, what a user's
``python -m pytest`` runs) and ``random`` (random draws, fewer examples: CI's second pass over the ``property``
tests, so that CI also draws what a user draws). ``HYPOTHESIS_PROFILE`` picks one and wins over ``CI``.
Every test that uses ``@given`` carries the ``property`` marker (``pytest -m property``).
"""

import os

import hypothesis
import pyro
import pytest
import torch
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(  # derandomize=False explicitly: under CI, hypothesis' own default derandomizes
    "random", derandomize=False, deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


def pytest_configure(config):
    config.addinivalue_line("markers", "property: a hypothesis property test (@given); set by conftest.py")


def pytest_collection_modifyitems(items):
    for item in items:
        if hypothesis.is_hypothesis_test(getattr(item, "obj", None)):
            item.add_marker(pytest.mark.property)


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """Tests reset global state: Pyro's param store, seeds, validation, and two CPU threads for every training
    (train.num_threads=auto keeps an OMP_NUM_THREADS): runs compared bit for bit must not differ in their thread
    count because another process loaded the machine in between (40 steps drift 2e-4 apart between 1 and 2)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    yield
    pyro.clear_param_store()
