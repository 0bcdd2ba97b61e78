"""``train.report_to``: transformers' default and names, TRL-style tags, and the W&B / trackio calls (through
fake modules that record them: offline, nothing installed)."""

import dataclasses
import sys
import types

import pytest
from transformers import TrainingArguments

from moedpo.config import ConfigError, load_config
from moedpo.tracking import MetricsLogger, resolve_report_to, tracker_tags


def test_the_default_is_transformers_and_names_are_checked():
    default = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}["report_to"]
    assert load_config().train.report_to == default == "none"
    assert resolve_report_to("none") == [] and resolve_report_to(None) == []
    assert load_config(overrides=["train.report_to=[tensorboard, wandb]"]).train.report_to == ["tensorboard", "wandb"]
    for bad in ("tensorbord", "[none, wandb]", "[all, wandb]"):
        with pytest.raises(ConfigError, match="train.report_to=.*expected none, all, or some of tensorboard"):
            load_config(overrides=[f"train.report_to={bad}"])


def test_tags_are_transformers_rewritten_names():
    metrics = {"loss": 0.5, "logps/chosen": -3.0, "eval/rewards/accuracies": 0.75, "world_size": 1, "v": [0.1]}
    assert tracker_tags(metrics) == {
        "train/loss": 0.5,
        "train/logps/chosen": -3.0,
        "eval/rewards/accuracies": 0.75,
        "train/world_size": 1.0,
    }


def _recording_module(name, calls):
    module = types.ModuleType(name)
    module.init = lambda **kwargs: calls.append(("init", kwargs))
    module.log = lambda data, step=None: calls.append(("log", dict(data), step))
    module.finish = lambda: calls.append(("finish",))
    return module


@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_wandb_and_trackio_get_a_named_run_its_config_and_each_step(name, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, name, _recording_module(name, calls))
    monkeypatch.setenv(f"{name.upper()}_PROJECT", "prefs")
    run_dir = tmp_path / "my-run"
    run_dir.mkdir()
    logger = MetricsLogger(run_dir, trackers=resolve_report_to(name), config={"train": {"max_steps": 2}})
    logger.log(1, {"loss": 0.5, "rewards/accuracies": 0.25})
    logger.log(2, {"loss": 0.25, "eval/mixture_nll": 0.6, "eval/mean_weights": [0.5, 0.5]})
    logger.close()
    init = {"project": "prefs", "name": "my-run", "config": {"train": {"max_steps": 2}}}
    init |= {"dir": str(run_dir)} if name == "wandb" else {}
    assert calls == [
        ("init", init),
        ("log", {"train/loss": 0.5, "train/rewards/accuracies": 0.25}, 1),
        ("log", {"train/loss": 0.25, "eval/mixture_nll": 0.6}, 2),
        ("finish",),
    ]
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 2  # the JSONL log is always written


@pytest.mark.parametrize("name, package", [("wandb", "wandb"), ("trackio", "trackio"), ("tensorboard", "tensorboard")])
def test_a_tracker_that_is_not_installed_names_its_package(name, package, monkeypatch):
    module = {"tensorboard": "torch.utils.tensorboard"}.get(name, name)
    monkeypatch.setitem(sys.modules, module, None)  # what a missing package looks like to import
    with pytest.raises(ConfigError, match=f"{name} needs the {package} package, which is not installed: pip install"):
        resolve_report_to([name])
    assert name not in resolve_report_to("all")  # all: the installed ones
