"""What a run found, in a table and in words: which annotators (user scope) or which share of the held-out pairs
(pair scope) each expert serves, how sure their posteriors are, how well each expert predicts its own units'
held-out pairs, and a plain sentence for each sign of weak evidence. ``report.md``, ``assignments.csv`` and the
console all show it, with or without a ``group`` column."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch


def write_assignments(path: Path, names: list[str], q: torch.Tensor) -> None:
    """``assignments.csv``: annotator, expert (the posterior's top), its posterior, then every expert's."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["annotator", "expert", "posterior", *[f"posterior_{k}" for k in range(q.shape[-1])]])
        for name, row in zip(names, q.tolist()):
            top = max(range(len(row)), key=row.__getitem__)
            writer.writerow([name, top, f"{row[top]:.4f}", *[f"{p:.4f}" for p in row]])


CALIBRATION_GAP = 0.25  # mean posterior confidence above the share its top expert predicts best: overconfident
START_AGREEMENT = 0.5  # ARI between the data start's clusters and the trained posteriors' assignment
RESTART_AGREEMENT = 0.8  # ARI between the assignments of the best two em.restarts


@dataclass(frozen=True)
class Evidence:
    """What the warnings read. ``assigned`` (N,) top expert per unit, ``confidence`` (N,) its posterior; the rest
    None where a run does not have it."""

    assigned: torch.Tensor
    confidence: torch.Tensor
    num_experts: int
    unit: str
    mixture_nll: float | None = None
    mixture_accuracy: float | None = None
    dpo_accuracy: float | None = None
    calibration: tuple[float, float] | None = None  # (mean confidence, share whose top expert is best held out)
    start_agreement: float | None = None  # ARI(data start's clusters, trained assignment)
    restart_agreement: float | None = None  # ARI between the best two em.restarts' assignments
    chance_nll: float = math.log(2)  # the held-out NLL of a uniform guess: ln 2 per pair, log n! per ranking of n


def calibration(q: torch.Tensor, ids: torch.Tensor, h: torch.Tensor, users: torch.Tensor, beta: float):
    """(mean posterior confidence, share of annotators whose top expert also has the highest held-out
    log-likelihood on their held-out pairs), over annotators with held-out pairs; None without any. A calibrated
    posterior of confidence c picks the expert that predicts best about a share c of the time."""
    loglik = torch.nn.functional.logsigmoid(beta * h.double())  # (pairs, K)
    confident, agree = [], []
    for row, user in enumerate(ids.tolist()):
        mine = users == user
        if bool(mine.any()):
            confident.append(float(q[row].max()))
            agree.append(float(int(loglik[mine].mean(0).argmax()) == int(q[row].argmax())))
    return (sum(confident) / len(confident), sum(agree) / len(agree)) if agree else None


def found_lines(evidence: Evidence, accuracy: list[float | None]) -> tuple[list[str], list[dict]]:
    """The section's markdown and its named diagnostics: per expert, its units (count and share), their mean
    posterior confidence and the expert's held-out accuracy on them (``accuracy``: one value, or None without
    held-out pairs, per expert); then one sentence per diagnostic."""
    assigned, confidence, unit = evidence.assigned, evidence.confidence, evidence.unit
    lines = ["## What was found", "", f"| expert | {unit} | share | mean posterior | held-out accuracy |"]
    lines.append("|---|---|---|---|---|")
    for j in range(evidence.num_experts):
        mine = assigned == j
        n = int(mine.sum())
        mean = f"{float(confidence[mine].mean()):.3f}" if n else "-"
        acc = "-" if accuracy[j] is None else f"{accuracy[j]:.3f}"
        lines.append(f"| {j} | {n} | {n / max(1, assigned.numel()):.0%} | {mean} | {acc} |")
    found = diagnostics(evidence)
    sentences = [f"**{d['name']}**: {d['message']}" for d in found] or [
        "No sign of weak evidence: every expert serves some, the posteriors are confident and the held-out mixture "
        f"NLL is below a uniform guess's {evidence.chance_nll:.3f}."
    ]
    return [*lines, "", *sentences, ""], found


def diagnostics(e: Evidence) -> list[dict]:
    """Named signs of weak evidence, each {"name", "message"} with what to change (``eval.json``, report, log)."""
    out, k, unit = [], e.num_experts, e.unit
    empty = [j for j in range(k) if not bool((e.assigned == j).any())]
    if empty and k > 1:
        out.append(("collapse", f"Expert {', '.join(map(str, empty))} serves no {unit}: the data may hold fewer "
                    f"than K={k} types, or training collapsed onto the others; try fewer experts."))  # fmt: skip
    mean = float(e.confidence.mean()) if e.confidence.numel() else 1.0
    if k > 1 and mean < (1 + 1 / k) / 2:
        out.append(("weak_posteriors", f"The posteriors are weak: mean confidence {mean:.2f}, where a coin among "
                    f"{k} gives {1 / k:.2f}. This data does not tell the types apart well (more pairs per annotator, "
                    "or fewer experts, help)."))  # fmt: skip
    pairs = math.isclose(e.chance_nll, math.log(2))
    if e.mixture_nll is not None and e.mixture_nll > e.chance_nll:
        guess = (
            "above ln 2 = 0.693, worse than a coin flip"
            if pairs
            else (f"above a uniform guess's {e.chance_nll:.3f} (log n! per ranking), worse than chance")
        )
        advice = "Lower train.learning_rate or em.beta" + (", or set em.label_smoothing (e.g. 0.1)." if pairs else ".")
        out.append(("overconfident_experts", f"The held-out mixture NLL {e.mixture_nll:.3f} is {guess}: the experts "
                    f"are overconfident. {advice}"))  # fmt: skip
    if e.calibration is not None and k > 1 and e.calibration[0] - e.calibration[1] > CALIBRATION_GAP:
        sure, best = e.calibration
        out.append(("overconfident_posteriors", f"The posteriors claim {sure:.2f} on average, but an annotator's "
                    f"top expert predicts its held-out pairs best for only {best:.0%} of them: the assignments are "
                    "surer than the data allow (fewer training steps or a lower learning rate, more pairs per "
                    "annotator)."))  # fmt: skip
    if e.start_agreement is not None and e.start_agreement < START_AGREEMENT:
        out.append(("start_disagrees", f"The data start's clusters and the trained experts' assignment agree "
                    f"little (ARI {e.start_agreement:.2f}): the types are not identified by this data, or training "
                    "drifted from them (a lower learning rate; more pairs per annotator)."))  # fmt: skip
    if e.restart_agreement is not None and e.restart_agreement < RESTART_AGREEMENT:
        out.append(("restarts_disagree", f"The best two of em.restarts split the {unit} differently (ARI "
                    f"{e.restart_agreement:.2f} < {RESTART_AGREEMENT}): the types are not identified by this data, "
                    "and the kept answer depends on the start. More pairs per annotator or fewer experts help; "
                    "RUN/restarts.json has each restart's score."))  # fmt: skip
    if None not in (e.mixture_accuracy, e.dpo_accuracy) and e.mixture_accuracy < e.dpo_accuracy:
        out.append(("below_dpo", f"Held-out accuracy {e.mixture_accuracy:.3f} is below one DPO policy's "
                    f"({e.dpo_accuracy:.3f}, RUN/dpo): the mixture does not beat K=1 on this data."))  # fmt: skip
    return [{"name": name, "message": message} for name, message in out]
