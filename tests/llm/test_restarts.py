"""em.restarts: short runs from different starts; the best one continues exactly where it stood."""

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

from moedpo import restarts
from moedpo.config import ConfigError, load_config
from moedpo.eval.found import Evidence, diagnostics
from moedpo.eval.report import report
from moedpo.inference.start import data_start, random_start
from moedpo.training import train

SMALL = ["model.hidden_size=32", "data.annotators_per_type=3", "data.pairs_per_annotator=12", "report.num_prompts=0"]
LABELS = torch.tensor([0, 0, 0, 1, 1, 1])
STEPS = ["train.max_steps=12", "train.save_steps=0", "train.eval_steps=0", "em.init_steps=4"]


def config(tmp_path, *overrides, name="run"):
    return load_config(overrides=[f"train.output_dir={tmp_path / name}", *SMALL, *STEPS, *overrides])


def params(run) -> dict:
    return load_file(run / "checkpoint" / "params.safetensors")


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_the_kept_restart_continues_exactly(tmp_path, monkeypatch):
    """Scores rigged to keep restart 0 (its start is the config's): after a random restart 1 has trained in
    between, the run ends bit for bit where a run without restarts ends, so the parameters, optimizer, scheduler,
    random state and loop state were all put back; restarts.json says what happened."""
    plain = train(config(tmp_path, name="plain"))
    calls = iter([0.1, 0.2])
    monkeypatch.setattr(restarts, "_score", lambda run: (next(calls), LABELS))
    run = train(config(tmp_path, "em.restarts=2", "em.restart_steps=5"))
    assert_same(params(plain), params(run))
    summary = json.loads((run / "restarts.json").read_text())
    assert summary == {"criterion": "eval/mixture_nll", "scores": [0.1, 0.2], "starts": ["data", "random"],
                       "kept": 0, "agreement": 1.0, "steps": 5}  # fmt: skip
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 13))  # the kept restart's five, then the rest


def test_every_restart_begins_from_the_same_state(tmp_path, monkeypatch):
    """Two restarts from one start score the same to the last bit: the second began from the first's origin."""
    monkeypatch.setattr(restarts, "random_start", lambda examples, k, by_user, steps, seed: data_start(
        examples, k, by_user, steps, 0))  # fmt: skip
    run = train(config(tmp_path, "em.restarts=2", "em.restart_steps=5"))
    summary = json.loads((run / "restarts.json").read_text())
    assert summary["scores"][0] == summary["scores"][1] and summary["agreement"] == 1.0


def test_a_crash_after_the_restarts_resumes_with_the_kept_start(tmp_path, monkeypatch, at_step):
    """The kept restart's start (a random partition, not what the config rebuilds) is in the checkpoint: a crash
    at step 8 resumes from the restarts' checkpoint at step 5 to an uninterrupted run's parameters."""
    scores = itertools.cycle([0.2, 0.1])  # restart 1 wins, in each of the two trainings
    monkeypatch.setattr(restarts, "_score", lambda run: (next(scores), LABELS))
    options = ["em.restarts=2", "em.restart_steps=5", "em.init_steps=8"]
    reference = train(config(tmp_path, *options, name="uninterrupted"))
    assert json.loads((reference / "restarts.json").read_text())["kept"] == 1  # the random start
    at_step(7)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, *options, name="crashed"))
    monkeypatch.undo()
    loop = json.loads((tmp_path / "crashed" / "checkpoint" / "loop.json").read_text())
    assert loop["start"]["clusters"]
    resumed = train(config(tmp_path, *options, name="crashed"), resume=True)
    assert_same(params(reference), params(resumed))


def test_random_starts_are_balanced_and_seeded():
    examples = [{"user": u, "index": i} for i, u in enumerate([0, 0, 1, 2, 2, 3, 4, 5, 5])]
    a = random_start(examples, 3, True, 10, seed=1)
    assert sorted(a.clusters) == [("user", u) for u in range(6)]
    assert sorted(torch.bincount(torch.tensor(list(a.clusters.values()))).tolist()) == [2, 2, 2]
    assert a == random_start(examples, 3, True, 10, seed=1) and a != random_start(examples, 3, True, 10, seed=2)
    assert type(a).from_json(json.loads(json.dumps(a.to_json()))) == a


def test_restarts_that_disagree_are_named(tmp_path):
    evidence = Evidence(torch.tensor([0, 1, 0, 1]), torch.ones(4), 2, "annotators", restart_agreement=0.3)
    assert [d["name"] for d in diagnostics(evidence)] == ["restarts_disagree"]
    assert diagnostics(Evidence(torch.tensor([0, 1]), torch.ones(2), 2, "annotators", restart_agreement=0.9)) == []
    run = train(config(tmp_path, "train.max_steps=2"))
    (run / "restarts.json").write_text(json.dumps({"agreement": 0.1}))
    report(run)
    named = json.loads((run / "report" / "eval.json").read_text())["diagnostics"]
    assert "restarts_disagree" in [d["name"] for d in named]
    assert "ARI 0.10 < 0.8" in (run / "report" / "report.md").read_text()


@pytest.mark.parametrize(
    ("value", "match"), [("em.restarts=0", "em.restarts"), ("em.restart_steps=12", "em.restart_steps")]
)
def test_bad_restart_settings_are_named(value, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=["em.restarts=2", "train.max_steps=12", value])
