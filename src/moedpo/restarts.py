"""``em.restarts``: R short runs of the same loop from different starts, the best one continued.

EM on a mixture ends where its start leads it. Restart 0 begins from the configured start (``em.init``: the data's
clusters, or symmetric); restarts 1.. from random balanced partitions of the latent units (annotators, or pairs),
which enter the first E-steps as the data start does (:class:`moedpo.inference.start.Start`). Each runs
``em.restart_steps`` steps from the same parameters, optimizer, scheduler and random state; the one with the
lowest held-out mixture NLL is kept (the training pairs' negative log evidence per pair where there are no held-out
pairs, since held-out pairs punish experts that memorise their annotators' few pairs and training pairs do not), and
training continues from its state at that step.

How much the best two agree (the ARI of their units' assignments) says whether the data identify the types: two
good optima that split the annotators differently mean the answer depends on luck. It is written to
``RUN/restarts.json`` and the report names it (``restarts_disagree``) below
:data:`moedpo.eval.found.RESTART_AGREEMENT`.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moedpo.eval.evaluate import evaluate, log_evidence
from moedpo.eval.metrics import adjusted_rand_index
from moedpo.inference.start import random_start
from moedpo.runs import RESTARTS_FILE


@dataclass
class RestartSummary:
    criterion: str  # what ranked them: eval/mixture_nll or train/nll (negative log evidence per pair)
    scores: list[float]  # per restart, lower is better
    starts: list[str]  # per restart: data, symmetric or random
    kept: int
    agreement: float | None  # ARI between the assignments of the best two restarts (None with one restart)
    steps: int

    def save(self, run_dir: Path) -> None:
        (run_dir / RESTARTS_FILE).write_text(json.dumps(asdict(self), indent=1))

    def line(self) -> str:
        scores = ", ".join(f"{s:.4f} ({kind})" for s, kind in zip(self.scores, self.starts))
        agree = f"; ARI between the best two {self.agreement:.2f}" if self.agreement is not None else ""
        return (
            f"moedpo: em.restarts: {len(self.scores)} starts x {self.steps} steps, {self.criterion} {scores}; "
            f"kept restart {self.kept}{agree}"
        )


def run_restarts(run, loop, params: dict, optimizer, scheduler, count: int, steps: int, step_fn) -> tuple:
    """Run ``count`` restarts of ``steps`` calls of ``step_fn(step) -> metrics``, leave the loop, parameters,
    optimizer, scheduler and random state at the best one's last step; returns (summary, its metrics per step)."""
    config = run.config
    first = loop.start
    starts = [first] + [
        random_start(run.data.train, config.experts.num_experts, config.em.scope == "user",
                     config.em.init_steps, config.train.seed + r)
        for r in range(1, count)
    ]  # fmt: skip
    kinds = ["data" if first is not None else "symmetric"] + ["random"] * (count - 1)
    origin, results = _state(run, params, optimizer, scheduler, loop), []
    for start in starts:
        _restore(origin, run, params, optimizer, scheduler, loop)
        loop.start = start
        lines = [step_fn(step) for step in range(steps)]
        score, labels = _score(run)
        results.append((score, labels, _state(run, params, optimizer, scheduler, loop), lines))
    order = sorted(range(count), key=lambda r: results[r][0])
    kept = order[0]
    _restore(results[kept][2], run, params, optimizer, scheduler, loop)
    agreement = adjusted_rand_index(results[order[0]][1], results[order[1]][1]) if count > 1 else None
    criterion = "eval/mixture_nll" if run.data.eval else "train/nll"
    summary = RestartSummary(criterion, [r[0] for r in results], kinds, kept, agreement, steps)
    return summary, results[kept][3]


def _score(run) -> tuple[float, torch.Tensor]:
    """(lower is better, each training unit's expert) of the run as it stands."""
    if run.data.eval and run.config.em.scope == "user":  # the evaluation has the annotators' posteriors already
        metrics, details = evaluate(run, run.data.train, run.data.eval)
        return metrics["eval/mixture_nll"], details["user_responsibilities"].argmax(-1)
    evidence, q = log_evidence(run, run.data.train)
    if run.data.eval:
        return evaluate(run, run.data.train, run.data.eval)[0]["eval/mixture_nll"], q.argmax(-1)
    return -evidence, q.argmax(-1)


def _state(run, params: dict, optimizer, scheduler, loop) -> dict:
    return {
        "params": {k: p.detach().clone() for k, p in params.items()},
        "gate": copy.deepcopy(run.gate.state_dict()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "scheduler": copy.deepcopy(scheduler.state_dict()),
        "loop": copy.deepcopy(loop.state_dict()),
        "start": loop.start,
        "num_steps": loop.num_steps,
        "rng": (torch.get_rng_state(), random.getstate()),
    }


def _restore(state: dict, run, params: dict, optimizer, scheduler, loop) -> None:
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state["params"][k])
    run.gate.load_state_dict(copy.deepcopy(state["gate"]))
    optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
    scheduler.load_state_dict(copy.deepcopy(state["scheduler"]))
    loop.load_state_dict(copy.deepcopy(state["loop"]))
    loop.start, loop.num_steps = state["start"], state["num_steps"]
    torch.set_rng_state(state["rng"][0])
    random.setstate(state["rng"][1])
