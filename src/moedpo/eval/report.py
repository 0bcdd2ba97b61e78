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
    _plot(report_dir / "training.png", metrics_path, metrics)


def _plot(path: Path, metrics_path: Path, final: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    if not any(k.startswith("eval/") for r in rows for k in r):  # no periodic evaluation: draw the final one
        rows[-1] = {**rows[-1], **{k: v for k, v in final.items() if k.startswith("eval/")}}
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    axes[0].plot(steps, loss, color="tab:blue", alpha=0.25, label="loss (per step)")
    axes[0].plot(steps, _ema(loss), color="tab:blue", label="loss (EMA 0.9)")
    axes[0].set_title("training loss (mean per pair)")
    curves = lambda k: k.startswith("eval/") and ("accuracies" in k or k == "eval/ari") and k.count("/") <= 3  # noqa: E731
    held_out = sorted({k for r in rows for k in r if curves(k)})
    for key in held_out:
        points = [(r["step"], r[key]) for r in rows if key in r]
        axes[1].plot(*zip(*points), marker="o", markersize=3, label=key.removeprefix("eval/"))
    axes[1].set_title("held-out pairs")
    axes[1].set_ylim(0, 1.05)
    axes[1].axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
    _per_type(axes[3], final)
    usage = sorted(k for k in rows[-1] if k.startswith("em/expert_usage_"))
    for key in usage:
        axes[2].plot(steps, _ema([r[key] for r in rows]), label=key.removeprefix("em/"))
    axes[2].set_title("posterior mass per expert (EMA)")
    axes[2].set_ylim(0, 1)
    if not held_out:
        axes[1].text(0.5, 0.5, "no held-out evaluation\n(no held-out pairs)", ha="center", transform=axes[1].transAxes)
    for ax in axes[:3]:
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _per_type(ax, final: dict) -> None:
    """Final held-out accuracy of each expert on each annotator type: an expert near 0.5 overall is right for its
    own type and wrong for the other (by design), which only this breakdown shows."""
    import numpy as np

    cells = {}
    for key, value in final.items():
        parts = key.split("/")  # eval/expert_k/<type>/rewards/accuracies
        if len(parts) == 5 and parts[1].startswith("expert_") and parts[3:] == ["rewards", "accuracies"]:
            cells[(parts[1], parts[2])] = value
    ax.set_title("final held-out accuracy by annotator type")
    if not cells:
        ax.text(0.5, 0.5, "no group column in the held-out data", ha="center", transform=ax.transAxes)
        return
    experts, types = sorted({e for e, _ in cells}), sorted({t for _, t in cells})
    width = 0.8 / len(types)
    for j, kind in enumerate(types):
        x = np.arange(len(experts)) + j * width
        ax.bar(x, [cells.get((e, kind), 0.0) for e in experts], width, label=f"type {kind}")
    ax.set_xticks(np.arange(len(experts)) + 0.4 - width / 2, experts)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)


def _ema(values, decay=0.9):
    out, current = [], values[0]
    for v in values:
        current = decay * current + (1 - decay) * v
        out.append(current)
    return out
