"""The report's section on ``experts.num_experts=auto``: each K's held-out NLL, the one chosen and why, and
``report/k_selection.png`` (the curve with ±margin standard errors of each K's excess over the best)."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

from moedpo.runs import K_SELECTION_FILE


def k_section(run_dir: Path, out: Path) -> list[str]:
    """Markdown lines and the plot, where the run chose its K (else nothing)."""
    path = run_dir / K_SELECTION_FILE
    if not path.exists():
        return []
    s = json.loads(path.read_text())
    rows = zip(s["candidates"], s["scores"], s["excess"], s["stderr"])
    lines = ["", "## Number of types (experts.num_experts=auto)", "",
             f"Each K trained {s['steps']} steps and was scored by the held-out NLL per {s['unit']} (mean over "
             f"{s['units']}). K={s['chosen']} was chosen: the smallest K within {s['margin']:g} standard errors of "
             f"the best (K={s['best']}), so a type is added only when held-out pairs pay for it.", "",
             "| K | held-out NLL | excess over the best | standard error |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {'**' * (k == s['chosen'])}{k}{'**' * (k == s['chosen'])} | {nll:.4f} | {d:+.4f} | {se:.4f} |"
              for k, nll, d, se in rows]  # fmt: skip
    _plot(out / "k_selection.png", s)
    return [*lines, "", "![K selection](k_selection.png)"]


def _plot(path: Path, s: dict) -> None:
    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.subplots()
    best = s["scores"][s["candidates"].index(s["best"])]
    ax.errorbar(s["candidates"], s["scores"], yerr=[s["margin"] * se for se in s["stderr"]], marker="o", capsize=3)
    ax.axhline(best, color="grey", lw=0.8, ls="--")
    ax.scatter([s["chosen"]], [s["scores"][s["candidates"].index(s["chosen"])]], s=140, facecolors="none",
               edgecolors="red", label=f"chosen K={s['chosen']}")  # fmt: skip
    ax.set_xticks(s["candidates"])
    ax.set_xlabel("K (experts)")
    ax.set_ylabel(f"held-out NLL per {s['unit']}")
    ax.set_title(f"num_experts=auto (bars: ±{s['margin']:g} SE of the excess)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
