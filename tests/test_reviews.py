"""The reviews world's texts and rewards: values worked out by hand, and every injected error is caught."""

import random

import pytest

from moedpo.data.reviews import ERRORS, _sentence, grammar, informativeness, make_review_rows, reward, sentiment


def test_rewards_by_hand():
    assert sentiment(" The plot was wonderful.") > 0.5 and sentiment(" The plot was awful.") < -0.4
    assert sentiment(" The plot was long.") == 0.0
    assert informativeness(" The plot was slow. The cast was long.") == 0.5  # 2 aspects / 4, nothing evaluative
    assert informativeness(" The plot was dull. The cast was great.") == 0.0  # 2/4 - 0.5 * (2 evaluative / 2)
    assert informativeness(" It was wonderful.") == -0.5  # 0/4 - 0.5 * 1/1
    assert informativeness(" The plot, the cast, the score, the ending, the editing and the lighting.") == 1.0  # capped
    assert grammar(" The plot was dull.") == 1.0
    assert grammar(" The plot were dull.") == 0.0
    assert grammar(" The the plot was dull.") == 0.0
    assert grammar(" The plot was dull") == 0.0
    assert grammar(" The plot was dull. The cast were great.") == 0.5


@pytest.mark.parametrize("error", [None, *ERRORS])
def test_every_injected_error_is_caught_and_clean_sentences_pass(error):
    rng = random.Random(0)
    for _ in range(200):
        aspect = rng.choice(["plot", "cast", None])
        text = " " + _sentence(rng, aspect, error)
        assert grammar(text) == (1.0 if error is None else 0.0), text


def test_annotators_label_by_their_own_objective():
    rows = make_review_rows(("sentiment", "grammar"), annotators_per_type=4, pairs_per_annotator=30, seed=2)
    for objective in ("sentiment", "grammar"):
        own = [r for r in rows if r["group"] == objective]
        agree = sum(reward(r["chosen"], objective) > reward(r["rejected"], objective) for r in own) / len(own)
        assert agree > 0.75, (objective, agree)
