"""The report's per-type section (issue 20 item 4, and min-max serving, item 3): each annotator type's held-out
accuracy under the mixture, sparse routing, one DPO policy (``RUN/dpo``) and min-max-regret serving, the worst
type named for each; ``RUN/report/minmax.json`` keeps the serving weights that ``moedpo generate --policy minmax``
draws its expert from.

A type's utility of expert k is its held-out agreement with the type's labels (``eval/expert_<k>/<type>/rewards/
accuracies``): serving expert k with probability w_k gives type t the agreement sum_k w_k U_tk, and min-max-regret
serving is the w minimising the largest gap to each type's best expert (:mod:`moedpo.eval.regret`). The gate's
average is the gate's mean prior over the held-out examples (no annotator known).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moedpo.eval.regret import minmax_regret_weights, regrets
from moedpo.runs import MINMAX_FILE


def type_utilities(metrics: dict, num_experts: int) -> tuple[list[str], torch.Tensor]:
    """(types, U (T, K)): each expert's held-out accuracy on each type's examples, from ``metrics``."""
    types = sorted(k.split("/")[2] for k in metrics if k.startswith("eval/expert_0/") and k.count("/") == 4)
    table = [[metrics[f"eval/expert_{j}/{t}/rewards/accuracies"] for j in range(num_experts)] for t in types]
    return types, torch.tensor(table, dtype=torch.float64).reshape(len(types), num_experts)


def types_section(run_dir: Path, metrics: dict, details: dict, num_experts: int) -> list[str]:
    """The markdown section, and ``report/minmax.json``; nothing without a ``group`` column."""
    types, utility = type_utilities(metrics, num_experts)
    if not types:
        return []
    gate = details["prior"].double().mean(0)
    minmax = minmax_regret_weights(utility)
    columns = {
        "mixture (posterior)": [metrics[f"eval/{t}/rewards/accuracies"] for t in types],
        "sparse (top expert)": [metrics[f"eval/top1/{t}/rewards/accuracies"] for t in types],
        "gate's average": (utility @ gate).tolist(),
        "min-max regret": (utility @ minmax).tolist(),
    }
    dpo = run_dir / "dpo" / "report" / "eval.json"
    if dpo.exists():
        baseline = json.loads(dpo.read_text())["metrics"]
        columns["one DPO policy"] = [baseline.get(f"eval/{t}/rewards/accuracies", float("nan")) for t in types]
    gaps = {"gate's average": regrets(utility, gate).tolist(), "min-max regret": regrets(utility, minmax).tolist()}
    saved = {"types": types, "utilities": utility.tolist(), "weights": minmax.tolist(), "gate_weights": gate.tolist(),
             "regrets": gaps}  # fmt: skip
    (run_dir / MINMAX_FILE).write_text(json.dumps(saved, indent=1))
    how = (
        "Held-out accuracy on each type's examples. *mixture*: each annotator's posterior (user scope) or the gate "
        "(pair scope); *gate's average* and *min-max regret*: one expert drawn per prompt, the annotator unknown, "
        f"with the gate's mean weights ({_weights(gate)}) or the weights that minimise the largest gap to a type's "
        f"best expert ({_weights(minmax)}; `moedpo generate --policy minmax`)."
    )
    lines = ["## Per annotator type", "", how, "", "| type | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 1) + "|"]  # fmt: skip
    lines += [f"| {t} | " + " | ".join(f"{col[i]:.3f}" for col in columns.values()) + " |" for i, t in enumerate(types)]
    best = utility.max(-1).values  # each type's best single expert
    served = [name for name in ("gate's average", "min-max regret", "one DPO policy") if name in columns]
    largest = {name: float((best - torch.tensor(columns[name], dtype=torch.float64)).max()) for name in served}
    lines += ["", "Largest regret (a type's best expert minus what it gets): "
              + "; ".join(f"{name} {gap:.3f}" for name, gap in largest.items()) + "."]  # fmt: skip
    worst = {name: types[min(range(len(types)), key=lambda i: col[i])] for name, col in columns.items()}
    lines += ["", "Worst type: " + "; ".join(f"{name}: **{t}** ({columns[name][types.index(t)]:.3f})"
                                            for name, t in worst.items()) + ".", ""]  # fmt: skip
    return lines


def _weights(w: torch.Tensor) -> str:
    return " / ".join(f"{x:.2f}" for x in w.tolist())
