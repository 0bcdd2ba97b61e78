"""A run's report, ``moedpo report RUN_DIR`` (also written at the end of training), in ``RUN/report/``:

- ``report.md``: held-out metrics; recovered vs true annotator types (ARI, confusion matrix); the rewards table
  (:mod:`moedpo.eval.rewards`, the paper's Table 1) with the DPO baseline of ``RUN/dpo`` where it exists;
- ``eval.json`` (metrics, per-example expert log-probs and responsibilities), ``rewards.json``;
- with matplotlib: ``training.png`` (loss and accuracy curves), ``types.png``, ``rewards.png``, and
  ``k_selection.png`` where ``experts.num_experts=auto`` chose K (:mod:`moedpo.eval.kcurve`).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from moedpo.assembly.components import build_start
from moedpo.config import ConfigError
from moedpo.data.reviews_world import held_out_prompts
from moedpo.eval.evaluate import evaluate, user_posteriors
from moedpo.eval.found import Evidence, calibration, found_lines, write_assignments
from moedpo.eval.kcurve import k_section
from moedpo.eval.metrics import adjusted_rand_index
from moedpo.eval.rewards import checks, resolve_rewards, reward_table
from moedpo.eval.types_report import types_section
from moedpo.runs import BEST, GATE_FILE, RESTARTS_FILE, find_checkpoint
from moedpo.session import RunSession


def write_report(
    report_dir: Path,
    metrics: dict,
    details: dict,
    examples: list[dict],
    metrics_path: Path,
    diagnostics: list[dict],
    kept: dict | None = None,
) -> None:
    """``eval.json`` (metrics, the named diagnostics, per-example log-probs and weights) and ``training.png``;
    ``kept``: the step ``train.load_best_model_at_end`` kept (``best_model``)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    logps = [k for k in ("expert_chosen_logps", "expert_rejected_logps", "expert_completion_logps") if k in details]
    per_example = [
        {
            "index": e["index"],
            "user": e["user"],
            "group": e["group"],
            **{key: details[key][i].tolist() for key in logps},
            "weights": details["weights"][i].tolist(),
        }
        for i, e in enumerate(examples)
    ]
    best = {"best_model": kept} if kept else {}
    saved = {"metrics": metrics, **best, "diagnostics": diagnostics, "examples": per_example}
    (report_dir / "eval.json").write_text(json.dumps(saved, indent=1))
    _plot(report_dir / "training.png", metrics_path, metrics)


def _plot(path: Path, metrics_path: Path, final: dict) -> None:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    if not any(k.startswith("eval/") for r in rows for k in r):  # no periodic evaluation: draw the final one
        rows[-1] = {**rows[-1], **{k: v for k, v in final.items() if k.startswith("eval/")}}
    fig = Figure(figsize=(17, 3.6))
    axes = fig.subplots(1, 4)
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
    lowest = min([r[k] for r in rows for k in held_out if k in r] + [0.0])  # an ARI can be negative
    axes[1].set_ylim(min(0.0, lowest - 0.05), 1.05)
    axes[1].axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance (accuracy; ARI: 0)")
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


def _per_type(ax, final: dict) -> None:
    """Final held-out accuracy of each expert on each annotator type: an expert near 0.5 overall is right for its
    own type and wrong for the other (by design), which only this breakdown shows."""
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


