"""``train.load_best_model_at_end``: the run ends with the parameters of its best held-out evaluation, says which
step in the log and eval.json, and keeps them through ``moedpo eval`` and ``--resume``."""

import json

import pytest
import torch
from safetensors.torch import load_file

import moedpo.training
from moedpo.assembly import open_run
from moedpo.config import ConfigError, load_config
from moedpo.runs import best_metric
from moedpo.training import train

SMALL = ["model.hidden_size=32", "data.annotators_per_type=3", "data.pairs_per_annotator=12"]
BEST = ["train.max_steps=8", "train.eval_steps=2", "train.load_best_model_at_end=true"]
ACCURACY = {2: 0.6, 4: 0.9, 6: 0.7, 8: 0.8}  # a peak at step 4, then lower


def config(tmp_path, name, *overrides):
    return load_config(overrides=[f"train.output_dir={tmp_path / name}", *SMALL, *BEST, *overrides])


@pytest.fixture
def scripted_accuracy(monkeypatch):
    """The training loop's evaluation, with eval/rewards/accuracies replaced by ACCURACY[step]; records a copy of
    every trainable parameter at each evaluation."""
    real, seen = moedpo.training.evaluate, {}

    def evaluate(run, train_examples, held_out):
        metrics, details = real(run, train_examples, held_out)
        step = 2 * (len(seen) + 1)
        seen[step] = {n: p.detach().clone() for n, p in run.trainable_parameters().items()}
        return {**metrics, "eval/rewards/accuracies": ACCURACY[step]}, details

    monkeypatch.setattr(moedpo.training, "evaluate", evaluate)
    return seen


def test_the_peak_steps_parameters_are_kept(tmp_path, scripted_accuracy, capsys):
    run = train(config(tmp_path, "run", "train.metric_for_best_model=rewards/accuracies"))
    assert (
        "load_best_model_at_end: kept step 4 of 8 (eval/rewards/accuracies 0.9, higher is better; at step 8: 0.8)"
        in (capsys.readouterr().err)
    )
    peak, last = scripted_accuracy[4], scripted_accuracy[8]
    assert any(not torch.equal(peak[n], last[n]) for n in peak)  # the run moved on after the peak
    reopened = open_run(run).trainable_parameters()  # what moedpo eval / generate / report use
    assert all(torch.equal(reopened[n].cpu(), peak[n]) for n in peak)
    final = load_file(run / "checkpoint" / "params.safetensors")  # --resume trains on from the last step
    assert all(torch.equal(final[n], last[n]) for n in last)
    for k in range(2):  # the PEFT adapters hold the kept step's weights
        adapter = load_file(run / "experts" / f"expert_{k}" / "adapter_model.safetensors")
        own = {n.replace(f".expert_{k}.", "."): p for n, p in peak.items() if f".expert_{k}." in n}
        assert adapter.keys() == own.keys() and all(torch.equal(adapter[n], own[n]) for n in own)
    gate = load_file(run / "gate.safetensors")["net.logits"]
    assert torch.equal(gate, load_file(run / "best" / "gate.safetensors")["net.logits"])
    kept = json.loads((run / "report" / "eval.json").read_text())["best_model"]
    assert kept == {"step": 4, "metric": "eval/rewards/accuracies", "value": 0.9, "greater_is_better": True}
    assert "Parameters of step 4 of 8" in (run / "report" / "report.md").read_text()


def test_a_resumed_run_keeps_the_same_best(tmp_path, scripted_accuracy, at_step):
    """Crash at step 7 (best at 4, checkpoint at 6), resume: the kept parameters are the uninterrupted run's."""
    options = ["train.metric_for_best_model=eval/rewards/accuracies", "train.save_steps=2"]
    whole = train(config(tmp_path, "whole", *options))
    scripted_accuracy.clear()
    at_step(6)  # VariationalEM.step raises as step 7 begins
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, "crashed", *options))
    scripted_accuracy.clear()
    scripted_accuracy.update({2: None, 4: None})  # evaluations resume at step 6 (the 3rd)
    at_step(-1)
    resumed = train(config(tmp_path, "crashed", *options), resume=True)
    for name in ("params.safetensors", "gate.safetensors"):
        a, b = load_file(whole / "best" / name), load_file(resumed / "best" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), name
    assert json.loads((resumed / "best" / "state.json").read_text())["step"] == 4


def test_which_way_is_better_is_inferred_as_transformers_does():
    assert best_metric(None, None) == ("eval/mixture_nll", False)  # the held-out loss, as transformers' "loss"
    assert best_metric("rewards/accuracies", None) == ("eval/rewards/accuracies", True)
    assert best_metric("eval/my_loss", None) == ("eval/my_loss", False)
    assert best_metric("eval/mixture_nll", True) == ("eval/mixture_nll", True)  # greater_is_better overrides


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ConfigError, match="load_best_model_at_end=true compares held-out evaluations: set"):
        load_config(overrides=["train.load_best_model_at_end=true", "train.eval_steps=0"])
    with pytest.raises(ConfigError, match="needs held-out pairs"):
        load_config(overrides=["train.load_best_model_at_end=true", "data.eval_fraction=0"])
    with pytest.raises(ConfigError, match="metric_for_best_model='acuracy': not a held-out metric of this run; its "):
        train(config(tmp_path, "typo", "train.metric_for_best_model=acuracy", "train.max_steps=2"))
