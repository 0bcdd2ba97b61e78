"""Evaluation report: ``report/eval.json`` (metrics, per-example expert log-probs and responsibilities) and,
when matplotlib is installed, ``report/training.png`` (loss and accuracy curves from metrics.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(report_dir: Path, metrics: dict, details: dict, examples: list[dict], metrics_path: Path) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    per_example = [
        {
            "index": e["index"],
            "user": e["user"],
            "group": e["group"],
            "expert_chosen_logps": details["expert_chosen_logps"][i].tolist(),
            "expert_rejected_logps": details["expert_rejected_logps"][i].tolist(),
            "weights": details["weights"][i].tolist(),
        }
        for i, e in enumerate(examples)
    ]
    (report_dir / "eval.json").write_text(json.dumps({"metrics": metrics, "examples": per_example}, indent=1))
    _plot(report_dir / "training.png", metrics_path)


def _plot(path: Path, metrics_path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [r["step"] for r in rows]
    axes[0].plot(steps, [r["loss"] for r in rows], label="loss")
    axes[0].plot(steps, [r["em/marginal_nll"] for r in rows], label="em/marginal_nll", alpha=0.7)
    axes[0].set_xlabel("step")
    axes[0].legend()
    for key in sorted({k for r in rows for k in r if k.endswith("accuracies")}):
        points = [(r["step"], r[key]) for r in rows if key in r]
        axes[1].plot(*zip(*points), label=key, marker="o" if key.startswith("eval/") else None, markersize=3)
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
