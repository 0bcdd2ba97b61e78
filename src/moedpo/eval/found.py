"""What a run found, in a table and in words: which annotators (user scope) or which share of the held-out pairs
(pair scope) each expert serves, how sure their posteriors are, how well each expert predicts its own units'
held-out pairs, and a plain sentence for each sign of weak evidence. ``report.md``, ``assignments.csv`` and the
console all show it, with or without a ``group`` column."""

from __future__ import annotations

import csv
import math
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


def found_lines(
    assigned: torch.Tensor,
    confidence: torch.Tensor,
    accuracy: list[float | None],
    unit: str,
    mixture_nll: float | None = None,
    mixture_accuracy: float | None = None,
    dpo_accuracy: float | None = None,
) -> list[str]:
    """The section's markdown: per expert, its ``unit``s (count and share), their mean posterior confidence and
    the expert's held-out accuracy on them; then the warnings. ``assigned`` (N,) top expert per unit,
    ``confidence`` (N,) its posterior, ``accuracy`` one value (or None: no held-out pairs) per expert."""
    k = len(accuracy)
    lines = ["## What was found", "", f"| expert | {unit} | share | mean posterior | held-out accuracy |"]
    lines.append("|---|---|---|---|---|")
    for j in range(k):
        mine = assigned == j
        n = int(mine.sum())
        mean = f"{float(confidence[mine].mean()):.3f}" if n else "-"
        acc = "-" if accuracy[j] is None else f"{accuracy[j]:.3f}"
        lines.append(f"| {j} | {n} | {n / max(1, assigned.numel()):.0%} | {mean} | {acc} |")
    warnings = _warnings(assigned, confidence, k, unit, mixture_nll, mixture_accuracy, dpo_accuracy)
    return [*lines, "", *(warnings or ["No sign of weak evidence: every expert serves some, the posteriors are "
                                       "confident and the held-out mixture NLL is below ln 2."]), ""]  # fmt: skip


def _warnings(assigned, confidence, k, unit, mixture_nll, mixture_accuracy, dpo_accuracy) -> list[str]:
    out = []
    empty = [j for j in range(k) if not bool((assigned == j).any())]
    if empty and k > 1:
        out.append(
            f"Expert {', '.join(map(str, empty))} serves no {unit}: the data may hold fewer than K={k} types, or "
            "training collapsed onto the others; try fewer experts."
        )
    mean = float(confidence.mean()) if confidence.numel() else 1.0
    if k > 1 and mean < (1 + 1 / k) / 2:
        out.append(
            f"The posteriors are weak: mean confidence {mean:.2f}, where a coin among {k} gives {1 / k:.2f}. This "
            "data does not tell the types apart well (more pairs per annotator, or fewer experts, help)."
        )
    if mixture_nll is not None and mixture_nll > math.log(2):
        out.append(
            f"The held-out mixture NLL {mixture_nll:.3f} is above ln 2 = 0.693, worse than a coin flip: the experts "
            "are overconfident. Lower train.learning_rate or em.beta, or set em.label_smoothing (e.g. 0.1)."
        )
    if None not in (mixture_accuracy, dpo_accuracy) and mixture_accuracy < dpo_accuracy:
        out.append(
            f"Held-out accuracy {mixture_accuracy:.3f} is below one DPO policy's ({dpo_accuracy:.3f}, RUN/dpo): the "
            "mixture does not beat K=1 on this data."
        )
    return out
