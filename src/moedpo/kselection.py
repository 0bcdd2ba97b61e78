"""``experts.num_experts: auto``: the number of types, chosen from the data by held-out pairs.

For each K = 1 .. ``experts.max_experts`` (in user scope at most the number of training annotators) training runs
``em.restart_steps`` steps (``em.restarts`` starts each, as :mod:`moedpo.restarts`) and is scored on the held-out
pairs: each unit's mean negative log predictive probability, where the unit is an annotator in user scope (their
posterior over the experts comes from their training pairs, as in ``moedpo eval``) and a pair in pair scope. A
larger K never fits the training pairs worse; on held-out pairs an extra expert pays only when the types it
separates are real, and otherwise costs the data each expert no longer sees.

The rule is the one-standard-error rule of model selection, on paired differences: the smallest K whose mean
excess over the best K, unit by unit, is within :data:`SE_MARGIN` standard errors of zero. A mixture must not
invent types on the strength of noise, so the simpler model wins ties. Training then continues from the chosen
K's short run; ``RUN/k_selection.json`` keeps the curve and the report draws it (``report/k_selection.png``).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moedpo.assembly import build_run
from moedpo.config import Config
from moedpo.data.batching import by_annotator
from moedpo.data.prepared import PreparedData
from moedpo.distributed import DataParallel
from moedpo.eval.evaluate import evaluate
from moedpo.restarts import RestartSummary, restore, run_restarts, snapshot
from moedpo.runs import K_SELECTION_FILE
from moedpo.trainloop import LoopParts, loop_parts, reference_once

SE_MARGIN = 2.0  # standard errors of the paired excess within which a smaller K is preferred to the best


@dataclass
class KSelection:
    candidates: list[int]  # the K tried, ascending
    scores: list[float]  # per K: held-out NLL per unit, averaged over units (lower is better)
    excess: list[float]  # per K: mean over units of its NLL minus the best K's
    stderr: list[float]  # per K: standard error of that excess
    chosen: int
    best: int  # the K of the lowest score (chosen unless a smaller K is within SE_MARGIN standard errors)
    unit: str  # annotator (user scope) | pair (pair scope)
    units: int
    steps: int  # training steps of each K before it was scored
    margin: float = SE_MARGIN  # standard errors of the excess within which the smaller K is preferred

    def save(self, run_dir: Path) -> None:
        (run_dir / K_SELECTION_FILE).write_text(json.dumps(asdict(self), indent=1))

    def line(self) -> str:
        curve = ", ".join(f"K={k} {s:.4f}" for k, s in zip(self.candidates, self.scores))
        why = (
            "the lowest"
            if self.chosen == self.best
            else f"within {self.margin:g} standard errors of K={self.best}'s, the smallest such"
        )
        return (
            f"moedpo: experts.num_experts=auto: chose K={self.chosen} ({why}); held-out NLL per {self.unit} after "
            f"{self.steps} steps each, over {self.units} {self.unit}s: {curve}"
        )


def unit_nll(log_prob: torch.Tensor, units: list[int] | None) -> torch.Tensor:
    """Each unit's mean negative log predictive probability: per annotator (``units``: each held-out pair's
    annotator), or per pair (``units`` None)."""
    nll = -log_prob.double()
    if units is None:
        return nll
    ids = torch.tensor(units)
    _, inverse = torch.unique(ids, return_inverse=True)
    total = torch.zeros(int(inverse.max()) + 1, dtype=nll.dtype).index_add_(0, inverse, nll)
    return total / torch.bincount(inverse).to(nll.dtype)


def choose(per_unit: dict[int, torch.Tensor], unit: str, steps: int, margin: float = SE_MARGIN) -> KSelection:
    """The smallest K whose paired mean excess over the best K is at most ``margin`` standard errors; ``per_unit``
    maps K to its units' held-out NLL (the same units, in the same order, for every K)."""
    candidates = sorted(per_unit)
    scores = {k: float(per_unit[k].mean()) for k in candidates}
    best = min(candidates, key=lambda k: scores[k])
    excess, stderr = {}, {}
    for k in candidates:
        d = per_unit[k] - per_unit[best]
        excess[k] = float(d.mean())
        stderr[k] = float(d.std(unbiased=True) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    chosen = next(k for k in candidates if excess[k] <= margin * stderr[k])
    return KSelection(
        candidates,
        [scores[k] for k in candidates],
        [excess[k] for k in candidates],
        [stderr[k] for k in candidates],
        chosen,
        best,
        unit,
        len(per_unit[best]),
        steps,
        margin,
    )


def candidates(config: Config, data: PreparedData) -> list[int]:
    """K = 1 .. experts.max_experts; in user scope no more than the training annotators (each type needs its own)."""
    most = config.experts.max_experts
    if config.em.scope == "user":
        most = min(most, len(by_annotator(data.train)))
    return list(range(1, most + 1))


def with_k(config: Config, k: int) -> Config:
    return dataclasses.replace(config, experts=dataclasses.replace(config.experts, num_experts=k))


@dataclass
class Chosen:
    """The chosen K's run as its short run left it, ready to train on from step ``selection.steps``."""

    parts: LoopParts
    selection: KSelection
    restarts: RestartSummary  # its em.restarts (one start when em.restarts is 1)
    lines: list[dict]  # its metrics per step


def select_k(config: Config, run_dir: Path, dp: DataParallel, ks: list[int]) -> Chosen:
    """Each K's short run, scored on the held-out pairs; the chosen one is rebuilt and restored to the state its
    short run ended in (one K's model in memory at a time)."""
    em, user_scope = config.em, config.em.scope == "user"
    per_unit, kept = {}, {}
    for k in ks:
        parts = _build(config, k, run_dir, dp)
        summary, lines = run_restarts(parts, f"moedpo K={k}")
        held_out = parts.run.data.eval
        log_prob = evaluate(parts.run, parts.run.data.train, held_out)[1]["log_prob"]
        per_unit[k] = unit_nll(log_prob, [e["user"] for e in held_out] if user_scope else None)
        kept[k] = (snapshot(parts), summary, lines)
        if dp.is_main:
            print(f"moedpo: K={k}: held-out NLL {float(per_unit[k].mean()):.4f} per "
                  f"{'annotator' if user_scope else 'pair'} after {em.restart_steps} steps", file=sys.stderr,
                  flush=True)  # fmt: skip
        del parts
        gc.collect()
    selection = choose(per_unit, "annotator" if user_scope else "pair", em.restart_steps)
    state, summary, lines = kept[selection.chosen]
    parts = _build(config, selection.chosen, run_dir, dp)
    restore(state, parts)
    return Chosen(parts, selection, summary, lines)


def _build(config: Config, k: int, run_dir: Path, dp: DataParallel) -> LoopParts:
    """The run with K experts, built and seeded as ``moedpo train`` builds a fresh run with that K (from the
    config's sources, not the run directory's copies: a loaded base draws nothing from the random generator, a
    fresh builtin one does), so the chosen K's short run is the first steps of a run with that K."""
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    run = build_run(with_k(config, k), dp.device(config.train.device))
    reference_once(run, run_dir, dp)
    return loop_parts(run, dp)
