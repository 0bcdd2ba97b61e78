"""experts.num_experts=auto: K chosen by held-out pairs, the smallest within the margin; the chosen K trains on
exactly as a run with that K would; a world with one type gets one expert."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from moedpo.config import ConfigError, load_config
from moedpo.data.builtin import make_builtin_rows
from moedpo.eval.evaluate import predictive_log_prob
from moedpo.kselection import choose, unit_nll
from moedpo.training import train

SMALL = [
    "model.hidden_size=32",
    "data.annotators_per_type=6",
    "data.pairs_per_annotator=24",
    "report.num_prompts=0",
    "train.max_steps=40",
    "em.restart_steps=25",
    "experts.max_experts=3",
    "train.eval_steps=0",
    "train.save_steps=0",
    "train.num_threads=1",
]  # fmt: skip (one thread: runs compared bit for bit)


def config(tmp_path, *overrides, name="run"):
    return load_config(overrides=[f"train.output_dir={tmp_path / name}", *SMALL, *overrides])


def by_hand(per_unit: dict, margin: float = 2.0) -> int:
    """The rule in float64 numpy: the smallest K whose paired mean excess over the best is <= margin SE."""
    ks = sorted(per_unit)
    best = min(ks, key=lambda k: np.mean(per_unit[k]))
    for k in ks:
        d = np.asarray(per_unit[k], dtype=np.float64) - np.asarray(per_unit[best], dtype=np.float64)
        se = np.std(d, ddof=1) / math.sqrt(len(d))
        if d.mean() <= margin * se:
            return k
    raise AssertionError("the best K always qualifies")


def test_the_rule_by_hand():
    """K=3 is best; K=2 is 0.05 worse per unit with a spread that makes that 1.15 standard errors (chosen); K=1 is
    far worse. Moving K=2's excess to 5 standard errors makes K=3 the choice."""
    best = [0.30, 0.35, 0.25, 0.40, 0.32, 0.28]
    noise = [0.10, -0.05, 0.20, 0.02, -0.08, 0.11]  # mean 0.05, sd 0.1062: SE 0.0434
    per_unit = {1: [b + 0.5 for b in best], 2: [b + n for b, n in zip(best, noise)], 3: best}
    s = choose({k: torch.tensor(v, dtype=torch.float64) for k, v in per_unit.items()}, "annotator", 25)
    assert (s.chosen, s.best) == (2, 3)
    assert s.excess[1] == pytest.approx(0.05) and s.stderr[1] == pytest.approx(0.1062 / math.sqrt(6), abs=1e-4)
    assert s.excess[2] == 0.0 and s.scores[2] == pytest.approx(np.mean(best))
    tight = {**per_unit, 2: [b + 0.05 + n / 10 for b, n in zip(best, noise)]}
    assert choose({k: torch.tensor(v) for k, v in tight.items()}, "annotator", 25).chosen == 3


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 5), st.integers(3, 12), st.integers(0, 2**31 - 1))
def test_the_rule_against_numpy(num_k, units, seed):
    rng = np.random.default_rng(seed)
    per_unit = {k: rng.gamma(2.0, 0.2, units) + rng.normal(0, 0.05) for k in range(1, num_k + 1)}
    s = choose({k: torch.tensor(v) for k, v in per_unit.items()}, "pair", 1)
    assert s.chosen == by_hand(per_unit) and s.chosen <= s.best
    assert s.best == min(per_unit, key=lambda k: per_unit[k].mean())


def test_unit_nll_averages_each_annotators_pairs():
    log_prob = torch.log(torch.tensor([0.5, 0.25, 0.8, 0.1]))
    assert torch.allclose(unit_nll(log_prob, [7, 3, 7, 3]),
                          torch.tensor([-(math.log(0.25) + math.log(0.1)) / 2, -(math.log(0.5) + math.log(0.8)) / 2],
                                       dtype=torch.float64))  # fmt: skip
    assert torch.allclose(unit_nll(log_prob, None), -log_prob.double())


def test_held_out_log_prob_is_the_mixture_predictive():
    """What K is scored on: log sum_k w_k sigmoid(beta h_k), here by hand."""
    h, w = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.25, 0.75]])
    expected = math.log(0.25 / (1 + math.exp(-1.0)) + 0.75 / (1 + math.exp(0.5)))
    assert float(predictive_log_prob(h, w, 0.5, 0.0)) == pytest.approx(expected)


@pytest.fixture(scope="module")
def two_types(tmp_path_factory):
    return train(config(tmp_path_factory.mktemp("k"), "experts.num_experts=auto"))


def test_two_types_give_two_experts_and_train_on_as_a_fixed_k_run(two_types, tmp_path):
    """The built-in world's two types: K=2 chosen, config.yaml says so (eval, --resume and generate read an
    integer), the report draws the curve, and the run ends bit for bit where `num_experts=2` ends: the chosen
    K's short run was kept, not retrained, and began as a fresh run with that K begins."""
    selection = json.loads((two_types / "k_selection.json").read_text())
    assert selection["chosen"] == 2 and selection["candidates"] == [1, 2, 3] and selection["unit"] == "annotator"
    assert selection["scores"][0] > selection["scores"][1]  # one expert cannot serve both types
    assert load_config(two_types / "config.yaml").experts.num_experts == 2
    assert "experts.num_experts=auto: chose K=2" in (two_types / "config.yaml").read_text()
    assert (two_types / "report" / "k_selection.png").stat().st_size > 0
    assert "## Number of types" in (two_types / "report" / "report.md").read_text()
    fixed = train(config(tmp_path, "experts.num_experts=2", name="fixed"))
    a, b = (load_file(r / "checkpoint" / "params.safetensors") for r in (two_types, fixed))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    lines = [json.loads(line) for line in (two_types / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 41))  # the chosen K's 25, then the rest
    assert all(line["em/num_experts"] == 2 for line in lines[:25])


def test_one_type_gets_one_expert(tmp_path):
    """A mixture must not invent types: annotators of one type only (the built-in world's `bright`)."""
    rows = [r for r in make_builtin_rows(annotators_per_type=12, pairs_per_annotator=24) if r["group"] == "bright"]
    source = tmp_path / "one_type.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = train(config(tmp_path, "experts.num_experts=auto", f"data.source={source}"))
    selection = json.loads((run / "k_selection.json").read_text())
    assert selection["chosen"] == 1, selection


def test_a_resumed_auto_run_keeps_its_k(two_types):
    """--resume with the user's own `auto` config (not the run's config.yaml) continues with the K chosen."""
    run = train(load_config(overrides=[f"train.output_dir={two_types}", *SMALL, "experts.num_experts=auto",
                                       "train.max_steps=42"]), resume=True)  # fmt: skip
    assert load_config(run / "config.yaml").experts.num_experts == 2


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["experts.num_experts=three"], "expected an integer >= 1, or auto"),
        (["experts.num_experts=0"], "expected an integer >= 1, or auto"),
        (["experts.num_experts=auto", "experts.max_experts=1"], "experts.max_experts=1"),
        (["experts.num_experts=auto", "data.eval_fraction=0"], "held-out pairs"),
        (["experts.num_experts=auto", "em.restart_steps=40"], "em.restart_steps=40"),
    ],
)
def test_bad_auto_settings_are_refused(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(overrides=[*SMALL, *overrides])