def report(run_dir: str | Path, session=None, num_prompts: int | None = None) -> Path:
    """Evaluate a finished run and write ``RUN/report/`` (see the module docstring); returns ``report.md``."""
    run_dir = Path(run_dir)
    if num_prompts is not None and num_prompts < 0:
        raise ConfigError(f"--num-prompts {num_prompts}: expected an integer >= 0 (0: no rewards table)")
    session = session if session is not None else RunSession(run_dir)
    run, config, out = session.run, session.config, run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    unit = "rankings" if run.data.rankings else "pairs"
    lines = [f"# moedpo report: {run_dir.name}", "", f"`{config.data.source}` on `{config.model.name_or_path}`; "
             f"K={config.experts.num_experts} {config.experts.mode} experts, em.scope={config.em.scope}, "
             f"{len(run.data.train)} training and {len(run.data.eval)} held-out {unit}.", ""]  # fmt: skip
    metrics, details, kept = {}, None, None
    if run.data.eval:
        metrics, details = evaluate(run, run.data.train, run.data.eval)
        metrics.update({"data/num_truncated": run.data.num_truncated, "data/num_dropped": run.data.num_dropped})
        kept = _kept_step(run_dir, config)
        lines += [f"## Held-out {unit}", ""]
        if kept:
            lines += [f"Parameters of step {kept['step']} of {config.train.max_steps} (train.load_best_model_at_end: "
                      f"best {kept['metric']}, {kept['value']:.4g}).", ""]  # fmt: skip
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in metrics.items() if isinstance(v, float) and k.count("/") <= 3]
        if run.data.rankings:
            lines += ["", "On rankings, `rewards/accuracies` is the share of the pairs each held-out ranking implies "
                      "that the mixture (or an expert) orders right; `mixture_nll` is per ranking, beside "
                      "`chance_nll`, a uniform guess's."]  # fmt: skip
        lines += ["", "![training curves](training.png)", ""]
    # the training annotators' posteriors (K expert passes over every training pair): once, for every section; the
    # held-out evaluation computed them already
    posteriors = None
    if config.em.scope == "user":
        known = details is not None and "user_ids" in details
        posteriors = (details["user_ids"], details["user_responsibilities"]) if known else None
        posteriors = posteriors or user_posteriors(run, run.data.train)
    found, named = _found_section(run, run_dir, posteriors, metrics, details)
    if run.data.eval:  # eval.json holds the named diagnostics beside the metrics
        write_report(out, metrics, details, run.data.eval, run_dir / "metrics.jsonl", named, kept)
    print("\n".join(found), file=sys.stderr, flush=True)
    lines += found
    lines += k_section(run_dir, out)
    lines += _types_section(run, out, posteriors)
    if details is not None:
        lines += types_section(run_dir, metrics, details, config.experts.num_experts)
    n = config.report.num_prompts if num_prompts is None else num_prompts
    rewards = resolve_rewards(config) if n else {}
    for stale in ("rewards.json", "rewards.png"):  # a report without a table keeps no old one
        (out / stale).unlink(missing_ok=True)
    if rewards:
        lines += _rewards_section(session, rewards, n, run_dir, out, posteriors)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


def _kept_step(run_dir: Path, config) -> dict | None:
    """The step whose parameters a ``load_best_model_at_end`` run kept: step, metric, value, greater_is_better."""
    best = find_checkpoint(run_dir, BEST) if config.train.load_best_model_at_end else None
    if best is None:
        return None
    return {k: v for k, v in json.loads((best / "state.json").read_text()).items() if k != "complete"}


