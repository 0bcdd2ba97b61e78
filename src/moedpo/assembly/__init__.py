"""Run assembly: one route from a config (and, for a saved run, its directory) to everything a run uses.

:func:`build_run` builds the tokenizer and base, the data, the expert bank, gate, guide and latent model;
``moedpo train`` (and ``--resume``, the DPO baseline) calls it with the config, :func:`open_run` with a finished
run directory (``eval``, ``generate``, ``report``, ``personalize``), restoring the trained state. Stages
receive what they need: the reviews world's annotation gets its reference from here (:mod:`.data`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from moedpo.assembly.base import build_base
from moedpo.assembly.components import (
    build_bank,
    build_gate,
    build_guide,
    check_rankings,
    gate_feature_dim,
    resolve_latent_model,
)
from moedpo.assembly.data import prepare_data
from moedpo.config import Config, ConfigError, load_config
from moedpo.data import reviews_world
from moedpo.data.batching import by_annotator
from moedpo.data.prepared import PreparedData
from moedpo.experts.loading import resolve_device
from moedpo.models.gates import Router
from moedpo.runs import DATA_FILE, GATE_FILE, GUIDE_FILE, REFERENCE_FILE, final_parameters, restore_parameters

__all__ = ["Run", "build_base", "build_run", "open_run", "prepare_data"]


@dataclass
class Run:
    """Everything ``train``, ``eval`` and ``generate`` share: built once, from one config, by :func:`build_run`."""

    config: Config
    tokenizer: object
    base: object
    data: PreparedData
    bank: object
    gate: Router
    model: object  # the latent preference model (a Pyro function)
    guide: object = None  # em.guide: a Pyro guide (an nn.Module's parameters train with the rest)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Name -> parameter of everything the optimizer steps (and a checkpoint holds): the experts', then the
        gate's (``gate.*``, when it learns by gradient) and the guide's (``guide.*``)."""
        params = dict(self.bank.trainable_parameters())
        params.update({f"gate.{n}": p for n, p in self.gate.named_parameters() if p.requires_grad})
        if isinstance(self.guide, torch.nn.Module):
            params.update({f"guide.{n}": p for n, p in self.guide.named_parameters()})
        return params


def build_run(config: Config, device: torch.device, saved: Path | None = None) -> Run:
    """Tokenizer and base model, validated and tokenized data, expert bank, gate and latent model.

    ``saved``: a run directory; its ``base/`` and ``data.json`` replace the config's model and data sources.
    """
    model = resolve_latent_model(config)  # cheap checks first: a misspelt name fails before any model loads
    reviews_world.objectives(config)
    saved_base = saved / "base" if saved is not None and (saved / "base").exists() else None
    tokenizer, base = build_base(config, saved_base)
    if saved is not None and (saved / DATA_FILE).exists():
        data = PreparedData.load(saved / DATA_FILE)
    else:
        data = prepare_data(config, tokenizer)  # validates every row first: errors leave nothing behind
    _check_num_experts(config, data)
    if data.rankings:
        check_rankings(config)
        model = resolve_latent_model(config, rankings=True)
    bank = build_bank(config, base, device)
    gate = build_gate(config, gate_feature_dim(config, base, data), len(data.user_ids), data.user_feature_dim)
    guide = build_guide(config, base)
    if isinstance(guide, torch.nn.Module):
        guide = guide.to(bank.device)
    return Run(config, tokenizer, base, data, bank, gate.to(bank.device), model, guide)


def _check_num_experts(config: Config, data: PreparedData) -> None:
    """In user scope each type needs annotators of its own: K above their number cannot be identified."""
    annotators = len(by_annotator(data.train))
    if config.em.scope == "user" and config.experts.num_experts > annotators:
        raise ConfigError(
            f"experts.num_experts={config.experts.num_experts}, but the data has {annotators} training annotators: "
            f"at most {annotators} types can be told apart; set experts.num_experts to {annotators} or fewer"
        )


def open_run(run_dir: str | Path) -> Run:
    """A finished run directory, rebuilt from its ``config.yaml`` and restored to its final state."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir}: not a moedpo run directory (no config.yaml)")
    if not (run_dir / GATE_FILE).exists():
        raise FileNotFoundError(
            f"{run_dir}: training did not finish (no {GATE_FILE}); continue it with "
            f"`moedpo train --config {run_dir / 'config.yaml'} --resume`"
        )
    config = load_config(run_dir / "config.yaml")
    run = build_run(config, resolve_device(config.train.device), saved=run_dir)
    checkpoint = final_parameters(run_dir, config.train.load_best_model_at_end)  # best/ or the last checkpoint
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint")
    restore_parameters(checkpoint, run.trainable_parameters())
    run.gate.load_state_dict(load_file(run_dir / GATE_FILE))  # and the closed-form proportions
    if isinstance(run.guide, torch.nn.Module) and (run_dir / GUIDE_FILE).exists():
        run.guide.load_state_dict(load_file(run_dir / GUIDE_FILE))
    if (run_dir / REFERENCE_FILE).exists():  # the run's own examples need no reference pass
        run.bank.load_reference_state(load_file(run_dir / REFERENCE_FILE))
    return run
