"""Draws keyed by latent unit (moedpo.inference.draws): each unit's draw depends on the seed, the step and the unit
only, so a batch split into micro-batches or processes draws what the whole batch draws; and the draws have the
distribution they claim."""

import pytest
import torch
from scipy.stats import chisquare
from test_micro_batches import _step, _user_scope_batches, _world

from moedpo.inference.draws import UnitDraws


def test_a_units_draw_does_not_depend_on_the_other_units_of_its_batch():
    draws = UnitDraws(seed=3)
    logits = torch.randn(6, 4, dtype=torch.float64)
    keys = [("user", u) for u in (5, 9, 2, 7, 1, 4)]
    whole = draws.categorical(logits, keys, step=11, stream="posterior")
    halves = torch.cat(
        [draws.categorical(logits[rows], keys[rows], 11, "posterior") for rows in (slice(0, 2), slice(2, 6))]
    )
    reordered = draws.categorical(logits.flip(0), keys[::-1], 11, "posterior").flip(0)
    assert torch.equal(whole, halves) and torch.equal(whole, reordered)
    uniforms = [
        draws.uniform(keys, 4, step, stream) for step, stream in ((11, "posterior"), (12, "posterior"), (11, "guide"))
    ]
    assert not torch.equal(uniforms[0], uniforms[1]) and not torch.equal(uniforms[0], uniforms[2])
    assert not torch.equal(UnitDraws(4).uniform(keys, 4, 11, "posterior"), uniforms[0])
    assert torch.equal(
        draws.uniform([("pair", 5)], 4, 11, "posterior")[0] == uniforms[0][0], torch.zeros(4, dtype=torch.bool)
    )


def test_gumbel_max_draws_follow_the_softmax():
    """20,000 units with the same logits: the frequencies of each value pass a chi-square test against softmax,
    on two steps (p > 1e-3 each; a wrong sign of the noise or a missing log gives p ~ 0)."""
    logits = torch.tensor([[1.5, 0.0, -1.0, 0.5]], dtype=torch.float64).expand(20_000, 4)
    keys = [("pair", i) for i in range(20_000)]
    expected = torch.softmax(logits[0], -1) * 20_000
    for step in (0, 1):
        counts = torch.bincount(UnitDraws(0).categorical(logits, keys, step, "guide"), minlength=4)
        assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3, counts


@pytest.mark.parametrize("gate_kind", ["mlp", "fixed"])
def test_a_gumbel_step_from_micro_batches_equals_one_from_the_whole_batch(gate_kind):
    """User scope, annotators {0, 2} then {1, 3} as two micro-batches (as two processes would hold them) against all
    four in one batch: the same posterior draw of each annotator's expert, so the same parameters (float64, 1e-9).
    Drawn from one shared random stream, as before, the two disagree."""
    world = _world()
    pairs, split = _user_scope_batches(world)
    torch.manual_seed(0)
    one = _step(world, "user", gate_kind, [pairs], schedule="gumbel")
    torch.manual_seed(0)
    two = _step(world, "user", gate_kind, split, schedule="gumbel")
    for a, b in zip(one, two):
        assert torch.allclose(a, b, atol=1e-9, rtol=0), (a - b).abs().max()
