"""``train.report_to`` in a real run: TensorBoard's event file holds the metrics.jsonl values under TRL's tags;
a tracker that is not installed stops ``moedpo train`` before anything is written."""

import sys

import pytest

from moedpo.cli import main
from moedpo.config import load_config
from moedpo.runs import read_metrics
from moedpo.training import train

SMALL = ["model.hidden_size=32", "data.annotators_per_type=3", "data.pairs_per_annotator=12"]


def test_tensorboard_event_file_holds_the_logged_metrics_under_trl_tags(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    steps = ["train.max_steps=4", "train.eval_steps=2", "train.report_to=tensorboard"]
    run = train(load_config(overrides=[f"train.output_dir={tmp_path / 'run'}", *SMALL, *steps]))
    events = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    rows = read_metrics(run)
    for key, tag in [
        ("loss", "train/loss"),
        ("logps/chosen", "train/logps/chosen"),
        ("rewards/accuracies", "train/rewards/accuracies"),
        ("expert_1/rewards/margins", "train/expert_1/rewards/margins"),
        ("learning_rate", "train/learning_rate"),
        ("eval/rewards/accuracies", "eval/rewards/accuracies"),
        ("eval/mixture_nll", "eval/mixture_nll"),
    ]:
        assert tag in tags, tag
        logged = {r["step"]: r[key] for r in rows if key in r}
        written = {e.step: e.value for e in events.Scalars(tag)}
        assert written.keys() == logged.keys(), tag
        assert all(abs(written[s] - logged[s]) <= 1e-6 * max(1.0, abs(logged[s])) for s in logged), tag
    assert sorted({e.step for e in events.Scalars("eval/mixture_nll")}) == [2, 4]
    assert not any(t.startswith("train/eval") or t.startswith("loss") for t in tags)


def test_default_run_writes_no_tracker_files(tmp_path):
    """transformers 5's default, none: only metrics.jsonl (before: a tensorboard/ folder whenever it was installed)."""
    run = train(load_config(overrides=[f"train.output_dir={tmp_path / 'run'}", *SMALL, "train.max_steps=1"]))
    assert (run / "metrics.jsonl").exists() and not (run / "tensorboard").exists()


def test_a_tracker_that_is_not_installed_stops_train_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed, whether it is or not
    run_dir = tmp_path / "run"
    assert main(["train", f"train.output_dir={run_dir}", *SMALL, "train.report_to=[tensorboard, wandb]"]) == 2
    assert "wandb needs the wandb package, which is not installed: pip install wandb" in capsys.readouterr().err
    assert not run_dir.exists()