def _found_section(run, run_dir: Path, posteriors, metrics: dict, details: dict | None) -> list[str]:
    """Per expert: its annotators (user scope; also ``assignments.csv``) or held-out pairs (pair scope), their
    posteriors and held-out accuracy, and the warnings (:mod:`moedpo.eval.found`)."""
    k, held_out = run.config.experts.num_experts, run.data.eval
    h = details["h"] if details is not None else None
    correct = details["correct"] if details is not None else None  # (N, K): each expert's share ordered right
    if posteriors is not None:
        ids, q = posteriors
        names = [run.data.user_ids[i] for i in ids.tolist()]
        write_assignments(run_dir / "report" / "assignments.csv", names, q)
        assigned, unit = q.argmax(-1), "annotators"
        expert_of = dict(zip(ids.tolist(), assigned.tolist()))
        pair_expert = torch.tensor([expert_of.get(e["user"], -1) for e in held_out], dtype=torch.long)
        confidence = q.max(-1).values
    elif details is not None:
        pair_expert = assigned = details["weights"].argmax(-1)
        confidence, unit = details["weights"].max(-1).values, "held-out pairs"
    else:
        return [], []
    accuracy = [None] * k
    for j in range(k):
        rows = pair_expert == j if h is not None else torch.zeros(0, dtype=torch.bool)
        if bool(rows.any()):
            accuracy[j] = float(correct[rows, j].mean())
    dpo = run_dir / "dpo" / "report" / "eval.json"
    dpo_accuracy = json.loads(dpo.read_text())["metrics"].get("eval/rewards/accuracies") if dpo.exists() else None
    restarts = run_dir / RESTARTS_FILE
    restart_agreement = json.loads(restarts.read_text())["agreement"] if restarts.exists() else None
    evidence = Evidence(assigned, confidence, k, unit, metrics.get("eval/mixture_nll"),
                        metrics.get("eval/rewards/accuracies"), dpo_accuracy,
                        restart_agreement=restart_agreement,
                        chance_nll=metrics.get("eval/chance_nll", math.log(2)))  # fmt: skip
    if posteriors is not None and h is not None and h.dim() == 2:  # calibration: pairs (rankings not yet)
        users = torch.tensor([e["user"] for e in held_out], dtype=torch.long)
        start = build_start(run.config, run.data)  # what training began from (None: it did not)
        clusters = None if start is None else torch.tensor([start.clusters[("user", u)] for u in ids.tolist()])
        agreement = None if clusters is None else adjusted_rand_index(clusters, assigned)
        evidence = replace(evidence, calibration=calibration(q, ids, h, users, run.config.em.beta),
                           start_agreement=agreement)  # fmt: skip
    return found_lines(evidence, accuracy)


def recovered_types(run, posteriors=None) -> tuple[list, list[int]] | None:
    """(true type, recovered expert) per annotator (user scope) or per held-out pair; None without a group.
    ``posteriors``: the training annotators' ``user_posteriors``, when the caller has them already."""
    if run.config.em.scope == "user":
        ids, q = posteriors if posteriors is not None else user_posteriors(run, run.data.train)
        group = {e["user"]: e["group"] for e in run.data.train}
        truth, found = [group[u] for u in ids.tolist()], q.argmax(-1).tolist()
    elif run.data.eval:
        _, details = evaluate(run, run.data.train, run.data.eval)
        truth, found = [e["group"] for e in run.data.eval], details["weights"].argmax(-1).tolist()
    else:
        return None
    return (truth, found) if truth and all(t is not None for t in truth) else None


def _types_section(run, out: Path, posteriors) -> list[str]:
    pairs = recovered_types(run, posteriors)
    if pairs is None:
        return []
    truth, found = pairs
    types, k = sorted(set(truth)), run.config.experts.num_experts
    counts = [[sum(t == kind and f == j for t, f in zip(truth, found)) for j in range(k)] for kind in types]
    codes = torch.tensor([types.index(t) for t in truth])
    ari = adjusted_rand_index(codes, torch.tensor(found))
    unit = "annotators" if run.config.em.scope == "user" else "held-out pairs"
    lines = ["## Recovered vs true types", "", f"Adjusted Rand index **{ari:.3f}** over {len(truth)} {unit}.", ""]
    lines += ["| true type | " + " | ".join(f"expert {j}" for j in range(k)) + " |", "|---" * (k + 1) + "|"]
    lines += [f"| {kind} | " + " | ".join(str(c) for c in row) + " |" for kind, row in zip(types, counts)]
    (out / "types.json").write_text(json.dumps({"ari": ari, "types": types, "counts": counts}))
    _heatmap(out / "types.png", counts, types, k, f"recovered types (ARI {ari:.2f})")
    lines += ["", "![confusion matrix](types.png)"]
    return lines + [""]


