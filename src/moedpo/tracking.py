"""Where a run's metrics go: always ``RUN/metrics.jsonl`` (one JSON object per logged step); with
``train.report_to`` (transformers' ``TrainingArguments.report_to``: none | tensorboard | wandb | trackio | all, or
a list) also TensorBoard (``RUN/tensorboard/``), Weights & Biases or trackio.

The trackers get the tags transformers' integrations write for TRL's trainers: a training metric ``loss`` is
``train/loss``, ``rewards/accuracies`` is ``train/rewards/accuracies``; held-out metrics keep their ``eval/`` names.
Each tracker is an optional package, imported by name only when a run asks for it (:func:`resolve_report_to`,
before anything is built); one that is asked for and not installed is a named error with its pip command.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from moedpo.config import ConfigError, report_to_names

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # tracker -> pip package
MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "trackio": "trackio"}  # what each imports


def resolve_report_to(value) -> list[str]:
    """The trackers ``train.report_to`` names: ``all`` is every installed one (as transformers), a named one that
    is not installed is refused with the package to install."""
    names = report_to_names(value)
    if names == ["all"]:
        return [name for name in MODULES if _module(name) is not None]
    for name in names:
        if _module(name) is None:
            raise ConfigError(
                f"train.report_to={value!r}: {name} needs the {PACKAGES[name]} package, which is not installed: "
                f"pip install {PACKAGES[name]} (or leave {name} out of train.report_to)"
            )
    return names


def _module(name: str):
    try:
        return importlib.import_module(MODULES[name])  # optional packages: imported only when asked for
    except ImportError:
        return None


def tracker_tags(metrics: dict) -> dict[str, float]:
    """transformers' tags (``rewrite_logs``): ``train/<key>``, held-out ``eval/<key>`` as they are; scalars only."""
    tags = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            tags[key if key.startswith("eval/") else f"train/{key}"] = float(value)
    return tags


class TensorBoard:
    def __init__(self, run_dir: Path, config: dict):
        self.writer = _module("tensorboard").SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, tags: dict) -> None:
        for tag, value in tags.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class RunTracker:
    """W&B or trackio (the same three calls): a run named after the run directory, in the project of
    ``WANDB_PROJECT`` / ``TRACKIO_PROJECT`` (default ``moedpo``), with the resolved config."""

    def __init__(self, name: str, run_dir: Path, config: dict):
        self.module = _module(name)
        project = os.environ.get(f"{name.upper()}_PROJECT", "moedpo")
        options = {"dir": str(run_dir)} if name == "wandb" else {}
        self.module.init(project=project, name=run_dir.name, config=config, **options)

    def log(self, step: int, tags: dict) -> None:
        self.module.log(tags, step=step)

    def close(self) -> None:
        self.module.finish()


class MetricsLogger:
    """``RUN/metrics.jsonl`` plus the ``trackers`` (names from :func:`resolve_report_to`). ``resume_step``: drop
    what a killed run logged after its checkpoint. ``config``: the resolved config, for W&B and trackio."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, trackers=(), config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        config = config or {}
        self.trackers = [
            TensorBoard(Path(run_dir), config) if name == "tensorboard" else RunTracker(name, Path(run_dir), config)
            for name in trackers
        ]

    def log(self, step: int, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        tags = tracker_tags(metrics)
        for tracker in self.trackers:
            tracker.log(step, tags)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
