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
import itertools
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moedpo.eval.evaluate import evaluate, log_evidence
from moedpo.eval.metrics import adjusted_rand_index
from moedpo.inference.start import random_start
from moedpo.progress import Progress
from moedpo.runs import RESTARTS_FILE
from moedpo.trainloop import LoopParts


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


def run_restarts(parts: LoopParts, label: str = "moedpo restarts") -> tuple[RestartSummary, list[dict]]:
    """``em.restarts`` runs of ``em.restart_steps`` steps of the loop, which is left, with its parameters, optimizer,
    scheduler and random state, at the best one's last step; returns (summary, its metrics per step)."""
    run, config = parts.run, parts.run.config
    count, steps = config.em.restarts, config.em.restart_steps
    first = parts.loop.start
    starts = [first] + [
        random_start(run.data.train, config.experts.num_experts, config.em.scope == "user",
                     config.em.init_steps, config.train.seed + r)
        for r in range(1, count)
    ]  # fmt: skip
    kinds = ["data" if first is not None else "symmetric"] + ["random"] * (count - 1)
    bar, shown = Progress(0, count * steps, label, enabled=parts.dp.is_main), itertools.count(1)
    origin, results = snapshot(parts), []
    for start in starts:
        restore(origin, parts)
        parts.loop.start = start
        lines = [parts.step(step, bar, next(shown)) for step in range(steps)]
        score, labels = _score(run)
        results.append((score, labels, snapshot(parts), lines))
    bar.close()
    order = sorted(range(count), key=lambda r: results[r][0])
    kept = order[0]
    restore(results[kept][2], parts)
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


def snapshot(parts: LoopParts) -> dict:
    """Everything the loop's next steps depend on, copied."""
    return {
        "params": {k: p.detach().clone() for k, p in parts.params.items()},
        "gate": copy.deepcopy(parts.run.gate.state_dict()),
        "optimizer": copy.deepcopy(parts.optimizer.state_dict()),
        "scheduler": copy.deepcopy(parts.scheduler.state_dict()),
        "loop": copy.deepcopy(parts.loop.state_dict()),
        "start": parts.loop.start,
        "num_steps": parts.loop.num_steps,
        "rng": (torch.get_rng_state(), random.getstate()),
    }


def restore(state: dict, parts: LoopParts) -> None:
    """The loop, parameters, optimizer, scheduler and random state as :func:`snapshot` found them."""
    with torch.no_grad():
        for k, p in parts.params.items():
            p.copy_(state["params"][k])
    parts.run.gate.load_state_dict(copy.deepcopy(state["gate"]))
    parts.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
    parts.scheduler.load_state_dict(copy.deepcopy(state["scheduler"]))
    parts.loop.load_state_dict(copy.deepcopy(state["loop"]))
    parts.loop.start, parts.loop.num_steps = state["start"], state["num_steps"]
    torch.set_rng_state(state["rng"][0])
    random.setstate(state["rng"][1])