def _rewards_section(session, rewards: dict, n: int, run_dir: Path, out: Path, posteriors) -> list[str]:
    config = session.config
    if config.data.source == "reviews":
        prompts = held_out_prompts(n, config.report.seed)
    else:
        prompts = list(dict.fromkeys(e["prompt_text"] for e in session.run.data.eval))[:n]
    if not prompts:
        return []
    dpo_dir = run_dir / "dpo"
    dpo = RunSession(dpo_dir) if (dpo_dir / GATE_FILE).exists() else None
    print(f"moedpo report: sampling {len(prompts)} held-out prompts per policy", file=sys.stderr, flush=True)
    table = reward_table(session, rewards, prompts, dpo, config.report.max_new_tokens, config.report.seed, posteriors)
    table["checks"] = checks(table)
    (out / "rewards.json").write_text(json.dumps(table, indent=1))
    names = list(rewards)
    lines = ["## Rewards of sampled completions (mean ± SE)", "",
             f"{len(prompts)} held-out prompts, one completion each per policy (temperature 1, seed "
             f"{config.report.seed}, {config.report.max_new_tokens} new tokens at most). *mixture*: an expert drawn "
             "from the routing weights below, prompt by prompt; *sparse*: their top expert (`moedpo.eval.rewards`). "
             "Routing: " + "; ".join(f"{r}: {how}" for r, how in table["routing"].items()) + ".", "",
             "| policy | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]  # fmt: skip
    for policy, cells in table["rows"].items():
        lines.append(
            f"| {policy} | " + " | ".join(f"{cells[r]['mean']:.3f} ± {cells[r]['se']:.3f}" for r in names) + " |"
        )
    c = table["checks"]
    lines += ["", f"Best expert per reward: {c['best_expert']} (each a different expert: "
              f"{c['experts_best_on_different_rewards']}; ahead of the runner-up by more than 2 SE: "
              f"{c['best_by_2se']})."]  # fmt: skip
    if "mixture_beats_dpo" in c:
        lines.append(
            f"The mixture beats DPO by more than 2 SE (of the difference) on: {c['mixture_beats_dpo'] or 'none'}."
        )
    else:
        lines.append("No DPO baseline (train.dpo_baseline=true trains one in RUN/dpo).")
    _bars(out / "rewards.png", table["rows"], names)
    lines += ["", "![rewards](rewards.png)"]
    lines += ["", "First samples:", ""] + [f"- {p}: `{t[0].strip()[:160]}`" for p, t in table["samples"].items()]
    return lines + [""]


def _heatmap(path: Path, counts, types, k, title) -> None:
    fig = Figure(figsize=(1.6 + 1.1 * k, 1.2 + 0.6 * len(types)))
    ax = fig.subplots()
    ax.imshow(counts, cmap="Blues")
    for i, row in enumerate(counts):
        for j, c in enumerate(row):
            ax.text(j, i, str(c), ha="center", va="center", color="black" if c < max(map(max, counts)) / 2 else "w")
    ax.set_xticks(range(k), [f"expert {j}" for j in range(k)])
    ax.set_yticks(range(len(types)), types)
    ax.set_xlabel("recovered (posterior argmax)")
    ax.set_ylabel("true type")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _bars(path: Path, rows: dict, names: list[str]) -> None:
    fig = Figure(figsize=(4.2 * len(names), 3.6))
    axes = fig.subplots(1, len(names), squeeze=False)
    policies = list(rows)
    colours = matplotlib.colormaps["tab10"](np.arange(len(policies)))
    for ax, r in zip(axes[0], names):
        means = [rows[p][r]["mean"] for p in policies]
        ax.bar(range(len(policies)), means, yerr=[2 * rows[p][r]["se"] for p in policies], color=colours, capsize=3)
        ax.set_xticks(range(len(policies)), policies, rotation=40, ha="right", fontsize=8)
        ax.set_title(f"{r} (mean, bars: ±2 SE)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
